"""``build_app() -> gr.Blocks``: the header and the tabs, composed. Each tab (``studio/tabs``) lays out
and wires itself through a `Context` (``studio/context``); this module only puts them in order.

API (every event has an explicit ``api_name``; gradio_client can drive the app):

- ``/load``, ``/heads``, ``/select``: run a stage (earlier stages run on demand) and return the
  tab's outputs. They take the settings form (``p2d.studio.form.FIELD_NAMES``) as keyword arguments.
- ``/preview``: a page of the selected samples (search, page).
- ``/train``: start training (returns at once); ``/train_status`` polls it (what the page's timer
  calls); ``/stop`` stops it; ``/wait_job`` blocks until the session's job ends (summary dict).
- ``/results``, ``/evaluate``, ``/merge``: the Results tab; ``/forgetting`` (accuracy per task before vs
  after: the eval set's tasks and the pool's other tasks), ``/controls`` (train random heads on P2D's
  data, P2D's heads on random data and LoRA on P2D's data at the same budget; a job).
- ``/chat`` (base vs base + trained heads, streamed; a job), ``/inspect_head`` (attention pattern,
  score and rank, gate-off loss change; a job), ``/compare_heads`` (two runs' head maps),
  ``/reuse_heads`` (another run's heads in the current run): the Explore tab.
- ``/upload_pool``, ``/upload_probe``, ``/upload_eval``: store and describe a data file.
- ``/show_command``, ``/save_config``, ``/apply_config``: settings as YAML and as a command.
- ``/export_peft``, ``/push``: the adapter in PEFT format (zip), a push to the Hugging Face Hub.
- ``/attach``, ``/runs``, ``/open_run``, ``/resume_run``: this session's key (to come back to it),
  its run folders, reopening one, resuming one.

Serving safety (`p2d.studio.limits` has every cap): no folder of the app is a static path, so no
run or upload file is reachable by URL; files go out only through `Studio.download` (files of the
requesting session). Every endpoint passes one gate (`p2d.studio.gate`); the upload route, the queue's
entrance and the client address are guarded below Gradio's handlers (`p2d.studio.guard`, installed by
`StudioBlocks.launch`). The queue has a size and every event a concurrency limit.
"""

from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from p2d.config import RunConfig

from .context import Context
from .gpu import check_hardware
from .guard import Guard, forwarded_headers_untrusted, quiet_gradio_tracebacks, take_turns
from .limits import Limits, current_limits
from .log import LOG
from .services import Studio
from .tabs import data as data_tab
from .tabs import explore as explore_tab
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
.p2d-lesson {font-size: 0.86em; color: var(--body-text-color-subdued); border-left: 3px solid var(--color-accent-soft);
  padding-left: 0.6em}
