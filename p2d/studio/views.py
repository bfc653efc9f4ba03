"""Views: a workspace rendered into the values of a tab's outputs, as dicts keyed by output name.

Pure reading: the session's `p2d.pipeline.Run` (its settings, result properties, ``stages_partial``,
``planned_steps``, ``metrics``), the worker's job and the training log. No Gradio here except the
value types Gradio displays (Markdown strings, pandas tables, Plotly figures, file paths).
"""

from __future__ import annotations

import html
import math
import random
from pathlib import Path

import pandas as pd

from p2d.controls import read_controls
from p2d.explore import forgetting as rows_of
from p2d.method.heads import HEADS_FILE
from p2d.method.selection import SELECTED_FILE
from p2d.pipeline import METRICS_FILE

from . import charts
from .worker import Job

# gradio is imported where an output needs its update type: the rest renders plain values without it

PAGE_SIZE = 10
PREVIEW_CHARS = 240
DATA_COLUMNS = ["set", "source", "format", "rows", "skipped", "skipped why", "tasks"]
PREVIEW_COLUMNS = ["rank", "score", "task", "prompt", "answer"]
RESULT_COLUMNS = ["metric", "before", "after", "change"]
EXAMPLE_COLUMNS = ["prompt", "gold", "before", "after"]
RUN_COLUMNS = ["run", "model", "data", "done", "partial", "last job"]


# ------------------------------------------------------------------------------------------ format


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)


