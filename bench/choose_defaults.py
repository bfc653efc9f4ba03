"""Choose P2D's default heads + selection from `bench/select_quality.py` results, by a stated rule.

Reads every ``<target>.json`` that ``bench/select_study.sh <seed>`` wrote into one folder and prints,
per configuration (head method, head positions, selection method, selection positions), the target
precision of the top 10% on each target, the mean and the worst target. The rule: the highest mean
precision over the targets; ties within 0.01 go to the higher worst-target precision. Only
configurations a run can express are listed (one ``positions`` setting serves both stages, so head and
selection positions agree; ``--all`` lists the mixed ones too). Random heads (the mean over their
draws) are listed as the control, never chosen.

    python bench/choose_defaults.py runs/select_study/seed100            # the choice (choice seed)
    python bench/choose_defaults.py runs/select_study/seed0 --only gradient_logratio:all:activation:all
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        d = json.loads(path.read_text())
        if "total_s" in d:  # finished runs only
            out[d["args"]["target"]] = d
    return out


def table(results: dict[str, dict]) -> dict[tuple, dict[str, float]]:
    """{(heads, head_positions, select, positions): {target: precision}}"""
    rows: dict[tuple, dict[str, float]] = {}
    for target, d in results.items():
        for r in d["summary"]:
            key = (r["heads"], r["head_positions"], r["select"], r["positions"])
            rows.setdefault(key, {})[target] = float(r["precision"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--only", default="", help="comma-separated heads:head_positions:select:positions to show")
    p.add_argument("--all", action="store_true", help="also list head and selection positions that differ")
    a = p.parse_args()
    results = load(a.folder)
    if not results:
        raise SystemExit(f"no finished results in {a.folder}")
    targets = sorted(results)
    rows = table(results)
    only = {tuple(x.split(":")) for x in a.only.split(",") if x}
    shown = [(k, v) for k, v in rows.items() if len(v) == len(targets) and (not only or k in only or k[0] == "random")
             and (a.all or k[1] in (k[3], "-"))]
    shown.sort(key=lambda kv: -statistics.mean(kv[1].values()))
    share = {t: results[t]["target_share"] for t in targets}
    print(f"{len(targets)} targets: {', '.join(targets)}; pool {results[targets[0]]['args']['pool_size']}, "
          f"seed {results[targets[0]]['args']['seed']}; chance = target share {statistics.mean(share.values()):.2f}")
    print("| heads (positions) | selection (positions) | " + " | ".join(targets) + " | mean | worst |")
    print("| --- | --- | " + " | ".join("---" for _ in targets) + " | --- | --- |")
    for (h, hp, s, sp), v in shown:
        cells = " | ".join(f"{v[t]:.2f}" for t in targets)
        print(f"| {h} ({hp}) | {s} ({sp}) | {cells} | {statistics.mean(v.values()):.3f} | {min(v.values()):.2f} |")
    candidates = [(k, v) for k, v in shown if k[0] != "random"]
    best_mean = max(statistics.mean(v.values()) for _, v in candidates)
    near = [(k, v) for k, v in candidates if statistics.mean(v.values()) >= best_mean - 0.01]
    choice, v = max(near, key=lambda kv: (min(kv[1].values()), statistics.mean(kv[1].values())))
    print(f"\nrule (highest mean; within 0.01, highest worst target): heads {choice[0]} at {choice[1]} positions, "
          f"selection {choice[2]} at {choice[3]} positions: mean {statistics.mean(v.values()):.3f}, "
          f"worst {min(v.values()):.2f}")


if __name__ == "__main__":
    main()
