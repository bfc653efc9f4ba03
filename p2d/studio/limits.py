"""Every cap the app applies, in one place: local vs public demo mode (``P2D_DEMO=1``).

The demo mode is meant for a public Hugging Face Space. Its caps are enforced on the server, whatever
arguments a page or a direct API call sends:

- the run (`Limits.apply`, applied once to the RunConfig a job runs, so the shown command carries
  them): built-in pool/probe/eval sizes, eval rows (``eval_limit``, also for an uploaded eval set),
  training steps (``max_steps``, enforced by the library), batch size, tokens per sample, gradient
  accumulation, generation length (``max_new_tokens``), trackers that write only local files, the
  AER reference always estimated, no remote code;
- the model (`Limits.check`): a hub id from the allowlist (env ``P2D_MODEL_ALLOWLIST``), no local
  model paths; data only from the session's own uploads;
- files (`Studio.receive`): bytes per uploaded file (also Gradio's own upload route,
  ``launch(max_file_size=...)``), bytes of all uploads of a session, rows kept per data file
  (``load_data(max_rows=...)``; the pool/probe/eval caps) and decompressed bytes read
  (``max_bytes``: a gzip bomb stops there), both at upload and when a run loads the file;
- requests (`p2d.studio.context.Context.bind`, `p2d.studio.server.build_app`): characters of any text
  argument, the ``/wait_job`` timeout, the Gradio queue size and per-event concurrency;
- sessions (`p2d.studio.workspace.Registry`, `p2d.studio.runner.Runner`): workspaces kept in
  memory, per client address (and new ones per address per hour), jobs queued or running per client
  address, and how long an idle workspace and its files are kept.

Local mode keeps only the caps that protect the server itself (queue, wait timeout, workspaces in
memory); it trusts its user with paths, models and sizes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from p2d.config import RunConfig, label
from p2d.errors import UserError

#: the hub ids the public demo allows besides the embedded model (override: env P2D_MODEL_ALLOWLIST)
DEFAULT_ALLOWLIST = ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct")
#: trackers that only write files into the run folder (the demo refuses ones that send data elsewhere)
LOCAL_TRACKERS = ("none", "auto", "tensorboard")
MB = 1024 * 1024


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def on_spaces() -> bool:
    """Running on Hugging Face Spaces (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def env_demo() -> bool:
    """The default mode: P2D_DEMO when set; otherwise the demo on Hugging Face Spaces (a Space is
    public unless its owner says otherwise with P2D_DEMO=0), local mode elsewhere."""
    value = os.environ.get("P2D_DEMO", "").strip().lower()
    if value:
        return value in ("1", "true", "yes", "on")
    return on_spaces()


def parse_allowlist(text: str | None) -> tuple[str, ...] | None:
    """``"org/a, org/b"`` -> ("default", "org/a", "org/b"); None or empty -> None (the default list)."""
    names = [n.strip() for n in (text or "").replace("\n", ",").split(",") if n.strip()]
    if not names:
        return None
    return tuple(dict.fromkeys(["default", *names]))


@dataclass(frozen=True)
class Limits:
    """Caps on runs, files, requests and sessions. ``None`` means uncapped."""

    demo: bool = False
    # the run
    max_pool: int | None = None
    max_probe: int | None = None
    max_eval: int | None = None
    max_other_eval: int | None = None      # held-out rows per other task (forgetting)
    max_steps: int | None = None
    max_batch: int | None = None
    max_length: int | None = None
    max_new_tokens: int | None = None
    max_grad_accum: int | None = None
    model_allowlist: tuple[str, ...] | None = None  # None: any model (local mode)
    # files
    max_file_bytes: int | None = None      # one uploaded file
    max_session_bytes: int | None = None   # all uploads of one session
    max_data_bytes: int | None = None      # decompressed bytes read from one data file
    # requests
    max_text_chars: int | None = None      # any text argument of any endpoint
    max_wait_s: float = 600.0              # /wait_job blocks at most this long
    queue_size: int | None = 256           # Gradio queue: requests waiting beyond this are refused
    concurrency: int = 4                   # default per-event concurrency
    follow_concurrency: int | None = None  # requests following a job (load/heads/select/evaluate/...)
    wait_concurrency: int = 8              # /wait_job callers at once
    # sessions
    max_workspaces: int = 64               # kept in memory (an evicted idle one reloads from disk)
    max_workspaces_per_ip: int | None = None
    max_new_workspaces_per_ip_hour: int | None = None
    max_jobs_per_ip: int | None = None     # queued or running, all sessions of one client address
    workspace_ttl_s: float | None = None   # idle workspaces (and their files) are deleted after this
    proxy_hops: int = 0                    # trusted proxies in front of the app (X-Forwarded-For)

    @property
    def allow_local_paths(self) -> bool:
        return not self.demo

    def with_options(self, **changes) -> "Limits":
        """A copy with some caps changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def data_rows(self) -> dict[str, int | None]:
        """Rows kept per data set (pool/probe/eval) when files are loaded."""
        return {"pool": self.max_pool, "probe": self.max_probe, "eval": self.max_eval}

    def data_limits(self) -> dict:
        """What a `p2d.pipeline.Run` takes as ``data_limits`` (None: uncapped, local mode)."""
        if not self.demo:
            return {}
        return {"max_rows": self.data_rows(), "max_bytes": self.max_data_bytes}

    def apply(self, config: RunConfig) -> tuple[RunConfig, list[str]]:
        """``config`` with the caps applied, plus one note per value that was lowered."""
        if not self.demo:
            return config, []
        notes: list[str] = []
        changes: dict = {}

        def cap(name: str, limit: int | None, unset_means_unlimited: bool = False) -> None:
            value = getattr(config, name)
            if limit is None:
                return
            if value is None and unset_means_unlimited:
                changes[name] = limit
            elif value is not None and value > limit:
                changes[name] = limit
                notes.append(f"{label(name)} capped at {limit} in the public demo (asked {value})")

        cap("pool_size", self.max_pool)
        cap("probe_size", self.max_probe)
        cap("eval_size", self.max_eval)
        cap("other_eval_size", self.max_other_eval)
        cap("eval_limit", self.max_eval, unset_means_unlimited=True)  # an uploaded eval set too
        cap("batch_size", self.max_batch)
        cap("max_length", self.max_length)
        cap("max_new_tokens", self.max_new_tokens)  # unset: the library's own cap (64)
        cap("grad_accum", self.max_grad_accum)
        cap("max_steps", self.max_steps, unset_means_unlimited=True)
        if config.steps is not None and self.max_steps is not None and config.steps > self.max_steps:
            notes.append(f"{label('steps')}: training stops after {self.max_steps} steps in the public demo "
                         f"(asked {config.steps})")
        if config.full_ft != "estimate":
            changes["full_ft"] = "estimate"
            notes.append(f"{label('full_ft')}: always estimated in the public demo")
        if config.report_to not in LOCAL_TRACKERS:
            changes["report_to"] = "none"
            notes.append(f"{label('report_to')}: {config.report_to} is off in the public demo (it would send the "
                         "run to the host's account); TensorBoard files in the run folder work")
        changes["trust_remote_code"] = False
        return config.replace(**changes), notes

    def check(self, config: RunConfig, upload_dir: Path | None) -> None:
        """Refuse what the mode does not allow: a model off the allowlist, local paths (demo)."""
        check_paths(config, self, upload_dir)
        check_model(config, self)

    def check_text(self, name: str, value) -> None:
        """A text argument longer than ``max_text_chars`` is refused."""
        if self.max_text_chars is not None and isinstance(value, str) and len(value) > self.max_text_chars:
            raise UserError(f"{name}: {len(value)} characters is over the {self.max_text_chars} this server takes; "
                            "send less")

    def wait_timeout(self, asked) -> float:
        """The ``/wait_job`` timeout the server grants for ``asked`` seconds."""
        try:
            asked = float(asked if asked is not None else self.max_wait_s)
        except (TypeError, ValueError):
            raise UserError(f"timeout: a number of seconds, not {asked!r}") from None
        if math.isnan(asked):
            asked = 0.0
        return max(0.0, min(asked, self.max_wait_s))


LOCAL = Limits()
DEMO = Limits(demo=True, max_pool=400, max_probe=64, max_eval=32, max_other_eval=5, max_steps=40, max_batch=16, max_length=256,
              max_new_tokens=64, max_grad_accum=4,
              model_allowlist=("default", *DEFAULT_ALLOWLIST),
              max_file_bytes=20 * MB, max_session_bytes=60 * MB, max_data_bytes=50 * MB,
              max_text_chars=64 * 1024, max_wait_s=60.0, queue_size=64, concurrency=4, follow_concurrency=16,
              wait_concurrency=8, max_workspaces=64, max_workspaces_per_ip=8, max_new_workspaces_per_ip_hour=30,
              max_jobs_per_ip=2, workspace_ttl_s=24 * 3600.0, proxy_hops=0)


def current_limits(demo: bool | None = None, **options) -> Limits:
    """DEMO when ``demo`` is True (with ``demo=None``: `env_demo`), else LOCAL; ``options`` change
    single caps (None: keep). The model allowlist comes from env P2D_MODEL_ALLOWLIST unless given,
    and the proxy hops from env P2D_PROXY_HOPS (default 1 on Spaces, whose proxy sets
    X-Forwarded-For)."""
    if demo is None:
        demo = env_demo()
    base = DEMO if demo else LOCAL
    if options.get("model_allowlist") is None:
        options["model_allowlist"] = parse_allowlist(os.environ.get("P2D_MODEL_ALLOWLIST"))
    if options.get("proxy_hops") is None:
        hops = os.environ.get("P2D_PROXY_HOPS", "").strip()
        options["proxy_hops"] = int(hops) if hops.isdigit() else (1 if on_spaces() else None)
    if not demo:
        options.pop("model_allowlist", None)  # local mode: any model
        options.pop("workspace_ttl_s", None)  # local mode: runs are kept
    return base.with_options(**options)


def client_ip(request, proxy_hops: int = 0) -> str:
    """The client address of a Gradio request: the connection's peer, or with ``proxy_hops`` trusted
    proxies in front of the app the address the outermost of them saw (X-Forwarded-For, counted from
    the right: a client can prepend anything, but not what the proxies append)."""
    headers = getattr(request, "headers", None) or {}
    if proxy_hops > 0:
        forwarded = [a.strip() for a in str(headers.get("x-forwarded-for", "")).split(",") if a.strip()]
        if len(forwarded) >= proxy_hops:
            return forwarded[-proxy_hops]
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return str(host or "unknown")


def looks_like_local_path(spec: str) -> bool:
    s = (spec or "").strip()
    if not s or s == "default":
        return False
    p = Path(s).expanduser()
    return s.startswith((".", "/", "~", "\\")) or s.lower().endswith(".gguf") or p.exists() or s.count("/") > 1


def check_model(config: RunConfig, limits: Limits) -> None:
    """In the demo: only the embedded model and the hub ids of the allowlist."""
    allowed = limits.model_allowlist
    if allowed is None:
        return
    model = (config.model or "default").strip()
    if model not in allowed:
        others = ", ".join(m for m in allowed if m != "default") or "none"
        raise UserError(f"{label('model')}: {model!r} is not available in the public demo; use the embedded default "
                        f"or one of: {others} (duplicate the Space to use other models)")


def check_paths(config: RunConfig, limits: Limits, upload_dir: Path | None) -> None:
    """In the demo: refuse local model paths and data paths outside the session's upload folder."""
    if limits.allow_local_paths:
        return
    if looks_like_local_path(config.model):
        raise UserError(f"{label('model')}: local model paths are disabled in the public demo; use the embedded "
                        "default or a hub id (duplicate the Space to use your own files)")
    for name in ("pool", "probe", "eval"):
        value = getattr(config, name)
        if not value:
            continue
        p = Path(value).expanduser()
        inside = False
        if upload_dir is not None:
            try:
                inside = p.resolve().is_relative_to(upload_dir.resolve())
            except (OSError, ValueError):
                inside = False
        if not inside:
            raise UserError(f"{label(name)} {value!r}: typed paths are disabled in the public demo; upload the file "
                            "instead")
