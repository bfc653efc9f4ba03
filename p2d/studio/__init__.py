"""P2D Studio: the Gradio app over the `p2d` library.

Layout (LlamaBoard-like, kept apart from the library):

- ``studio/tabs/*.py``   one module per tab; each ``build()`` returns its named components
- ``studio/charts.py``   pure Plotly figure builders (no Gradio, testable without a browser)
- ``studio/runner.py``   background job runner: one job at a time, a visible queue, stop flags,
                         a job registry so a reloaded page re-attaches to its run
- ``studio/workspace.py`` per-session workspaces (own run folder, own `p2d.pipeline.Run`)
- ``studio/fields.py``   the settings form <-> `p2d.config.RunConfig` (the YAML `python -m p2d run
                         --config` takes)
- ``studio/actions.py``  what the buttons do (library calls through the runner, rendering)
- ``studio/app.py``      ``build_app() -> gr.Blocks`` wires it together
"""

__all__ = ["build_app"]


def build_app(*args, **kwargs):
    from .app import build_app as _build

    return _build(*args, **kwargs)
