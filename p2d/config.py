"""Run settings: one dataclass that owns every value of a P2D run.

`RunConfig` is the only place a setting is normalised and checked: its fields carry their type,
allowed choices, range, a label and the pipeline stages they affect (field metadata). Everything
else builds on it:

- YAML files (`save` / `load`), the file `python -m p2d run --config` takes and the app saves;
- the command line: every subcommand's flags are generated from these fields (`p2d.cli`), one flag
  name per setting (``head_ratio`` is ``--head-ratio`` everywhere);
- `to_command()`, the equivalent command line of a config (round-trips through the CLI parser);
- the app's settings form, whose inputs are named after the fields;
- `p2d.pipeline.Run`, which knows from ``stages`` which results a changed setting invalidates.

Values arrive as typed Python values (YAML, the API) or as strings (command line, form): both go
through the same normalisation. Optional numbers accept ``none`` (or an empty value) for "not set";
``steps``, ``max_steps``, ``eval_limit`` and ``max_new_tokens`` also read 0 as "not set", which is
how the app's number boxes say it.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .adapter import ADAPTER_KINDS, PROJECTIONS, adapter_name
from .cost import REFERENCE_MODES
from .data.builtin import DEFAULT_TARGET, TASKS
from .data.builtin_align import ALIGN_POOL, ALIGN_TARGETS
from .data.builtin_hard import HARD_POOL, HARD_TARGETS
from .data.formats import parse_mapping
from .errors import UserError, shown
from .files import write_text
from .method.heads import DEFAULT_HEAD_METHOD, HEAD_METHODS
from .models import DTYPES, HEADS_PRECISIONS, INFERENCE_PRECISIONS, QUANTIZE
from .method.gating import POSITIONS
from .method.selection import DEFAULT_POSITIONS, DEFAULT_SELECT_METHOD, SELECT_METHODS
from .tracking import REPORT_TO
from .training import SCHEDULERS, TrainConfig

#: the longest settings text `RunConfig.from_yaml` parses (a saved file of every setting is about 1.5 KB)
MAX_SETTINGS_BYTES = 256 * 1024
#: the seed range every random generator the library seeds accepts (numpy's is the narrowest)
MAX_SEED = 2 ** 32 - 1


class _SettingsLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``, also ``<<: *name``): settings never need them, and
    nested aliases make a text of a few hundred bytes stand for gigabytes of values (a YAML bomb)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported in settings files; "
                                              "write the values out", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, what: str = "the settings file"):
    """A settings text parsed as YAML: at most `MAX_SETTINGS_BYTES`, no aliases (UserError otherwise)."""
    size = len(text.encode("utf-8", errors="replace")) if isinstance(text, str) else len(text)
    if size > MAX_SETTINGS_BYTES:
        raise UserError(f"{what} is {size} bytes; settings files are at most {MAX_SETTINGS_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_SettingsLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        first = " ".join((str(exc).splitlines() or [""])[0].split())
        raise UserError(f"{what} is not valid YAML: {first[:160]}") from None
    except RecursionError:
        raise UserError(f"{what} is nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # a value YAML cannot build (a 5,000-digit number, a bad date)
        raise UserError(f"{what} has a value that cannot be read: {' '.join(str(exc).split())[:160]}") from None


#: the pipeline stages, in the order a run executes them (see p2d.pipeline)
STAGES = ("load", "heads", "select", "eval_before", "reference", "train", "eval_after")


def _targets():
    return tuple(dict.fromkeys(TASKS + HARD_TARGETS + ALIGN_TARGETS))


#: pool specs that name a built-in pool instead of a file (``None`` is the plain built-in pool)
BUILTIN_POOLS = ("builtin", HARD_POOL, ALIGN_POOL)


def pool_targets(pool: str) -> tuple[str, ...]:
    """The targets a built-in pool (one of `BUILTIN_POOLS`) offers."""
    return {HARD_POOL: HARD_TARGETS, ALIGN_POOL: ALIGN_TARGETS}.get(pool, TASKS)


def setting(default, group: str, label: str, help: str, stages: tuple = (), choices=None, minimum=None,
            maximum=None, above: float | None = None, none_if_zero: bool = False, factory=None):
    """A RunConfig field with its metadata.

    ``choices`` may be a callable (resolved lazily, so stage modules can own their method names);
    ``minimum``/``maximum`` are inclusive bounds, ``above`` an exclusive lower bound.
    """
    meta = {"group": group, "label": label, "help": help, "stages": tuple(stages), "choices": choices,
            "minimum": minimum, "maximum": maximum, "above": above, "none_if_zero": none_if_zero}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_SCORE = ("heads", "select", "train", "reference")  # stages whose batches depend on batch size / max length
_EVAL = ("eval_before", "eval_after")


#: named starting points: `RunConfig.preset`, ``--preset`` of ``python -m p2d run``, buttons in the app.
#: "quick-tour": the whole pipeline on the embedded model in a few minutes on a 2-core CPU with a
#: visible result (README, "Quick tour", has the measured time and accuracy). "p2d-paper": P2D as the paper
#: describes it (gate-gradient heads, their activation selects the rows, the heads' q/k/v/o slices are
#: trained, 10% of the heads and of the pool), whatever the defaults become.
PRESETS: dict[str, dict] = {
    "quick-tour": {"model": "default", "target": "addition", "pool_size": 300, "probe_size": 32, "eval_size": 30,
                   "other_eval_size": 2, "seed": 0},
    "p2d-paper": {"head_method": "gradient_logratio", "select_method": "activation", "adapter": "heads",
                  "projections": ["q", "k", "v", "o"], "head_ratio": 0.1, "data_ratio": 0.1,
                  "min_head_layer": None, "max_head_layer": None},
}


@dataclass
class RunConfig:
    """All settings of one P2D run (model, data, the three stages, evaluation, cost, output)."""

    # model ---------------------------------------------------------------------------------------
    model: str = setting("default", "model", "Model",
                         "model spec: default (embedded SmolLM2-135M-Instruct), a hub id, a local folder or a .gguf "
                         "file", stages=("load",))
    device: str = setting("auto", "model", "Device", "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps",
                          stages=("load",))
    dtype: str = setting("auto", "model", "Precision", "auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16",
                         stages=("load",), choices=DTYPES)
    trust_remote_code: bool = setting(False, "model", "Trust remote code", "allow custom model code from the hub",
                                      stages=("load",))
    quantize: str | None = setting(None, "model", "Quantise frozen MLPs",
                                   "8bit or 4bit: load the frozen MLPs with bitsandbytes (saves GPU memory, slower on "
                                   "CPU); none: dense", stages=("load",), choices=QUANTIZE)
    inference_precision: str = setting("same", "model", "No-gradient precision",
                                       "what the selection stage's head pass and evaluation run in: same (the model's "
                                       "dtype), bf16 (a bfloat16 copy, CPU or GPU) or int8 (CPU: a copy with dynamic "
                                       "int8 MLPs and LM head); head scoring and training keep the model's dtype",
                                       stages=("select", "eval_before", "eval_after"), choices=INFERENCE_PRECISIONS)
    # data ------------------------------------------------------------------------------------------
    pool: str | None = setting(None, "data", "Pool file", "training pool: a data file, a dataset "
                               "ID[:CONFIG][@SPLIT[START:STOP]] (hub id or dataset folder, streamed), builtin-hard "
                               "(the built-in pools where surface words mislead: the target skill only in other "
                               "wordings, plus lexical twins) or builtin-align (a behaviour the model already has, "
                               "scarce among decoys: json, signoff, refusal, ordinal); none or builtin: the built-in "
                               "task pool",
                               stages=("load",))
    probe: str | None = setting(None, "data", "Probe file", "~100 examples of the target task, used to find the heads "
                                "(a file or ID[:CONFIG][@SPLIT[START:STOP]], e.g. openai/gsm8k:main@train[:100])",
                                stages=("load",))
    eval: str | None = setting(None, "data", "Eval file", "eval set for accuracy before/after training (a file or "
                               "ID[:CONFIG][@SPLIT], e.g. another split: openai/gsm8k:main@test)", stages=("load",))
    columns: dict | None = setting(None, "data", "Column mapping",
                                   "column mapping such as prompt=question,answer=reply,task=label (formats are "
                                   "detected otherwise)", stages=("load",))
    target: str | None = setting(None, "data", "Target task", "built-in pools: the target task (default addition; "
                                 "builtin-hard: addition, alphabetical, dates or past_tense; builtin-align: json, "
                                 "signoff, refusal or ordinal)", stages=("load",),
                                 choices=_targets)
    pool_size: int = setting(1000, "data", "Pool size", "built-in pool: rows in the pool", stages=("load",), minimum=1)
    probe_size: int = setting(100, "data", "Probe size", "built-in pool: probe rows (target task)", stages=("load",),
                              minimum=1)
    eval_size: int = setting(100, "data", "Eval size", "built-in pool: eval rows (target task)", stages=("load",),
                             minimum=0)
    other_eval_size: int = setting(5, "data", "Forgetting rows", "built-in pool: held-out rows of every other task, "
                                   "evaluated before and after training (what tuning changed elsewhere; 0: off)",
                                   stages=("load",), minimum=0)
    seed: int = setting(0, "data", "Seed", "seed of the built-in pool, the random controls and the training order",
                        stages=("load", "heads", "select", "train", "reference"), minimum=0, maximum=MAX_SEED)
    max_length: int = setting(256, "data", "Max tokens per sample", "samples are truncated to this many tokens",
                              stages=_SCORE + _EVAL, minimum=8)
    batch_size: int = setting(8, "data", "Batch size", "samples per batch (scoring, training and the reference)",
                              stages=_SCORE, minimum=1)
    # stage 1: heads ----------------------------------------------------------------------------------
    head_method: str = setting(DEFAULT_HEAD_METHOD, "heads", "Head scoring method", "how heads are scored",
                               stages=("heads",), choices=HEAD_METHODS)
    head_ratio: float = setting(0.1, "heads", "Share of heads", "share of all query heads to select (0.1 = 10%)",
                                stages=("heads",), above=0.0, maximum=1.0)
    min_head_layer: int | None = setting(None, "heads", "Lowest head layer", "heads are selected from this decoder "
                                         "layer up (none: layer 0); a higher one shortens every training backward",
                                         stages=("heads",), minimum=0)
    max_head_layer: int | None = setting(None, "heads", "Highest head layer", "heads are selected up to this decoder "
                                         "layer (none: the last); a lower one stops the selection forward there",
                                         stages=("heads",), minimum=0)
    heads_precision: str = setting("same", "heads", "Head-scoring precision",
                                   "what head scoring's forward and backward run in: same (the model's dtype) or bf16 "
                                   "(a bfloat16 copy, CPU or GPU; gate gradients summed in float32); gate-gradient "
                                   "methods only", stages=("heads",), choices=HEADS_PRECISIONS)
    positions: str = setting(DEFAULT_POSITIONS, "heads", "Answer positions",
                             "where head and sample statistics are taken: all answer positions, or content (without "
                             "the end-of-turn and template tokens)", stages=("heads", "select"), choices=POSITIONS)
    # stage 2: data -----------------------------------------------------------------------------------
    select_method: str = setting(DEFAULT_SELECT_METHOD, "select", "Selection method", "how pool samples are scored",
                                 stages=("select",), choices=SELECT_METHODS)
    data_ratio: float = setting(0.1, "select", "Share of the pool", "share of the pool to keep (0.1 = 10%)",
                                stages=("select",), above=0.0, maximum=1.0)
    hidden_layer: int | None = setting(None, "select", "Hidden-state layer", "the hidden selection method: which "
                                       "decoder layer's mean hidden state is compared (none: the middle layer)",
                                       stages=("select",), minimum=0)
    # stage 3: training -------------------------------------------------------------------------------
    epochs: float | None = setting(None, "train", "Epochs",
                                   "passes over the selected data (none: the reference epochs, so both sides of the "
                                   "AER see the same number of passes over their data)", stages=("train",), above=0.0)
    steps: int | None = setting(None, "train", "Steps", "exact number of optimizer steps; overrides epochs (0 or none: "
                                "from epochs)", stages=("train",), minimum=1, none_if_zero=True)
    max_steps: int | None = setting(None, "train", "Max steps", "stop training after at most this many optimizer "
                                    "steps (0 or none: no cap)", stages=("train",), minimum=1, none_if_zero=True)
    lr: float = setting(1e-3, "train", "Learning rate", "peak learning rate of the head deltas", stages=("train",),
                        above=0.0)
    grad_accum: int = setting(1, "train", "Gradient accumulation", "batches per optimizer step (the effective batch "
                              "is batch size x this)", stages=("train",), minimum=1)
    warmup_ratio: float = setting(0.05, "train", "Warmup share", "share of the steps with linear warmup (then cosine "
                                  "decay)", stages=("train",), minimum=0.0, maximum=0.99)
    weight_decay: float = setting(0.0, "train", "Weight decay", "AdamW weight decay of the head deltas only",
                                  stages=("train",), minimum=0.0)
    max_grad_norm: float = setting(1.0, "train", "Max gradient norm", "clip the gradient norm (0: no clipping)",
                                   stages=("train",), minimum=0.0)
    scheduler: str = setting("cosine", "train", "Scheduler", "learning-rate decay after the warmup",
                             stages=("train",), choices=SCHEDULERS)
    gradient_checkpointing: bool = setting(False, "train", "Gradient checkpointing", "recompute activations in the "
                                           "backward: less memory, about a third slower", stages=("train",))
    val_ratio: float = setting(0.0, "train", "Validation share", "share of the training data held out for a "
                               "validation loss on the live chart (0: none)", stages=("train",), minimum=0.0,
                               maximum=0.5)
    val_every: int = setting(0, "train", "Validate every", "validation loss every N steps (0: ten times per run)",
                             stages=("train",), minimum=0)
    checkpoint_every: int = setting(50, "train", "Checkpoint every", "save the training state every N steps so a "
                                    "killed run can resume (0: never)", minimum=0)
    adapter: str = setting("heads", "train", "Adapter", "what is trained on the selected heads: heads (their q/k/v/o "
                           "slices) or offset (a LoFiT-style vector added to each head's output; cannot be merged)",
                           stages=("train",), choices=ADAPTER_KINDS)
    projections: list[str] = setting(None, "train", "Projections", "which slices of each selected head to train "
                                     "(subset of q,k,v,o)", stages=("train",), choices=PROJECTIONS,
                                     factory=lambda: list(PROJECTIONS))
    # evaluation ----------------------------------------------------------------------------------------
    eval_limit: int | None = setting(None, "eval", "Eval rows", "evaluate on at most this many rows (0 or none: all)",
                                     stages=_EVAL, minimum=1, none_if_zero=True)
    max_new_tokens: int | None = setting(None, "eval", "Max new tokens", "generation cap (0 or none: longest gold "
                                         "answer + 8, at most 64)", stages=_EVAL, minimum=1, none_if_zero=True)
    # cost (AER) ------------------------------------------------------------------------------------------
    reference_epochs: float = setting(3.0, "cost", "Reference epochs",
                                      "epochs of the full fine-tuning reference over the whole pool (fixed; never "
                                      "derived from how long P2D trains)", stages=("reference",), above=0.0)
    full_ft: str = setting("estimate", "cost", "Full fine-tuning reference",
                           "estimate (time a length-stratified sample of reference batches) or measure (run every "
                           "reference step; as slow as full fine-tuning)", stages=("reference",),
                           choices=REFERENCE_MODES)
    # output -------------------------------------------------------------------------------------------
    report_to: str = setting("auto", "output", "Report to", "experiment tracker: auto (TensorBoard files in the run "
                             "folder when tensorboard is installed), none, tensorboard, trackio or wandb",
                             choices=REPORT_TO)
    out: str = setting("runs/latest", "output", "Run folder", "folder for every file of the run")

    def __post_init__(self):
        self.normalize()

    def normalize(self) -> "RunConfig":
        """Coerce every field to its type and check its choices and range (UserError on a bad value)."""
        return normalize_fields(self)

    def validate(self) -> "RunConfig":
        """`normalize` plus the checks that involve several settings or the built-in pool."""
        self.normalize()
        if self.min_head_layer is not None and self.max_head_layer is not None and self.min_head_layer > self.max_head_layer:
            raise UserError(f"the lowest head layer ({self.min_head_layer}) is above the highest ({self.max_head_layer})")
        if self.builtin_pool:
            allowed = pool_targets(self.builtin_pool)
            self.target = self.target or (DEFAULT_TARGET if DEFAULT_TARGET in allowed else allowed[0])
            if self.target not in allowed:
                raise UserError(f"the target {self.target!r} is not a task of the {self.builtin_pool} pool; choose "
                                f"from {', '.join(allowed)}")
        return self

    def require_probe(self) -> "RunConfig":
        """Scoring heads needs target examples: a pool file without a probe file is refused (`p2d.pipeline.Run`
        checks this before it scores heads; a run given its heads from elsewhere needs no probe)."""
        if not self.builtin_pool and not self.probe:
            raise UserError("a pool file needs a probe file (probe: ~100 examples of the target task) to find heads")
        return self

    # -- derived values ----------------------------------------------------------------------------
    @property
    def builtin_pool(self) -> str | None:
        """``"builtin"`` (the plain built-in pool), ``"builtin-hard"``, ``"builtin-align"``, or None when the
        pool is a file."""
        return "builtin" if not self.pool else (self.pool if self.pool in BUILTIN_POOLS else None)

    @property
    def adapter_name(self) -> str:
        """The adapter's name (`p2d.adapter.adapter_name`: ``qkvo``, ``qo``, ``offset`` ...): the kind and
        projections of ``adapter`` and ``projections`` in the word the cells and the benchmark use."""
        return adapter_name(self.adapter, self.projections)

    @property
    def train_epochs(self) -> float:
        """Epochs of head training over the selected data (default: the reference epochs)."""
        return self.epochs if self.epochs is not None else self.reference_epochs

    def train_config(self) -> TrainConfig:
        """The `p2d.training.TrainConfig` of these settings: the one way a run, its controls and the
        benchmark's cells get their training settings (a cell changes only what it varies: its learning
        rate, its adapter)."""
        return TrainConfig(steps=self.steps, epochs=self.train_epochs, max_steps=self.max_steps, lr=self.lr,
                           batch_size=self.batch_size, grad_accum=self.grad_accum, max_length=self.max_length,
                           projections=tuple(self.projections), weight_decay=self.weight_decay,
                           warmup_ratio=self.warmup_ratio, max_grad_norm=self.max_grad_norm, seed=self.seed,
                           scheduler=self.scheduler, gradient_checkpointing=self.gradient_checkpointing,
                           val_ratio=self.val_ratio, val_every=self.val_every, adapter=self.adapter)

    def stage_settings(self, stage: str) -> dict:
        """The settings a stage's result depends on directly (see `p2d.pipeline` for upstream)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if stage in f.metadata["stages"]}

    # -- YAML ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path) -> Path:
        return write_text(path, self.to_yaml())

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict | None) -> "RunConfig":
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"unknown setting(s) {_names(unknown)}; known settings: {', '.join(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **changes) -> "RunConfig":
        """The named starting point ``name`` (`PRESETS`) with ``changes`` on top."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {shown(name)}: choose from {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **changes})

    @classmethod
    def from_yaml(cls, text: str) -> "RunConfig":
        data = parse_yaml(text)
        if data is not None and not isinstance(data, dict):
            raise UserError("the settings file must be a YAML mapping of setting: value")
        return cls.from_dict(data)

    @classmethod
    def load(cls, path) -> "RunConfig":
        return cls.from_yaml(read_settings_file(path))

    # -- command line ----------------------------------------------------------------------------
    def to_command(self, command: str = "run") -> str:
        """The `python -m p2d run ...` command that reproduces this config (settings that differ from
        the defaults; unset optional values are written as ``none``)."""
        default = RunConfig()
        parts = ["python", "-m", "p2d", command]
        for f in fields(self):
            value = getattr(self, f.name)
            if _plain(value) == _plain(getattr(default, f.name)):
                continue
            parts += flag_tokens(f.name, value)
        return " ".join(shlex.quote(p) for p in parts)


# ------------------------------------------------------------------------------------- helpers


def label(name: str, cls=None) -> str:
    """'Share of heads (head_ratio)': how messages name a setting, for CLI and app users alike."""
    f = config_field(name, cls)
    return _label(f)


def _label(f: dataclasses.Field) -> str:
    return f"{f.metadata.get('label', f.name)} ({f.name})"


def inherited(name: str, default=dataclasses.MISSING, factory=None, **changes):
    """A field of another settings class (`p2d.bench.config.BenchConfig`) that is RunConfig's ``name``:
    the same label, help, choices and range (``changes`` overrides some), another default; no stages."""
    f = config_field(name)
    meta = {**f.metadata, **changes, "stages": ()}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is dataclasses.MISSING:
        if f.default_factory is not dataclasses.MISSING:
            return field(default_factory=f.default_factory, metadata=meta)
        default = f.default
    return field(default=default, metadata=meta)


def normalize_fields(obj):
    """Coerce every field of a dataclass declared with `setting` to its type, check choices and ranges
    (the one normalisation of RunConfig and the other option classes); returns ``obj``."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        setattr(obj, f.name, _normalize_value(f, hints[f.name], getattr(obj, f.name)))
    return obj


