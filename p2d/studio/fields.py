"""The settings form <-> `p2d.config.RunConfig`.

The form's inputs are named as below (these names are also the parameter names of the app's API
endpoints, so gradio_client can pass any of them by keyword). `values_to_config` turns the form into
the RunConfig (the same settings the YAML file of `python -m p2d run --config` holds) and
`config_to_values` fills the form from one.
"""

from __future__ import annotations

from dataclasses import fields as dc_fields

from p2d.config import RunConfig
from p2d.data.formats import parse_mapping
from p2d.errors import UserError

from .limits import looks_like_local_path

#: form inputs in API order; every event that needs the settings takes all of them
FIELD_NAMES: tuple[str, ...] = (
    "model_source", "model_name", "device", "dtype", "trust_remote_code", "quantize",
    "data_source", "target", "pool_size", "probe_size", "eval_size", "seed",
    "pool_path", "probe_path", "eval_path", "columns", "max_length",
    "head_method", "head_ratio",
    "select_method", "data_ratio",
    "steps", "epochs", "lr", "batch_size", "projections",
    "eval_limit", "max_new_tokens", "full_ft",
    "out",
)

MODEL_SOURCES = (("Embedded default (SmolLM2-135M-Instruct)", "embedded"), ("Hugging Face hub id", "hub"),
                 ("Local folder or .gguf file", "local"))
DATA_SOURCES = (("Built-in task pool", "builtin"), ("My files", "files"))

#: the settings that require loading again when they change (model + data)
LOAD_KEYS = ("model", "device", "dtype", "trust_remote_code", "quantize", "pool", "probe", "eval", "columns", "target",
             "pool_size", "probe_size", "eval_size", "seed")


def format_columns(mapping: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (mapping or {}).items())


