"""How well does each (head method x selection method) pair concentrate the target task?

Builds the built-in mixed task pool (`p2d.data.builtin.build_task_pool`), scores heads on the probe
set, selects the top ``--data-ratio`` of the pool, and reports for every pair:

- precision: fraction of the selected rows whose task is the target (random selection ~ target share);
- auroc: how well the scores rank target rows above the others (0.5 = chance);
- times, and (``--mode features``) cost as a ratio to one plain no-grad forward over the pool.

Two modes:

``--mode runs`` (default): real `score_heads` / `select_data` runs for every listed pair. Extra head
variants reuse a gradient run: ``gradient:ratio`` (old name of the log-ratio contrast, by `recontrast`),
``gradient:none`` (no contrast) and ``all`` (every head).

``--mode features``: `p2d.method.features` passes over the pool (`head_norms`: every head's activation
statistic for all answer-position settings from one forward; `head_features`: also every head's gate
gradient, for the settings that get alignment) and the probe; the gradient heads come from one real
`score_heads` run per setting (``gradient``; the ``layer`` and ``logratio`` contrasts by `recontrast`);
the activation, activation_length_z, alignment and prefilter_alignment scores of every head set
(gradient variants, ``--proxy-methods`` run for real, ``--random-draws`` random head sets) are then
computed from the features without rerunning the model (they equal `select_data`'s scores to float
rounding; tests/test_selection.py). Also reports the Spearman
correlation of the activation score with the number of scored answer positions. ``--cost`` times one
plain forward over the pool and real activation / alignment / prefilter_alignment runs.

Examples (2-core CPU)::

    HF_HUB_OFFLINE=1 python bench/select_quality.py --pool-size 600 --json bench/select_quality.json
    HF_HUB_OFFLINE=1 python bench/select_quality.py --mode features --target capitals --pool-size 300 \
        --probe-size 50 --max-length 128 --batch-size 16 --proxy-methods taylor,lofit --cost --json out.json

Prints a table, then the whole result as JSON (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from p2d.method.features import (activation_from_features, alignment_from_features, head_features,  # noqa: E402
                               head_norms, plain_forward_seconds)
from p2d.method.heads import HEAD_METHODS, HeadScores, recontrast, score_heads, select_top  # noqa: E402
from p2d.bench.cells import auroc  # noqa: E402
from p2d.explore import spearman as rank_correlation  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.method.scoring import top_samples  # noqa: E402
from p2d.method.selection_variants import rank_below_kept  # noqa: E402
from p2d.method.selection import select_data  # noqa: E402


def variant(base: HeadScores, name: str, ratio: float, geometry) -> HeadScores:
    """Head variants computed from a gradient run's stored importances (no extra model pass)."""
    if name == "all":
        sel = [[layer, head] for layer in range(geometry.n_layers) for head in range(geometry.n_q_heads)]
        return HeadScores("all", 1.0, base.scores, sel, 0.0, base.model, {})
    if name == "gradient:ratio":
        return dataclasses.replace(recontrast(base, "logratio", ratio), method=name, extra={})
    if name != "gradient:none":
        raise ValueError(name)
    probe = torch.tensor(base.extra["probe_importance"], dtype=torch.float64)
    scores = (probe / probe.sum()).tolist()  # the normalised probe importance: score_heads without a contrast
    return HeadScores(name, ratio, scores, select_top(scores, ratio), base.time_s, base.model, {})


