"""The frontier of the benchmark (``--parts frontier``): accuracy against end-to-end cost, as the paper's
Figure 1 draws it, with full fine-tuning of the whole pool as a dense learning curve.

For each split and reporting seed:

- every trained selector (``trained_selectors``) x adapter is a point: P2D's heads with each adapter of
  ``adapters`` (``qkvo``, ``qo``, ``offset``), LoRA and full fine-tuning, all on the selector's rows at
  the benchmark's budget and epochs (`p2d.bench.benchmark.Bench.cell` units: the selectors' and classic
  cells of the same name are the same units). Its cost is `p2d.cells.cell_cost`: head scoring +
  selection + training, wall seconds (and CPU seconds);
- full fine-tuning of the whole pool (``cell-full-full-pool-dense``) is evaluated every ``frontier_every``
  steps over its first epoch (0: about ten points) and at ``curve_points`` steps over the rest, so its
  curve is dense where the cheap points sit and ends at its final accuracy.

A point's equal-accuracy AER is its cost over the training time full fine-tuning needed to reach the
point's accuracy on the same seed's curve (`equal_accuracy_aer`: from the base model at 0 s, linear
between curve points; "not reached" when the curve never gets there), given with its range over seeds
and the number of seeds where it was reached. The cheapest configuration whose mean accuracy reaches
full fine-tuning's mean final accuracy is named (`cheapest_reaching`), or the report says none does.
The figure is a small hand-written SVG per split (``frontier-<split>.svg``, no plotting dependency, so
Markdown shows it; plotly's static export would need kaleido and a browser) beside the plotly HTML.
"""

from __future__ import annotations

import math
import statistics

from ..cells import CELLS, Cell, curve_steps
from ..cost import time_to_reach
from ..manifest import content_digest
from .split import folder_name

DENSE = "-dense"  # tag of the dense full-pool cell
ADAPTER_LABELS = {"lora": "LoRA q,k,v,o", "full": "full fine-tuning"}