def short(text: str, n: int = PREVIEW_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def progress_html(fraction: float | None, label: str, detail: str = "", state: str = "running") -> str:
    """A progress bar with a label (static HTML, inline styles, no animation; ``state`` picks the colour)."""
    color = {"running": "#6366f1", "done": "#10b981", "failed": "#ef4444", "stopped": "#f59e0b",
             "queued": "#94a3b8", "idle": "#cbd5e1"}.get(state, "#6366f1")
    pct = 0.0 if fraction is None else max(0.0, min(1.0, float(fraction))) * 100
    return (
        f'<div class="p2d-progress" data-state="{state}" style="font-family:inherit;margin:4px 0 8px 0">'
        f'<div style="display:flex;justify-content:space-between;font-size:0.95em;margin-bottom:4px">'
        f'<span><b>{html.escape(label)}</b></span><span>{html.escape(detail)}</span></div>'
        f'<div style="background:var(--border-color-primary);border-radius:6px;height:14px;overflow:hidden">'
        f'<div class="p2d-progress-fill" style="width:{pct:.1f}%;background:{color};height:100%"></div></div></div>'
    )


def error_md(message: str) -> str:
    return f"✗ **Error:** {message}"


def _partial(run, stage: str) -> bool:
    return run is not None and stage in run.stages_partial


# -------------------------------------------------------------------------------------- the banner


def banner(studio, ws) -> str:
    """One line above the tabs: this session's job and how many jobs of other sessions wait or run."""
    job = studio.current_job(ws)
    others = studio.worker.busy() - (1 if job is not None and job.active else 0)
    parts = [studio.worker.describe(job, clock=False)] if job is not None else []
    if others > 0:
        parts.append(f"{others} job{'s' if others != 1 else ''} of other sessions queued or running")
    return " · ".join(parts)


def job_line(studio, job: Job | None, notes: list[str] = (), clock: bool = True) -> str:
    """The status line under a tab's buttons (``clock``: with the seconds a running job has run)."""
    text = studio.worker.describe(job, clock) if job is not None else ""
    return text + (("  \n" + "; ".join(notes)) if notes else "")


def job_summary(studio, ws) -> dict:
    job = studio.current_job(ws)
    d = job.summary() if job is not None else {"status": "none"}
    d.pop("plan", None)
    run = ws.run
    if run is not None:
        d["run_dir"] = str(run.out)
        d["log_lines"] = len(ws.log())
        d["metrics"] = (run.out / METRICS_FILE).exists()
        d["stages_done"], d["stages_partial"] = run.stages_done, run.stages_partial
    return d


# -------------------------------------------------------------------------------- 1 model & data


def runs(studio, ws) -> dict:
    """The session's run folders (the "Runs of this session" table and picker)."""
    rows = studio.runs_table(ws)
    current = next((r["run"] for r in rows if r["current"]), None)
    table = pd.DataFrame([{**{k: r[k] for k in RUN_COLUMNS}, "run": ("▶ " if r["current"] else "") + r["run"]}
                          for r in rows], columns=RUN_COLUMNS)
    import gradio as gr  # a dropdown's choices change with the runs (Gradio's update type)

    names = [r["run"] for r in rows]
    return {"runs": table, "run_pick": gr.Dropdown(choices=names, value=current or (names[-1] if names else None))}


def model_data(studio, ws) -> dict:
    run = ws.run
    info = studio.worker.model_info(run.config) if run is not None else None
    summary = None
    if run is not None:
        summary = run.data.summary() if run.data is not None else run.results.get("load")
    if run is None or not summary:
        return {"info": "Nothing loaded yet. Pick a model and data, then press **Load**. (Heads, Data and Train "
                        "also load on demand.)",
                "data_table": pd.DataFrame(columns=DATA_COLUMNS),
                "mix_plot": charts.empty_figure("Load data to see its task mix", height=300)}
    if info is not None:
        md = (f"**Model** `{info['model']}` · {info['architecture']} · {info['layers']} layers × "
              f"{info['q_heads']} query heads ({info['kv_heads']} kv heads, head dim {info['head_dim']}) = "
              f"**{info['heads_total']} heads** · {fmt_params(info['params'])} parameters · "
              f"{info['device']} {info['dtype']}"
              f"{'' if info['chat_template'] else ' · no chat template! (plain prompt format)'}  \n")
    else:  # a run read back from its folder: the model loads with the next stage
        md = f"**Model** `{run.config.model}` (not loaded yet: it loads with the next stage)  \n"
    md += f"**Run folder** `{run.out.name if ws.root in Path(run.out).parents else run.out}`"
    rows, groups = [], {}
    for name, s in summary.items():
        reasons = ", ".join(f"{n} {r}" for r, n in s["skipped_reasons"].items()) or "-"
        top = sorted(s["tasks"].items(), key=lambda kv: -kv[1])
        tasks = ", ".join(f"{t} {n}" for t, n in top[:6]) + (f", +{len(top) - 6} more" if len(top) > 6 else "")
        if s.get("truncated"):
            reasons = (reasons if reasons != "-" else "") + f" (only the first {s['rows']} rows kept: the row cap)"
        rows.append({"set": name, "source": short(Path(str(s["source"])).name if ws.root in Path(str(s["source"])).parents
                                                  else s["source"], 80),
                     "format": s["format"], "rows": s["rows"],
                     "skipped": s["skipped"], "skipped why": reasons.strip(), "tasks": tasks or "(no labels)"})
        if s["tasks"]:
            groups[name] = s["tasks"]
    fig = (charts.task_mix(groups, "Task mix of the loaded sets") if groups
           else charts.empty_figure("The data has no task labels", height=300))
    return {"info": md, "data_table": pd.DataFrame(rows, columns=DATA_COLUMNS), "mix_plot": fig}


# ----------------------------------------------------------------------------------------- 2 heads


def heads(studio, ws) -> dict:
    run = ws.run
    hs = run.heads if run is not None else None
    if hs is None:
        return {"info": "No head scores yet: choose a method and press **Find heads**.",
                "heatmap": charts.heads_heatmap([], []), "per_layer": charts.heads_per_layer([], 0),
                "table": pd.DataFrame(columns=["rank", "layer", "head", "score"])}
    ranks = charts.head_ranks(hs.scores)
    rows = [{"rank": ranks[l][h], "layer": l, "head": h,
             "score": round(hs.scores[l][h], 6) if charts.finite(hs.scores[l][h]) else None}
            for l, h in hs.selected]
    contrast = hs.extra.get("contrast")
    md = (f"**{len(hs.selected)} of {hs.n_layers * hs.n_q_heads} heads** selected ({hs.ratio:.0%}) by "
          f"`{hs.method}`{f' ({contrast})' if contrast else ''} in {hs.time_s:.1f} s · layers "
          f"{', '.join(str(l) for l in sorted({l for l, _ in hs.selected}))}")
    if _partial(run, "heads"):
        md += ("  \n■ **Partial:** head scoring was stopped part-way, so these scores cover only the work done. "
               "Press **Find heads** to score them all.")
    return {"info": md, "heatmap": charts.heads_heatmap(hs.scores, hs.selected),
            "per_layer": charts.heads_per_layer(hs.selected, hs.n_layers, hs.n_q_heads), "table": pd.DataFrame(rows)}


# ------------------------------------------------------------------------------------------ 3 data


def _random_counts(ws, run) -> dict | None:
    """Task counts of a seeded random pick of the same size (the control the task-mix chart shows)."""
    pool = run.data.pool.samples
    if not any(s.task is not None for s in pool):
        return None
    key = (str(run.out), run.selection.n_selected, run.config.seed)
    cached = ws.cache.get("random_counts")
    if cached and cached[0] == key:
        return cached[1]
    counts: dict[str, int] = {}
    for i in random.Random(run.config.seed).sample(range(len(pool)), min(len(pool), run.selection.n_selected)):
        if pool[i].task is not None:
            counts[pool[i].task] = counts.get(pool[i].task, 0) + 1
    ws.cache["random_counts"] = (key, counts)
    return counts


def preview(studio, ws, query: str = "", page=1) -> dict:
    """One page of the selected samples (rank, score, task, prompt, answer), filtered by ``query``."""
    run = ws.run
    sel = run.selection if run is not None else None
    if sel is None or run.data is None:
        return {"preview": pd.DataFrame(columns=PREVIEW_COLUMNS), "page_label": "No selection yet.", "page": 1}
    pool = run.data.pool.samples
    q = (query or "").strip().lower()
    rows = []
    for rank, i in enumerate(sel.selected, start=1):
        s = pool[i]
        prompt = s.prompt_text or (s.prompt[-1]["content"] if s.prompt else "")
        if q and q not in prompt.lower() and q not in s.answer.lower() and q not in (s.task or "").lower():
            continue
        score = sel.scores[i]
        rows.append({"rank": rank, "score": round(score, 5) if charts.finite(score) else None,
                     "task": s.task or "", "prompt": short(prompt), "answer": short(s.answer)})
    pages = max(1, math.ceil(len(rows) / PAGE_SIZE))
    try:
        page = min(max(1, int(page or 1)), pages)
    except (TypeError, ValueError):
        page = 1
    label = (f"Page {page} of {pages} · {len(rows)} of {len(sel.selected)} selected samples"
             + (f" match “{query.strip()}”" if q else ""))
    return {"preview": pd.DataFrame(rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE], columns=PREVIEW_COLUMNS),
            "page_label": label, "page": page}


