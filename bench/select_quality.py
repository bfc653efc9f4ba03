"""How well does each (head set x selection score) pair concentrate the target task of the built-in pool?

A thin script over the library (`python -m p2d bench --parts precision` is the benchmark's own study,
on its splits and seeds): builds the built-in mixed task pool (`p2d.data.builtin.build_task_pool`),
scores heads on the probe set, and reads every head set's selection scores off one all-heads feature
pass over the pool (`p2d.method.features`: equal to `select_data`'s scores to float rounding). For
every pair it reports the precision (share of target rows among the top ``--data-ratio``; random
selection ~ the target share), the AUROC of the scores for target rows (`p2d.bench.stats`) and, for
activation, the Spearman correlation with the number of scored answer positions.

Head sets: ``gradient`` scored once per answer-position setting (its ``gradient_layer`` and
``gradient_logratio`` contrasts read off the same maps, `p2d.method.heads.from_maps`), the
``--proxy-methods`` scored for real, and ``--random-draws`` random sets (`p2d.cells.random_heads`,
draws 0.. of ``--seed``). Scores: activation and activation_length_z at every ``--positions``
setting; alignment and prefilter_alignment where the pool's gate gradients are computed
(``--alignment``, ``--alignment-positions``). ``--cost`` times one plain forward over the pool
(`p2d.bench.components.plain_forward_seconds`) and real selections and head scorings, in rounds.

Example (2-core CPU; ``bench/select_study.sh`` runs it for every target)::

    python bench/select_quality.py --target capitals --pool-size 300 --probe-size 50 --max-length 128 \
        --batch-size 16 --proxy-methods taylor,lofit --cost --json out.json

Prints a table, and writes the whole result as JSON to ``--json`` (`bench/choose_defaults.py` reads it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from p2d.bench.components import plain_forward_seconds  # noqa: E402
from p2d.bench.stats import target_stats  # noqa: E402
from p2d.cells import random_heads  # noqa: E402
from p2d.data.builtin import build_task_pool  # noqa: E402
from p2d.data.loading import load_records  # noqa: E402
from p2d.explore import spearman  # noqa: E402
from p2d.method.features import activation_from_features, alignment_from_features, head_features, head_norms  # noqa: E402
from p2d.method.heads import from_maps, score_heads  # noqa: E402
from p2d.method.scoring import top_samples  # noqa: E402
from p2d.method.selection import select_data  # noqa: E402
from p2d.method.selection_variants import rank_below_kept  # noqa: E402
from p2d.models import load_model  # noqa: E402


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _row_metrics(scores: list[float], labels: list[str], target: str, ratio: float) -> dict:
    s = target_stats(top_samples(scores, ratio), scores, labels, target)
    top = sorted(s["task_counts"].items(), key=lambda kv: -kv[1])[:3]
    return {"precision": round(s["precision"], 4), "auroc": None if s["auroc"] is None else round(s["auroc"], 4),
            "top_tasks": dict(top)}


def _length_correlation(scores: list[float], lengths: list[int]) -> float | None:
    pairs = [(a, float(b)) for a, b in zip(scores, lengths) if math.isfinite(a)]
    rho = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else None
    return None if rho is None else round(rho, 3)


def study(args, lm, pool, probe, log) -> dict:
    """Every head set x score x positions setting, from the feature passes (see the module docstring)."""
    t0 = time.perf_counter()
    labels, target = [s.task for s in pool], args.target
    positions = _list(args.positions)
    aligned = _list(args.alignment_positions or args.positions) if args.alignment else []
    feats, pfeats, timing = {}, {}, {}
    plain = [p for p in positions if p not in aligned]
    if plain:  # activation statistics of these settings from one no-grad forward
        t = time.perf_counter()
        feats = head_norms(lm, pool, args.batch_size, args.max_length, plain)
        timing["pool_norms_s"] = round(time.perf_counter() - t, 1)
    for pos in aligned:  # activation statistics and gate gradients of pool and probe
        t = time.perf_counter()
        feats[pos] = head_features(lm, pool, args.batch_size, args.max_length, positions=pos, progress=log)
        pfeats[pos] = head_features(lm, probe, args.batch_size, args.max_length, positions=pos, progress=log)
        timing[f"features_{pos}_s"] = round(time.perf_counter() - t, 1)
    common = dict(ratio=args.head_ratio, pool=pool, seed=args.seed, max_length=args.max_length)
    head_sets: dict[tuple[str, str], list[list[int]]] = {}
    for pos in positions:
        hs = score_heads(lm, probe, "gradient", batch_size=args.batch_size, positions=pos, progress=log, **common)
        timing[f"heads_gradient_{pos}_s"] = hs.time_s
        for name in ("gradient", "gradient_layer", "gradient_logratio"):
            head_sets[(name, pos)] = from_maps(hs, name).selected
    proxy_times = {}
    for m in _list(args.proxy_methods):
        for pos in _list(args.proxy_positions):
            hs = score_heads(lm, probe, m, batch_size=8, positions=pos, progress=log, **common)
            head_sets[(m, pos)], proxy_times[f"{m}/{pos}"] = hs.selected, hs.time_s
    for d in range(args.random_draws):
        head_sets[(f"random{d}", "-")] = random_heads(lm, args.head_ratio, args.seed, d).selected

    rows = []
    for (hname, hpos), heads in head_sets.items():
        for pos in positions:
            f = feats[pos]
            act = activation_from_features(f, heads)
            scores = {"activation": act, "activation_length_z": activation_from_features(f, heads, debias="length")}
            if pos in aligned:
                scores["alignment"] = alignment_from_features(f, pfeats[pos], heads)
                keep = set(top_samples(act, min(1.0, args.prefilter_factor * args.data_ratio)))
                scores["prefilter_alignment"] = list(scores["alignment"])
                rank_below_kept(act, keep, scores["prefilter_alignment"])
            for sm, sc in scores.items():
                row = {"heads": hname, "head_positions": hpos, "select": sm, "positions": pos,
                       **_row_metrics(sc, labels, target, args.data_ratio)}
                if sm == "activation":
                    row["spearman_length"] = _length_correlation(act, f.lengths.tolist())
                rows.append(row)
    groups: dict[tuple, list[dict]] = {}  # random draws summarised as one row: mean and range
    for r in rows:
        key = ("random" if r["heads"].startswith("random") else r["heads"], r["head_positions"], r["select"], r["positions"])
        groups.setdefault(key, []).append(r)
    summary = []
    for key, rs in groups.items():
        prec, au = [r["precision"] for r in rs], [r["auroc"] for r in rs if r["auroc"] is not None]
        rho = [r["spearman_length"] for r in rs if r.get("spearman_length") is not None]
        summary.append({"heads": key[0], "head_positions": key[1], "select": key[2], "positions": key[3], "n": len(rs),
                        "precision": round(statistics.fmean(prec), 4), "precision_min": min(prec),
                        "precision_max": max(prec), "auroc": round(statistics.fmean(au), 4) if au else None,
                        **({"spearman_length": round(statistics.fmean(rho), 3)} if rho else {})})
    cost = measure_cost(args, lm, pool, probe, head_sets[("gradient", positions[-1])], positions[-1]) if args.cost else {}
    return {"rows": rows, "summary": summary, "head_sets": {f"{k[0]}/{k[1]}": v for k, v in head_sets.items()},
            "timing": timing | {"proxy_heads_s": proxy_times, "features_total_s": round(time.perf_counter() - t0, 1)},
            "cost": cost}


def measure_cost(args, lm, pool, probe, heads, pos) -> dict:
    """The minimum over ``--cost-repeats`` rounds, each timing everything once (robust to load spikes)."""
    times: dict[str, list[float]] = {}
    precision = {}
    labels = [s.task for s in pool]
    for rep in range(args.cost_repeats):
        times.setdefault("plain_forward", []).append(plain_forward_seconds(lm, pool, args.batch_size, args.max_length))
        for sm in ("activation", "alignment", "prefilter_alignment"):
            sel = select_data(lm, heads, pool, sm, ratio=args.data_ratio, probe=probe, batch_size=args.batch_size,
                              max_length=args.max_length, positions=pos, prefilter_factor=args.prefilter_factor)
            times.setdefault(sm, []).append(sel.time_s)
            precision[sm] = _row_metrics(sel.scores, labels, args.target, args.data_ratio)["precision"]
        for m in _list(args.cost_head_methods):
            hs = score_heads(lm, probe, m, ratio=args.head_ratio, pool=pool, seed=args.seed, batch_size=8,
                             max_length=args.max_length, positions=pos)
            times.setdefault(f"heads:{m}", []).append(hs.time_s)
        print(f"cost round {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), file=sys.stderr)
    plain = min(times["plain_forward"])
    cost = {"plain_forward_s": round(plain, 2), "repeats": args.cost_repeats, "all_times_s": times, "heads": heads,
            "positions": pos}
    for k, v in times.items():
        if k != "plain_forward":
            cost[k] = {"time_s": round(min(v), 2), "ratio_to_plain_forward": round(min(v) / plain, 2),
                       **({"precision": precision[k]} if k in precision else {})}
    return cost


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--target", default="addition")
    ap.add_argument("--pool-size", type=int, default=600)
    ap.add_argument("--probe-size", type=int, default=100)
    ap.add_argument("--target-share", type=float, default=0.1)
    ap.add_argument("--head-ratio", type=float, default=0.1)
    ap.add_argument("--data-ratio", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mode", choices=("features",), default="features", help="(the only mode; kept for old commands)")
    ap.add_argument("--positions", default="all,content", help="answer-position settings")
    ap.add_argument("--alignment", action=argparse.BooleanOptionalAction, default=True,
                    help="pool gate gradients for alignment / prefilter_alignment (costly)")
    ap.add_argument("--alignment-positions", default="",
                    help="settings that get whole-pool gate gradients (default: all of --positions)")
    ap.add_argument("--proxy-methods", default="", help="head methods scored for real, e.g. taylor,lofit")
    ap.add_argument("--proxy-positions", default="content", help="positions for --proxy-methods")
    ap.add_argument("--random-draws", type=int, default=10)
    ap.add_argument("--prefilter-factor", type=float, default=3.0)
    ap.add_argument("--cost", action="store_true", help="time a plain forward and real selections and head scorings")
    ap.add_argument("--cost-repeats", type=int, default=3, help="--cost: rounds (the minimum time is kept)")
    ap.add_argument("--cost-head-methods", default="gradient,taylor,lofit,shift_sgd,shift",
                    help="--cost: head methods timed for real (on the probe and pool sample)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(args.model, device="cpu", dtype="fp32")
    tp = build_task_pool(target=args.target, seed=args.seed, pool_size=args.pool_size, target_share=args.target_share,
                         probe_size=args.probe_size, eval_size=0)
    pool, probe = load_records(tp.pool).samples, load_records(tp.probe).samples
    n_target = sum(s.task == args.target for s in pool)
    print(f"model {lm.spec}: {lm.geometry.n_layers} x {lm.geometry.n_q_heads} heads; pool {len(pool)} ({n_target} "
          f"{args.target}), probe {len(probe)}", file=sys.stderr, flush=True)

    def log(done, total, desc):
        if done == total or done % 10 == 0:
            print(f"  {desc} [{done}/{total}] {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)

    res = study(args, lm, pool, probe, log)
    result = {"args": vars(args), "model": lm.spec, "pool_task_counts": tp.counts(),
              "target_share": round(n_target / len(pool), 4), **res, "total_s": round(time.perf_counter() - t0, 1)}
    print(f"\n{'heads':>18} {'hpos':>7} {'select':<20} {'pos':<8} {'prec':>6} {'min':>5} {'max':>5} {'auroc':>6} {'rho_len':>7}")
    for r in res["summary"]:
        print(f"{r['heads']:>18} {r['head_positions']:>7} {r['select']:<20} {r['positions']:<8} {r['precision']:6.3f} "
              f"{r['precision_min']:5.2f} {r['precision_max']:5.2f} {str(r['auroc']):>6} {str(r.get('spearman_length', '')):>7}")
    if res["cost"]:
        print(json.dumps(res["cost"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