def dense_steps(total_steps: int, epochs: float, every: int, points: int) -> list[int]:
    """The curve's steps: every ``every`` steps over the first epoch (0: about ten points), its last
    step, and ``points`` steps spread over the whole run (the final step included)."""
    first = max(1, math.ceil(total_steps / max(epochs, 1.0)))
    every = every or max(1, first // 10)
    return sorted(set(range(every, first + 1, every)) | {first} | curve_steps(total_steps, points))


def point_cells(cfg) -> list[tuple[str, str, Cell]]:
    """(selector, adapter, cell) of every frontier point; adapter ``lora``/``full`` for those cells."""
    out = []
    for s in cfg.selectors:
        if s not in cfg.trained_selectors:
            continue
        out += [(s, a, Cell("heads", s, "p2d", a)) for a in cfg.adapters]
        out += [(s, "lora", Cell("lora", s)), (s, "full", Cell("full", s))]
    return out


def unit_name(cell: Cell) -> str:
    return f"cell-{cell.heads or cell.trainable}-{cell.adapter or cell.trainable}-{cell.data}"


def run(bench, sp, rows: dict, lrs: dict) -> None:
    """Every point's cell at this seed, and the dense curve of full fine-tuning of the whole pool."""

    c = bench.cfg
    p2d = bench.heads(sp, c.head_method)
    if "full" in lrs:
        pool_rows = {"result": {"selected": list(range(len(sp.pool)))}, "digest": content_digest(len(sp.pool))}
        bench.cell(sp, CELLS["full-pool"], pool_rows, None, lrs["full"], curve=True, tag=DENSE,
                   curve_at=lambda steps: dense_steps(steps, c.epochs, c.frontier_every, c.curve_points))
    for s, adapter, cell in point_cells(c):
        lr = lrs.get(f"{adapter}-p2d" if cell.uses_heads else adapter)
        if lr is None or rows.get(s) is None:
            continue
        bench.cell(sp, cell, rows[s], p2d if cell.uses_heads else None, lr)


# ------------------------------------------------------------------------------------------ arithmetic
def equal_accuracy_aer(cost_s: float, curve: list[dict], accuracy: float, base_accuracy: float,
                       key: str = "train_s") -> dict:
    """``cost_s`` over the time full fine-tuning's ``curve`` ([{key, "accuracy"}, ...], from the base model
    at 0 s) needed to reach ``accuracy``: {"time_to_reach", "aer", "reached"}. The base model already at
    the accuracy: time 0 and no finite AER (``reached`` True, ``aer`` None)."""
    t = time_to_reach([{"train_s": p[key], "accuracy": p["accuracy"]} for p in curve], accuracy, base_accuracy)
    if t is None:
        return {"time_to_reach": None, "aer": None, "reached": False}
    return {"time_to_reach": t, "aer": cost_s / t if t > 0 else None, "reached": True}


def cheapest_reaching(points: list[dict], target: float | None) -> dict | None:
    """The point of lowest mean cost whose mean accuracy is at least ``target`` (None: no point does)."""
    if target is None:
        return None
    ok = [p for p in points if p.get("accuracy") is not None and p["accuracy"] >= target and p.get("cost_s") is not None]
    return min(ok, key=lambda p: p["cost_s"]) if ok else None


def _range(values: list) -> dict | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def _mean(values):
    v = [x for x in values if x is not None]
    return statistics.fmean(v) if v else None


def summarise(cfg, seeds: dict[int, dict], cost) -> dict | None:
    """The frontier of a split from its units (``cost(result, units, data, head_method, cpu=False)``: the
    report's `p2d.cells.cell_cost` of a cell from its units)."""
    name = unit_name(CELLS["full-pool"]) + DENSE
    curves, finals, bases = {}, {}, {}
    for seed, u in seeds.items():
        if name in u and "base" in u:
            r, b = u[name]["result"], u["base"]["result"]["accuracy"]
            curves[seed] = [{"train_s": 0.0, "cpu_s": 0.0, "accuracy": b}] + [
                {"train_s": p["train_s"], "cpu_s": p.get("cpu_s"), "accuracy": p["accuracy"]} for p in r["curve"]]
            finals[seed] = {"accuracy": r["accuracy"], "train_s": r["train_s"], "cpu_s": r.get("cpu_s"),
                            "steps": r["steps"]}
            bases[seed] = b
    points = []
    for s, adapter, cell in point_cells(cfg):
        un = unit_name(cell)
        per = {}
        for seed, u in seeds.items():
            if un not in u:
                continue
            res = u[un]["result"]
            p = {"accuracy": res["accuracy"], "cost_s": cost(res, u, s, cfg.head_method),
                 "cost_cpu_s": cost(res, u, s, cfg.head_method, cpu=True)}
            if seed in curves:
                p["eq"] = equal_accuracy_aer(p["cost_s"], curves[seed], p["accuracy"], bases[seed])
                if all(q.get("cpu_s") is not None for q in curves[seed]):
                    p["eq_cpu"] = equal_accuracy_aer(p["cost_cpu_s"], curves[seed], p["accuracy"], bases[seed],
                                                     key="cpu_s")
            per[seed] = p
        if not per:
            continue
        with_curve = [p for p in per.values() if "eq" in p]
        points.append({"selector": s, "adapter": adapter, "accuracy": _mean(p["accuracy"] for p in per.values()),
                       "cost_s": _mean(p["cost_s"] for p in per.values()),
                       "cost_cpu_s": _mean(p["cost_cpu_s"] for p in per.values()),
                       "aer_eq": _range([p["eq"]["aer"] for p in with_curve]),
                       "aer_eq_cpu": _range([p["eq_cpu"]["aer"] for p in with_curve if "eq_cpu" in p]),
                       "reached": sum(p["eq"]["reached"] for p in with_curve), "with_curve": len(with_curve),
                       "at_base": sum(p["eq"]["time_to_reach"] == 0.0 for p in with_curve),
                       "per_seed": {k: {"accuracy": v["accuracy"], "cost_s": v["cost_s"]} for k, v in per.items()}})
    if not curves and "frontier" not in cfg.parts:  # the selector and classic cells alone are no frontier
        return None
    full_final = _mean(f["accuracy"] for f in finals.values())
    best = cheapest_reaching(points, full_final)
    return {"points": points, "curves": curves, "full": finals, "full_final_accuracy": full_final,
            "full_cost_s": _mean(f["train_s"] for f in finals.values()),
            "cheapest_reaching_full": None if best is None else {k: best[k] for k in ("selector", "adapter",
                                                                                      "accuracy", "cost_s")}}


# ------------------------------------------------------------------------------------------ output
def _p(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _r(r, digits=3) -> str:
    if not r:
        return "–"
    if r["n"] == 1 or r["min"] == r["max"]:
        return f"{r['median']:.{digits}g}"
    return f"{r['median']:.{digits}g} [{r['min']:.{digits}g}, {r['max']:.{digits}g}]"


def label(p: dict) -> str:
    a = p["adapter"]
    return f"{p['selector']} rows / " + (ADAPTER_LABELS.get(a) or f"P2D heads {a}")


def markdown(f: dict) -> str:
    """The frontier's section of results.md."""
    lines = ["### Frontier: accuracy against end-to-end cost", ""]
    full = f["full"]
    if full:
        lines.append(f"Full fine-tuning of the whole pool (seeds {sorted(full)}): final accuracy "
                     f"{_p(f['full_final_accuracy'])}% after {f['full_cost_s']:.3g} s of training; its curve "
                     "(training seconds, accuracy %): " + "; ".join(
                         f"seed {s}: " + ", ".join(f"{p['train_s']:.3g} s {_p(p['accuracy'])}" for p in c)
                         for s, c in f["curves"].items()) + ".")
    else:
        lines.append("Full fine-tuning of the whole pool has no dense curve yet: no equal-accuracy AER.")
    lines += ["", "Each point: the selector's rows at the budget, trained by the adapter; cost = head scoring + "
              "selection + training (mean over seeds). Equal-accuracy AER = cost / the training time full "
              "fine-tuning needed to reach the point's accuracy on the same seed's curve, median [min, max] over "
              "seeds; \"not reached\": the curve never got there.", "",
              "| configuration | accuracy % | cost s | cost CPU s | equal-accuracy AER | same, CPU seconds | reached |",
              "|---|---|---|---|---|---|---|"]
    for p in sorted(f["points"], key=lambda p: p["cost_s"]):
        missed, at_base = p["with_curve"] - p["reached"], p.get("at_base", 0)
        aer = (_r(p["aer_eq"]) if p["aer_eq"] else "no curve" if not p["with_curve"]
               else "not reached" if missed == p["with_curve"] else "base model already there" if at_base else "–")
        notes = []
        if p["aer_eq"] and missed:
            notes.append(f"not reached in {missed}")
        if p["aer_eq"] and at_base:
            notes.append(f"base model already there in {at_base}")
        aer += f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"| {label(p)} | {_p(p['accuracy'])} | {p['cost_s']:.3g} | {p['cost_cpu_s']:.3g} | {aer} | "
                     f"{_r(p['aer_eq_cpu'])} | {p['reached']}/{p['with_curve']} |")
    best = f["cheapest_reaching_full"]
    lines.append("")
    if best and full:
        lines.append(f"Cheapest configuration at or above full fine-tuning's final accuracy ({_p(f['full_final_accuracy'])}%): "
                     f"{label(best)}, {_p(best['accuracy'])}% at {best['cost_s']:.3g} s "
                     f"({best['cost_s'] / f['full_cost_s']:.3f} of full fine-tuning's training time).")
    elif full:
        lines.append(f"No configuration reaches full fine-tuning's final accuracy ({_p(f['full_final_accuracy'])}%).")
    lines.append("")
    return "\n".join(lines)


def svg_name(split: str) -> str:
    """The figure file of a split's frontier (beside results.md)."""
    return f"frontier-{folder_name(split)}.svg"


COLORS = {"qkvo": "#1f77b4", "qo": "#2ca02c", "offset": "#9467bd", "lora": "#ff7f0e", "full": "#d62728"}


def svg(frontiers: dict[str, dict], width: int = 760, height: int = 420) -> str:
    """The frontier of every split as one static SVG: accuracy % against cost seconds (log axis); full
    fine-tuning's curves as grey lines, every point as a dot coloured by adapter."""
    xs = [p["train_s"] for f in frontiers.values() for c in f["curves"].values() for p in c if p["train_s"] > 0]
    xs += [p["cost_s"] for f in frontiers.values() for p in f["points"] if p["cost_s"] > 0]
    if not xs:
        xs = [1.0, 10.0]
    lo, hi = math.log10(min(xs)) - 0.1, math.log10(max(xs)) + 0.1
    left, right, top, bottom = 60, width - 170, 30, height - 45

    def X(t):
        return left + (math.log10(max(t, 10 ** lo)) - lo) / (hi - lo) * (right - left)

    def Y(a):
        return bottom - a * (bottom - top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>']
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        for m in (1, 3):
            t = m * 10 ** e
            if lo <= math.log10(t) <= hi:
                out.append(f'<line x1="{X(t):.1f}" y1="{bottom}" x2="{X(t):.1f}" y2="{bottom + 4}" stroke="black"/>'
                           f'<text x="{X(t):.1f}" y="{bottom + 16}" text-anchor="middle">{t:g}</text>')
    for a in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left - 4}" y1="{Y(a):.1f}" x2="{right}" y2="{Y(a):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 7}" y="{Y(a) + 4:.1f}" text-anchor="end">{100 * a:.0f}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">cost, seconds (log): heads + '
               'selection + training</text>')
    out.append(f'<text x="14" y="{(top + bottom) / 2}" transform="rotate(-90 14 {(top + bottom) / 2})" '
               'text-anchor="middle">strict accuracy %</text>')
    title = ", ".join(frontiers)
    out.append(f'<text x="{left}" y="18">Frontier: {title}</text>')
    for f in frontiers.values():
        for c in f["curves"].values():
            pts = " ".join(f"{X(p['train_s']):.1f},{Y(p['accuracy']):.1f}" for p in c if p["train_s"] > 0)
            out.append(f'<polyline points="{pts}" fill="none" stroke="#888" stroke-width="1.5"/>')
        for p in f["points"]:
            col = COLORS.get(p["adapter"], "#333")
            out.append(f'<circle cx="{X(p["cost_s"]):.1f}" cy="{Y(p["accuracy"]):.1f}" r="4" fill="{col}">'
                       f'<title>{label(p)}: {_p(p["accuracy"])}% at {p["cost_s"]:.0f} s</title></circle>')
            out.append(f'<text x="{X(p["cost_s"]) + 5:.1f}" y="{Y(p["accuracy"]) - 4:.1f}" font-size="8" '
                       f'fill="{col}">{p["selector"]}</text>')
    ly = top
    shown = {p["adapter"] for f in frontiers.values() for p in f["points"]}
    for name, col in [("full FT, whole pool (curve)", "#888")] + [(ADAPTER_LABELS.get(k, f"heads {k}"), v)
                                                                   for k, v in COLORS.items() if k in shown]:
        out.append(f'<rect x="{right + 15}" y="{ly}" width="10" height="10" fill="{col}"/>'
                   f'<text x="{right + 30}" y="{ly + 9}">{name}</text>')
        ly += 16
    out.append("</svg>")
    return "\n".join(out) + "\n"
