"""What the app's buttons do: library calls (through the runner) and rendering of their results.

`Studio` holds the app-wide pieces (runner, workspaces, demo limits). Its ``render_*`` methods turn a
workspace into the values of one tab's outputs; its ``job_*`` methods are the job bodies the runner
executes. Nothing here builds Gradio layout (see ``studio/tabs``) or wires events (``studio/app``);
the few Gradio helpers used (``gr.skip``, ``gr.Warning``) only shape return values.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from p2d.config import RunConfig
from p2d.errors import UserError

from . import charts
from .fields import config_to_values, load_signature, values_to_config
from .gpu import gpu
from .limits import Limits, apply_caps, check_paths
from .runner import Job, Runner
from .workspace import Registry, Workspace

PAGE_SIZE = 10
PREVIEW_CHARS = 240


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} K"
    return str(n)


def _short(text: str, n: int = PREVIEW_CHARS) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_log(path: Path) -> list[dict]:
    """Records of a train_log.jsonl (a half-written last line is ignored)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def progress_html(fraction: float | None, label: str, detail: str = "", state: str = "running") -> str:
    """A progress bar with a label (pure HTML, inline styles; ``state`` picks the colour)."""
    color = {"running": "#6366f1", "done": "#10b981", "failed": "#ef4444", "stopped": "#f59e0b",
             "queued": "#94a3b8", "idle": "#cbd5e1"}.get(state, "#6366f1")
    pct = 0.0 if fraction is None else max(0.0, min(1.0, float(fraction))) * 100
    return (
        f'<div class="p2d-progress" data-state="{state}" style="font-family:inherit;margin:4px 0 8px 0">'
        f'<div style="display:flex;justify-content:space-between;font-size:0.95em;margin-bottom:4px">'
        f'<span><b>{html.escape(label)}</b></span><span>{html.escape(detail)}</span></div>'
        f'<div style="background:#e2e8f0;border-radius:6px;height:14px;overflow:hidden">'
        f'<div class="p2d-progress-fill" style="width:{pct:.1f}%;background:{color};height:100%;'
        f'transition:width 0.4s"></div></div></div>'
    )


@gpu(duration=120)
def _gpu_heads(run):
    return run.find_heads()


@gpu(duration=120)
def _gpu_select(run):
    return run.select()


@gpu(duration=300)
def _gpu_train(run, on_log=None):
    return run.train(on_log=on_log)


@gpu(duration=120)
def _gpu_evaluate(run, when):
    return run.evaluate(when)


