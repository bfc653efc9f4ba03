"""Pure Plotly figure builders for the app (no Gradio, no model: plain numbers in, figures out).

Every builder returns a `plotly.graph_objects.Figure`, including for empty input (a figure with a
centred "nothing yet" note), so the page never shows a blank or broken plot.

Light and dark pages: the figures are built on the server, which does not know the visitor's theme, so
their backgrounds are transparent (the page's block colour shows through) and grid lines a translucent
grey that reads on both; in a dark page the app's CSS (`p2d.studio.server.STYLE`) gives the figures' text
Gradio's theme text colour.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import plotly.graph_objects as go
import plotly.io as pio

from p2d.method.heads import head_ranks  # noqa: F401 - the library's ranks (one order everywhere), used below and by views

GRID = "rgba(128,128,128,0.25)"
#: plotly_white with transparent backgrounds and grid lines that read on light and dark pages
TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.update(paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)")
for _axis in (TEMPLATE.layout.xaxis, TEMPLATE.layout.yaxis):
    _axis.update(gridcolor=GRID, zerolinecolor=GRID, linecolor=GRID)
COLORS = {
    "heads": "#6366f1",      # indigo
    "select": "#f59e0b",     # amber
    "train": "#10b981",      # emerald
    "projected": "rgba(16,185,129,0.25)",
    "full": "#ef4444",       # red
    "pool": "#94a3b8",       # slate
    "selected": "#6366f1",
    "random": "#f59e0b",
    "raw": "rgba(99,102,241,0.35)",
    "smooth": "#4338ca",
    "before": "#94a3b8",
    "after": "#10b981",
}


def finite(x) -> bool:
    """A real number (not a bool) that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _layout(fig: go.Figure, title: str | None = None, height: int = 360, **kw) -> go.Figure:
    fig.update_layout(template=TEMPLATE, height=height, margin=dict(l=50, r=20, t=50 if title else 20, b=45),
                      title=dict(text=title, x=0.01, font=dict(size=15)) if title else None, **kw)
    return fig


