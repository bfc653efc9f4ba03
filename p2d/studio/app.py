"""``build_app() -> gr.Blocks``: the header and the tabs, composed. Each tab (``studio/tabs``) lays out
and wires itself through a `Context` (``studio/context``); this module only puts them in order.

API (every event has an explicit ``api_name``; gradio_client can drive the app):

- ``/load``, ``/heads``, ``/select``: run a stage (earlier stages run on demand) and return the
  tab's outputs. They take the settings form (``p2d.studio.form.FIELD_NAMES``) as keyword arguments.
- ``/preview``: a page of the selected samples (search, page).
- ``/train``: start training (returns at once); ``/train_status`` polls it (what the page's timer
  calls); ``/stop`` stops it; ``/wait_job`` blocks until the session's job ends (summary dict).
- ``/results``, ``/evaluate``, ``/merge``: the Results tab.
- ``/upload_pool``, ``/upload_probe``, ``/upload_eval``: store and describe a data file.
- ``/show_command``, ``/save_config``, ``/apply_config``: settings as YAML and as a command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gradio as gr

from p2d.config import RunConfig

from .context import Context
from .limits import current_limits
from .services import Studio
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
TABS = (("1 · Model & data", "model", model_tab), ("2 · Heads", "heads", heads_tab), ("3 · Data", "data", data_tab),
        ("4 · Train", "train", train_tab), ("5 · Results & export", "results", results_tab))


def default_runs_root() -> Path:
    return Path(os.environ.get("P2D_STUDIO_RUNS") or Path("runs") / "studio").expanduser().resolve()


def build_app(demo: bool | None = None, runs_root: str | os.PathLike | None = None, studio: Studio | None = None,
              config: RunConfig | str | os.PathLike | None = None) -> gr.Blocks:
    """The Gradio app. ``demo`` (default: env P2D_DEMO) switches the public demo limits on;
    ``runs_root`` (default: env P2D_STUDIO_RUNS, else runs/studio) holds one folder per session;
    ``config`` (a RunConfig or a settings YAML file) is what the form starts with."""
    limits = current_limits(demo)
    root = Path(runs_root).expanduser().resolve() if runs_root else default_runs_root()
    if config is not None and not isinstance(config, RunConfig):
        config = RunConfig.load(config)
    st = studio or Studio(limits, root, config=config)
    for note in st.start_notes:
        print(f"p2d studio: {note}", file=sys.stderr)
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
        ctx = Context(st)
        ctx.banner.render()
        browser_ws = gr.BrowserState(None, storage_key="p2d-studio-workspace")
        settings_tab.build(ctx)
        with gr.Tabs(elem_id="tabs"):
            for title, key, tab in TABS:
                with gr.Tab(title, id=key, elem_id=f"tab-{key}"):
                    tab.build(ctx)
        ctx.finish(browser_ws, app)

    app.studio = st  # for tests and app.py
    app.queue(default_concurrency_limit=4)
    return app


def launch(options) -> None:
    """Serve the app with `p2d.studio.options.StudioOptions` (blocks until stopped)."""
    app = build_app(demo=options.demo, runs_root=options.runs, config=options.config)
    app.launch(server_name=options.host, server_port=options.port, share=options.share or None,
               footer_links=["api", "gradio"])


def main(argv: list[str] | None = None) -> None:
    """`python app.py [flags]`: the same flags as `python -m p2d studio`."""
    from p2d.cli import main as cli_main

    raise SystemExit(cli_main(["studio", *(sys.argv[1:] if argv is None else argv)]))