def data(studio, ws, query: str = "", page=1) -> dict:
    run = ws.run
    sel = run.selection if run is not None else None
    if sel is None or run.data is None:
        return {"info": "No selection yet: choose a method and press **Select data**.",
                "hist": charts.score_histogram([]),
                "mix": charts.empty_figure("Task mix appears after selection", height=300),
                "download": None, **preview(studio, ws, query, page)}
    pool = run.data.pool.samples
    counts = sel.task_counts(pool)
    if counts is not None:
        pool_counts: dict[str, int] = {}
        for s in pool:
            if s.task is not None:
                pool_counts[s.task] = pool_counts.get(s.task, 0) + 1
        mix = charts.task_mix({"pool": pool_counts, "selected": counts, "random pick": _random_counts(ws, run)},
                              "Task mix: pool vs selected vs a random pick of the same size")
    else:
        mix = charts.empty_figure("The pool has no task labels: no task mix to compare", height=300)
    unscored = sel.extra.get("unscored") or 0
    target = run.config.target if not run.config.pool else None
    hit = ""
    if counts is not None and target:
        hit = (f" · target `{target}`: {counts.get(target, 0)} of {sel.n_selected} "
               f"({counts.get(target, 0) / max(1, sel.n_selected):.0%})")
    md = (f"**{sel.n_selected} of {sel.n_pool} pool samples** selected ({sel.ratio:.0%}) by `{sel.method}` "
          f"in {sel.time_s:.1f} s{hit}" + (f" · {unscored} samples could not be scored (no answer tokens "
                                              "within max length)" if unscored else ""))
    if _partial(run, "select"):
        md += ("  \n■ **Partial:** data selection was stopped part-way; samples not scored yet rank last. "
               "Press **Select data** to score them all.")
    return {"info": md, "hist": charts.score_histogram(sel.scores, sel.selected), "mix": mix,
            "download": studio.download(ws, run.out / SELECTED_FILE), **preview(studio, ws, query, page)}