def empty_figure(message: str = "Nothing to show yet", height: int = 300) -> go.Figure:
    """A blank figure with a centred note (used before a stage has run)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#64748b"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, height=height)


# ------------------------------------------------------------------------------------------- heads


def heads_heatmap(scores: Sequence[Sequence[float]], selected: Iterable[Sequence[int]] = (),
                  title: str | None = None) -> go.Figure:
    """Heatmap of head scores, layers (rows, layer 0 at the bottom) x query heads (columns).

    Selected heads are marked with open squares (trace name "selected heads"); hover shows layer,
    head, score and rank (1 = highest score).
    """
    if not scores or not len(scores[0]):
        return empty_figure("Run head scoring to see the heatmap")
    n_layers, n_heads = len(scores), len(scores[0])
    z = [[float(s) if finite(s) else None for s in row] for row in scores]
    ranks = head_ranks(scores)
    total = n_layers * n_heads
    custom = [[[ranks[l][h] if ranks[l][h] is not None else "-", total] for h in range(n_heads)]
              for l in range(n_layers)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), customdata=custom, colorscale="Viridis",
        colorbar=dict(title=dict(text="score"), thickness=12), name="head scores",
        hovertemplate="layer %{y}, head %{x}<br>score %{z:.4g}<br>rank %{customdata[0]} of %{customdata[1]}"
                      "<extra></extra>"))
    sel = [(int(l), int(h)) for l, h in selected]
    if sel:
        fig.add_trace(go.Scatter(
            x=[h for _, h in sel], y=[l for l, _ in sel], mode="markers", name="selected heads", showlegend=True,
            marker=dict(symbol="square-open", size=max(8, min(22, int(300 / max(n_layers, n_heads)))),
                        color="#f43f5e", line=dict(width=2.5)),
            customdata=[[ranks[l][h] if ranks[l][h] is not None else "-",
                         z[l][h] if z[l][h] is not None else float("nan")] for l, h in sel],
            hovertemplate="selected: layer %{y}, head %{x}<br>score %{customdata[1]:.4g}<br>rank %{customdata[0]}"
                          "<extra></extra>"))
    fig.update_xaxes(title="query head", dtick=1 if n_heads <= 32 else None, showgrid=False, zeroline=False,
                     range=[-0.5, n_heads - 0.5])
    fig.update_yaxes(title="layer", dtick=1 if n_layers <= 16 else (2 if n_layers <= 40 else None), showgrid=False,
                     zeroline=False, range=[-0.5, n_layers - 0.5])
    height = max(320, min(760, 22 * n_layers + 120))
    _layout(fig, title or f"Head scores ({n_layers} layers x {n_heads} heads, {len(sel)} selected)", height=height,
            legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return fig


def heads_per_layer(selected: Iterable[Sequence[int]], n_layers: int, n_heads: int | None = None) -> go.Figure:
    """Bar chart: number of selected heads in each layer."""
    sel = [(int(l), int(h)) for l, h in selected]
    if not sel or n_layers < 1:
        return empty_figure("Run head scoring to see selected heads per layer", height=260)
    counts = [0] * n_layers
    for l, _ in sel:
        if 0 <= l < n_layers:
            counts[l] += 1
    fig = go.Figure(go.Bar(x=list(range(n_layers)), y=counts, marker_color=COLORS["heads"], name="selected heads",
                           hovertemplate="layer %{x}: %{y} selected<extra></extra>"))
    fig.update_xaxes(title="layer", dtick=1 if n_layers <= 32 else None)
    top = max(counts)
    fig.update_yaxes(title="selected heads", rangemode="tozero", dtick=1 if top <= 6 else None,
                     range=[0, min(n_heads, top + 1) if n_heads else top + 1])
    return _layout(fig, "Selected heads per layer", height=260)


# -------------------------------------------------------------------------------------------- data


def score_histogram(scores: Sequence[float | None], selected: Iterable[int] = (), bins: int = 40) -> go.Figure:
    """Histogram of pool sample scores, all samples vs the selected ones (overlaid)."""
    vals = [float(s) for s in scores if finite(s)]
    if not vals:
        return empty_figure("Run data selection to see the score histogram")
    sel_vals = [float(scores[i]) for i in selected if 0 <= i < len(scores) and finite(scores[i])]
    lo, hi = min(vals), max(vals)
    size = (hi - lo) / bins if hi > lo else 1.0
    xbins = dict(start=lo, end=hi + size, size=size)
    counts = [0] * (bins + 1)
    for v in vals:
        counts[min(bins, int((v - lo) / size))] += 1
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=vals, xbins=xbins, name=f"pool ({len(vals)})", marker_color=COLORS["pool"],
                               opacity=0.75, hovertemplate="score %{x}<br>%{y} samples<extra>pool</extra>"))
    if sel_vals:
        fig.add_trace(go.Histogram(x=sel_vals, xbins=xbins, name=f"selected ({len(sel_vals)})",
                                   marker_color=COLORS["selected"], opacity=0.85,
                                   hovertemplate="score %{x}<br>%{y} samples<extra>selected</extra>"))
        cut = min(sel_vals)
        fig.add_trace(go.Scatter(x=[cut, cut], y=[0, max(counts) * 1.05], mode="lines", name=f"cut-off {cut:.3g}",
                                 line=dict(color="#f43f5e", dash="dash", width=2), hoverinfo="skip"))
    fig.update_layout(barmode="overlay", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    fig.update_xaxes(title="sample score (higher = more wanted)")
    fig.update_yaxes(title="samples", rangemode="tozero")
    return _layout(fig, "Pool sample scores", height=320)


def task_mix(groups: dict[str, dict[str, int] | None], title: str = "Task mix") -> go.Figure:
    """Grouped bars of task shares (%) for several sets, e.g. {"pool": {...}, "selected": {...},
    "random pick": {...}}. Sets whose counts are None are left out."""
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return empty_figure("No task labels in this data", height=300)
    tasks: list[str] = []
    for counts in groups.values():
        for t in counts:
            if t not in tasks:
                tasks.append(t)
    first = next(iter(groups.values()))
    tasks.sort(key=lambda t: (-first.get(t, 0), t))
    palette = [COLORS["pool"], COLORS["selected"], COLORS["random"], COLORS["train"], COLORS["full"]]
    fig = go.Figure()
    for i, (name, counts) in enumerate(groups.items()):
        n = sum(counts.values()) or 1
        fig.add_trace(go.Bar(
            x=tasks, y=[100.0 * counts.get(t, 0) / n for t in tasks], name=f"{name} (n={sum(counts.values())})",
            marker_color=palette[i % len(palette)], customdata=[counts.get(t, 0) for t in tasks],
            hovertemplate="%{x}: %{y:.1f}% (%{customdata} rows)<extra>" + name + "</extra>"))
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    fig.update_yaxes(title="share of set (%)", rangemode="tozero")
    fig.update_xaxes(tickangle=-30 if len(tasks) > 6 else 0)
    return _layout(fig, title, height=340)


# ------------------------------------------------------------------------------------------- train


def smooth(values: Sequence[float], beta: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** i))
    return out


def loss_chart(records: Sequence[dict], planned_steps: int | None = None, beta: float = 0.8) -> go.Figure:
    """Training loss per step from train_log.jsonl records: raw (thin) and smoothed (bold)."""
    pts = [(int(r["step"]), float(r["loss"])) for r in records if "step" in r and finite(r.get("loss"))]
    if not pts:
        return empty_figure("Start training to see the loss curve", height=320)
    steps = [s for s, _ in pts]
    losses = [l for _, l in pts]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers" if len(pts) < 40 else "lines", name="loss",
                             line=dict(color=COLORS["raw"], width=1.5), marker=dict(size=4),
                             hovertemplate="step %{x}<br>loss %{y:.4f}<extra>raw</extra>"))
    fig.add_trace(go.Scatter(x=steps, y=smooth(losses, beta), mode="lines", name="smoothed",
                             line=dict(color=COLORS["smooth"], width=3),
                             hovertemplate="step %{x}<br>smoothed %{y:.4f}<extra></extra>"))
    val = [(int(r["step"]), float(r["val_loss"])) for r in records if "step" in r and finite(r.get("val_loss"))]
    if val:
        fig.add_trace(go.Scatter(x=[s for s, _ in val], y=[v for _, v in val], mode="lines+markers",
                                 name="validation", line=dict(color=COLORS.get("val", "#f59e0b"), width=2, dash="dot"),
                                 marker=dict(size=7), hovertemplate="step %{x}<br>validation %{y:.4f}<extra></extra>"))
    last = max(planned_steps or 0, steps[-1])
    if planned_steps:
        fig.update_xaxes(range=[0.5, last + 0.5])
    fig.update_xaxes(title="step", dtick=1 if last <= 15 else None, tickformat="d")
    fig.update_yaxes(title="answer-token loss")
    fig.update_layout(legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return _layout(fig, f"Training loss (step {steps[-1]}{f' of {planned_steps}' if planned_steps else ''}, "
                        f"last {losses[-1]:.4f})", height=340)


def aer_value(t_heads: float, t_select: float, t_train: float, t_full: float | None) -> float | None:
    """(heads + selection + training time) / full fine-tuning time; None when t_full is unknown."""
    if not t_full or not finite(t_full) or t_full <= 0:
        return None
    return (t_heads + t_select + t_train) / t_full


def aer_chart(t_heads: float = 0.0, t_select: float = 0.0, t_train: float = 0.0, t_full: float | None = None,
              t_train_left: float = 0.0, full_label: str = "full fine-tuning") -> go.Figure:
    """Stacked horizontal bars: P2D's head/selection/training time against full fine-tuning time.

    ``t_train_left`` (projected remaining training time) is drawn as a faint segment. The title
    gives the running AER (so far) and, while training, the projected AER at the end.
    """
    t_heads, t_select, t_train = (max(0.0, float(x or 0.0)) for x in (t_heads, t_select, t_train))
    t_left = max(0.0, float(t_train_left or 0.0))
    if t_heads + t_select + t_train + t_left == 0 and not t_full:
        return empty_figure("Stage times and AER appear here", height=260)
    rows = ["P2D", full_label]
    fig = go.Figure()
    for name, value, color in (("head scoring", t_heads, COLORS["heads"]), ("data selection", t_select, COLORS["select"]),
                               ("head training", t_train, COLORS["train"])):
        fig.add_trace(go.Bar(y=[rows[0]], x=[value], name=name, orientation="h", marker_color=color,
                             hovertemplate=f"{name}: %{{x:.1f}} s<extra></extra>"))
    if t_left > 0:
        fig.add_trace(go.Bar(y=[rows[0]], x=[t_left], name="training left (projected)", orientation="h",
                             marker=dict(color=COLORS["projected"], line=dict(color=COLORS["train"], width=1)),
                             hovertemplate="projected remaining: %{x:.1f} s<extra></extra>"))
    if t_full:
        fig.add_trace(go.Bar(y=[rows[1]], x=[t_full], name=full_label, orientation="h", marker_color=COLORS["full"],
                             hovertemplate=f"{full_label}: %{{x:.1f}} s<extra></extra>"))
    now = aer_value(t_heads, t_select, t_train, t_full)
    if now is None:
        title = "Time per stage (full fine-tuning reference not available yet)"
    else:
        title = f"AER {now:.3f} so far (speed-up {1 / now:.1f}x)" if now > 0 else "AER 0"
        if t_left > 0:
            end = aer_value(t_heads, t_select, t_train + t_left, t_full)
            title += f" · projected {end:.3f} ({1 / end:.1f}x)"
    fig.update_layout(barmode="stack", legend=dict(orientation="h", y=-0.3, x=0, yanchor="top", traceorder="normal"),
                      yaxis=dict(categoryorder="array", categoryarray=rows[::-1]))
    fig.update_xaxes(title=dict(text="seconds", standoff=4), rangemode="tozero")
    fig = _layout(fig, title, height=340)
    fig.update_layout(margin=dict(b=110))
    return fig


# ----------------------------------------------------------------------------------------- results


def eval_chart(before: dict | None, after: dict | None) -> go.Figure:
    """Grouped bars: exact-match and contains accuracy (%) before vs after training."""
    if not before and not after:
        return empty_figure("Evaluation results appear here after training", height=300)
    metrics = [("accuracy", "exact match"), ("contains", "contains answer")]
    fig = go.Figure()
    for name, res, color in (("before", before, COLORS["before"]), ("after", after, COLORS["after"])):
        if not res:
            continue
        ys = [100.0 * res[k] if finite(res.get(k)) else None for k, _ in metrics]
        fig.add_trace(go.Bar(x=[label for _, label in metrics], y=ys, name=name, marker_color=color,
                             text=[f"{y:.0f}%" if y is not None else "n/a" for y in ys], textposition="outside",
                             hovertemplate="%{x}: %{y:.1f}%<extra>" + name + "</extra>"))
    fig.update_yaxes(title="accuracy on the eval set (%)", range=[0, 110])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return _layout(fig, "Accuracy before vs after", height=320)


# ---------------------------------------------------------------------------------------- explore


def attention_heatmap(pattern: dict | None) -> go.Figure:
    """One head's attention weights (`p2d.explore.attention_pattern`): rows attend to columns, tokens as
    labels, the first answer token marked."""
    if not pattern or not pattern.get("weights"):
        return empty_figure("Open a head to see its attention pattern")
    tokens = [f"{i + pattern.get('offset', 0)}:{t!r}"[:24] for i, t in enumerate(pattern["tokens"])]
    n = len(tokens)
    fig = go.Figure(go.Heatmap(
        z=pattern["weights"], x=tokens, y=tokens, colorscale="Blues", zmin=0, colorbar=dict(title=dict(text="weight"),
                                                                                         thickness=12),
        hovertemplate="%{y} attends to %{x}<br>weight %{z:.3f}<extra></extra>"))
    start = pattern.get("answer_start")
    if start is not None and start < n:
        fig.add_hline(y=start - 0.5, line=dict(color="#f43f5e", width=1.5, dash="dot"),
                      annotation_text="answer starts", annotation_position="bottom right")
    fig.update_yaxes(autorange="reversed", title="token (query)", tickfont=dict(size=9), showgrid=False)
    fig.update_xaxes(title="attends to (key)", tickfont=dict(size=9), tickangle=-60, showgrid=False)
    height = max(380, min(900, 12 * n + 220))
    return _layout(fig, f"Layer {pattern['layer']}, head {pattern['head']} (kv head {pattern.get('kv_head')}): "
                        f"attention on {n} tokens" + (f" (last {n} of {pattern['n_tokens']})"
                                                      if pattern.get("offset") else ""), height=height)


def difference_heatmap(diff: Sequence[Sequence[float]], name_a: str, name_b: str) -> go.Figure:
    """Rank-percentile difference per head (a minus b, `p2d.explore.compare_head_maps`): red = ranked
    higher in a, blue = higher in b."""
    if not diff or not len(diff[0]):
        return empty_figure("Pick two head maps to compare")
    n_layers, n_heads = len(diff), len(diff[0])
    fig = go.Figure(go.Heatmap(z=diff, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="RdBu",
                               reversescale=True, zmid=0, zmin=-1, zmax=1,
                               colorbar=dict(title=dict(text="rank a − b"), thickness=12),
                               hovertemplate="layer %{y}, head %{x}<br>percentile a − b: %{z:.2f}<extra></extra>"))
    fig.update_xaxes(title="query head", showgrid=False)
    fig.update_yaxes(title="layer", showgrid=False)
    return _layout(fig, f"Rank difference: {name_a} − {name_b}", height=max(320, min(760, 22 * n_layers + 120)))


def forgetting_chart(rows: Sequence[dict]) -> go.Figure:
    """Bars per task: accuracy (%) before and after training (`p2d.explore.forgetting` rows)."""
    rows = [r for r in rows if finite(r.get("before")) or finite(r.get("after"))]
    if not rows:
        return empty_figure("Per-task accuracy appears here after the evaluation after training", height=300)
    names = [r["task"] + (" (eval)" if r["set"] == "eval" else "") for r in rows]
    fig = go.Figure()
    for when in ("before", "after"):
        ys = [100.0 * r[when] if finite(r.get(when)) else None for r in rows]
        fig.add_trace(go.Bar(x=names, y=ys, name=when, marker_color=COLORS[when],
                             text=[f"{y:.0f}%" if y is not None else "" for y in ys], textposition="outside",
                             hovertemplate="%{x}: %{y:.0f}%<extra>" + when + "</extra>"))
    fig.update_yaxes(title="accuracy (%)", range=[0, 112])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    return _layout(fig, "What tuning changed: accuracy per task, before vs after", height=340)


def controls_chart(p2d: dict | None, controls: dict) -> go.Figure:
    """Accuracy (%) of P2D and its controls (`p2d.controls.run_controls`), AER in the hover."""
    items = ([("P2D", p2d)] if p2d else []) + [(c.get("label", k), c) for k, c in controls.items()]
    if not controls:
        return empty_figure("Press “Run the controls” to train them", height=300)
    ys = [100.0 * c["accuracy"] if finite(c.get("accuracy")) else None for _, c in items]
    colors = [COLORS["train"] if name == "P2D" else COLORS["pool"] for name, _ in items]
    aers = [f"{c['aer']:.3f}" if finite(c.get("aer")) else "n/a" for _, c in items]
    fig = go.Figure(go.Bar(x=[n for n, _ in items], y=ys, marker_color=colors, customdata=aers,
                           text=[f"{y:.0f}%" if y is not None else "n/a" for y in ys], textposition="outside",
                           hovertemplate="%{x}<br>accuracy %{y:.0f}%<br>AER %{customdata}<extra></extra>"))
    fig.update_yaxes(title="exact match on the eval set (%)", range=[0, 112])
    return _layout(fig, "P2D vs its controls (same data budget and steps)", height=340)
