"""Small pieces the bench/ scripts share: the Jaccard of two selections, the CPU's name, and the end of a
measuring script (load after, total time, the markdown printed and both files written)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def jaccard(a, b) -> float:
    """|a & b| / |a | b| of two collections (1.0 when both are empty)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def finish(res: dict, t0: float, markdown, json_path: str | None, md_path: str | None) -> dict:
    """Close a measurement: ``load_after`` and ``total_s`` into ``res``, ``markdown(res)`` printed and written
    to ``md_path``, ``res`` written as JSON to ``json_path`` (either may be None)."""
    res["load_after"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t0
    md = markdown(res)
    print(md)
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1, default=float))
    if md_path:
        Path(md_path).write_text(md)
    return res