# ----------------------------------------------------------------------------------------- 4 train


def planned_steps(run) -> int | None:
    if run is None:
        return None
    if run.train_result is not None:
        return run.train_result.steps_planned
    return run.planned_steps()


def train_progress(studio, ws, job: Job | None, records: list[dict]) -> str:
    """The progress bar of the Train tab (any job of the session; training shows steps and time left)."""
    run = ws.run
    planned = planned_steps(run)
    last = records[-1] if records else None
    if job is None:
        return progress_html(0, "No job yet", "press Start training", state="idle")
    if job.status == "queued":
        return progress_html(0, "Queued", studio.worker.describe(job), state="queued")
    training = job.kind == "train" and last is not None and job.phase == "training the heads"
    if job.active and training:
        step, tot = int(last["step"]), planned or job.total or int(last["step"])
        el = float(last.get("elapsed_s") or 0.0)
        left = el / step * max(0, tot - step) if step else None
        stop = " · stopping after this step" if job.stop_requested else ""
        return progress_html(step / max(1, tot), f"Training: step {step} of {tot}",
                             f"elapsed {fmt_s(el)} · remaining ~{fmt_s(left)} · loss {last['loss']:.4f}{stop}")
    if job.active:
        what = job.phase or job.desc or job.label
        return progress_html(job.done / job.total if job.total else 0.0, f"{job.label}: {what}",
                             (f"{job.done}/{job.total} · " if job.total else "") + f"job elapsed {fmt_s(job.elapsed())}")
    if job.kind == "train" and last is not None:
        step = int(last["step"])
        tot = planned or step
        stopped = job.status == "stopped" or _partial(run, "train")
        label = ("Training stopped (adapter kept)" if stopped and run is not None and run.train_result is not None
                 else {"done": "Training finished", "stopped": "Training stopped",
                       "failed": "Training failed"}[job.status])
        return progress_html(step / max(1, tot), f"{label}: step {step} of {tot}",
                             f"training {fmt_s(last.get('elapsed_s'))} · job {fmt_s(job.elapsed())}",
                             state="stopped" if stopped else job.status)
    return progress_html(1.0 if job.status == "done" else 0.0, studio.worker.describe(job), "", state=job.status)


def loss_figure(ws, records: list[dict]):
    return charts.loss_chart(records, planned_steps(ws.run))


def aer_figure(studio, ws, job: Job | None, records: list[dict]):
    """Stage times against the full fine-tuning reference; while training, the projected end."""
    run = ws.run
    if run is None:
        return charts.aer_chart()
    t_heads = run.heads.time_s if run.heads is not None else 0.0
    t_select = run.selection.time_s if run.selection is not None else 0.0
    full = run.full
    t_left = 0.0
    if run.train_result is not None:
        t_train = run.train_result.time_s
    elif records:
        t_train = float(records[-1].get("elapsed_s") or 0.0)
        step, planned = int(records[-1]["step"]), planned_steps(run)
        if job is not None and job.active and job.kind == "train" and step:
            t_left = t_train / step * max(0, (planned or step) - step)
    else:
        t_train = 0.0
    label = "full fine-tuning"
    if full is not None:
        label += f" ({full.mode}" + (f", ±{full.stderr_s:.0f} s" if full.stderr_s else "") + ")"
    return charts.aer_chart(t_heads, t_select, t_train, full.time_s if full is not None else None, t_left,
                            full_label=label)


