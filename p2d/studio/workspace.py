"""Per-session workspaces: each browser session works in its own run folder with its own `Run`.

A workspace is found by the Gradio session hash of the request. The page also keeps the workspace
id in the browser's localStorage (``gr.BrowserState``); after a reload the new session hash is
mapped back to the same workspace, so charts and a running job come back.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# files a stage writes into the run folder; re-running a stage removes what the later stages wrote
STAGE_FILES = {
    "heads": ["heads.json"],
    "select": ["selected.jsonl", "scores.jsonl", "selection.json"],
    "train": ["train_log.jsonl", "adapter", "adapter.zip", "full_ft.json", "eval_after.json", "metrics.json"],
}


@dataclass
class Workspace:
    id: str
    root: Path
    run: Any = None                      # p2d.pipeline.Run once loaded
    loaded: dict | None = None           # the model/data settings the run was loaded with
    run_index: int = 0
    job_id: str | None = None            # latest job of this workspace
    created: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.time)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # derived values (random pick counts, ...)

    @property
    def upload_dir(self) -> Path:
        return self.root / "uploads"

    @property
    def out(self) -> Path | None:
        return Path(self.run.out) if self.run is not None else None

    def new_run_dir(self) -> Path:
        self.run_index += 1
        path = self.root / f"run-{self.run_index:03d}"
        while path.exists():
            self.run_index += 1
            path = self.root / f"run-{self.run_index:03d}"
        return path

    def clear_from(self, stage: str) -> None:
        """Forget the results of ``stage`` and every later stage (objects and files)."""
        order = ["heads", "select", "train"]
        run = self.run
        if run is None:
            return
        for st in order[order.index(stage):]:
            if st == "heads":
                run.heads = None
                run.times.pop("heads", None)
            elif st == "select":
                run.selection = None
                run.times.pop("select", None)
                self.cache.pop("random_counts", None)
            else:
                run.train_result = None
                run.eval_after = None
                run.full = None
                run.times.pop("train", None)
            for name in STAGE_FILES[st]:
                p = Path(run.out) / name
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.exists():
                    p.unlink()


class Registry:
    """Workspaces by id, and which workspace each Gradio session uses."""

    def __init__(self, root: Path, max_workspaces: int = 64):
        self.root = Path(root)
        self.max = max_workspaces
        self._by_id: dict[str, Workspace] = {}
        self._by_session: dict[str, str] = {}
        self._lock = threading.Lock()

    def create(self) -> Workspace:
        with self._lock:
            ws_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
            ws = Workspace(ws_id, self.root / ws_id)
            self._by_id[ws_id] = ws
            self._evict()
            return ws

    def _evict(self) -> None:
        if len(self._by_id) <= self.max:
            return
        idle = sorted(self._by_id.values(), key=lambda w: w.touched)
        for ws in idle[:len(self._by_id) - self.max]:
            self._by_id.pop(ws.id, None)
            for s, w in list(self._by_session.items()):
                if w == ws.id:
                    self._by_session.pop(s, None)

    def get(self, ws_id: str | None) -> Workspace | None:
        return self._by_id.get(ws_id) if ws_id else None

    def for_session(self, session: str | None) -> Workspace:
        """The session's workspace (created on first use)."""
        key = session or "anonymous"
        with self._lock:
            ws_id = self._by_session.get(key)
            ws = self._by_id.get(ws_id) if ws_id else None
        if ws is None:
            ws = self.create()
            with self._lock:
                self._by_session[key] = ws.id
        ws.touched = time.time()
        return ws

    def attach(self, session: str | None, ws_id: str | None) -> Workspace | None:
        """Point ``session`` at an existing workspace (page reload); None if it is unknown."""
        ws = self.get(ws_id)
        if ws is not None:
            with self._lock:
                self._by_session[session or "anonymous"] = ws.id
            ws.touched = time.time()
        return ws

    def all(self) -> list[Workspace]:
        return list(self._by_id.values())
