"""``build_app() -> gr.Blocks``: the tabs (studio/tabs), the runner (studio/runner) and the logic
(studio/actions) wired together.

API (every event has an explicit ``api_name``; gradio_client can drive the app):

- ``/load``, ``/heads``, ``/select``: run a stage (earlier stages run on demand) and return the
  tab's outputs. They take the settings form (``p2d.studio.fields.FIELD_NAMES``) as keyword arguments.
- ``/preview``: a page of the selected samples (search, page).
- ``/train``: start training (returns at once); ``/train_status`` polls it (same outputs the page's
  timer uses); ``/stop`` stops it; ``/wait_job`` blocks until the session's job ends (summary dict).
- ``/results``, ``/evaluate``, ``/merge``: the Results tab.
- ``/show_command``, ``/save_config``, ``/apply_config``: settings as YAML and as a command.
"""

from __future__ import annotations

import inspect
import sys
import os
import time
from pathlib import Path

import gradio as gr

from p2d.errors import UserError

from .actions import Studio, log_error
from .fields import FIELD_NAMES
from .limits import Limits, current_limits
from .tabs import data as data_tab
from .tabs import heads as heads_tab
from .tabs import model_data as model_tab
from .tabs import results as results_tab
from .tabs import settings as settings_tab
from .tabs import train as train_tab

TITLE = "P2D Studio"
STYLE = """
<style>
.p2d-header h1 {margin-bottom: 0.1em}
.p2d-banner {min-height: 1.6em}
#heads-heatmap, #loss-chart, #aer-chart {min-height: 240px}
</style>
"""


def default_runs_root() -> Path:
    return Path(os.environ.get("P2D_STUDIO_RUNS") or Path("runs") / "studio").expanduser().resolve()


# ------------------------------------------------------------------------------------ wiring helpers


def named(fn, names, *, progress: bool = False):
    """Wrap ``fn(values: dict, request[, progress])`` as a Gradio handler whose parameters are
    ``names`` (so the API takes them by keyword, with the components' values as defaults)."""
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request))
    if progress:
        params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    n = len(names)

    def split(args):
        values = dict(zip(names, args[:n]))
        rest = args[n:]
        return values, rest[0] if rest else None, (rest[1] if len(rest) > 1 else None)

    if inspect.isgeneratorfunction(fn):
        def wrapper(*args):
            values, request, prog = split(args)
            yield from (fn(values, request, prog) if progress else fn(values, request))
    else:
        def wrapper(*args):
            values, request, prog = split(args)
            return fn(values, request, prog) if progress else fn(values, request)
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {"request": gr.Request}
    wrapper.__name__ = fn.__name__
    return wrapper


def _dl(path, label: str | None = None):
    kw = {"label": label} if label else {}
    return gr.DownloadButton(value=path, interactive=bool(path), **kw)


def _err(msg: str) -> str:
    return f"✗ **Error:** {msg}"


# --------------------------------------------------------------------------------------- the app