def train(studio, ws, job: Job | None = None) -> dict:
    job = job or studio.current_job(ws)
    records = ws.log()
    return {"status": job_line(studio, job), "progress": train_progress(studio, ws, job, records),
            "loss": loss_figure(ws, records), "aer": aer_figure(studio, ws, job, records)}


# --------------------------------------------------------------------------------------- 5 results


def _eval_rows(before: dict | None, after: dict | None) -> list[dict]:
    rows = []
    for key, name, pct in (("accuracy", "exact match", True), ("contains", "contains answer", True),
                           ("loss", "answer loss", False), ("n", "eval rows", False)):
        b = before.get(key) if before else None
        a = after.get(key) if after else None

        def f(x):
            if x is None:
                return ""
            return f"{100 * x:.1f}%" if pct else (f"{x:.4f}" if isinstance(x, float) else str(x))
        change = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and key != "n":
            change = f"{100 * (a - b):+.1f} pp" if pct else f"{a - b:+.4f}"
        rows.append({"metric": name, "before": f(b), "after": f(a), "change": change})
    return rows


def _example_rows(before: dict | None, after: dict | None) -> list[dict]:
    bex = {e["index"]: e for e in (before or {}).get("examples", [])}
    aex = {e["index"]: e for e in (after or {}).get("examples", [])}

    def mark(x):
        if not x:
            return ""
        return ("✓ " if x.get("correct") else "✗ ") + (short(x.get("prediction", ""), 200) or "(empty)")
    rows = []
    for idx in dict.fromkeys(list(bex) + list(aex)):
        b, a = bex.get(idx, {}), aex.get(idx, {})
        e = b or a
        rows.append({"prompt": short(e.get("prompt", ""), 200), "gold": short(e.get("gold", ""), 80),
                     "before": mark(b), "after": mark(a)})
    return rows


def results(studio, ws) -> dict:
    run = ws.run
    if run is None:
        return {"summary": "No results yet: train first.", "table": pd.DataFrame(columns=RESULT_COLUMNS),
                "chart": charts.eval_chart(None, None), "examples": pd.DataFrame(columns=EXAMPLE_COLUMNS),
                "adapter_dl": None, "metrics_dl": None, "peft_dl": None}
    before = run.eval_before.to_dict(with_examples=True) if run.eval_before is not None else None
    after = run.eval_after.to_dict(with_examples=True) if run.eval_after is not None else None
    m = run.metrics()
    lines = []
    if m.get("aer") is not None:
        lines.append(f"**AER {m['aer']:.3f}** (speed-up {m['speedup']:.1f}x vs full fine-tuning, "
                     f"{m.get('aer_mode', '')}): heads {m['time_heads_s']:.1f} s + selection {m['time_select_s']:.1f} s "
                     f"+ training {m['time_train_s']:.1f} s = {m['time_p2d_s']:.1f} s vs {m['time_full_s']:.1f} s "
                     f"({m.get('reference_epochs', 0):g} epochs over the whole pool"
                     + (f", ±{m['time_full_stderr_s']:.1f} s" if m.get("time_full_stderr_s") else "") + ")")
    if m.get("trainable_params"):
        tot = m.get("total_params") or 0
        share = f" ({100 * m['trainable_params'] / tot:.3f}% of {fmt_params(tot)})" if tot else ""
        lines.append(f"Trained **{fmt_params(m['trainable_params'])} parameters**{share} in {m.get('steps_done')} "
                     f"of {m.get('steps_planned')} steps" + (" (stopped early)" if m.get("stopped") else "")
                     + (f", final loss {m['final_loss']:.4f}" if m.get("final_loss") is not None else "")
                     + f"; optimizer state {fmt_bytes(m.get('optimizer_state_bytes'))}"
                     + (f" vs {fmt_bytes(m['full_optimizer_state_bytes'])} for full fine-tuning"
                        if m.get("full_optimizer_state_bytes") else ""))
    elif run.train_result is None:
        lines.append("No results yet: train on the **Train** tab (evaluation runs before and after).")
    if _partial(run, "train") and after is not None:
        lines.append("■ **The “after” column is for a stopped training:** the heads as trained up to the stop "
                     f"(step {m.get('steps_done')} of {m.get('steps_planned')}).")
    elif _partial(run, "train"):
        lines.append("■ Training was stopped: press **Evaluate now** to evaluate the heads trained so far.")
    for when, res in (("before", run.eval_before), ("after", run.eval_after)):
        if res is not None and res.partial:
            lines.append(f"■ The evaluation {when} training was stopped part-way: it covers {res.n_generated} "
                         f"of {res.n} rows.")
    if run.data is not None and run.data.eval is None:
        lines.append("This run has no eval set, so there is no accuracy to compare.")
    return {"summary": "  \n".join(lines), "table": pd.DataFrame(_eval_rows(before, after), columns=RESULT_COLUMNS),
            "chart": charts.eval_chart(before, after),
            "examples": pd.DataFrame(_example_rows(before, after), columns=EXAMPLE_COLUMNS),
            # packed by the job that trained (the public demo never packs in a request; locally a run trained
            # elsewhere is packed when first shown)
            "adapter_dl": studio.download(ws, studio.adapter_zip(ws, make=not studio.limits.demo)),
            "peft_dl": studio.download(ws, studio.peft_zip(ws)),
            "metrics_dl": studio.download(ws, run.out / METRICS_FILE)}


