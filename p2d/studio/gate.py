"""The one server-side gate every endpoint goes through (`p2d.studio.context.Context.bind` and the two plain API
functions, ``/attach`` and ``/wait_job``); tabs only lay out and bind.

`Gate.check(name, args)` runs before a handler, with the endpoint's name (its ``api_name``, or the handler's
name for events the page calls by index) and its arguments by name:

- every text argument within `p2d.studio.limits.Limits.max_text_chars`, and every one that names a model,
  a file, a folder, a run or a repository (`NAME_ARGUMENTS`) within what a file system or the hub takes
  (`p2d.models.check_spec`), before anything looks it up; in both modes;
- in the public demo, what the demo does not do at all (`REFUSED_IN_DEMO`: pushing with the host's token,
  writing a merged model into a server folder, training in several processes);
- every number an endpoint takes besides the settings (`NUMBER_ARGUMENTS`: the chat's reply length,
  temperature, top-p and seed, a head's layer, head and row, a preview page) checked as the settings are
  (`p2d.config.check_number`: NaN, inf, text, negative or huge values are one clear line), in both modes;
- the checks of single arguments (`ARGUMENT_CHECKS`): the training processes, the settings text, the chat
  prompt's characters (its tokens are counted in the job, `Limits.check_prompt_tokens`) and, in the demo,
  its reply length.

`Gate.waiting(ws, client)` is held by every call that waits on a job (``/wait_job`` and the stage buttons
that follow their job): at most ``max_waits_per_workspace`` per session (attached viewers of one workspace
count together) and ``max_waits_per_ip`` per client address; ``/wait_job`` is refused beyond them at once,
so waiting calls never pile up in the queue. While every ``/wait_job`` slot is taken (`Gate.crowded`), a
wait returns within a second (the job's summary says it is still running) so that the slots go round:
Gradio's queue then starts the waiting call of the address with the fewest running first.

`Gate.outgoing(value)` is what every response passes through: in the public demo no server path leaves the
app (a path under the session's folder becomes relative to it, ``run-001/metrics.json``; other server
folders become placeholders). Downloads of text files get the same treatment (`Studio.download`). Gradio's
own file URLs (its cache, ``/gradio_api/file=...``) stay: they are how the browser fetches a file.

Events the page calls by index (``page_load``, ``load_config_file``, the tab re-render) cannot be refused
without breaking the page; they go through the same gate and are harmless: the page load hands out a key only
for a workspace it created or a key it was sent (`Studio.attach`), and a settings file is read only from an
upload this client made (`Studio.receive`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections import Counter
from pathlib import Path

from p2d.chat import MAX_NEW_TOKENS
from p2d.config import check_number
from p2d.errors import UserError
from p2d.models import check_spec

from .guard import gradio_upload_folder

#: endpoint -> why the public demo refuses it (whatever the page shows)
REFUSED_IN_DEMO = {
    "push": "pushing to the Hub is disabled in the public demo (it would use the host's token): download the PEFT "
            "adapter instead, or duplicate the Space",
    "merge": "saving a merged model to a folder is disabled in the public demo: download the head adapter instead, "
             "or duplicate the Space",
    "export_gguf": "GGUF export is off in the public demo: download the PEFT adapter instead",
    "dataset_options": "datasets from the hub are off in the public demo: upload files instead, or duplicate the Space",
}
MAX_PROCESSES = 64
#: arguments that name a model, file, folder, run or repository (looked up on disk or on the hub)
NAME_ARGUMENTS = ("model_name", "pool_path", "probe_path", "eval_path", "repo_id", "run", "run_pick", "name", "a", "b",
                  "folder", "dataset", "source_run")


def _processes(limits, args: dict) -> None:
    n = args.get("processes")
    try:
        n = int(n or 1)
    except (TypeError, ValueError, OverflowError):
        raise UserError("Training processes: a whole number between 1 and 64") from None
    if n > 1 and limits.demo:
        raise UserError("training with several processes is off in the public demo: duplicate the Space")
    if not 1 <= n <= MAX_PROCESSES:
        raise UserError(f"Training processes: between 1 and {MAX_PROCESSES}")


def _settings_text(limits, args: dict) -> None:
    limits.check_text("settings", args.get("text"), limits.max_settings_chars)


def _chat(limits, args: dict) -> None:
    limits.check_text("prompt", args.get("prompt"), limits.max_prompt_chars)
    cap = limits.max_new_tokens
    asked = args.get("max_new_tokens")
    if cap is not None and asked is not None and check_number(asked, "Max new tokens", whole=True) > cap:
        raise UserError(f"Max new tokens: at most {cap} here")


#: endpoint -> {argument: (what it is, whole number, minimum, maximum)}; None values take the handler's default
NUMBER_ARGUMENTS = {
    "chat": {"max_new_tokens": ("Max new tokens", True, 1, MAX_NEW_TOKENS), "temperature": ("Temperature", False, 0.0, 5.0),
             "top_p": ("Top-p", False, 0.0, 1.0), "seed": ("Seed", True, 0, 2 ** 32 - 1)},
    "inspect_head": {"layer": ("Layer", True, 0, 10_000), "head": ("Head", True, 0, 10_000),
                     "row": ("Sample row", True, 0, 10 ** 9)},
    "preview": {"page": ("Page", True, 0, 10 ** 9)},
}


#: endpoint -> a check of its arguments (``fn(limits, args)``, UserError to refuse)
ARGUMENT_CHECKS = {"train": _processes, "apply_config": _settings_text, "chat": _chat}


def server_folders(studio) -> list[tuple[str, str]]:
    """(server folder, what a response shows instead), longest first."""
    folders = {str(studio.runs_root): "<runs>", str(gradio_upload_folder()): "<uploads>",
               str(studio.outbox): "<downloads>", str(Path(tempfile.gettempdir()).resolve()): "<tmp>",
               str(Path.home()): "~", os.getcwd(): "."}
    pairs = [(f, shown) for f, shown in folders.items() if f and f != "/"]
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


class Gate:
    """See the module docstring. One per app (`p2d.studio.services.Studio.gate`)."""

    def __init__(self, studio):
        self.studio = studio
        self.limits = studio.limits
        self._lock = threading.Lock()
        self._waits_ws: Counter = Counter()
        self._waits_ip: Counter = Counter()
        self._wait_calls = 0  # /wait_job calls waiting now (those that ``refuse``)
        workspace = re.escape(str(studio.runs_root)) + r"/ws-[0-9a-f]{8,64}(?:/|(?=[^/\w-])|$)"
        others = "|".join(re.escape(f) for f, _ in server_folders(studio))
        self._pattern = re.compile(f"({workspace})|({others})(?![\\w.-])")
        self._shown = dict(server_folders(studio))

    # -- requests -----------------------------------------------------------------------------------
    def check(self, name: str, args: dict) -> None:
        """Refuse a call (UserError) the server does not take; see the module docstring."""
        lim = self.limits
        for arg, value in args.items():
            lim.check_text(arg, value)
            if arg in NAME_ARGUMENTS and isinstance(value, str):
                check_spec(value.strip(), what=arg)
        if lim.demo and name in REFUSED_IN_DEMO:
            raise UserError(REFUSED_IN_DEMO[name])
        for arg, (what, whole, low, high) in NUMBER_ARGUMENTS.get(name, {}).items():
            if args.get(arg) is not None:
                check_number(args[arg], what, whole=whole, minimum=low, maximum=high)
        check = ARGUMENT_CHECKS.get(name)
        if check is not None:
            check(lim, args)

    @contextlib.contextmanager
    def waiting(self, ws, client: str, refuse: bool = True):
        """Count a call waiting on ``ws``'s job from ``client``; with ``refuse``, a UserError when the
        session or the address already has as many waiting as the caps allow."""
        lim, key = self.limits, getattr(ws, "id", "") or ""
        with self._lock:
            if refuse and lim.max_waits_per_workspace is not None and \
                    self._waits_ws[key] >= lim.max_waits_per_workspace:
                raise UserError(f"this session already has {self._waits_ws[key]} calls waiting on its job: wait with "
                                "those (or poll /train_status)")
            if refuse and lim.max_waits_per_ip is not None and self._waits_ip[client] >= lim.max_waits_per_ip:
                raise UserError(f"your address already has {self._waits_ip[client]} calls waiting on jobs: wait with "
                                "those (or poll /train_status)")
            self._waits_ws[key] += 1
            self._waits_ip[client] += 1
            self._wait_calls += refuse
        try:
            yield
        finally:
            with self._lock:
                self._wait_calls -= refuse
                for counter, k in ((self._waits_ws, key), (self._waits_ip, client)):
                    counter[k] -= 1
                    if counter[k] <= 0:
                        del counter[k]

    def crowded(self) -> bool:
        """Every ``/wait_job`` slot (``wait_concurrency``) is taken: waits should make way."""
        if not self.limits.demo:
            return False
        with self._lock:
            return self._wait_calls >= self.limits.wait_concurrency

    def waits(self) -> dict:
        """Calls waiting now, by workspace id and by client address (for tests and the bench)."""
        with self._lock:
            return {"workspaces": dict(self._waits_ws), "addresses": dict(self._waits_ip)}

    # -- responses ----------------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """``text`` without server paths (public demo; locally unchanged)."""
        if not self.limits.demo or not isinstance(text, str) or "/" not in text:
            return text
        return self._pattern.sub(lambda m: "" if m.group(1) else self._shown[m.group(2)], text)

    def outgoing(self, value):
        """A response value with `scrub` applied to its texts (strings, lists, dicts, tables); other
        values (figures, component updates, file values) as they are."""
        if not self.limits.demo:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.outgoing(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.outgoing(v) for v in value)
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas is a dependency of the app
            return value
        if isinstance(value, pd.DataFrame):
            return value.map(lambda v: self.scrub(v) if isinstance(v, str) else v)
        return value
