"""What the answer readers select on the benchmark's splits: the share of target-skill rows (and of twins
or decoys) among the selected 10%, next to prompt TF-IDF; no model, so it runs in seconds.

A thin script over the library: every split's pool, probe and labels are the benchmark's own
(`p2d.bench.config.BenchConfig.run_config` at the reporting seeds, `p2d.pipeline.load_run_data`), the
selections are `p2d.method.selection.select_data` with the registry's methods, the figures
`p2d.bench.stats.target_stats`. P2D's activation needs the model and its heads: its figures come
from the benchmark's units (``python -m p2d bench --parts precision``), not from here.

    python bench/answer_readers.py --json docs/data/answer_readers.json --md docs/data/answer_readers.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2d.bench.config import BenchConfig  # noqa: E402
from p2d.bench.stats import target_stats  # noqa: E402
from p2d.files import write_json, write_text  # noqa: E402
from p2d.method.selection import select_data  # noqa: E402
from p2d.pipeline import load_run_data  # noqa: E402

SPLITS = ("builtin-hard:addition", "builtin-hard:alphabetical", "builtin-hard:dates", "builtin-hard:past_tense",
          "builtin:addition", "builtin:dates", "builtin-align:json", "builtin-align:signoff", "builtin-align:refusal",
          "builtin-align:ordinal")
METHODS = ("answer_shape", "answer_tfidf", "shape_tfidf", "tfidf")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--seeds", type=int, default=3, help="reporting seeds 0..n-1 (the benchmark's)")
    ap.add_argument("--pool-size", type=int, default=None, help="default: the benchmark's")
    ap.add_argument("--json")
    ap.add_argument("--md")
    a = ap.parse_args(argv)
    cfg = BenchConfig(**({"pool_size": a.pool_size} if a.pool_size else {}))
    out = {"pool_size": cfg.pool_size, "probe_size": cfg.probe_size, "data_ratio": cfg.data_ratio,
           "seeds": list(range(a.seeds)), "splits": {}}
    for split in a.splits.split(","):
        per = {m: [] for m in METHODS}
        for seed in range(a.seeds):
            rc = cfg.run_config(split, seed)
            data = load_run_data(rc)
            pool, probe = data.pool.samples, data.probe.samples
            labels = [s.task for s in pool]
            for m in METHODS:
                sel = select_data(None, None, pool, m, ratio=cfg.data_ratio, probe=probe)
                st = target_stats(sel.selected, sel.scores, labels, rc.target)
                decoys = sum(c for t, c in st["task_counts"].items() if t.startswith(rc.target + "_")) / sel.n_selected
                per[m].append({"precision": st["precision"], "twins": decoys, "pool_share": st["pool_share"],
                               "selected_shapes": sel.extra.get("selected_shapes"),
                               "probe_shapes": sel.extra.get("probe_shapes")})
        out["splits"][split] = {m: {"precision_mean": statistics.fmean(r["precision"] for r in rs),
                                    "precision_per_seed": [r["precision"] for r in rs],
                                    "twins_mean": statistics.fmean(r["twins"] or 0.0 for r in rs),
                                    "pool_share": rs[0]["pool_share"], "probe_shapes": rs[0]["probe_shapes"],
                                    "selected_shapes_seed0": rs[0]["selected_shapes"]}
                                for m, rs in per.items()}
        print(split, {m: round(v["precision_mean"], 3) for m, v in out["splits"][split].items()}, flush=True)
    if a.json:
        write_json(Path(a.json), out)
    if a.md:
        write_text(Path(a.md), markdown(out))
    return out


def markdown(out: dict) -> str:
    lines = [f"Target rows among the selected {out['data_ratio']:.0%} (mean over seeds {out['seeds']}; pool "
             f"{out['pool_size']} rows, probe {out['probe_size']}; in brackets: twins and decoys, the labels `<target>_*`):", "",
             "| split | pool share | ceiling | " + " | ".join(METHODS) + " | probe answers' shapes |",
             "|---|---|---|" + "---|" * len(METHODS) + "---|"]
    for split, v in out["splits"].items():
        cells = [f"{100 * v[m]['precision_mean']:.1f} ({100 * v[m]['twins_mean']:.0f})" for m in METHODS]
        shapes = ", ".join(f"{k} {100 * x:.0f}%" for k, x in (v["answer_shape"]["probe_shapes"] or {}).items())
        share = v[METHODS[0]]["pool_share"]
        ceiling = min(1.0, share / out["data_ratio"])  # every target row selected
        lines.append(f"| `{split}` | {100 * share:.1f} | {100 * ceiling:.0f} | " + " | ".join(cells) + f" | {shapes} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