/* charts: transparent backgrounds (p2d.studio.charts); in a dark page their text takes the theme's colour */
.dark .js-plotly-plot .main-svg text:not(.hoverlayer *) {fill: var(--body-text-color) !important}
</style>
"""
TABS = (("1 · Model & data", "model", model_tab), ("2 · Heads", "heads", heads_tab), ("3 · Data", "data", data_tab),
        ("4 · Train", "train", train_tab), ("5 · Results & export", "results", results_tab),
        ("6 · Explore", "explore", explore_tab))


class StudioBlocks(gr.Blocks):
    """The app's Blocks: `launch` serves it with the upload size cap, the guard (`p2d.studio.guard.Guard`),
    Gradio's queue taking turns across client addresses (`p2d.studio.guard.take_turns`) and uvicorn's
    X-Forwarded-For rewriting off, however it is launched (app.py, the CLI, tests, benches)."""

    studio: Studio

    def launch(self, *args, **kwargs):
        from starlette.middleware import Middleware

        kwargs.setdefault("max_file_size", self.studio.limits.max_file_bytes)
        app_kwargs = dict(kwargs.pop("app_kwargs", None) or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                    Middleware(Guard, studio=self.studio, blocks=self)]
        take_turns(self._queue, self.studio.limits.proxy_hops, self.studio.limits.max_running_per_ip)
        if self.studio.limits.demo:
            quiet_gradio_tracebacks()
        with forwarded_headers_untrusted():
            return super().launch(*args, app_kwargs=app_kwargs, **kwargs)


LIGHT_GROUP = "light"


def share_light_slots(app: gr.Blocks, limit: int) -> None:
    """Put every event that has no concurrency group of its own (all but the job-following ones and
    ``/wait_job``) into one group of ``limit`` slots. Per event (Gradio's default), a flood over many
    endpoints runs dozens of handlers at once in this one process: each light call then gets a
    sliver of the interpreter (one GIL, shared with the job worker) and takes twenty times its
    idle time. With one small group a flood's requests wait in the queue instead, where
    `p2d.studio.guard.take_turns` starts the address with the fewest running first."""
    for fn in app.fns.values():
        if fn.concurrency_id == str(id(fn.fn)):  # Gradio's default: a group of its own
            fn.concurrency_id, fn.concurrency_limit = LIGHT_GROUP, limit


def default_runs_root() -> Path:
    return Path(os.environ.get("P2D_STUDIO_RUNS") or Path("runs") / "studio").expanduser().resolve()


def browser_secret(root: Path) -> str:
    """The secret the page's stored workspace key is encrypted with (Gradio's BrowserState), kept in the
    runs folder so a restarted server can still read what browsers stored."""
    import secrets

    path = root / ".studio-secret"
    try:
        text = path.read_text(encoding="utf-8").strip()
        if len(text) >= 16:
            return text
    except OSError:
        pass
    text = secrets.token_urlsafe(24)
    path.write_text(text, encoding="utf-8")
    try:
        path.chmod(0o600)
    except OSError:
        pass
    return text


def build_app(demo: bool | None = None, runs_root: str | os.PathLike | None = None, studio: Studio | None = None,
              config: RunConfig | str | os.PathLike | None = None, limits: Limits | None = None) -> gr.Blocks:
    """The Gradio app. ``demo`` (default: env P2D_DEMO; on Hugging Face Spaces on unless P2D_DEMO=0)
    switches the public demo limits on; ``limits`` gives them whole instead; ``runs_root`` (default:
    env P2D_STUDIO_RUNS, else runs/studio) holds one folder per session; ``config`` (a RunConfig or a
    settings YAML file) is what the form starts with. Refuses ZeroGPU hardware (`p2d.studio.gpu`)."""
    check_hardware()
    limits = studio.limits if studio is not None else (limits or current_limits(demo))
    root = Path(runs_root).expanduser().resolve() if runs_root else default_runs_root()
    if config is not None and not isinstance(config, RunConfig):
        config = RunConfig.load(config)
    st = studio or Studio(limits, root, config=config)
    for note in st.start_notes:
        LOG.note(note)
    # No static paths: run folders and uploads are never served by URL (downloads: Studio.download).
    # Gradio's own cache (downloads handed out, uploads until received) is emptied of old files.
    ttl = int(limits.workspace_ttl_s or 0)
    cache = (max(60, min(3600, ttl // 4)), ttl) if ttl else None

    with StudioBlocks(title=TITLE, analytics_enabled=False, delete_cache=cache) as app:
        gr.HTML(STYLE, padding=False)
        with gr.Row(equal_height=True):
            gr.Markdown(f"# {TITLE}\nFind the attention heads that matter for a task, select training data with "
                        "them, and fine-tune only those heads (P2D: parameters → data).", elem_classes="p2d-header")
            if limits.demo:
                gr.DuplicateButton("Duplicate this Space", size="lg", scale=0, min_width=240, elem_id="duplicate-btn")
        if limits.demo:
            models = ", ".join(m for m in (limits.model_allowlist or ()) if m != "default")
            gr.Markdown(f"**Public demo:** pool ≤ {limits.max_pool} rows, probe ≤ {limits.max_probe}, eval ≤ "
                        f"{limits.max_eval}, ≤ {limits.max_steps} training steps; models: the embedded one"
                        + (f" or {models}" if models else "") + "; uploads up to "
                        f"{(limits.max_file_bytes or 0) // (1024 * 1024)} MB (no local paths, no merged-model export)"
                        + (f"; an unused session is deleted after {limits.workspace_ttl_s / 3600:g} h"
                           if limits.workspace_ttl_s else "")
                        + ". One job runs at a time; others queue. Duplicate the Space for your own hardware and "
                        "limits.", elem_id="demo-note")
        ctx = Context(st)
        ctx.banner.render()
        browser_ws = gr.BrowserState(None, storage_key="p2d-studio-workspace", secret=browser_secret(st.runs_root))
        settings_tab.build(ctx)
        with gr.Tabs(elem_id="tabs"):
            for title, key, tab in TABS:
                with gr.Tab(title, id=key, elem_id=f"tab-{key}"):
                    tab.build(ctx)
        ctx.finish(browser_ws, app)

    app.studio = st  # for tests and app.py
    if limits.light_concurrency is not None:
        share_light_slots(app, limits.light_concurrency)
    app.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    return app


def launch_kwargs(app: gr.Blocks, options=None) -> dict:
    """What ``app.launch`` gets besides host and port: the upload size cap (Gradio's upload route
    refuses bigger files before they are stored; `StudioBlocks.launch` sets it too), the login, the
    share link."""
    limits = app.studio.limits
    kwargs = {"max_file_size": limits.max_file_bytes, "footer_links": ["api", "gradio"]}
    if options is not None:
        kwargs.update(share=options.share or None, auth=options.auth_pairs())
    return kwargs


def limits_of(options) -> Limits:
    """The caps a `StudioOptions` asks for (mode, model allowlist, expiry, proxy hops)."""
    from .limits import parse_allowlist

    return current_limits(options.demo, model_allowlist=parse_allowlist(options.model_allowlist),
                          workspace_ttl_s=float(options.expire_hours) * 3600.0, proxy_hops=options.proxy_hops)


def launch(options) -> None:
    """Serve the app with `p2d.studio.options.StudioOptions` (blocks until stopped)."""
    app = build_app(runs_root=options.runs, config=options.config, limits=limits_of(options))
    app.launch(server_name=options.host, server_port=options.port, **launch_kwargs(app, options))