def build_app(demo: bool | None = None, runs_root: str | os.PathLike | None = None,
              studio: Studio | None = None) -> gr.Blocks:
    """The Gradio app. ``demo`` (default: env P2D_DEMO) switches the public demo limits on;
    ``runs_root`` (default: env P2D_STUDIO_RUNS, else runs/studio) holds one folder per session."""
    limits: Limits = current_limits(demo)
    root = Path(runs_root).expanduser().resolve() if runs_root else default_runs_root()
    st = studio or Studio(limits, root)
    gr.set_static_paths([str(st.runs_root)])

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.HTML(STYLE, padding=False)
        with gr.Row(equal_height=True):
            gr.Markdown(f"# {TITLE}\nFind the attention heads that matter for a task, select training data with "
                        "them, and fine-tune only those heads (P2D: parameters → data).", elem_classes="p2d-header")
            if limits.demo:
                gr.DuplicateButton("Duplicate this Space", size="lg", scale=0, min_width=240, elem_id="duplicate-btn")
        if limits.demo:
            gr.Markdown(f"**Public demo:** pool ≤ {limits.max_pool} rows, probe ≤ {limits.max_probe}, eval ≤ "
                        f"{limits.max_eval}, ≤ {limits.max_steps} training steps, uploads only (no local paths, "
                        "no merged-model export). One job runs at a time; others queue. Duplicate the Space for "
                        "your own hardware and limits.", elem_id="demo-note")
        banner = gr.Markdown(elem_classes="p2d-banner", elem_id="job-banner")
        browser_ws = gr.BrowserState(None, storage_key="p2d-studio-workspace")
        poll_state = gr.State({})

        s = settings_tab.build(limits)
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("1 · Model & data", id="model", elem_id="tab-model"):
                m = model_tab.build(limits)
            with gr.Tab("2 · Heads", id="heads", elem_id="tab-heads"):
                h = heads_tab.build(limits)
            with gr.Tab("3 · Data", id="data", elem_id="tab-data"):
                d = data_tab.build(limits)
            with gr.Tab("4 · Train", id="train", elem_id="tab-train"):
                t = train_tab.build(limits)
            with gr.Tab("5 · Results & export", id="results", elem_id="tab-results"):
                r = results_tab.build(limits)

        comps = {}
        for ns in (m, h, d, t, s):
            for name in FIELD_NAMES:
                if hasattr(ns, name):
                    comps[name] = getattr(ns, name)
        missing = [n for n in FIELD_NAMES if n not in comps]
        assert not missing, f"settings without a component: {missing}"
        FIELDS = [comps[n] for n in FIELD_NAMES]

        MD_OUT = [m.info, m.data_table, m.mix_plot]
        H_OUT = [h.info, h.heatmap, h.per_layer, h.table]
        D_OUT = [d.info, d.hist, d.mix, d.preview, d.page_label, d.page, d.download]
        T_OUT = [t.progress, t.loss, t.aer]
        R_OUT = [r.summary, r.table, r.chart, r.examples, r.adapter_dl, r.metrics_dl]
        GROUPS = {"model": MD_OUT, "heads": H_OUT, "data": D_OUT, "train": T_OUT, "results": R_OUT}

        # ---- renderers (workspace -> output values) ----------------------------------------------
        def render(ws, group: str) -> list:
            if group == "model":
                return list(st.render_model_data(ws))
            if group == "heads":
                return list(st.render_heads(ws))
            if group == "data":
                md, hist, mix, df, label, page, path = st.render_data(ws)
                return [md, hist, mix, df, label, page, _dl(path)]
            if group == "train":
                bar, loss, aer, _ = st.train_view(ws)
                return [bar, loss, aer]
            summary, table, chart, examples, zip_path, metrics_path = st.render_results(ws)
            return [summary, table, chart, examples, _dl(zip_path), _dl(metrics_path)]

        def refresher(*groups):
            def refresh(request: gr.Request):
                ws = st.workspace(request)
                out = [st.job_banner(ws)]
                for g in groups:
                    out += render(ws, g)
                return out
            return refresh, [banner] + [c for g in groups for c in GROUPS[g]]

        # ---- stage buttons (load / heads / select): job in the runner, progress while waiting ----
        def stage(kind: str, label: str, group: str, make_body):
            def handler(values, request, progress):
                ws = st.workspace(request)
                try:
                    cfg, notes = st.config_from_values(values, ws)
                    job = st.submit(ws, kind, make_body(ws, cfg), label)
                except Exception as exc:  # noqa: BLE001
                    msg = log_error(exc)
                    gr.Warning(msg)
                    yield [_err(msg)] + [gr.skip()] * len(GROUPS[group])
                    return
                note = ("  \n" + "; ".join(notes)) if notes else ""
                last = None
                while job.active:
                    text = st.runner.describe(job)
                    if job.total:
                        progress((job.done, job.total), desc=job.desc or text)
                    else:
                        progress(None, desc=text)
                    if text != last:
                        last = text
                        yield [text + note] + [gr.skip()] * len(GROUPS[group])
                    time.sleep(0.25)
                final = st.runner.describe(job) + note
                if job.status == "failed":
                    gr.Warning(job.error or "failed")
                yield [final] + render(ws, group)
            handler.__name__ = f"{kind}_stage"
            return named(handler, FIELD_NAMES, progress=True)

        load_fn = stage("load", "Load", "model", st.job_load)
        heads_fn = stage("heads", "Head scoring", "heads", st.job_heads)
        select_fn = stage("select", "Data selection", "data", st.job_select)

        fn, outs = refresher("heads", "data", "train", "results")
        m.load_btn.click(load_fn, FIELDS, [m.status] + MD_OUT, api_name="load", concurrency_limit=None).then(
            fn, None, outs, api_visibility="private", show_progress="hidden")
        fn, outs = refresher("model", "data", "train", "results")
        h.run_btn.click(heads_fn, FIELDS, [h.status] + H_OUT, api_name="heads", concurrency_limit=None).then(
            fn, None, outs, api_visibility="private", show_progress="hidden")
        fn, outs = refresher("model", "heads", "train", "results")
        d.run_btn.click(select_fn, FIELDS, [d.status] + D_OUT,
                        api_name="select", concurrency_limit=None).then(
            fn, None, outs, api_visibility="private", show_progress="hidden")

        # ---- preview paging / search -----------------------------------------------------------------
        def preview(search: str, page: float, request: gr.Request):
            df, label, page = st.preview(st.workspace(request), search, page)
            return df, label, page

        def preview_step(delta):
            def go(search: str, page: float, request: gr.Request):
                return preview(search, (int(page or 1) + delta), request)
            return go

        def search(query: str, request: gr.Request):
            return preview(query, 1, request)

        d.search.submit(search, [d.search], [d.preview, d.page_label, d.page], api_visibility="private")
        d.search.input(search, [d.search], [d.preview, d.page_label, d.page],
                       api_visibility="private", show_progress="hidden", trigger_mode="always_last")
        d.page.submit(preview, [d.search, d.page], [d.preview, d.page_label, d.page], api_name="preview")
        d.prev_btn.click(preview_step(-1), [d.search, d.page], [d.preview, d.page_label, d.page],
                         api_visibility="private")
        d.next_btn.click(preview_step(+1), [d.search, d.page], [d.preview, d.page_label, d.page],
                         api_visibility="private")

        # ---- training: start (returns at once), poll with the timer, stop ----------------------------
        def train_start(values, request):
            ws = st.workspace(request)
            try:
                cfg, notes = st.config_from_values(values, ws)
                job = st.submit(ws, "train", st.job_train(ws, cfg), "Training")
            except Exception as exc:  # noqa: BLE001
                msg = log_error(exc)
                gr.Warning(msg)
                return _err(msg), gr.Timer(active=False), gr.skip(), gr.skip()
            text = st.runner.describe(job) + (("  \n" + "; ".join(notes)) if notes else "")
            bar, _, _, _ = st.train_view(ws, job)
            return text, gr.Timer(active=True), bar, st.job_banner(ws)

        t.start_btn.click(named(train_start, FIELD_NAMES), FIELDS, [t.status, t.timer, t.progress, banner],
                          api_name="train", concurrency_limit=None)

        ALL_RENDER = MD_OUT + H_OUT + D_OUT + R_OUT
        POLL_OUT = [banner, t.status, t.progress, t.loss, t.aer, t.timer, poll_state] + ALL_RENDER

        def poll(state: dict, request: gr.Request):
            ws = st.workspace(request)
            job = st.current_job(ws)
            state = dict(state or {})
            bar, loss, aer, n_lines = st.train_view(ws, job)
            status = st.runner.describe(job) if job is not None else ""
            key = (job.id if job else None, n_lines)
            changed = state.get("key") != list(key)
            finished_now = job is not None and not job.active and state.get("finished") != job.id
            keep_polling = job is not None and job.active
            new_state = {"key": list(key), "job_active": keep_polling,
                         "finished": job.id if job is not None and not job.active else state.get("finished")}
            plots = [loss, aer] if changed or finished_now else [gr.skip(), gr.skip()]
            rest = [gr.skip()] * len(ALL_RENDER)
            if finished_now:
                rest = render(ws, "model") + render(ws, "heads") + render(ws, "data") + render(ws, "results")
                if job.status == "failed":
                    gr.Warning(job.error or "job failed")
            return [st.job_banner(ws), status, bar] + plots + [gr.Timer(active=keep_polling), new_state] + rest

        t.timer.tick(poll, [poll_state], POLL_OUT, api_name="train_status", show_progress="hidden",
                     concurrency_limit=None)

        def stop(request: gr.Request):
            ws = st.workspace(request)
            job = st.current_job(ws)
            if st.runner.stop(job):
                msg = (f"■ Stop requested: {job.label} ends after the current step"
                       + (" (the adapter trained so far is kept)" if job.kind == "train" else ""))
            else:
                msg = "Nothing is running in this session."
            return msg, st.job_banner(ws)

        t.stop_btn.click(stop, None, [t.status, banner], api_name="stop", concurrency_limit=None)

        def wait_job(timeout: float = 600.0, request: gr.Request = None) -> dict:
            """Block until this session's job has ended (or ``timeout`` seconds); its summary."""
            ws = st.workspace(request)
            job = st.current_job(ws)
            if job is not None:
                st.runner.wait(job, timeout=float(timeout))
            return st.job_summary(ws)

        gr.api(wait_job, api_name="wait_job", concurrency_limit=None)

        # ---- results --------------------------------------------------------------------------------
        def results(request: gr.Request):
            ws = st.workspace(request)
            try:
                vals = render(ws, "results")
            except Exception as exc:  # noqa: BLE001
                return [_err(log_error(exc))] + [gr.skip()] * len(R_OUT)
            return [""] + vals

        r.refresh_btn.click(results, None, [r.status] + R_OUT, api_name="results", concurrency_limit=None)

        def follow(job):
            """Status lines of a job while it runs (for generator handlers)."""
            last = None
            while job.active:
                text = st.runner.describe(job)
                if text != last:
                    last = text
                    yield text
                time.sleep(0.3)

        def evaluate(request: gr.Request, progress=gr.Progress()):
            ws = st.workspace(request)
            try:
                job = st.submit(ws, "evaluate", st.job_evaluate(ws), "Evaluation")
            except Exception as exc:  # noqa: BLE001
                yield [_err(log_error(exc))] + [gr.skip()] * len(R_OUT)
                return
            for text in follow(job):
                if job.total:
                    progress((job.done, job.total), desc=job.desc)
                yield [text] + [gr.skip()] * len(R_OUT)
            yield [st.runner.describe(job)] + render(ws, "results")

        r.eval_btn.click(evaluate, None, [r.status] + R_OUT, api_name="evaluate", concurrency_limit=None)

        def merge(folder: str, request: gr.Request):
            ws = st.workspace(request)
            try:
                if limits.demo:
                    raise UserError("saving a merged model to a folder is disabled in the public demo: download "
                                    "the head adapter instead, or duplicate the Space")
                if not (folder or "").strip():
                    raise UserError("type the folder to save the merged model to")
                job = st.submit(ws, "merge", st.job_merge(ws, folder.strip()), "Merged-model export")
            except Exception as exc:  # noqa: BLE001
                yield _err(log_error(exc))
                return
            yield from follow(job)
            yield (f"✓ merged model saved to `{job.result}`" if job.status == "done" else st.runner.describe(job))

        r.merge_btn.click(merge, [r.merge_dir], [r.merge_status], api_name="merge", concurrency_limit=None)

        # ---- settings: YAML and command ---------------------------------------------------------------
        def show_command(values, request):
            ws = st.workspace(request)
            try:
                cfg = st.config_for_file(values, ws)
            except Exception as exc:  # noqa: BLE001
                msg = log_error(exc)
                return f"# {msg}", f"# {msg}"
            return cfg.to_yaml(), cfg.to_command()

        s.show_btn.click(named(show_command, FIELD_NAMES), FIELDS, [s.yaml, s.command], api_name="show_command")

        def save_config(values, request):
            ws = st.workspace(request)
            try:
                cfg = st.config_for_file(values, ws)
            except Exception as exc:  # noqa: BLE001
                msg = log_error(exc)
                return gr.skip(), gr.skip(), gr.skip(), _err(msg)
            folder = ws.root / "settings"
            folder.mkdir(parents=True, exist_ok=True)
            path = cfg.save(folder / "p2d-config.yaml")
            return (gr.File(value=str(path), visible=True), cfg.to_yaml(), cfg.to_command(),
                    f"Saved. Run it from a shell with `python -m p2d run --config p2d-config.yaml`.")

        s.save_btn.click(named(save_config, FIELD_NAMES), FIELDS, [s.file, s.yaml, s.command, s.status],
                         api_name="save_config")

        def apply_yaml(text: str, request: gr.Request):
            ws = st.workspace(request)
            try:
                values, notes = st.values_from_yaml(text or "", ws)
            except Exception as exc:  # noqa: BLE001
                msg = log_error(exc)
                gr.Warning(msg)
                return [gr.skip()] * len(FIELDS) + [_err(msg)]
            msg = "✓ settings applied" + (f" ({'; '.join(notes)})" if notes else "") + \
                  ". Press Load (or any stage button) to use them."
            return [values[n] for n in FIELD_NAMES] + [msg]

        s.apply_btn.click(apply_yaml, [s.yaml], FIELDS + [s.status], api_name="apply_config")

        def load_config_file(file, request: gr.Request):
            try:
                text = Path(file).read_text(encoding="utf-8")
            except (OSError, TypeError, UnicodeDecodeError) as exc:
                return [gr.skip()] * len(FIELDS) + [_err(f"could not read the settings file: {exc}"), gr.skip()]
            return apply_yaml(text, request) + [text]

        s.upload.upload(load_config_file, [s.upload], FIELDS + [s.status, s.yaml], api_visibility="private")

        # ---- uploads and form behaviour ------------------------------------------------------------
        def uploader(kind: str):
            def on_upload(file, columns: str, request: gr.Request):
                ws = st.workspace(request)
                if not file:
                    return gr.skip(), gr.skip(), gr.skip()
                try:
                    path, msg = st.upload(ws, kind, file, columns)
                except Exception as exc:  # noqa: BLE001
                    return gr.skip(), gr.skip(), _err(log_error(exc))
                return path, "files", msg
            on_upload.__name__ = f"upload_{kind}"
            return on_upload

        for kind, fcomp, pcomp in (("pool", m.pool_file, m.pool_path), ("probe", m.probe_file, m.probe_path),
                                   ("eval", m.eval_file, m.eval_path)):
            fcomp.upload(uploader(kind), [fcomp, m.columns], [pcomp, m.data_source, m.status],
                         api_name=f"upload_{kind}")

        def toggle_data(source):
            return gr.Group(visible=source != "files"), gr.Group(visible=source == "files")

        m.data_source.change(toggle_data, [m.data_source], [m.builtin_group, m.files_group],
                             api_visibility="private", show_progress="hidden")

        def toggle_model(source):
            return gr.Textbox(interactive=source != "embedded")

        m.model_source.change(toggle_model, [m.model_source], [m.model_name], api_visibility="private",
                              show_progress="hidden")

        # ---- page load: re-attach to this browser's workspace (and its running job) -----------------
        def on_page_load(browser_id, request: gr.Request):
            ws = st.attach(request, browser_id)
            job = st.current_job(ws)
            if ws.run is not None:
                from .fields import config_to_values

                values = config_to_values(ws.run.config, out_auto=limits.demo or ws.cache.get("out_auto", True))
                field_vals = [values[n] for n in FIELD_NAMES]
            else:
                field_vals = [gr.skip()] * len(FIELDS)
            rendered = render(ws, "model") + render(ws, "heads") + render(ws, "data") + render(ws, "results")
            bar, loss, aer, n = st.train_view(ws, job)
            active = job is not None and job.active
            state = {"key": [job.id if job else None, n], "job_active": active,
                     "finished": job.id if job is not None and not job.active else None}
            return ([ws.id] + field_vals + rendered
                    + [bar, loss, aer, gr.Timer(active=active), st.job_banner(ws),
                       st.runner.describe(job) if job else "", state])

        app.load(on_page_load, [browser_ws],
                 [browser_ws] + FIELDS + ALL_RENDER + [t.progress, t.loss, t.aer, t.timer, banner, t.status,
                                                      poll_state],
                 api_visibility="private", show_progress="hidden")

    app.studio = st  # for tests and app.py
    app.queue(default_concurrency_limit=4)
    return app


def launch(options) -> None:
    """Serve the app with `p2d.studio.options.StudioOptions` (blocks until stopped)."""
    app = build_app(demo=options.demo, runs_root=options.runs)
    app.launch(server_name=options.host, server_port=options.port, share=options.share or None,
               footer_links=["api", "gradio"])


def main(argv: list[str] | None = None) -> None:
    """`python app.py [flags]`: the same flags as `python -m p2d studio`."""
    from p2d.cli import main as cli_main

    raise SystemExit(cli_main(["studio", *(sys.argv[1:] if argv is None else argv)]))
