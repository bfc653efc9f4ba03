"""Every cap the app applies, in one place: local vs public demo mode (``P2D_DEMO=1``).

The demo mode is meant for a public Hugging Face Space. Its caps are enforced on the server, whatever
arguments a page or a direct API call sends:

- the run (`Limits.apply`, applied once to the RunConfig a job runs, so the shown command carries
  them): every numeric setting has a cap (`SETTING_CAPS`: lowered to it; `SETTING_FLOORS`: raised to
  it unless 0, where a small value means more work; the rest is bounded by `p2d.config.RunConfig`
  itself), trackers that write only local files, the AER reference always estimated, no remote code;
- the model (`Limits.check`): a hub id from the allowlist (env ``P2D_MODEL_ALLOWLIST``), no local
  model paths; data only from the session's own uploads;
- files: Gradio's upload route (`p2d.studio.guard`: bytes per request, files per request, uploads
  and bytes per client address per hour, bytes of unclaimed uploads in all, their expiry); then
  `Studio.receive`: only an upload this client made through that route, bytes of all uploads of a
  session (refused ones count too), rows kept per data file (``load_data(max_rows=...)``),
  decompressed bytes read (``max_bytes``) and characters per field (``max_field_chars``), at upload
  and when a run loads the file;
- requests (`p2d.studio.gate`, the one gate every endpoint goes through): characters of any text
  argument, the settings text, the chat prompt (characters, then tokens in the job), what the demo
  refuses (`p2d.studio.gate.REFUSED_IN_DEMO`), the ``/wait_job`` timeout and how many calls wait at
  once per session and per client address; the Gradio queue size, per-event concurrency (in the demo
  one group of slots for every light request, `p2d.studio.server.share_light_slots`) and queued
  requests per client address (`p2d.studio.guard`);
- sessions (`p2d.studio.workspace.Registry`, `p2d.studio.worker.Worker`): workspaces kept in
  memory, per client address (and new ones per address per hour), jobs queued or running per client
  address, how long one job runs (the one worker takes turns across addresses), and how long an idle
  workspace and its files are kept;
- the disk (`p2d.studio.workspace.Registry.room`): the runs folder's total (idle workspaces go,
  least recently used first, beyond it) and what one address stores in 24 hours;
- the server log (`p2d.studio.log`): every line cut, repeats counted, a line budget per address.

The client address is the connection's peer, or with ``proxy_hops`` trusted proxies the address the
outermost of them saw (`client_ip`); uvicorn's own rewriting of it from X-Forwarded-For is switched
off (`p2d.studio.guard.forwarded_headers_untrusted`).

Local mode keeps only the caps that protect the server itself (queue, wait timeout, workspaces in
memory); it trusts its user with paths, models and sizes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from p2d.config import RunConfig, label
from p2d.errors import UserError, shown
from p2d.models import check_spec

#: the hub ids the public demo allows besides the embedded model (override: env P2D_MODEL_ALLOWLIST)
DEFAULT_ALLOWLIST = ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct")
#: trackers that only write files into the run folder (the demo refuses ones that send data elsewhere)
LOCAL_TRACKERS = ("none", "auto", "tensorboard")
MB = 1024 * 1024


def _number(value) -> str:
    if isinstance(value, int) and abs(value) < 10 ** 15:
        return str(value)
    try:
        return f"{value:g}"
    except (OverflowError, TypeError, ValueError):
        return shown(value, 40)


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
    max_epochs: float | None = None
    max_reference_epochs: float | None = None
    max_lr: float | None = None
    max_weight_decay: float | None = None
    max_clip_norm: float | None = None     # the max_grad_norm setting
    max_val_ratio: float | None = None
    min_val_every: int | None = None       # validation every N steps: at least this (0 stays "ten per run")
    min_checkpoint_every: int | None = None  # a checkpoint every N steps: at least this (0 stays "never")
    model_allowlist: tuple[str, ...] | None = None  # None: any model (local mode)
    # files
    max_file_bytes: int | None = None      # one uploaded file
    max_session_bytes: int | None = None   # all uploads of one session
    max_data_bytes: int | None = None      # decompressed bytes read from one data file
    max_field_chars: int | None = None     # characters of one field of a data row (longer rows are skipped)
    max_upload_files: int | None = None    # files in one request to Gradio's upload route
    max_uploads_per_ip_hour: int | None = None
    max_upload_bytes_per_ip_hour: int | None = None
    max_pending_upload_bytes: int | None = None  # uploads no session has received yet, all clients
    max_pending_upload_share: float | None = None  # of that pool, the most one client address holds
    upload_ttl_s: float | None = None      # an upload no session received is deleted after this
    # requests
    max_text_chars: int | None = None      # any text argument of any endpoint
    max_settings_chars: int | None = None  # a settings text (YAML)
    max_prompt_chars: int | None = None    # the chat prompt, before it is tokenised
    max_prompt_tokens: int | None = None   # the chat prompt, in the model's tokens
    max_wait_s: float = 600.0              # /wait_job blocks at most this long
    queue_size: int | None = 256           # Gradio queue: requests waiting beyond this are refused
    max_queued_per_ip: int | None = None   # requests of one client address in the queue, waiting or running
    max_running_per_ip: int | None = None  # requests of one client address running at once (the rest wait)
    concurrency: int = 4                   # default per-event concurrency
    light_concurrency: int | None = None   # light requests (every event outside the job, wait groups) at once, all
    #                                        events together (None: `concurrency` per event)
    follow_concurrency: int | None = None  # requests following a job (load/heads/select/evaluate/...)
    wait_concurrency: int = 8              # /wait_job callers at once
    max_waits_per_workspace: int | None = None  # /wait_job and job-following calls at once, one session
    max_waits_per_ip: int | None = None    # the same, all sessions of one client address
    # sessions
    max_workspaces: int = 64               # kept in memory (an evicted idle one reloads from disk)
    max_workspaces_per_ip: int | None = None
    max_new_workspaces_per_ip_hour: int | None = None
    max_jobs_per_ip: int | None = None     # queued or running, all sessions of one client address
    max_job_s: float | None = None         # a job is stopped after running this long (the one worker is shared)
    workspace_ttl_s: float | None = None   # idle workspaces (and their files) are deleted after this
    max_disk_bytes: int | None = None      # the runs folder in all: idle workspaces go, oldest first, beyond it
    max_disk_bytes_per_ip_day: int | None = None  # what one client address stores in 24 hours
    sweep_every_s: float | None = None     # expiry and disk sweeps (None: a quarter of the shortest expiry, <= 300 s)
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
        return {"max_rows": self.data_rows(), "max_bytes": self.max_data_bytes, "max_field_chars": self.max_field_chars}

    def apply(self, config: RunConfig) -> tuple[RunConfig, list[str]]:
        """``config`` with the caps applied, plus one note per value that was lowered."""
        if not self.demo:
            return config, []
        notes: list[str] = []
        changes: dict = {}

        def cap(name: str, limit, unset_means_unlimited: bool = False) -> None:
            value = getattr(config, name)
            if limit is None:
                return
            if value is None and unset_means_unlimited:
                changes[name] = limit
            elif value is not None and value > limit:
                changes[name] = limit
                notes.append(f"{label(name)} capped at {_number(limit)} in the public demo (asked {_number(value)})")

        for name, attr in SETTING_CAPS.items():
            cap(name, getattr(self, attr), unset_means_unlimited=name in ("eval_limit", "max_steps"))
        for name, attr in SETTING_FLOORS.items():
            floor, value = getattr(self, attr), getattr(config, name)
            if floor is not None and 0 < value < floor:
                changes[name] = floor
                notes.append(f"{label(name)} raised to {floor} in the public demo (asked {value})")
        if self.max_steps is not None and config.steps is not None and config.steps > self.max_steps:
            notes.append(f"{label('steps')}: training stops after {self.max_steps} steps in the public demo "
                         f"(asked {config.steps})")
        if config.full_ft != "estimate":
            changes["full_ft"] = "estimate"
            notes.append(f"{label('full_ft')}: always estimated in the public demo")
        if config.inference_precision != "same":  # a reduced copy of the model per run: memory a visitor chooses
            changes["inference_precision"] = "same"
            notes.append(f"{label('inference_precision')}: {config.inference_precision} is off in the public demo "
                         "(it keeps another copy of the model per run)")
        if config.heads_precision != "same":  # the same: a bfloat16 copy while the heads are scored
            changes["heads_precision"] = "same"
            notes.append(f"{label('heads_precision')}: {config.heads_precision} is off in the public demo "
                         "(it keeps another copy of the model while the heads are scored)")
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

    def check_text(self, name: str, value, cap: int | None = None) -> None:
        """A text argument longer than ``cap`` (default ``max_text_chars``) is refused."""
        cap = self.max_text_chars if cap is None else cap
        if cap is not None and isinstance(value, str) and len(value) > cap:
            raise UserError(f"{name}: {len(value)} characters is over the {cap} this server takes; send less")

    def check_prompt_tokens(self, tokenizer, prompt: str) -> None:
        """A chat prompt of more than ``max_prompt_tokens`` tokens of the model's tokenizer is refused."""
        if self.max_prompt_tokens is None:
            return
        n = len(tokenizer(str(prompt), add_special_tokens=False)["input_ids"])
        if n > self.max_prompt_tokens:
            raise UserError(f"the prompt is {n} tokens; this server answers prompts of up to {self.max_prompt_tokens} "
                            "tokens: shorten it")

    def wait_timeout(self, asked) -> float:
        """The ``/wait_job`` timeout the server grants for ``asked`` seconds."""
        try:
            asked = float(asked if asked is not None else self.max_wait_s)
        except (TypeError, ValueError):
            raise UserError(f"timeout: a number of seconds, not {shown(asked)}") from None
        if math.isnan(asked):
            asked = 0.0
        return max(0.0, min(asked, self.max_wait_s))


