"""How well does each (head method x selection method) pair concentrate the target task?

Builds the built-in mixed task pool (`p2d.data.builtin.build_task_pool`), scores heads with each head
method on the probe set, selects the top ``--data-ratio`` of the pool with each selection method, and
reports for every pair:

- precision: fraction of the selected rows whose task is the target (random selection ~ target share);
- auroc: how well the scores rank target rows above the others (0.5 = chance);
- time of the heads stage and of the selection stage, and selection seconds per 1,000 pool samples.

Extra head variants (free to compute, they reuse the gradient run): ``gradient:ratio`` (log-ratio
contrast of normalised importances instead of the difference), ``gradient:none`` (no contrast, plain
Michel importance) and ``all`` (every head; a reference for the head-space scores).

Run (2-core CPU, ~15 min with the defaults)::

    HF_HUB_OFFLINE=1 python bench/select_quality.py --pool-size 600 --json bench/select_quality.json

Prints one table row per pair, then the whole result as JSON (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from p2d.data.builtin import build_task_pool  # noqa: E402
from p2d.data.loading import load_records  # noqa: E402
from p2d.heads import HeadScores, score_heads, select_top  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.selection import select_data  # noqa: E402


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pairs = [(s, p) for s, p in zip(scores, positive) if s is not None and math.isfinite(s)]
    n_pos = sum(p for _, p in pairs)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return None
    pairs.sort(key=lambda t: t[0])
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg = (i + j) / 2 + 1
        rank_sum += avg * sum(p for _, p in pairs[i:j + 1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def variant(base: HeadScores, name: str, ratio: float, geometry) -> HeadScores:
    """Head variants computed from a gradient run's stored importances (no extra model pass)."""
    if name == "all":
        sel = [[layer, head] for layer in range(geometry.n_layers) for head in range(geometry.n_q_heads)]
        return HeadScores("all", 1.0, base.scores, sel, 0.0, base.model, {})
    probe = torch.tensor(base.extra["probe_importance"], dtype=torch.float64)
    probe = probe / probe.sum()
    if name == "gradient:none":
        scores = probe
    elif name == "gradient:ratio":
        pool = torch.tensor(base.extra["pool_importance"], dtype=torch.float64)
        pool = pool / pool.sum()
        scores = torch.log(probe.clamp_min(1e-12) / pool.clamp_min(1e-12))
    else:
        raise ValueError(name)
    scores = scores.tolist()
    return HeadScores(name, ratio, scores, select_top(scores, ratio), base.time_s, base.model, {})


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--target", default="addition")
    ap.add_argument("--pool-size", type=int, default=600)
    ap.add_argument("--probe-size", type=int, default=100)
    ap.add_argument("--target-share", type=float, default=0.1)
    ap.add_argument("--head-ratio", type=float, default=0.1)
    ap.add_argument("--data-ratio", type=float, default=0.1)
    ap.add_argument("--head-methods", default="shift,gradient,random",
                    help="comma list of shift,gradient,random and the variants gradient:ratio,gradient:none,all")
    ap.add_argument("--select-methods", default="alignment,ablation,activation")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--proxy-steps", type=int, default=20)
    ap.add_argument("--proxy-lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the result here (rewritten after every pair)")
    ap.add_argument("--heads-dir", default=None,
                    help="cache folder for head scores: reuse <dir>/<method>/heads.json when present, else save it")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    lm = load_model(args.model, device="cpu", dtype="fp32")
    tp = build_task_pool(target=args.target, seed=args.seed, pool_size=args.pool_size,
                         target_share=args.target_share, probe_size=args.probe_size, eval_size=0)
    pool = load_records(tp.pool).samples
    probe = load_records(tp.probe).samples
    is_target = [s.task == args.target for s in pool]
    print(f"model {lm.spec}: {lm.geometry.n_layers} x {lm.geometry.n_q_heads} heads; pool {len(pool)} "
          f"({sum(is_target)} {args.target}), probe {len(probe)}; load {time.perf_counter() - t0:.1f}s",
          file=sys.stderr, flush=True)

    methods = [m.strip() for m in args.head_methods.split(",") if m.strip()]
    sel_methods = [m.strip() for m in args.select_methods.split(",") if m.strip()]
    heads: dict[str, HeadScores] = {}
    def log(done, total, desc):
        if done == total or done % 10 == 0:
            print(f"  {desc} [{done}/{total}] {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    for m in methods:
        if m in ("shift", "gradient", "random"):
            cached = Path(args.heads_dir, m.replace(":", "-"), "heads.json") if args.heads_dir else None
            if cached is not None and cached.is_file():
                heads[m] = HeadScores.load(cached)
                print(f"heads {m}: loaded {cached}", file=sys.stderr, flush=True)
                continue
            heads[m] = score_heads(lm, probe, m, ratio=args.head_ratio, pool=pool, seed=args.seed,
                                   batch_size=args.batch_size, max_length=args.max_length,
                                   proxy_steps=args.proxy_steps, proxy_lr=args.proxy_lr, progress=log)
            if cached is not None:
                heads[m].save(cached.parent)
            print(f"heads {m}: {heads[m].time_s:.1f}s, layers {sorted({l for l, _ in heads[m].selected})}",
                  file=sys.stderr, flush=True)
    for m in methods:
        if m in heads:
            continue
        if m.startswith("gradient:") and "gradient" not in heads:
            heads["gradient"] = score_heads(lm, probe, "gradient", ratio=args.head_ratio, pool=pool, seed=args.seed,
                                            batch_size=args.batch_size, max_length=args.max_length)
        base = heads.get("gradient") or HeadScores("all", 1.0, [], [], 0.0, lm.spec, {})
        heads[m] = variant(base, m, args.head_ratio, lm.geometry)

    rows = []
    for m in methods:
        hs = heads[m]
        for sm in sel_methods:
            sel = select_data(lm, hs, pool, sm, ratio=args.data_ratio, probe=probe, batch_size=args.batch_size,
                              max_length=args.max_length, seed=args.seed, progress=log)
            hits = sum(is_target[i] for i in sel.selected)
            row = {"heads": m, "select": sm, "precision": round(hits / max(sel.n_selected, 1), 4),
                   "auroc": None if (a := auroc(sel.scores, is_target)) is None else round(a, 4),
                   "n_selected": sel.n_selected, "pool_tokens": sel.extra.get("tokens"), "heads_s": hs.time_s, "select_s": sel.time_s,
                   "select_s_per_1000": round(1000 * sel.time_s / len(pool), 1),
                   "selected_task_counts": sel.task_counts(pool)}
            rows.append(row)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "partial": True}, indent=1))
            print(f"{m:>15} x {sm:<10} precision {row['precision']:.3f} auroc {row['auroc']} "
                  f"heads {hs.time_s:6.1f}s select {sel.time_s:6.1f}s ({row['select_s_per_1000']} s/1000)",
                  file=sys.stderr, flush=True)

    rnd = select_data(lm, heads[methods[0]], pool, "random", ratio=args.data_ratio, seed=args.seed)
    result = {
        "args": vars(args),
        "model": lm.spec,
        "geometry": lm.geometry.to_dict(),
        "pool_task_counts": tp.counts(),
        "random_selection_precision": round(sum(is_target[i] for i in rnd.selected) / rnd.n_selected, 4),
        "heads": {m: {"time_s": h.time_s, "selected": h.selected,
                      "extra": {k: v for k, v in h.extra.items() if not isinstance(v, list)}}
                  for m, h in heads.items()},
        "rows": rows,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    print(f"\n{'heads':>15} {'select':<10} {'prec':>6} {'auroc':>6} {'heads_s':>8} {'select_s':>9} {'s/1000':>7}")
    for r in rows:
        print(f"{r['heads']:>15} {r['select']:<10} {r['precision']:6.3f} {str(r['auroc']):>6} {r['heads_s']:8.1f} "
              f"{r['select_s']:9.1f} {r['select_s_per_1000']:7.1f}")
    print(f"random selection precision: {result['random_selection_precision']}")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return result


if __name__ == "__main__":
    main()
