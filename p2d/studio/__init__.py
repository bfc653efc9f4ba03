"""P2D Studio: the Gradio app over the `p2d` library.

Layout (LlamaBoard-like, kept apart from the library; the app lays out and wires, the library runs):

- ``studio/server.py``     ``build_app() -> gr.Blocks``: header, settings accordion and tabs, composed
- ``studio/context.py``    what each tab's ``build(ctx)`` gets: the services, the shared components and
                           ``ctx.bind``, the one way an event is wired (named inputs/outputs, one error
                           handler); re-renders the other tabs when a job ends; the page load
- ``studio/tabs/*.py``     one module per tab: its layout and its events
- ``studio/form.py``       the settings inputs (one per `p2d.config.RunConfig` field) <-> RunConfig
- ``studio/services.py``   `Studio`: the job worker, workspaces, form -> the RunConfig a job runs, uploads
                           and downloads (one function each)
- ``studio/jobs.py``       job bodies: `p2d.pipeline.Run` driven through its public API
- ``studio/views.py``      a workspace rendered into a tab's output values (dicts by output name)
- ``studio/charts.py``     pure Plotly figure builders (no Gradio, testable without a browser)
- ``studio/worker.py``     the one background job worker: one job at a time, its time shared fairly
                           across client addresses (not first come), a visible place in the queue with an
                           estimate, stop flags and the demo's job time cap, a job registry so a reloaded
                           page re-attaches; the shared model cache
- ``studio/workspace.py``  per-session workspaces (run folders run-NNN, uploads, downloads), their expiry
                           and the disk's caps
- ``studio/limits.py``     local vs public demo mode; the demo caps, applied once to the RunConfig
- ``studio/gate.py``       the one gate every endpoint passes: caps, the demo's refusals, waits, no server
                           paths in what goes out
- ``studio/guard.py``      below Gradio's handlers: its upload route (each address's share of the uploads
                           waiting, a path of its own for every upload), requests per address in the
                           queue and its turns across addresses, the client address (uvicorn's
                           forwarded-header rewriting off)
- ``studio/log.py``        the server log: every line cut, repeats counted, a line budget per address
- ``studio/options.py``    how the app is served (`python -m p2d studio` flags)
- ``studio/gpu.py``        ZeroGPU's decorator where the ``spaces`` package exists
- ``studio/screenshots.py`` regenerates the README's screenshots (``assets/``) from a real run
"""

__all__ = ["build_app"]


def build_app(*args, **kwargs):
    from .server import build_app as _build

    return _build(*args, **kwargs)