#: RunConfig setting -> the Limits cap it is lowered to (unset ``eval_limit`` and ``max_steps`` become the cap;
#: ``steps`` is kept, the training stops at ``max_steps``: `STOPPED_BY`)
SETTING_CAPS = {"pool_size": "max_pool", "probe_size": "max_probe", "eval_size": "max_eval",
                "other_eval_size": "max_other_eval", "eval_limit": "max_eval", "batch_size": "max_batch",
                "max_length": "max_length", "max_new_tokens": "max_new_tokens", "grad_accum": "max_grad_accum",
                "max_steps": "max_steps", "epochs": "max_epochs", "reference_epochs": "max_reference_epochs",
                "lr": "max_lr", "weight_decay": "max_weight_decay", "max_grad_norm": "max_clip_norm",
                "val_ratio": "max_val_ratio"}
STOPPED_BY = {"steps": "max_steps"}
#: RunConfig settings checked against the loaded model where they are used (a UserError beyond it)
BOUNDED_BY_MODEL = ("hidden_layer", "min_head_layer", "max_head_layer")
#: RunConfig setting -> the Limits floor it is raised to unless 0 (a larger value means less work)
SETTING_FLOORS = {"val_every": "min_val_every", "checkpoint_every": "min_checkpoint_every"}

LOCAL = Limits()
DEMO = Limits(demo=True, max_pool=400, max_probe=64, max_eval=32, max_other_eval=5, max_steps=40, max_batch=16, max_length=256,
              max_new_tokens=64, max_grad_accum=4, max_epochs=10.0, max_reference_epochs=10.0, max_lr=1.0,
              max_weight_decay=1.0, max_clip_norm=100.0, max_val_ratio=0.2, min_val_every=5, min_checkpoint_every=10,
              model_allowlist=("default", *DEFAULT_ALLOWLIST),
              max_file_bytes=20 * MB, max_session_bytes=60 * MB, max_data_bytes=50 * MB, max_field_chars=100_000,
              max_upload_files=1, max_uploads_per_ip_hour=60, max_upload_bytes_per_ip_hour=150 * MB,
              max_pending_upload_bytes=200 * MB, max_pending_upload_share=0.25, upload_ttl_s=600.0,
              max_text_chars=64 * 1024, max_settings_chars=16 * 1024, max_prompt_chars=4000, max_prompt_tokens=256,
              max_wait_s=30.0, queue_size=256, max_queued_per_ip=16, max_running_per_ip=4, concurrency=4, light_concurrency=4,
              follow_concurrency=16,
              wait_concurrency=8, max_waits_per_workspace=2, max_waits_per_ip=2,
              max_workspaces=64, max_workspaces_per_ip=8, max_new_workspaces_per_ip_hour=30,
              max_jobs_per_ip=2, max_job_s=300.0, workspace_ttl_s=24 * 3600.0,
              max_disk_bytes=10 * 1024 * MB, max_disk_bytes_per_ip_day=400 * MB, proxy_hops=0)


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
    check_spec(s)
    return s.startswith((".", "/", "~", "\\")) or s.lower().endswith(".gguf") or s.count("/") > 1 or \
        Path(s).expanduser().exists()


def check_model(config: RunConfig, limits: Limits) -> None:
    """In the demo: only the embedded model and the hub ids of the allowlist."""
    allowed = limits.model_allowlist
    if allowed is None:
        return
    model = (config.model or "default").strip()
    if model not in allowed:
        others = ", ".join(m for m in allowed if m != "default") or "none"
        raise UserError(f"{label('model')}: {shown(model)} is not available in the public demo; use the embedded default "
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
            raise UserError(f"{label(name)} {shown(value)}: typed paths are disabled in the public demo; upload the "
                            "file instead")
