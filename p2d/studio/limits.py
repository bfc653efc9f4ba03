"""Local vs public demo mode (``P2D_DEMO=1``) and what the demo caps.

The demo mode is meant for a public Hugging Face Space: it caps sizes and training steps so a
visitor's run stays short, refuses local filesystem paths (model folders/.gguf files, typed data
paths, merged-model export), always writes into a per-session run folder, and shows a "Duplicate this
Space" button. The caps are applied in one place, `Limits.apply`, to the RunConfig a job runs (the
step cap is RunConfig's own ``max_steps``, so the library enforces it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from p2d.config import RunConfig, label
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
    max_batch: int | None = None
    max_length: int | None = None

    @property
    def allow_local_paths(self) -> bool:
        return not self.demo

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
        cap("eval_limit", self.max_eval)
        cap("batch_size", self.max_batch)
        cap("max_length", self.max_length)
        cap("max_steps", self.max_steps, unset_means_unlimited=True)
        if config.steps is not None and self.max_steps is not None and config.steps > self.max_steps:
            notes.append(f"{label('steps')}: training stops after {self.max_steps} steps in the public demo "
                         f"(asked {config.steps})")
        if config.full_ft != "estimate":
            changes["full_ft"] = "estimate"
            notes.append(f"{label('full_ft')}: always estimated in the public demo")
        changes["trust_remote_code"] = False
        return config.replace(**changes), notes


LOCAL = Limits()
DEMO = Limits(demo=True, max_pool=400, max_probe=64, max_eval=32, max_steps=40, max_batch=16, max_length=256)


def current_limits(demo: bool | None = None) -> Limits:
    """DEMO when ``demo`` is True (or, with ``demo=None``, when the env var P2D_DEMO is set)."""
    if demo is None:
        demo = env_flag("P2D_DEMO")
    return DEMO if demo else LOCAL


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