# ---------------------------------------------------------------------------------- results: extras
CONTROL_COLUMNS = ["cell", "accuracy", "AER", "trainable params", "rows", "steps", "learning rate"]


def _pct(x) -> str:
    return f"{100 * x:.0f}%" if charts.finite(x) else "–"


def forgetting(studio, ws) -> dict:
    """Per-task accuracy before vs after training (the eval set's tasks and the pool's other tasks)."""
    run = ws.run
    rows = rows_of(run.eval_before, run.eval_after) if run is not None else []
    others = [r for r in rows if r["set"] == "other tasks" and r["change"] is not None]
    if others:
        worst = min(others, key=lambda r: r["change"])
        md = (f"Other tasks, mean change {100 * sum(r['change'] for r in others) / len(others):+.0f} pp over "
              f"{len(others)} tasks ({others[0]['n']} held-out rows each); "
              + (f"largest drop: {worst['task']} {100 * worst['change']:+.0f} pp." if worst["change"] < 0
                 else "no task dropped."))
    elif run is not None and run.eval_after is not None:
        md = ("No other-task rows in this run: the built-in pool holds them out when Forgetting rows "
              "(other_eval_size) is above 0; with your files, an eval file with a task column shows its tasks.")
    else:
        md = ""
    return {"forgetting_md": md, "forgetting": charts.forgetting_chart(rows)}


def controls(studio, ws) -> dict:
    """P2D next to its controls (controls.json of the current run, when built on its current results)."""
    run = ws.run
    data = read_controls(run) if run is not None and run.train_result is not None else None
    if not data:
        return {"controls_md": "", "controls_table": pd.DataFrame(columns=CONTROL_COLUMNS),
                "controls_chart": charts.controls_chart(None, {})}
    cells = [("P2D", data["p2d"])] + [(c["label"], c) for c in data["controls"].values()]
    table = [{"cell": name, "accuracy": _pct(c.get("accuracy")),
              "AER": f"{c['aer']:.3f}" if charts.finite(c.get("aer")) else "–",
              "trainable params": fmt_params(c.get("trainable_params")), "rows": c.get("rows"),
              "steps": c.get("steps"), "learning rate": f"{c['lr']:g}" if c.get("lr") else "–"} for name, c in cells]
    p2d_acc = data["p2d"].get("accuracy")
    better = [c["label"] for c in data["controls"].values()
              if charts.finite(c.get("accuracy")) and charts.finite(p2d_acc) and c["accuracy"] >= p2d_acc]
    md = ("One draw each, at P2D's data budget and steps. " + (
        f"**As good as or better than P2D here:** {', '.join(better)}." if better else
        "**P2D is ahead of every control here** (one draw: see the benchmark for the spread)."))
    if not data.get("complete"):
        md += " ■ Stopped before every control was trained."
    return {"controls_md": md, "controls_table": pd.DataFrame(table, columns=CONTROL_COLUMNS),
            "controls_chart": charts.controls_chart(data["p2d"], data["controls"])}


