"""`Context`: what every tab's ``build(ctx)`` gets, and the one way a tab wires an event.

A tab lays out its part of the page and binds its own events with `Context.bind`, which

- passes the inputs by name (with ``settings=True`` the whole settings form too, as keyword parameters
  named after its inputs, so the API takes them by keyword), after the one gate every request passes
  (`p2d.studio.gate.Gate.check`, by the endpoint's name: text caps, what the public demo refuses, the
  checks of single arguments). The form's values reach the handler as the page sends them (Gradio's
  preprocessing off for these events): `p2d.studio.form.to_config` parses and checks every one, and
  Gradio would spend a thread hop per input on its own (~55), which under a flood made ``/show_command``
  take five times another light call;
- takes the handler's result as a dict keyed by output name (names missing from it leave that
  output as it is; a download button gets a path), passed through `p2d.studio.gate.Gate.outgoing`
  (no server paths in the public demo);
- is the one error handler: a `UserError` becomes a one-line message in the page (the ``status``
  output) and a warning toast; anything else "internal error" (one line), with the traceback in the
  server log (both logged within bounds: `p2d.studio.log`).

Shared components live here: the settings inputs (created unrendered by `p2d.studio.form`, placed by
the tabs), the job banner, the poll timer, and ``job_end``, a state a handler sets when a job has
ended so the other tabs re-render (`finish` wires that, and the page load, once every tab is built).
"""

from __future__ import annotations

import inspect

import gradio as gr

from p2d.errors import UserError

from . import form, views
from .log import LOG
from .services import Studio


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException, client: str = "", where: str = "") -> str:
    """A UserError's own text; anything else as 'internal error'; one line. The server log
    (`p2d.studio.log.LOG`) gets a short line for the UserError, the traceback for anything else."""
    if isinstance(exc, UserError):
        LOG.user_error(client, where, exc)
        return one_line(str(exc), 1000)
    LOG.bug(client, where, exc)
    return f"internal error ({type(exc).__name__}: {one_line(exc, 200)}); see the server log"