def _int(value, name: str, minimum: int | None = None, none_below: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a whole number, got {value!r}") from None
    if f != int(f):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    v = int(f)
    if none_below is not None and v < none_below:
        return None
    if minimum is not None and v < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {v}")
    return v


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None


def _path(value) -> str | None:
    s = (value or "").strip() if isinstance(value, str) else (str(value) if value else "")
    return s or None


def values_to_config(values: dict, validate: bool = True) -> RunConfig:
    """Form values (by FIELD_NAMES) -> a RunConfig. Missing names take RunConfig's defaults.

    ``steps`` 0 (or empty) means "from epochs"; ``eval_limit``/``max_new_tokens`` 0 mean "all"/"auto";
    an empty ``out`` means "a new folder per load" (left as RunConfig's default here).
    """
    d = RunConfig()
    v = dict(values)
    cfg = RunConfig()
    source = v.get("model_source") or "embedded"
    name = (v.get("model_name") or "").strip()
    if source == "embedded":
        cfg.model = "default"
    elif not name:
        raise UserError("type a hub id or a local model path, or pick the embedded default model")
    else:
        cfg.model = name
    cfg.device = v.get("device") or d.device
    cfg.dtype = v.get("dtype") or d.dtype
    cfg.trust_remote_code = bool(v.get("trust_remote_code", d.trust_remote_code))
    cfg.quantize = v.get("quantize") if v.get("quantize") in ("8bit", "4bit") else None
    if (v.get("data_source") or "builtin") == "files":
        cfg.pool, cfg.probe, cfg.eval = (_path(v.get(k)) for k in ("pool_path", "probe_path", "eval_path"))
        if not cfg.pool:
            raise UserError("upload a pool file (or type its path), or pick the built-in task pool")
        cfg.target = None
    else:
        cfg.pool = cfg.probe = cfg.eval = None
        cfg.target = v.get("target") or None
    cfg.columns = parse_mapping(v.get("columns"))
    for key in ("pool_size", "probe_size", "eval_size"):
        if v.get(key) not in (None, ""):
            setattr(cfg, key, _int(v[key], key.replace("_", " "), minimum=1 if key == "pool_size" else 0))
    if v.get("seed") not in (None, ""):
        cfg.seed = _int(v["seed"], "seed", minimum=0)
    if v.get("max_length") not in (None, ""):
        cfg.max_length = _int(v["max_length"], "max length", minimum=8)
    cfg.head_method = v.get("head_method") or None
    if v.get("head_ratio") not in (None, ""):
        cfg.head_ratio = _float(v["head_ratio"], "head ratio")
    cfg.select_method = v.get("select_method") or None
    if v.get("data_ratio") not in (None, ""):
        cfg.data_ratio = _float(v["data_ratio"], "data ratio")
    if "steps" in v:
        cfg.steps = _int(v["steps"], "steps", none_below=1)
    if v.get("epochs") not in (None, ""):
        cfg.epochs = _float(v["epochs"], "epochs")
        if cfg.steps is None and not cfg.epochs > 0:
            raise UserError("set steps, or epochs above 0")
    if v.get("lr") not in (None, ""):
        cfg.lr = _float(v["lr"], "learning rate")
        if not cfg.lr > 0:
            raise UserError(f"learning rate must be positive, got {cfg.lr}")
    if v.get("batch_size") not in (None, ""):
        cfg.batch_size = _int(v["batch_size"], "batch size", minimum=1)
    if "projections" in v and v["projections"] is not None:
        proj = v["projections"]
        cfg.projections = [p.strip() for p in proj.split(",")] if isinstance(proj, str) else list(proj)
    if "eval_limit" in v:
        cfg.eval_limit = _int(v["eval_limit"], "eval limit", none_below=1)
    if "max_new_tokens" in v:
        cfg.max_new_tokens = _int(v["max_new_tokens"], "max new tokens", none_below=1)
    cfg.full_ft = v.get("full_ft") or d.full_ft
    cfg.out = _path(v.get("out")) or d.out
    return cfg.validate() if validate else cfg


def config_to_values(cfg: RunConfig, out_auto: bool = False) -> dict:
    """A RunConfig -> form values (by FIELD_NAMES). ``out_auto`` leaves the run folder empty (auto)."""
    d = RunConfig()
    if cfg.model in (None, "", "default"):
        source, name = "embedded", ""
    elif looks_like_local_path(cfg.model):
        source, name = "local", cfg.model
    else:
        source, name = "hub", cfg.model
    from p2d.data.builtin import DEFAULT_TARGET
    from p2d.heads import DEFAULT_HEAD_METHOD
    from p2d.selection import DEFAULT_SELECT_METHOD

    return {
        "model_source": source, "model_name": name, "device": cfg.device, "dtype": cfg.dtype,
        "trust_remote_code": bool(cfg.trust_remote_code), "quantize": cfg.quantize or "none",
        "data_source": "files" if cfg.pool else "builtin",
        "target": cfg.target or DEFAULT_TARGET,
        "pool_size": cfg.pool_size, "probe_size": cfg.probe_size, "eval_size": cfg.eval_size, "seed": cfg.seed,
        "pool_path": cfg.pool or "", "probe_path": cfg.probe or "", "eval_path": cfg.eval or "",
        "columns": format_columns(cfg.columns), "max_length": cfg.max_length,
        "head_method": cfg.head_method or DEFAULT_HEAD_METHOD, "head_ratio": cfg.head_ratio,
        "select_method": cfg.select_method or DEFAULT_SELECT_METHOD, "data_ratio": cfg.data_ratio,
        "steps": cfg.steps or 0, "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size,
        "projections": list(cfg.projections),
        "eval_limit": cfg.eval_limit or 0, "max_new_tokens": cfg.max_new_tokens or 0, "full_ft": cfg.full_ft,
        "out": "" if out_auto or cfg.out == d.out else cfg.out,
    }


def load_signature(cfg: RunConfig) -> dict:
    """The part of a config that, when changed, needs the model/data loaded again."""
    return {k: getattr(cfg, k) for k in LOAD_KEYS}


def config_keys() -> list[str]:
    return [f.name for f in dc_fields(RunConfig)]
