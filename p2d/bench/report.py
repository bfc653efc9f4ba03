"""Aggregate the benchmark's units into results.json, results.md and an AER-vs-accuracy figure.

Cost per cell (seconds): training time, plus head scoring when the cell uses P2D's heads, plus the
selection pass when it uses selected data. AER = cost / the *measured* training time of the
full-pool cell of the same target and seed (full fine-tuning, all parameters, the same epochs over
the whole pool). "AER at equal accuracy" = P2D's cost / the training time full fine-tuning needed
to reach P2D's accuracy, read off its measured learning curve (None when it never did).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path

from ..files import read_json, write_json, write_text
from .cells import time_to_reach
from .config import CELLS

BUDGET_BASELINES = ("full-random", "lora-random", "heads-random")


def _stat(values) -> dict | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def cell_cost(cell: str, res: dict, heads_s: float, select_s: float, rh_select_s: float) -> float:
    """A cell's training time plus what its inputs cost: P2D's head scoring when it trains P2D's heads or
    uses P2D's data, P2D's selection for P2D's data, the random heads' selection for theirs."""
    kind, data, _ = CELLS[cell]
    extra = heads_s if kind == "heads" or data == "p2d" else 0.0
    extra += {"p2d": select_s, "rh_data": rh_select_s}.get(data, 0.0)
    return res["train_s"] + extra


def collect(bench, machine: dict, model: dict) -> dict:
    """Every finished unit of ``bench`` (a `p2d.bench.runner.Bench`) that matches its settings."""
    cfg, root = bench.cfg, bench.out / "units"
    targets = ["custom"] if cfg.custom_data else cfg.targets
    out = {"config": asdict(cfg), "machine": machine, "model": model, "learning_rates": bench.lrs or {},
           "sweep": {k: (read_json(root / "sweep" / f"{k}.json") or {}).get("result") for k in ("heads", "lora", "full")},
           "targets": {}}
    for target in targets:
        per_seed = []
        for seed in cfg.seed_list:
            base = bench.result(target, seed, "base")
            hp = bench.result(target, seed, "heads_p2d") or {}
            sp = bench.result(target, seed, "select_p2d") or {}
            sr = bench.result(target, seed, "select_random_heads") or {}
            draws = (bench.result(target, seed, "random_head_draws") or {}).get("draws", [])
            cells = {name: bench.result(target, seed, f"cell-{name}") for name in CELLS}
            cells = {k: v for k, v in cells.items() if v}
            ref = cells.get("full-pool")
            row = {"seed": seed, "base": base, "heads_s": hp.get("time_s"), "select_s": sp.get("time_s"),
                   "p2d_selection": {k: sp.get(k) for k in ("precision", "auroc", "pool_share", "task_counts")},
                   "random_heads_selection": {k: sr.get(k) for k in ("precision", "auroc")},
                   "random_head_draws": draws, "cells": {}}
            for name, res in cells.items():
                cost = cell_cost(name, res, hp.get("time_s") or 0.0, sp.get("time_s") or 0.0, sr.get("time_s") or 0.0)
                c = {"accuracy": res.get("accuracy"), "contains": res.get("contains"), "loss": res.get("loss"),
                     "cost_s": cost, "train_s": res["train_s"], "steps": res["steps"], "rows": res["rows"],
                     "trainable_params": res["trainable_params"], "optimizer_state_bytes": res["optimizer_state_bytes"],
                     "peak_mem_mb": res.get("peak_mem_mb"), "lr": res.get("lr"),
                     "aer": cost / ref["train_s"] if ref else None}
                if ref and ref.get("cpu_s") and res.get("cpu_s") is not None:
                    extra_cpu = cell_cost(name, {"train_s": 0.0}, hp.get("cpu_s") or 0.0, sp.get("cpu_s") or 0.0,
                                      sr.get("cpu_s") or 0.0)
                    c["aer_cpu"] = (res["cpu_s"] + extra_cpu) / ref["cpu_s"]
                if base and base.get("other_accuracy") is not None and res.get("other_accuracy") is not None:
                    c["forgetting"] = res["other_accuracy"] - base["other_accuracy"]
                if name == "p2d" and ref:
                    t_reach = time_to_reach(ref.get("curve") or [], res.get("accuracy"))
                    c["full_time_to_reach_s"] = t_reach
                    c["aer_at_equal_accuracy"] = cost / t_reach if t_reach else None
                row["cells"][name] = c
            if ref:
                row["reference_curve"] = ref.get("curve")
            row["target_rows"] = (bench.result(target, seed, "target_rows") or {}).get("points")
            per_seed.append(row)
        out["targets"][target] = {"seeds": per_seed, "summary": _summarise(per_seed)}
    out["summary"] = {t: v["summary"].get("headline") for t, v in out["targets"].items()}
    comp = read_json(root / "components.json")
    out["components"] = comp["result"] if comp else None
    return out


def _summarise(rows: list[dict]) -> dict:
    cells = sorted({c for r in rows for c in r["cells"]}, key=list(CELLS).index)
    s: dict = {"cells": {}}
    for c in cells:
        vals = [r["cells"][c] for r in rows if c in r["cells"]]
        s["cells"][c] = {k: _stat(v.get(k) for v in vals) for k in
                         ("accuracy", "contains", "loss", "forgetting", "aer", "aer_cpu", "cost_s", "train_s",
                          "trainable_params", "optimizer_state_bytes", "peak_mem_mb", "aer_at_equal_accuracy")}
    s["base_accuracy"] = _stat((r["base"] or {}).get("accuracy") for r in rows)
    s["p2d_precision"] = _stat(r["p2d_selection"].get("precision") for r in rows)
    s["p2d_auroc"] = _stat(r["p2d_selection"].get("auroc") for r in rows)
    s["random_heads_precision"] = _stat(d.get("precision") for r in rows for d in r["random_head_draws"])
    s["pool_share"] = _stat(r["p2d_selection"].get("pool_share") for r in rows)
    # differences per seed, so the spread is of the paired difference
    diffs = {}
    for other in BUDGET_BASELINES + ("randomheads-p2d", "heads-rhdata", "lora-p2d", "full-p2d", "full-pool", "lora-pool"):
        d = [r["cells"]["p2d"]["accuracy"] - r["cells"][other]["accuracy"] for r in rows
             if "p2d" in r["cells"] and other in r["cells"] and r["cells"]["p2d"]["accuracy"] is not None
             and r["cells"][other]["accuracy"] is not None]
        diffs[other] = _stat(d)
    s["p2d_minus"] = diffs
    best = [max((r["cells"][b]["accuracy"] for b in BUDGET_BASELINES if b in r["cells"]
                 and r["cells"][b]["accuracy"] is not None), default=None) for r in rows]
    s["p2d_minus_best_budget_baseline"] = _stat(
        r["cells"]["p2d"]["accuracy"] - b for r, b in zip(rows, best) if b is not None and "p2d" in r["cells"]
        and r["cells"]["p2d"]["accuracy"] is not None)
    p2d = s["cells"].get("p2d", {})
    s["headline"] = {
        "p2d_accuracy": p2d.get("accuracy"), "base_accuracy": s["base_accuracy"],
        "p2d_minus_best_budget_baseline_pp": _scale(s["p2d_minus_best_budget_baseline"], 100),
        "p2d_aer": p2d.get("aer"), "p2d_speedup": _inv(p2d.get("aer")), "p2d_aer_cpu": p2d.get("aer_cpu"),
        "p2d_aer_at_equal_accuracy": p2d.get("aer_at_equal_accuracy"),
        "p2d_precision": s["p2d_precision"], "random_heads_precision": s["random_heads_precision"],
        "pool_share": s["pool_share"],
    }
    return s


def _scale(st, k):
    return None if st is None else {**st, "mean": st["mean"] * k, "sd": st["sd"] * k}


def _inv(st):
    return None if st is None or not st["mean"] else {"mean": 1 / st["mean"], "n": st["n"]}


# ------------------------------------------------------------------------------------------ output
def _fmt(st, pct=False, digits=3) -> str:
    if st is None:
        return "–"
    m, sd = st["mean"], st["sd"]
    if pct:
        return f"{100 * m:.1f} ± {100 * sd:.1f}" if st["n"] > 1 else f"{100 * m:.1f}"
    return f"{m:.{digits}g} ± {sd:.{digits}g}" if st["n"] > 1 else f"{m:.{digits}g}"


def _fmt_int(st) -> str:
    return "–" if st is None else f"{st['mean']:,.0f}"


def markdown(results: dict) -> str:
    cfg = results["config"]
    m = results["machine"]
    machine = (f"{m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}, {m.get('cpu_count')} CPUs, "
               f"{m.get('torch_threads')} torch threads" + (f", {m['gpu']}" if m.get("gpu") else "")) \
        if isinstance(m, dict) else str(m)
    lines = [f"# P2D benchmark ({'quick' if cfg['quick'] else 'default size'})", "",
             f"Machine: {machine}  ", f"Model: {results['model'].get('model')} "
             f"({results['model'].get('params'):,} parameters, {results['model'].get('device')}, "
             f"{results['model'].get('dtype')})  ",
             f"Seeds {cfg['first_seed']}..{cfg['first_seed'] + cfg['seeds'] - 1}; pool {cfg['pool_size']} rows "
             f"(10% target), probe {cfg['probe_size']}, eval {cfg['eval_size']}; {cfg['epochs']:g} epochs over each "
             f"cell's data; batch {cfg['batch_size']}, max length {cfg['max_length']}; heads {cfg['head_method']} "
             f"({cfg['head_ratio']:.0%}), selection {cfg['select_method']} ({cfg['data_ratio']:.0%}), "
             f"{cfg.get('positions', 'all')} answer positions.  ",
             f"Learning rates (sweep on the probe set): {results['learning_rates']}.  ",
             f"Total time of this invocation: {results.get('time_s', 0):.0f} s.", ""]
    if results.get("complete") is False:
        lines += ["**Incomplete:** the time limit stopped the run before every unit finished; the tables cover "
                  "what did (rerun the same command to continue).", ""]
    cuda = str(results["model"].get("device", "")).startswith("cuda")  # peak memory is only measured there
    lines += ["Other tasks: exact match on held-out rows of every other task of the pool, change from the base "
              "model in points (negative = forgetting)." + ("" if cuda else " Peak memory is reported on CUDA only."), ""]
    for target, t in results["targets"].items():
        s = t["summary"]
        lines += [f"## Target `{target}`", "",
                  f"Base model exact match {_fmt(s['base_accuracy'], pct=True)}%. Selection: P2D's data is "
                  f"{_fmt(s['p2d_precision'], pct=True)}% target rows (AUROC {_fmt(s['p2d_auroc'])}); data picked "
                  f"by random heads {_fmt(s['random_heads_precision'], pct=True)}%; the pool "
                  f"{_fmt(s['pool_share'], pct=True)}%.", "",
                  "| cell | seeds | exact match % | contains % | answer loss | other tasks (pp vs base) | AER (wall) | "
                  "AER (CPU time) | trainable params | optimizer state MB |" + (" peak mem MB |" if cuda else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
        for c, st in s["cells"].items():
            opt = st["optimizer_state_bytes"]
            opt_mb = "–" if opt is None else f"{opt['mean'] / 2 ** 20:,.1f}"
            n = (st["accuracy"] or {}).get("n", 0)
            lines.append(f"| {CELLS[c][2]} | {n} | {_fmt(st['accuracy'], pct=True)} | {_fmt(st['contains'], pct=True)} | "
                         f"{_fmt(st['loss'])} | {_fmt(st['forgetting'], pct=True)} | {_fmt(st['aer'])} | "
                         f"{_fmt(st['aer_cpu'])} | "
                         f"{_fmt_int(st['trainable_params'])} | "
                         f"{opt_mb} |" + (f" {_fmt(st['peak_mem_mb'])} |" if cuda else ""))
        d = s["p2d_minus"]
        lines += ["", "P2D minus (exact match, pp, paired by seed; mean ± sd over n seeds): " + ", ".join(
            f"{CELLS[k][2]} {_fmt(_scale(v, 100))} (n={v['n']})" for k, v in d.items() if v is not None) + ".  ",
            f"P2D minus the best equal-budget baseline (per seed): "
            f"{_fmt(_scale(s['p2d_minus_best_budget_baseline'], 100))} pp.  "]
        p2d = s["cells"].get("p2d", {})
        if p2d.get("aer_at_equal_accuracy"):
            lines.append(f"AER at equal accuracy (P2D's cost / full fine-tuning's time to reach P2D's accuracy): "
                         f"{_fmt(p2d['aer_at_equal_accuracy'])}.")
        curves = [r.get("target_rows") for r in t["seeds"] if r.get("target_rows")]
        if curves:
            lines += ["", "Accuracy vs target rows in the training data (P2D heads, same budget and epochs): "
                      + ", ".join(f"{p['target_rows']} rows: {100 * (p['accuracy'] or 0):.0f}%" for p in curves[0]) + "."]
        lines.append("")
    if results.get("components"):
        from .components import components_markdown

        lines.append(components_markdown(results["components"]))
    return "\n".join(lines)


def figure(results: dict):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    targets = list(results["targets"])
    fig = make_subplots(rows=1, cols=max(1, len(targets)), subplot_titles=[f"target: {t}" for t in targets],
                        shared_yaxes=True)
    palette = ["#6366f1", "#10b981", "#f59e0b", "#ef4444", "#0ea5e9", "#a855f7", "#64748b", "#111827"]
    for col, target in enumerate(targets, start=1):
        for i, (cell, st) in enumerate(results["targets"][target]["summary"]["cells"].items()):
            if st["aer"] is None or st["accuracy"] is None:
                continue
            fig.add_trace(go.Scatter(
                x=[st["aer"]["mean"]], y=[100 * st["accuracy"]["mean"]], mode="markers", name=CELLS[cell][2],
                legendgroup=cell, showlegend=col == 1,
                marker=dict(size=14 if cell == "p2d" else 10, color=palette[i % len(palette)],
                            symbol="star" if cell == "p2d" else "circle"),
                error_x=dict(type="data", array=[st["aer"]["sd"]]),
                error_y=dict(type="data", array=[100 * st["accuracy"]["sd"]])), row=1, col=col)
        fig.update_xaxes(type="log", title_text="AER (lower = cheaper; full fine-tuning = 1)", row=1, col=col)
    fig.update_yaxes(title_text="target exact match (%)", row=1, col=1)
    fig.update_layout(title="AER vs target accuracy (mean ± sd over seeds)", template="plotly_white",
                      height=460, width=max(560, 460 * len(targets)), legend=dict(orientation="h", y=-0.25))
    return fig


def write_report(out: Path, results: dict) -> None:
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown(results))
    try:
        fig = figure(results)
    except ImportError:  # plotly missing (a bare GPU image): rerunning the same command elsewhere redraws it
        return
    write_text(out / "aer_vs_accuracy.html", fig.to_html(include_plotlyjs=True, full_html=True))