def results_all(studio, ws) -> dict:
    return {**results(studio, ws), **forgetting(studio, ws), **controls(studio, ws)}


# ------------------------------------------------------------------------------------------ 6 explore
SCORE_PREFIX = "h"


def head_grid(hs) -> pd.DataFrame:
    """Head scores as a layers x heads table (a click on a cell opens that head)."""
    if hs is None:
        return pd.DataFrame(columns=["layer"])
    ranks = charts.head_ranks(hs.scores)
    rows = []
    for layer, row in enumerate(hs.scores):
        cells = {f"{SCORE_PREFIX}{h}": (f"#{ranks[layer][h]}" if ranks[layer][h] is not None else "–")
                 + (" ★" if [layer, h] in [list(x) for x in hs.selected] else "") for h in range(len(row))}
        rows.append({"layer": layer, **cells})
    return pd.DataFrame(rows)


def explore(studio, ws) -> dict:
    """Choices of the Explore tab: runs, eval prompts of the current run, head maps; the clickable head grid."""
    import gradio as gr

    rows = studio.runs_table(ws)
    names = [r["run"] for r in rows]
    current = next((r["run"] for r in rows if r["current"]), None)
    run = ws.run
    prompts = []
    if run is not None and run.data is not None:
        for i, s in enumerate((run.data.eval or run.data.probe).samples[:40]):
            text = s.prompt[-1]["content"] if s.prompt else ""
            prompts.append((f"{i}: {short(text, 70)}", text))
    maps = [r["run"] for r in rows if (ws.root / r["run"] / HEADS_FILE).is_file()]
    if run is not None and (run.out / HEADS_FILE).is_file() and run.out.name not in maps:
        maps.append(run.out.name)
    hs = run.heads if run is not None else None
    info = ("Click a cell to open that head (#rank under the run's method, ★ = selected)." if hs is not None else
            "No head scores yet: press **Find heads** on the Heads tab.")
    return {"run_pick": gr.Dropdown(choices=names, value=current), "prompt_pick": gr.Dropdown(choices=prompts, value=None),
            "grid": head_grid(hs), "grid_info": info,
            "map_a": gr.Dropdown(choices=maps, value=current if current in maps else None),
            "map_b": gr.Dropdown(choices=maps, value=None)}


def head_md(out: dict) -> str:
    """What `p2d.explore.inspect_head` found, in two lines."""
    p, r, g = out["pattern"], out.get("rank"), out["gate_off"]
    lines = [f"**Layer {p['layer']}, head {p['head']}**" + (
        f": score {r['score']:.4g}, rank {r['rank']} of {r['of']} under `{r['method']}`"
        + (" (selected)" if r["selected"] else "") if r and r.get("score") is not None else "")]
    lines.append(f"Gated off, the probe answer loss goes {g['loss']:.3f} → {g['loss_gated']:.3f} "
                 f"(**{g['change']:+.3f}** over {g['n']} probe rows).")
    s = out.get("gate_off_selected")
    if s:
        lines.append(f"All {len(s['heads'])} selected heads gated off: {s['loss']:.3f} → {s['loss_gated']:.3f} "
                     f"(**{s['change']:+.3f}**).")
    return "  \n".join(lines)


def compare_md(out: dict) -> str:
    a, b = out["a"], out["b"]
    rho = f"{out['spearman']:.2f}" if out.get("spearman") is not None else "n/a"
    jac = f"{out['jaccard']:.2f}" if out.get("jaccard") is not None else "n/a"
    return (f"**{a['name']}** (`{a['method']}`, {a['n_selected']} heads) vs **{b['name']}** (`{b['method']}`, "
            f"{b['n_selected']} heads): selected sets overlap **Jaccard {jac}** ({len(out['shared'])} shared); "
            f"rank correlation of all scores **Spearman {rho}**.")


#: every tab's view, by tab name (what a page load and the end of a job re-render)
TABS = {"model": model_data, "runs": runs, "heads": heads, "data": data, "train": train, "results": results_all,
        "explore": explore}
