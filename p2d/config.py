"""Run settings: one dataclass, saved and loaded as YAML, shared by `python -m p2d run` and the app.

Every field maps to a `run` flag of the same name (underscores become dashes), so a config file and
a command line are interchangeable; `to_command()` prints the equivalent command.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from .errors import UserError

from .adapter import PROJECTIONS
from .heads import DEFAULT_HEAD_METHOD, HEAD_METHODS
from .selection import DEFAULT_SELECT_METHOD, SELECT_METHODS


@dataclass
class RunConfig:
    """All settings of one P2D run (model, data, the three stages, evaluation, output)."""

    # model
    model: str = field(default="default", metadata={"help": "model spec: default, hub id, folder or .gguf"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, else fp32), fp32, bf16, fp16"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the hub"})
    quantize: str | None = field(default=None, metadata={"help": "8bit or 4bit: bitsandbytes for the frozen "
                                                                 "MLPs (GPU memory; slower on CPU)"})
    # data: files, or the built-in task pool when `pool` is empty
    pool: str | None = field(default=None, metadata={"help": "training pool file (empty: built-in task pool)"})
    probe: str | None = field(default=None, metadata={"help": "~100 target examples used to find the heads"})
    eval: str | None = field(default=None, metadata={"help": "eval set for before/after accuracy"})
    columns: dict | None = field(default=None, metadata={"help": "column mapping: prompt=q,answer=a on the command line, a mapping in YAML"})
    target: str | None = field(default=None, metadata={"help": "built-in pool: target task"})
    pool_size: int = field(default=1000, metadata={"help": "built-in pool: rows in the pool"})
    probe_size: int = field(default=100, metadata={"help": "built-in pool: probe rows"})
    eval_size: int = field(default=100, metadata={"help": "built-in pool: eval rows"})
    seed: int = field(default=0, metadata={"help": "seed for the pool, random controls and training order"})
    max_length: int = field(default=256, metadata={"help": "max tokens per sample"})
    # stage 1: heads
    head_method: str | None = field(default=None, metadata={"help": "shift, gradient or random"})
    head_ratio: float = field(default=0.1, metadata={"help": "share of all query heads to select"})
    # stage 2: data
    select_method: str | None = field(default=None, metadata={"help": "ablation, alignment, activation or random"})
    data_ratio: float = field(default=0.1, metadata={"help": "share of the pool to keep"})
    # stage 3: training
    steps: int | None = field(default=100, metadata={"help": "optimizer steps (empty: from epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "epochs over the selected data when steps is empty"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the head deltas"})
    batch_size: int = field(default=8, metadata={"help": "samples per step"})
    projections: list[str] = field(default_factory=lambda: list(PROJECTIONS),
                                   metadata={"help": "which head projections to train (q, k, v, o)"})
    # evaluation and cost
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on at most this many rows"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "generation cap (empty: from gold answers)"})
    full_ft: str = field(default="estimate", metadata={"help": "full fine-tuning reference: estimate or measure"})
    # output
    out: str = field(default="runs/latest", metadata={"help": "run folder"})

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        from .data.builtin import DEFAULT_TARGET, TASKS

        self.head_method = self.head_method or DEFAULT_HEAD_METHOD
        self.select_method = self.select_method or DEFAULT_SELECT_METHOD
        if not self.pool:
            self.target = self.target or DEFAULT_TARGET
            if self.target not in TASKS:
                raise UserError(f"unknown target task {self.target!r}: choose one of {', '.join(TASKS)}")
        if self.head_method not in HEAD_METHODS:
            raise UserError(f"unknown head method {self.head_method!r}: choose {', '.join(HEAD_METHODS)}")
        if self.select_method not in SELECT_METHODS:
            raise UserError(f"unknown select method {self.select_method!r}: choose {', '.join(SELECT_METHODS)}")
        for name in ("head_ratio", "data_ratio"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise UserError(f"{name.replace('_', '-')} must be in (0, 1], got {v}")
        if self.pool and not self.probe:
            raise UserError("a custom --pool needs a --probe file (~100 examples of the target task)")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1 or self.max_length < 8:
            raise UserError("batch size must be >= 1 and max length >= 8")
        bad = [p for p in self.projections if p not in PROJECTIONS]
        if bad or not self.projections:
            raise UserError(f"projections must be a non-empty subset of q, k, v, o (got {self.projections})")
        if self.quantize not in (None, "", "none", "8bit", "4bit"):
            raise UserError(f"quantize must be 8bit or 4bit (or empty), got {self.quantize!r}")
        if self.full_ft not in ("estimate", "measure"):
            raise UserError(f"full-ft must be estimate or measure, got {self.full_ft!r}")
        return self

    # -- YAML -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict | None) -> "RunConfig":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)} in config; known: {', '.join(sorted(known))}")
        cfg = cls(**data)
        if isinstance(cfg.projections, str):
            cfg.projections = [p.strip() for p in cfg.projections.split(",") if p.strip()]
        return cfg

    @classmethod
    def from_yaml(cls, text: str) -> "RunConfig":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"config is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if data is not None and not isinstance(data, dict):
            raise UserError("config must be a YAML mapping of setting: value")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        return cls.from_yaml(path.read_text(encoding="utf-8"))

    # -- command line ---------------------------------------------------------------------------
    def to_command(self) -> str:
        """The `python -m p2d run ...` command that reproduces this config (non-default fields only)."""
        default = RunConfig()
        parts = ["python", "-m", "p2d", "run"]
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name) or value is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, (list, tuple)):
                parts += [flag, ",".join(map(str, value))]
            elif isinstance(value, dict):
                parts += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
            else:
                parts += [flag, str(value)]
        return " ".join(shlex.quote(p) for p in parts)