class Context:
    """The services and the shared components (build inside the app's ``gr.Blocks``)."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.limits = studio.limits
        self.form = form.build_inputs(studio.limits, studio.initial)
        self.banner = gr.Markdown(elem_classes="p2d-banner", elem_id="job-banner", render=False)
        self.timer = gr.Timer(1.0, active=False)
        self.poll_state = gr.State({})
        self.job_end = gr.State(None)
        self.views: dict[str, dict] = {}  # tab -> {output name: component} its view fills
        #: event settings of the handlers that submit a job and follow it (one shared concurrency limit)
        self.job_event = dict(concurrency_limit=studio.limits.follow_concurrency, concurrency_id="jobs",
                              show_progress="hidden")

    # -- wiring ----------------------------------------------------------------------------------
    def bind(self, trigger, fn, *, outputs: dict, inputs: dict | None = None, settings: bool = False,
             status: str | None = None, oauth: bool = False, **event):
        """``trigger(wrapped fn, inputs, outputs, **event)``; see the module docstring.

        ``fn(request, **named inputs)`` (plus ``settings=`` the form's values by name) returns or
        yields a dict keyed by the names in ``outputs``. With ``oauth``, ``fn`` also gets ``token=``: the
        visitor's Hugging Face access token from Gradio's login (``gr.OAuthToken``) for this request, or None."""
        inputs = dict(inputs or {})
        form_names = list(form.FIELD_NAMES) if settings else []
        names = form_names + list(inputs)
        comps = [self.form[n] for n in form_names] + list(inputs.values())
        out_names, out_comps = list(outputs), list(outputs.values())
        if settings and not any(getattr(c, "data_model", None) for c in inputs.values()):
            event.setdefault("preprocess", False)  # the form as sent: `form.to_config` parses and checks it

        gate = self.studio.gate
        endpoint = event.get("api_name") or fn.__name__

        def pack(result: dict | None):
            result = result or {}
            unknown = set(result) - set(out_names)
            assert not unknown, f"{fn.__name__} returned outputs it does not declare: {sorted(unknown)}"
            values = []
            for name, comp in zip(out_names, out_comps):
                value = result[name] if name in result else gr.skip()
                if isinstance(comp, gr.DownloadButton) and name in result and not isinstance(value, gr.DownloadButton):
                    value = gr.DownloadButton(value=value, interactive=bool(value))
                elif name in result and not isinstance(comp, (gr.File, gr.DownloadButton, gr.UploadButton)):
                    value = gate.outgoing(value)
                values.append(value)
            return values[0] if len(values) == 1 else values

        def call_args(args):
            request = args[len(names)] if len(args) > len(names) else None
            given = dict(zip(names, args[:len(names)]))
            gate.check(endpoint, given)
            kwargs = {n: given[n] for n in inputs}
            if settings:
                kwargs["settings"] = {n: given[n] for n in form_names}
            if oauth:  # Gradio puts the login's token after the request (only this request's)
                login = args[len(names) + 1] if len(args) > len(names) + 1 else None
                kwargs["token"] = getattr(login, "token", None) or None
            return request, kwargs

        def failed(exc: BaseException, args):
            request = args[len(names)] if len(args) > len(names) else None
            client = self.studio.client(request) if request is not None else ""
            message = gate.scrub(describe_error(exc, client, endpoint))
            gr.Warning(message)
            if status is None:
                return pack({})
            code = isinstance(outputs[status], gr.Code)  # a code box shows the message as a comment
            return pack({status: f"# ✗ {message}" if code else views.error_md(message)})

        if inspect.isgeneratorfunction(fn):
            def handler(*args):
                try:
                    request, kwargs = call_args(args)
                    for result in fn(request, **kwargs):
                        yield pack(result)
                except Exception as exc:  # noqa: BLE001 - the one error handler
                    yield failed(exc, args)
        else:
            def handler(*args):
                try:
                    request, kwargs = call_args(args)
                    return pack(fn(request, **kwargs))
                except Exception as exc:  # noqa: BLE001 - the one error handler
                    return failed(exc, args)

        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
        params.append(inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                        annotation=gr.Request))
        annotations = {"request": gr.Request}
        if oauth:
            params.append(inspect.Parameter("oauth_token", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                            annotation=gr.OAuthToken | None))
            annotations["oauth_token"] = gr.OAuthToken | None
        handler.__signature__ = inspect.Signature(params)
        handler.__annotations__ = annotations
        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return trigger(handler, comps, out_comps, **event)

    def register_view(self, tab: str, outputs: dict) -> None:
        """The outputs a tab's view (`p2d.studio.views.TABS`) fills, re-rendered after other tabs' jobs."""
        self.views[tab] = outputs

    def run_job(self, request, kind: str, label: str, make, tab: str | None, settings: dict | None = None,
                create: bool = False, **make_args):
        """Submit a job and follow it (a generator for a handler): ``make(studio, ws, [config,]
        **make_args)`` gives its body; with ``settings`` the form becomes the job's RunConfig first.
        ``create``: a session without a workspace gets one (the stage buttons; within the caps)."""
        st = self.studio
        ws = st.workspace(request, create=create)
        notes: list[str] = []
        if settings is not None:
            cfg, notes = st.run_config(settings, ws)
            body = make(st, ws, cfg, **make_args)
        else:
            body = make(st, ws, **make_args)
        job = st.submit(ws, kind, body, label, request)
        yield from self.follow_job(job, ws, tab, notes)

    def follow_job(self, job, ws, tab: str | None, notes=(), every: float = 1.0):
        """Yield the status line of ``job`` while it runs (when it changed, at most every ``every``
        seconds); then its final line, with ``tab``'s view and ``job_end`` (the other tabs re-render)."""
        st = self.studio
        last = None
        with st.gate.waiting(ws, job.client, refuse=False):
            while job.active:
                line = views.job_line(st, job, notes)
                if line != last:
                    last = line
                    yield {"status": line}
                st.worker.wait(job, timeout=every)
        if job.status == "failed":
            gr.Warning(st.gate.scrub(job.error or "failed"))
        final = {"status": views.job_line(st, job, notes)}
        if tab is not None:
            final.update(views.TABS[tab](st, ws), job_end={"job": job.id, "rendered": tab})
        yield final

    # -- what needs every tab --------------------------------------------------------------------
    def finish(self, browser_ws: gr.BrowserState, app: gr.Blocks) -> None:
        """Once every tab is built: re-render the other tabs when a job ended, and the page load
        (re-attach to this browser's workspace and its running job)."""
        missing = [n for n, c in self.form.items() if not c.is_rendered]
        assert not missing, f"settings inputs no tab shows: {missing}"
        st = self.studio
        all_views = {f"{tab}.{name}": comp for tab, outs in self.views.items() for name, comp in outs.items()}

        def rendered(ws, skip: str | None = None) -> dict:
            out = {}
            for tab, outs in self.views.items():
                if tab != skip:
                    out.update({f"{tab}.{k}": v for k, v in views.TABS[tab](st, ws).items() if k in outs})
            return out

        def refresh_tabs(request: gr.Request, job_end: dict | None):
            ws = st.workspace(request)
            return {"banner": views.banner(st, ws), **rendered(ws, skip=(job_end or {}).get("rendered"))}

        self.bind(self.job_end.change, refresh_tabs, inputs={"job_end": self.job_end},
                  outputs={"banner": self.banner, **all_views}, api_visibility="private", show_progress="hidden")

        def page_load(request: gr.Request, browser_ws: str | None):
            """The page's first call (by index; see `p2d.studio.gate`): the browser's workspace, and its key
            only when this call made the workspace or was sent the key."""
            ws, key = st.attach_key(request, browser_ws if isinstance(browser_ws, str) else None)
            job = st.current_job(ws)
            active = job is not None and job.active
            values = st.form_of_run(ws) or {}
            return {**({"browser_ws": key} if key else {}), **{f"form.{k}": v for k, v in values.items()},
                    **rendered(ws), "banner": views.banner(st, ws), "timer": gr.Timer(active=active), "poll": {}}

        outputs = {"browser_ws": browser_ws, **{f"form.{k}": c for k, c in self.form.items()}, **all_views,
                   "banner": self.banner, "timer": self.timer, "poll": self.poll_state}
        self.bind(app.load, page_load, inputs={"browser_ws": browser_ws}, outputs=outputs,
                  api_visibility="private", show_progress="hidden")

