"""Local vs public demo mode (``P2D_DEMO=1``) and what the demo caps.

The demo mode is meant for a public Hugging Face Space: it caps pool size and steps so a visitor's run
stays short, refuses local filesystem paths (model folders/.gguf files, typed data paths, merged-model
export), always writes into a per-session run folder, and shows a "Duplicate this Space" button.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from p2d.config import RunConfig
from p2d.errors import UserError


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Limits:
    """Caps on one run. ``None`` means uncapped (local mode)."""

    demo: bool = False
    max_pool: int | None = None
    max_probe: int | None = None
    max_eval: int | None = None
    max_steps: int | None = None
    max_epochs: float | None = None
    max_batch: int | None = None
    max_length: int | None = None

    @property
    def allow_local_paths(self) -> bool:
        return not self.demo


LOCAL = Limits()
DEMO = Limits(demo=True, max_pool=400, max_probe=64, max_eval=32, max_steps=40, max_epochs=2.0, max_batch=16,
              max_length=256)


def current_limits(demo: bool | None = None) -> Limits:
    """DEMO when ``demo`` is True (or, with ``demo=None``, when the env var P2D_DEMO is set)."""
    if demo is None:
        demo = env_flag("P2D_DEMO")
    return DEMO if demo else LOCAL


def _cap(value, cap, name: str, notes: list[str]):
    if cap is None or value is None or value <= cap:
        return value
    notes.append(f"{name} capped at {cap} in the demo (asked {value})")
    return cap


def apply_caps(config: RunConfig, limits: Limits) -> tuple[RunConfig, list[str]]:
    """A copy of ``config`` with the demo caps applied, plus one note per value that was lowered."""
    if not limits.demo:
        return config, []
    notes: list[str] = []
    c = replace(config)
    c.pool_size = _cap(c.pool_size, limits.max_pool, "pool size", notes)
    c.probe_size = _cap(c.probe_size, limits.max_probe, "probe size", notes)
    c.eval_size = _cap(c.eval_size, limits.max_eval, "eval size", notes)
    if c.steps is None and limits.max_steps is not None:
        c.epochs = _cap(c.epochs, limits.max_epochs, "epochs", notes)
    c.steps = _cap(c.steps, limits.max_steps, "steps", notes)
    c.batch_size = _cap(c.batch_size, limits.max_batch, "batch size", notes)
    c.max_length = _cap(c.max_length, limits.max_length, "max length", notes)
    if c.eval_limit is not None:
        c.eval_limit = _cap(c.eval_limit, limits.max_eval, "eval limit", notes)
    if c.full_ft != "estimate":
        notes.append("the full fine-tuning reference is always estimated in the demo")
        c.full_ft = "estimate"
    c.trust_remote_code = False
    return c, notes


def looks_like_local_path(spec: str) -> bool:
    s = (spec or "").strip()
    if not s or s == "default":
        return False
    p = Path(s).expanduser()
    return s.startswith((".", "/", "~", "\\")) or s.lower().endswith(".gguf") or p.exists() or s.count("/") > 1


def check_paths(config: RunConfig, limits: Limits, upload_dir: Path | None) -> None:
    """In the demo: refuse local model paths and data paths outside the session's upload folder."""
    if limits.allow_local_paths:
        return
    if looks_like_local_path(config.model):
        raise UserError("local model paths are disabled in the public demo: use the embedded default or a hub id "
                        "(duplicate the Space to use your own files)")
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
            raise UserError(f"{name} file {value!r}: typed paths are disabled in the public demo; upload the file "
                            "instead")