class Studio:
    """App-wide state and the logic behind every button."""

    def __init__(self, limits: Limits, runs_root: Path, runner: Runner | None = None):
        self.limits = limits
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.runner = runner or Runner(max_models=1)
        self.registry = Registry(self.runs_root)

    # ============================================================================ sessions
    def workspace(self, request) -> Workspace:
        return self.registry.for_session(getattr(request, "session_hash", None))

    def attach(self, request, browser_ws_id: str | None) -> Workspace:
        """Page load: the workspace this browser used before (kept in localStorage), else - locally -
        the workspace of the job that is running now, else a new one."""
        session = getattr(request, "session_hash", None)
        ws = self.registry.attach(session, browser_ws_id)
        if ws is None and not self.limits.demo:
            job = self.runner.latest()
            if job is not None and job.active:
                ws = self.registry.attach(session, job.owner)
        return ws or self.registry.for_session(session)

    def current_job(self, ws: Workspace) -> Job | None:
        return self.runner.get(ws.job_id)

    # ============================================================================ settings
    def config_from_values(self, values: dict, ws: Workspace | None = None) -> tuple[RunConfig, list[str]]:
        """Form values -> a validated, demo-capped RunConfig (+ notes on capped values)."""
        cfg = values_to_config(values)
        cfg, notes = apply_caps(cfg, self.limits)
        check_paths(cfg, self.limits, ws.upload_dir if ws is not None else None)
        if self.limits.demo or not (values.get("out") or "").strip():
            cfg.out = ""  # decided per load: a new folder in the workspace
        return cfg, notes

    def config_for_file(self, values: dict, ws: Workspace) -> RunConfig:
        """The RunConfig to save or show as a command: the form, with the run folder filled in."""
        cfg, _ = self.config_from_values(values, ws)
        if not cfg.out:
            cfg.out = str(ws.out) if ws.out is not None else RunConfig().out
        return cfg

    def values_from_yaml(self, text: str, ws: Workspace) -> tuple[dict, list[str]]:
        cfg = RunConfig.from_yaml(text).validate()
        cfg, notes = apply_caps(cfg, self.limits)
        check_paths(cfg, self.limits, ws.upload_dir)
        return config_to_values(cfg, out_auto=self.limits.demo), notes

    def upload(self, ws: Workspace, kind: str, file, columns: str | None = None) -> tuple[str, str]:
        """Copy an uploaded data file into the workspace and describe it: (stored path, markdown).
        The description (format, rows, skipped rows, tasks) or the loader's error is the markdown."""
        from p2d.data.loading import load_data

        from p2d.data.formats import parse_mapping

        src = Path(file)
        ws.upload_dir.mkdir(parents=True, exist_ok=True)
        dest = ws.upload_dir / f"{kind}-{time.strftime('%H%M%S')}-{src.name}"
        shutil.copyfile(src, dest)
        try:
            summ = load_data(str(dest), mapping=parse_mapping(columns)).summary()
        except UserError as exc:
            return str(dest), f"✗ **{kind}** `{src.name}`: {exc}"
        tasks = ", ".join(f"{k} {v}" for k, v in list(summ["tasks"].items())[:6]) or "no task labels"
        skipped = (f" ({', '.join(f'{n} {r}' for r, n in summ['skipped_reasons'].items())})"
                   if summ["skipped"] else "")
        return str(dest), (f"**{kind}** `{src.name}`: format **{summ['format']}**, {summ['rows']} rows, "
                           f"{summ['skipped']} skipped{skipped}; tasks: {tasks}")

    # ============================================================================ job bodies
    def _bind(self, run, job: Job) -> None:
        run.progress = job.progress
        run.should_stop = job.should_stop

    def ensure_loaded(self, ws: Workspace, cfg: RunConfig, job: Job, force: bool = False):
        """The workspace's Run for ``cfg``: reused when model and data settings are unchanged, else
        the model (cached across sessions) and data are loaded into a new run folder."""
        from p2d.pipeline import Run

        sig = load_signature(cfg)
        run = ws.run
        same_out = not cfg.out or (run is not None and str(cfg.out) == str(run.config.out))
        if run is not None and ws.loaded == sig and same_out and not force:
            keep_out = run.config.out
            run.config = dataclasses.replace(cfg, out=keep_out)
            self._bind(run, job)
            return run
        job.set_phase("loading model")
        job.desc = f"loading model {cfg.model}" + (" (first use converts the embedded model, ~30 s)"
                                                     if cfg.model == "default" else "")
        lm = self.runner.model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, cfg.quantize)
        if job.should_stop():
            raise UserError("stopped before the data was loaded")
        auto_out = not cfg.out
        out = ws.new_run_dir() if auto_out else Path(cfg.out)
        cfg = dataclasses.replace(cfg, out=str(out))
        job.set_phase("loading data")
        run = Run(cfg, progress=job.progress, should_stop=job.should_stop, lm=lm)
        run.load()
        with ws.lock:
            ws.run, ws.loaded = run, sig
            ws.cache = {"out_auto": auto_out}
        return run

    def _heads_key(self, cfg: RunConfig) -> tuple:
        return (cfg.head_method, cfg.seed, cfg.batch_size, cfg.max_length)

    def _select_key(self, cfg: RunConfig, run) -> tuple:
        return (cfg.select_method, cfg.seed, cfg.batch_size, cfg.max_length, tuple(map(tuple, run.heads.selected)))

    def ensure_heads(self, ws: Workspace, run, job: Job, rerun: bool = False):
        """Head scores for the run's settings. Scores are reused when only the ratio changed."""
        cfg = run.config
        key = self._heads_key(cfg)
        if run.heads is not None and ws.cache.get("heads_key") == key and not rerun:
            if run.heads.ratio != cfg.head_ratio:
                previous = run.heads.selected
                run.heads = run.heads.with_ratio(cfg.head_ratio)
                if run.heads.selected != previous:
                    ws.clear_from("select")
                run.heads.save(run.out)
            return run.heads
        job.set_phase("scoring heads")
        ws.clear_from("heads")
        heads = _gpu_heads(run)
        ws.cache["heads_key"] = key
        if heads.extra.get("stopped"):
            raise UserError("head scoring was stopped: the scores so far are shown; run it again for all of them")
        return heads

    def ensure_selection(self, ws: Workspace, run, job: Job, rerun: bool = False):
        """Pool scores for the run's heads. Scores are reused when only the data ratio changed."""
        cfg = run.config
        key = self._select_key(cfg, run)
        sel = run.selection
        if sel is not None and ws.cache.get("select_key") == key and not rerun:
            if sel.ratio != cfg.data_ratio:
                run.selection = sel.with_ratio(cfg.data_ratio)
                if run.selection.selected != sel.selected:
                    ws.clear_from("train")
                run.selection.save(run.out, run.data.pool.samples)
                ws.cache.pop("random_counts", None)
            return run.selection
        job.set_phase("selecting data")
        ws.clear_from("select")
        sel = _gpu_select(run)
        ws.cache["select_key"] = key
        if sel.extra.get("stopped"):
            raise UserError("data selection was stopped: the samples scored so far are shown; run it again for all")
        return sel

    def job_load(self, ws: Workspace, cfg: RunConfig):
        def body(job: Job):
            return self.ensure_loaded(ws, cfg, job, force=True)
        return body

    def job_heads(self, ws: Workspace, cfg: RunConfig):
        def body(job: Job):
            run = self.ensure_loaded(ws, cfg, job)
            return self.ensure_heads(ws, run, job)
        return body

    def job_select(self, ws: Workspace, cfg: RunConfig):
        def body(job: Job):
            run = self.ensure_loaded(ws, cfg, job)
            self.ensure_heads(ws, run, job)
            if job.should_stop():
                return None
            return self.ensure_selection(ws, run, job)
        return body

    def job_train(self, ws: Workspace, cfg: RunConfig):
        """Load/heads/selection when missing, evaluate before, estimate the full fine-tuning reference
        (for the live AER), train (live log), evaluate after, write metrics.json."""
        def body(job: Job):
            run = self.ensure_loaded(ws, cfg, job)
            self.ensure_heads(ws, run, job)
            if job.should_stop():
                return None
            self.ensure_selection(ws, run, job)
            if job.should_stop():
                return None
            ws.clear_from("train")
            c = run.config
            tc = run.train_config()
            n_sel = max(1, len(run.selection.selected))
            planned = tc.planned_steps(n_sel)
            if self.limits.max_steps is not None and planned > self.limits.max_steps:
                c.steps = self.limits.max_steps
                planned = c.steps
            job.info["planned_steps"] = planned
            c.save(run.out / "config.yaml")
            eval_key = (c.eval_limit, c.max_new_tokens, c.max_length)
            if run.eval_before is not None and ws.cache.get("eval_key") != eval_key:
                run.eval_before = None
            if run.data.eval is not None and run.eval_before is None:
                ws.cache["eval_key"] = eval_key
                job.set_phase("evaluating before training")
                _gpu_evaluate(run, "before")
                if job.should_stop():
                    return None
            if c.full_ft == "estimate":
                job.set_phase("timing full fine-tuning (reference for AER)")
                run.full_finetune_reference(epochs=planned * c.batch_size / n_sel)
                if job.should_stop():
                    return None
            job.set_phase("training")
            job.info["train_started"] = time.time()
            result = _gpu_train(run)
            if not result.stopped and run.data.eval is not None:
                job.set_phase("evaluating after training")
                _gpu_evaluate(run, "after")
            self._finish_reference(run, job)
            run.write_metrics()
            return result
        return body

    def _finish_reference(self, run, job: Job) -> None:
        """The full fine-tuning reference for the epochs actually trained (the up-front estimate is
        rescaled; `measure` times every step unless the job was stopped)."""
        if run.train_result is None:
            return
        if run.config.full_ft == "measure" and not job.should_stop():
            job.set_phase("measuring full fine-tuning (reference for AER)")
        elif run.full is None:
            return
        run.full_finetune_reference()

    def job_evaluate(self, ws: Workspace):
        def body(job: Job):
            run = ws.run
            if run is None:
                raise UserError("nothing loaded yet: load a model and data first")
            self._bind(run, job)
            if run.data.eval is None:
                raise UserError("this run has no eval set: add an eval file on the Model & data tab")
            c = run.config
            eval_key = (c.eval_limit, c.max_new_tokens, c.max_length)
            if run.eval_before is None or ws.cache.get("eval_key") != eval_key:
                ws.cache["eval_key"] = eval_key
                job.set_phase("evaluating the base model")
                _gpu_evaluate(run, "before")
            if run.train_result is not None and not job.should_stop():
                job.set_phase("evaluating the trained heads")
                _gpu_evaluate(run, "after")
            run.write_metrics()
        return body

    def job_merge(self, ws: Workspace, folder: str):
        from p2d.adapter import merge_and_save

        def body(job: Job):
            run = ws.run
            adapter = self.adapter_dir(ws)
            if run is None or adapter is None:
                raise UserError("no trained adapter yet: train first")
            job.set_phase("merging the adapter and saving the model")
            return str(merge_and_save(run.lm, adapter, Path(folder).expanduser()))
        return body

    # ============================================================================ submit
    def submit(self, ws: Workspace, kind: str, body, label: str) -> Job:
        job = self.runner.submit(kind, ws.id, body, label=label)
        ws.job_id = job.id
        return job

    # ============================================================================ rendering
    def adapter_dir(self, ws: Workspace) -> Path | None:
        if ws.out is None:
            return None
        p = ws.out / "adapter"
        return p if (p / "adapter_config.json").exists() or any(p.glob("*.safetensors")) else None

    def render_model_data(self, ws: Workspace):
        run = ws.run
        if run is None or run.lm is None:
            return ("Nothing loaded yet. Pick a model and data, then press **Load**. "
                    "(Heads, Data and Train also load on demand.)",
                    pd.DataFrame(columns=["set", "source", "format", "rows", "skipped", "skipped why", "tasks"]),
                    charts.empty_figure("Load data to see its task mix", height=300))
        info = run.lm.info()
        md = (f"**Model** `{info['model']}` · {info['architecture']} · {info['layers']} layers × "
              f"{info['q_heads']} query heads ({info['kv_heads']} kv heads, head dim {info['head_dim']}) = "
              f"**{info['heads_total']} heads** · {_fmt_params(info['params'])} parameters · "
              f"{info['device']} {info['dtype']}"
              f"{'' if info['chat_template'] else ' · no chat template! (plain prompt format)'}  \n"
              f"**Run folder** `{run.out}`")
        rows, groups = [], {}
        for name in ("pool", "probe", "eval"):
            d = getattr(run.data, name)
            if d is None:
                continue
            s = d.summary()
            reasons = ", ".join(f"{n} {r}" for r, n in s["skipped_reasons"].items()) or "-"
            tasks = s["tasks"]
            top = sorted(tasks.items(), key=lambda kv: -kv[1])
            tasks_txt = ", ".join(f"{t} {n}" for t, n in top[:6]) + (f", +{len(top) - 6} more" if len(top) > 6 else "")
            rows.append({"set": name, "source": _short(s["source"], 80), "format": s["format"], "rows": s["rows"],
                         "skipped": s["skipped"], "skipped why": reasons, "tasks": tasks_txt or "(no labels)"})
            if tasks:
                groups[name] = tasks
        fig = charts.task_mix(groups, "Task mix of the loaded sets") if groups else \
            charts.empty_figure("The data has no task labels", height=300)
        return md, pd.DataFrame(rows), fig

    def render_heads(self, ws: Workspace):
        run = ws.run
        hs = run.heads if run is not None else None
        if hs is None:
            return ("No head scores yet: choose a method and press **Find heads**.",
                    charts.heads_heatmap([], []), charts.heads_per_layer([], 0),
                    pd.DataFrame(columns=["rank", "layer", "head", "score"]))
        ranks = charts.head_ranks(hs.scores)
        rows = [{"rank": ranks[l][h], "layer": l, "head": h,
                 "score": round(hs.scores[l][h], 6) if charts._finite(hs.scores[l][h]) else None}
                for l, h in hs.selected]
        total = hs.n_layers * hs.n_q_heads
        contrast = hs.extra.get("contrast")
        md = (f"**{len(hs.selected)} of {total} heads** selected ({hs.ratio:.0%}) by `{hs.method}`"
              f"{f' ({contrast})' if contrast else ''} in {hs.time_s:.1f} s · layers "
              f"{', '.join(str(l) for l in sorted({l for l, _ in hs.selected}))}")
        return (md, charts.heads_heatmap(hs.scores, hs.selected), charts.heads_per_layer(hs.selected, hs.n_layers,
                                                                                           hs.n_q_heads),
                pd.DataFrame(rows))

    def _random_counts(self, ws: Workspace) -> dict | None:
        run = ws.run
        pool = run.data.pool.samples
        if not any(s.task is not None for s in pool):
            return None
        key = (run.selection.n_selected, run.config.seed)
        cached = ws.cache.get("random_counts")
        if cached and cached[0] == key:
            return cached[1]
        pick = random.Random(run.config.seed).sample(range(len(pool)), min(len(pool), run.selection.n_selected))
        counts: dict[str, int] = {}
        for i in pick:
            if pool[i].task is not None:
                counts[pool[i].task] = counts.get(pool[i].task, 0) + 1
        ws.cache["random_counts"] = (key, counts)
        return counts

    def preview(self, ws: Workspace, query: str = "", page: int = 1):
        """One page of the selected samples (rank, score, task, prompt, answer), filtered by ``query``."""
        cols = ["rank", "score", "task", "prompt", "answer"]
        run = ws.run
        if run is None or run.selection is None:
            return pd.DataFrame(columns=cols), "No selection yet.", 1
        pool = run.data.pool.samples
        q = (query or "").strip().lower()
        rows = []
        for rank, i in enumerate(run.selection.selected, start=1):
            s = pool[i]
            prompt = s.prompt_text or (s.prompt[-1]["content"] if s.prompt else "")
            if q and q not in prompt.lower() and q not in s.answer.lower() and q not in (s.task or "").lower():
                continue
            score = run.selection.scores[i]
            rows.append({"rank": rank, "score": round(score, 5) if charts._finite(score) else None,
                         "task": s.task or "", "prompt": _short(prompt), "answer": _short(s.answer)})
        pages = max(1, math.ceil(len(rows) / PAGE_SIZE))
        try:
            page = int(page or 1)
        except (TypeError, ValueError):
            page = 1
        page = min(max(1, page), pages)
        chunk = rows[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
        n_sel = len(run.selection.selected)
        label = (f"Page {page} of {pages} · {len(rows)} of {n_sel} selected samples"
                 + (f" match “{query.strip()}”" if q else ""))
        return pd.DataFrame(chunk, columns=cols), label, page

    def render_data(self, ws: Workspace, query: str = "", page: int = 1):
        run = ws.run
        sel = run.selection if run is not None else None
        if sel is None:
            df, label, page = self.preview(ws, query, page)
            return ("No selection yet: choose a method and press **Select data**.",
                    charts.score_histogram([]), charts.empty_figure("Task mix appears after selection", height=300),
                    df, label, page, None)
        pool = run.data.pool.samples
        counts = sel.task_counts(pool)
        if counts is not None:
            pool_counts = {}
            for s in pool:
                if s.task is not None:
                    pool_counts[s.task] = pool_counts.get(s.task, 0) + 1
            mix = charts.task_mix({"pool": pool_counts, "selected": counts, "random pick": self._random_counts(ws)},
                                  "Task mix: pool vs selected vs a random pick of the same size")
        else:
            mix = charts.empty_figure("The pool has no task labels: no task mix to compare", height=300)
        unscored = sel.extra.get("unscored") or 0
        target = run.config.target if not run.config.pool else None
        hit = ""
        if counts is not None and target:
            share = counts.get(target, 0) / max(1, sel.n_selected)
            hit = f" · target `{target}`: {counts.get(target, 0)} of {sel.n_selected} ({share:.0%})"
        md = (f"**{sel.n_selected} of {sel.n_pool} pool samples** selected ({sel.ratio:.0%}) by `{sel.method}` "
              f"in {sel.time_s:.1f} s{hit}" + (f" · {unscored} samples could not be scored (no answer tokens "
                                                  "within max length)" if unscored else ""))
        df, label, page = self.preview(ws, query, page)
        path = run.out / "selected.jsonl"
        return (md, charts.score_histogram(sel.scores, sel.selected), mix, df, label, page,
                str(path) if path.exists() else None)

    # -- training view ---------------------------------------------------------------------------
    def train_view(self, ws: Workspace, job: Job | None = None):
        """(progress html, loss figure, AER figure, number of log lines) for the workspace's run."""
        run = ws.run
        job = job or self.current_job(ws)
        records = read_log(run.out / "train_log.jsonl") if run is not None and run.out is not None else []
        metrics = _read_json(run.out / "metrics.json") if run is not None else None
        planned = None
        if job is not None and job.kind == "train":
            planned = job.info.get("planned_steps")
        if planned is None and run is not None and run.train_result is not None:
            planned = run.train_result.steps_planned
        loss = charts.loss_chart(records, planned)
        # AER
        t_heads = run.times.get("heads", 0.0) if run is not None else 0.0
        t_select = run.times.get("select", 0.0) if run is not None else 0.0
        t_full = run.full.time_s if run is not None and run.full is not None else None
        training_now = job is not None and job.kind == "train" and job.active and job.phase == "training"
        if run is not None and run.train_result is not None:
            t_train, t_left = run.train_result.time_s, 0.0
        elif records:
            t_train = float(records[-1].get("elapsed_s") or 0.0)
            step = int(records[-1]["step"])
            t_left = (t_train / step) * max(0, (planned or step) - step) if training_now and step else 0.0
        else:
            t_train, t_left = 0.0, 0.0
        if metrics and metrics.get("time_full_s"):
            t_full = metrics["time_full_s"]
        aer = charts.aer_chart(t_heads, t_select, t_train, t_full, t_left,
                               full_label=("full fine-tuning (measured)" if run is not None and run.full is not None
                                           and run.full.mode == "measured" else "full fine-tuning (estimated)"))
        # progress bar
        if job is None:
            bar = progress_html(0, "No job yet", "press Start training", state="idle")
        elif job.status == "queued":
            bar = progress_html(0, "Queued", self.runner.describe(job), state="queued")
        elif job.active:
            if job.kind == "train" and job.phase == "training" and records:
                step = int(records[-1]["step"])
                tot = planned or job.total or step
                el = float(records[-1].get("elapsed_s") or 0.0)
                left = el / step * max(0, tot - step) if step else None
                stop = " · stopping after this step" if job.stop_requested else ""
                bar = progress_html(step / max(1, tot), f"Training: step {step} of {tot}",
                                    f"elapsed {_fmt_s(el)} · remaining ~{_fmt_s(left)} · "
                                    f"loss {records[-1]['loss']:.4f}{stop}")
            else:
                frac = job.done / job.total if job.total else None
                what = job.desc or job.phase or job.label
                bar = progress_html(frac or 0.0, f"{job.label}: {what}",
                                    (f"{job.done}/{job.total} · " if job.total else "")
                                    + f"job elapsed {_fmt_s(job.elapsed())}")
        else:
            st = job.status
            if job.kind == "train" and records:
                step = int(records[-1]["step"])
                tot = planned or step
                label = {"done": "Training finished", "stopped": "Training stopped (adapter kept)",
                         "failed": "Training failed"}[st]
                bar = progress_html(step / max(1, tot), f"{label}: step {step} of {tot}",
                                    f"training {_fmt_s(records[-1].get('elapsed_s'))} · job {_fmt_s(job.elapsed())}",
                                    state=st)
            else:
                bar = progress_html(1.0 if st == "done" else 0.0, self.runner.describe(job), "", state=st)
        return bar, loss, aer, len(records)

    # -- results ---------------------------------------------------------------------------------
    def render_results(self, ws: Workspace):
        run = ws.run
        empty_cols = ["metric", "before", "after", "change"]
        if run is None:
            return ("No results yet: train first.", pd.DataFrame(columns=empty_cols), charts.eval_chart(None, None),
                    pd.DataFrame(columns=["prompt", "gold", "before", "after"]), None, None)
        out = run.out
        before = _read_json(out / "eval_before.json")
        after = _read_json(out / "eval_after.json")
        metrics = _read_json(out / "metrics.json")
        rows = []
        for key, label, pct in (("accuracy", "exact match", True), ("contains", "contains answer", True),
                                ("loss", "answer loss", False), ("n", "eval rows", False)):
            b = before.get(key) if before else None
            a = after.get(key) if after else None

            def f(x):
                if x is None:
                    return ""
                return f"{100 * x:.1f}%" if pct else (f"{x:.4f}" if isinstance(x, float) else str(x))
            ch = ""
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and key != "n":
                d = a - b
                ch = f"{100 * d:+.1f} pp" if pct else f"{d:+.4f}"
            rows.append({"metric": label, "before": f(b), "after": f(a), "change": ch})
        ex_rows = []
        bex = {e["index"]: e for e in (before or {}).get("examples", [])}
        aex = {e["index"]: e for e in (after or {}).get("examples", [])}
        for idx in list(dict.fromkeys(list(bex) + list(aex))):
            b, a = bex.get(idx, {}), aex.get(idx, {})
            e = b or a

            def mark(x):
                if not x:
                    return ""
                return ("✓ " if x.get("correct") else "✗ ") + (_short(x.get("prediction", ""), 200) or "(empty)")
            ex_rows.append({"prompt": _short(e.get("prompt", ""), 200), "gold": _short(e.get("gold", ""), 80),
                            "before": mark(b), "after": mark(a)})
        lines = []
        if metrics:
            if metrics.get("aer") is not None:
                lines.append(f"**AER {metrics['aer']:.3f}** (speed-up {metrics['speedup']:.1f}x vs full fine-tuning, "
                             f"{metrics.get('aer_mode', '')}): heads {metrics['time_heads_s']:.1f} s + selection "
                             f"{metrics['time_select_s']:.1f} s + training {metrics['time_train_s']:.1f} s = "
                             f"{metrics['time_p2d_s']:.1f} s vs {metrics['time_full_s']:.1f} s")
            if metrics.get("trainable_params"):
                tot = metrics.get("total_params") or 0
                share = f" ({100 * metrics['trainable_params'] / tot:.3f}% of {_fmt_params(tot)})" if tot else ""
                lines.append(f"Trained **{_fmt_params(metrics['trainable_params'])} parameters**{share} in "
                             f"{metrics.get('steps_done')} steps"
                             + (" (stopped early)" if metrics.get("stopped") else "")
                             + (f", final loss {metrics['final_loss']:.4f}" if metrics.get("final_loss") is not None else "")
                             + f"; optimizer state {_fmt_bytes(metrics.get('optimizer_state_bytes'))}"
                             + (f" vs {_fmt_bytes(metrics['full_optimizer_state_bytes'])} for full fine-tuning"
                                if metrics.get("full_optimizer_state_bytes") else ""))
        elif run.train_result is None:
            lines.append("No results yet: train on the **Train** tab (evaluation runs before and after).")
        if run.data is not None and run.data.eval is None:
            lines.append("This run has no eval set, so there is no accuracy to compare.")
        adapter = self.adapter_dir(ws)
        zip_path = None
        if adapter is not None:
            zip_path = out / "adapter.zip"
            newest = max((p.stat().st_mtime for p in adapter.rglob("*") if p.is_file()), default=0)
            if not zip_path.exists() or zip_path.stat().st_mtime < newest:
                tmp = shutil.make_archive(str(out / ".adapter-tmp"), "zip", root_dir=adapter.parent, base_dir="adapter")
                Path(tmp).replace(zip_path)
        metrics_path = out / "metrics.json"
        return ("  \n".join(lines), pd.DataFrame(rows, columns=empty_cols), charts.eval_chart(before, after),
                pd.DataFrame(ex_rows, columns=["prompt", "gold", "before", "after"]),
                str(zip_path) if zip_path else None, str(metrics_path) if metrics_path.exists() else None)

    # -- convenience -----------------------------------------------------------------------------
    def job_banner(self, ws: Workspace) -> str:
        job = self.current_job(ws)
        others = self.runner.busy() - (1 if job is not None and job.active else 0)
        parts = []
        if job is not None:
            parts.append(self.runner.describe(job))
        if others > 0:
            parts.append(f"{others} job{'s' if others != 1 else ''} of other sessions queued or running")
        return " · ".join(parts)

    def job_summary(self, ws: Workspace) -> dict:
        job = self.current_job(ws)
        d = job.summary() if job is not None else {"status": "none"}
        run = ws.run
        if run is not None:
            d["run_dir"] = str(run.out)
            d["log_lines"] = len(read_log(run.out / "train_log.jsonl"))
            d["metrics"] = (run.out / "metrics.json").exists()
        return d


def log_error(exc: BaseException) -> str:
    """Message for the page: a UserError's own text; anything else as 'internal error' (traceback to
    the server log)."""
    if isinstance(exc, UserError):
        return str(exc)
    import traceback

    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return f"internal error ({type(exc).__name__}: {exc}); see the server log"