def spearman(x: list[float], y: list[float]) -> float | None:
    """Rank correlation (`p2d.explore.spearman`) over the pairs where both are finite."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None
    return rank_correlation([a for a, _ in pairs], [b for _, b in pairs])


def _metrics(scores, is_target, ratio, tasks=None) -> dict:
    sel = top_samples(scores, ratio)
    a = auroc(scores, is_target)
    out = {"precision": round(sum(is_target[i] for i in sel) / max(len(sel), 1), 4),
           "auroc": None if a is None else round(a, 4)}
    if tasks is not None:
        counts: dict[str, int] = {}
        for i in sel:
            counts[tasks[i]] = counts.get(tasks[i], 0) + 1
        out["top_tasks"] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:3])
    return out


def main_features(args, lm, pool, probe, is_target, log) -> dict:
    """--mode features: see the module docstring."""
    t0 = time.perf_counter()
    positions_list = [p.strip() for p in args.positions.split(",") if p.strip()]
    align_positions = ([p.strip() for p in (args.alignment_positions or args.positions).split(",") if p.strip()]
                       if args.alignment else [])
    feats, pfeats, timing = {}, {}, {}
    norm_positions = [p for p in positions_list if p not in align_positions]
    if norm_positions:  # norms of these settings from one no-grad forward
        t = time.perf_counter()
        feats = head_norms(lm, pool, args.batch_size, args.max_length, norm_positions)
        timing["pool_norms_s"] = round(time.perf_counter() - t, 1)
        print(f"pool norms {norm_positions}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    for pos in align_positions:  # norms and gate gradients of the whole pool and the probe
        t = time.perf_counter()
        feats[pos] = head_features(lm, pool, args.batch_size, args.max_length, positions=pos, progress=log)
        pfeats[pos] = head_features(lm, probe, args.batch_size, args.max_length, positions=pos, progress=log)
        timing[f"features_{pos}_s"] = round(time.perf_counter() - t, 1)
        print(f"features {pos}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)

    head_sets: dict[tuple[str, str], list[list[int]]] = {}
    for pos in positions_list:  # the gradient heads: one real run, its other contrasts recomputed from its maps
        hs = score_heads(lm, probe, "gradient", ratio=args.head_ratio, pool=pool, seed=args.seed,
                         batch_size=args.batch_size, max_length=args.max_length, positions=pos, progress=log)
        timing[f"heads_gradient_{pos}_s"] = hs.time_s
        for kind, name in (("difference", "gradient"), ("layer", "gradient_layer"), ("logratio", "gradient_logratio")):
            head_sets[(name, pos)] = recontrast(hs, kind).selected
    proxy_times = {}
    for m in [m.strip() for m in args.proxy_methods.split(",") if m.strip()]:
        for pos in [p.strip() for p in args.proxy_positions.split(",") if p.strip()]:
            hs = score_heads(lm, probe, m, ratio=args.head_ratio, pool=pool, seed=args.seed, batch_size=8,
                             max_length=args.max_length, positions=pos, progress=log)
            head_sets[(m, pos)] = hs.selected
            proxy_times[f"{m}/{pos}"] = hs.time_s
            print(f"heads {m}/{pos}: {hs.time_s:.0f}s", file=sys.stderr, flush=True)
    for r in range(args.random_draws):
        gen = torch.Generator().manual_seed(1000 + r)
        scores = torch.rand(lm.geometry.n_layers, lm.geometry.n_q_heads, generator=gen, dtype=torch.float64)
        head_sets[(f"random{r}", "-")] = select_top(scores, args.head_ratio)

    rows = []
    factor = args.prefilter_factor
    for (hname, hpos), heads in head_sets.items():
        for pos in positions_list:
            f = feats[pos]
            act = activation_from_features(f, heads)
            lengths = f.lengths.tolist()
            row_scores = {"activation": act, "activation_length_z": activation_from_features(f, heads, debias="length")}
            if pos in align_positions:
                ali = alignment_from_features(f, pfeats[pos], heads)
                pre = list(ali)
                rank_below_kept(act, set(top_samples(act, min(1.0, factor * args.data_ratio))), pre)
                row_scores["alignment"] = ali
                row_scores["prefilter_alignment"] = pre
            for sm, sc in row_scores.items():
                row = {"heads": hname, "head_positions": hpos, "select": sm, "positions": pos,
                       **_metrics(sc, is_target, args.data_ratio, [s_.task for s_ in pool])}
                if sm == "activation":
                    rho = spearman(act, [float(x) for x in lengths])
                    row["spearman_length"] = None if rho is None else round(rho, 3)
                rows.append(row)
    # random-head summary: mean and range over draws
    summary = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = ("random" if r["heads"].startswith("random") else r["heads"], r["head_positions"], r["select"], r["positions"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        prec = [r["precision"] for r in rs]
        au = [r["auroc"] for r in rs if r["auroc"] is not None]
        item = {"heads": key[0], "head_positions": key[1], "select": key[2], "positions": key[3], "n": len(rs),
                "precision": round(sum(prec) / len(prec), 4), "precision_min": min(prec), "precision_max": max(prec),
                "auroc": round(sum(au) / len(au), 4) if au else None}
        rho = [r["spearman_length"] for r in rs if r.get("spearman_length") is not None]
        if rho:
            item["spearman_length"] = round(sum(rho) / len(rho), 3)
        summary.append(item)

    cost = {}
    if args.cost:  # min over --cost-repeats rounds, each round timing everything once (robust to load spikes)
        heads = head_sets[("gradient", positions_list[-1])]
        pos = positions_list[-1]
        times: dict[str, list[float]] = {}
        precision = {}
        head_methods = [m.strip() for m in args.cost_head_methods.split(",") if m.strip()]
        for rep in range(args.cost_repeats):
            times.setdefault("plain_forward", []).append(plain_forward_seconds(lm, pool, args.batch_size, args.max_length))
            for sm in ("activation", "alignment", "prefilter_alignment"):
                sel = select_data(lm, heads, pool, sm, ratio=args.data_ratio, probe=probe, batch_size=args.batch_size,
                                  max_length=args.max_length, positions=pos, prefilter_factor=factor)
                times.setdefault(sm, []).append(sel.time_s)
                precision[sm] = _metrics(sel.scores, is_target, args.data_ratio)["precision"]
            for m in head_methods:
                hs = score_heads(lm, probe, m, ratio=args.head_ratio, pool=pool, seed=args.seed, batch_size=8,
                                 max_length=args.max_length, positions=pos)
                times.setdefault(f"heads:{m}", []).append(hs.time_s)
            print(f"cost round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
                  file=sys.stderr, flush=True)
        plain = min(times["plain_forward"])
        cost = {"plain_forward_s": round(plain, 2), "repeats": args.cost_repeats, "all_times_s": times,
                "heads": heads, "positions": pos}
        for k, v in times.items():
            if k != "plain_forward":
                cost[k] = {"time_s": round(min(v), 2), "ratio_to_plain_forward": round(min(v) / plain, 2)}
                if k in precision:
                    cost[k]["precision"] = precision[k]
    return {"rows": rows, "summary": summary, "head_sets": {f"{k[0]}/{k[1]}": v for k, v in head_sets.items()},
            "timing": timing | {"proxy_heads_s": proxy_times, "features_total_s": round(time.perf_counter() - t0, 1)},
            "cost": cost}


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
                    help="comma list of p2d.method.heads.HEAD_METHODS and the variants gradient:ratio,gradient:none,all")
    ap.add_argument("--select-methods", default="alignment,ablation,activation")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--proxy-steps", type=int, default=20)
    ap.add_argument("--proxy-lr", type=float, default=None, help="default: p2d.method.heads.PROXY_LR[method]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mode", choices=("runs", "features"), default="runs")
    ap.add_argument("--positions", default="all,content", help="features mode: answer-position settings")
    ap.add_argument("--alignment", action=argparse.BooleanOptionalAction, default=True,
                    help="features mode: pool gate gradients for alignment / prefilter_alignment (costly)")
    ap.add_argument("--alignment-positions", default="",
                    help="features mode: settings that get whole-pool gate gradients (default: all of --positions)")
    ap.add_argument("--proxy-methods", default="", help="features mode: head methods run for real, e.g. taylor,lofit")
    ap.add_argument("--proxy-positions", default="content", help="features mode: positions for --proxy-methods")
    ap.add_argument("--random-draws", type=int, default=10)
    ap.add_argument("--prefilter-factor", type=float, default=3.0)
    ap.add_argument("--cost", action="store_true", help="features mode: time plain forward and real selections")
    ap.add_argument("--cost-repeats", type=int, default=3, help="--cost: rounds (the minimum time is kept)")
    ap.add_argument("--cost-head-methods", default="gradient,taylor,lofit,shift_sgd,shift",
                    help="features mode with --cost: head methods timed for real (on the probe and pool sample)")
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

    def log(done, total, desc):
        if done == total or done % 10 == 0:
            print(f"  {desc} [{done}/{total}] {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    if args.mode == "features":
        res = main_features(args, lm, pool, probe, is_target, log)
        result = {"args": vars(args), "model": lm.spec, "pool_task_counts": tp.counts(),
                  "target_share": round(sum(is_target) / len(pool), 4), **res,
                  "total_s": round(time.perf_counter() - t0, 1)}
        print(f"\n{'heads':>18} {'hpos':>7} {'select':<20} {'pos':<8} {'prec':>6} {'min':>5} {'max':>5} {'auroc':>6} {'rho_len':>7}")
        for r in res["summary"]:
            print(f"{r['heads']:>18} {r['head_positions']:>7} {r['select']:<20} {r['positions']:<8} {r['precision']:6.3f} "
                  f"{r['precision_min']:5.2f} {r['precision_max']:5.2f} {str(r['auroc']):>6} {str(r.get('spearman_length', '')):>7}")
        if res["cost"]:
            print(json.dumps(res["cost"], indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result

    methods = [m.strip() for m in args.head_methods.split(",") if m.strip()]
    sel_methods = [m.strip() for m in args.select_methods.split(",") if m.strip()]
    heads: dict[str, HeadScores] = {}

    for m in methods:
        if m in HEAD_METHODS:
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