def read_settings_file(path) -> str:
    """The text of a YAML settings file, or a UserError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"settings file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"could not read the settings file {path}: {str(exc).splitlines()[0]}") from None


def options_from(cls, yaml_path: str | None = None, given: dict | None = None):
    """An options dataclass from its defaults, a YAML file (``yaml_path``) and explicit values."""
    data: dict = {}
    if yaml_path:
        path = Path(yaml_path)
        text = read_settings_file(path)
        loaded = parse_yaml(text, f"the settings file {path}")
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path} must be a YAML mapping of setting: value")
        data.update(loaded or {})
    data.update(given or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise UserError(f"unknown setting(s) {_names(unknown)}; known settings: {', '.join(known)}")
    return cls(**data)


def _names(names: list, limit: int = 5) -> str:
    """Setting names for a one-line message: each shortened, at most ``limit`` of them."""
    out = ", ".join(shown(str(n), 40) for n in names[:limit])
    return out + (f" and {len(names) - limit} more" if len(names) > limit else "")


def config_field(name: str, cls=None) -> dataclasses.Field:
    for f in fields(cls or RunConfig):
        if f.name == name:
            return f
    raise KeyError(name)


def choices_of(f: dataclasses.Field) -> tuple | None:
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else (tuple(c) if c is not None else None)


def flag_tokens(name: str, value) -> list[str]:
    """Command-line tokens that set ``name`` to ``value``."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    if value is None:
        return [flag, "none"]
    if isinstance(value, (list, tuple)):
        return [flag, ",".join(map(str, value))]
    if isinstance(value, dict):
        return [flag, ",".join(f"{k}={v}" for k, v in value.items())]
    return [flag, str(value)]


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def _base_type(hint):
    """(type, optional) of an annotation such as ``int | None``."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if args and type(None) in args and origin is not list and origin is not dict:
        inner = [a for a in args if a is not type(None)]
        return _base_type(inner[0])[0], True
    if origin is list:
        return list, False
    if origin is dict:
        return dict, False
    return hint, False


_NONE_WORDS = ("", "none", "null", "~")


def _normalize_value(f: dataclasses.Field, hint, value):
    kind, optional = _base_type(hint)
    meta = f.metadata
    name = f.name
    if isinstance(value, str):
        value = value.strip()
    if (optional or kind is dict) and (value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)):
        return None
    if value is None:
        raise UserError(f"{_label(f)} needs a value")
    if kind is bool:
        if isinstance(value, str):
            low = value.lower()
            if low not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise UserError(f"{_label(f)} must be true or false, got {shown(value)}")
            return low in ("true", "yes", "1", "on")
        return bool(value)
    if kind is int:
        value = _to_int(value, _label(f))
        if meta["none_if_zero"] and value == 0:
            return None
        _check_range(value, meta, _label(f))
        return value
    if kind is float:
        value = _to_float(value, _label(f))
        _check_range(value, meta, _label(f))
        return value
    if kind is list:
        items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
        items = [str(x).strip().lower() for x in items if str(x).strip()]
        allowed = choices_of(f)
        bad = [x for x in items if allowed and x not in allowed]
        if bad or not items:
            raise UserError(f"{_label(f)} must be a non-empty subset of {', '.join(allowed)}, got {shown(value)}")
        return [c for c in allowed if c in items] if allowed else items
    if kind is dict:
        if isinstance(value, str):
            return parse_mapping(value)
        if not isinstance(value, dict):
            raise UserError(f"{_label(f)} must be key=column pairs (prompt=question,answer=reply), got {shown(value)}")
        return {str(k): str(v) for k, v in value.items()} or None
    # str
    value = str(value)
    allowed = choices_of(f)
    if allowed is not None:
        low = value.lower()
        if name == "quantize" and low in ("none", "no", "off"):
            return None
        if low not in allowed:
            raise UserError(f"{_label(f)} must be one of {', '.join(allowed)}, got {shown(value)}")
        return low
    if name == "device":
        low = value.lower()
        if not (low in ("auto", "cpu", "cuda", "mps") or (low.startswith("cuda:") and low[5:].isdigit())):
            raise UserError(f"{_label(f)} must be auto, cpu, cuda, cuda:N or mps, got {shown(value)}")
        return low
    if name == "pool" and value.lower() in BUILTIN_POOLS:
        return None if value.lower() == "builtin" else value.lower()
    if not value and name in ("model", "out"):
        raise UserError(f"{_label(f)} must not be empty")
    return value


def _to_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{what} must be a whole number, got {shown(value)}")
    if isinstance(value, int):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a whole number, got {shown(value)}") from None
    if not math.isfinite(f) or f != int(f):
        raise UserError(f"{what} must be a whole number, got {shown(value)}")
    return int(f)


def _to_float(value, what: str) -> float:
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number, got {shown(value)}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {shown(value)}") from None
    if not math.isfinite(f):
        raise UserError(f"{what} must be a finite number, got {shown(value)}")
    return f


def _num(value) -> str:
    """A number for a message (`:g` for what a float can hold, a short repr beyond)."""
    if isinstance(value, int) and abs(value) < 10 ** 15:
        return str(value)
    try:
        return f"{value:g}"
    except (OverflowError, ValueError, TypeError):
        return shown(value, 40)


def _check_range(value, meta: dict, what: str) -> None:
    lo, hi, above = meta["minimum"], meta["maximum"], meta["above"]
    if above is not None and not value > above:
        raise UserError(f"{what} must be above {_num(above)}, got {_num(value)}")
    if lo is not None and value < lo:
        raise UserError(f"{what} must be at least {_num(lo)}, got {_num(value)}")
    if hi is not None and value > hi:
        raise UserError(f"{what} must be at most {_num(hi)}, got {_num(value)}")


def check_number(value, what: str, whole: bool = False, minimum=None, maximum=None, above=None):
    """``value`` as a whole number (``whole``) or a finite float within the bounds, checked as a setting is
    (NaN, inf, text and out-of-range values are a UserError naming ``what``); for numbers that are not
    settings, such as an endpoint's arguments."""
    number = _to_int(value, what) if whole else _to_float(value, what)
    _check_range(number, {"minimum": minimum, "maximum": maximum, "above": above}, what)
    return number
