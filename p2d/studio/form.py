"""The settings form: one input per `p2d.config.RunConfig` field, and the form <-> RunConfig.

Every input is named after the RunConfig field it sets, and those names are the keyword parameters of
the app's API endpoints (gradio_client passes any of them by keyword). Only two settings are asked in
two steps, so the form has six names of its own:

- ``model_source`` (embedded / hub / local) and ``model_name``  ->  ``model``
- ``data_source`` (builtin / files / hub) and ``pool_path``, ``probe_path``, ``eval_path``  ->  ``pool``,
  ``probe``, ``eval`` (with the built-in pool, ``columns`` is not used and left unset; with files or a
  dataset, ``target`` is). ``hub`` (local mode only) fills the paths with dataset specs
  ``ID:CONFIG@SPLIT`` (`p2d.data.read_datasets.parse_dataset_spec`) picked on the Model & data tab.

`to_config` hands the values to `RunConfig.from_dict`, which parses and checks every one of them
(errors name the setting as "Label (field_name)"); `to_values` fills the form from a RunConfig. An
empty run folder (``out``) means "a new folder per model/data setting in this session's workspace".

`build_inputs` creates the inputs (unrendered, so each tab places the ones it shows and every tab can
wire events that read the whole form); labels and help texts come from the RunConfig field metadata.
"""

from __future__ import annotations

from dataclasses import fields

from p2d.config import BUILTIN_POOLS, RunConfig, choices_of, config_field, label, pool_targets
from p2d.data.builtin import DEFAULT_TARGET, available_tasks
from p2d.errors import UserError, shown

# gradio is imported where the inputs are built: the form <-> RunConfig conversion works without it

from .limits import Limits, looks_like_local_path

#: form inputs in API order (the first 30 are the names of earlier versions, kept in their order)
FIELD_NAMES: tuple[str, ...] = (
    "model_source", "model_name", "device", "dtype", "trust_remote_code", "quantize",
    "data_source", "target", "pool_size", "probe_size", "eval_size", "seed",
    "pool_path", "probe_path", "eval_path", "columns", "max_length",
    "head_method", "head_ratio",
    "select_method", "data_ratio",
    "steps", "epochs", "lr", "batch_size", "projections",
    "eval_limit", "max_new_tokens", "full_ft",
    "out",
    "max_steps", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm", "checkpoint_every",
    "reference_epochs", "scheduler", "gradient_checkpointing", "val_ratio", "val_every", "report_to",
    "positions", "adapter", "other_eval_size", "hidden_layer",
    "min_head_layer", "max_head_layer",
    "inference_precision",
    "heads_precision",
)
FORM_ONLY = ("model_source", "model_name", "data_source", "pool_path", "probe_path", "eval_path")
#: RunConfig fields the form sets directly (under their own name)
CONFIG_NAMES = tuple(n for n in FIELD_NAMES if n not in FORM_ONLY)
_ASKED_IN_TWO_STEPS = ("model", "pool", "probe", "eval")
assert sorted(CONFIG_NAMES + _ASKED_IN_TWO_STEPS) == sorted(f.name for f in fields(RunConfig)), \
    "every RunConfig field needs a form input"

MODEL_SOURCES = (("Embedded default (SmolLM2-135M-Instruct)", "embedded"), ("Hugging Face hub id", "hub"),
                 ("Local folder or .gguf file", "local"))
DATA_SOURCES = (("Built-in task pool", "builtin"), ("Built-in pool where words mislead", "builtin-hard"),
                ("Built-in alignment pool (a behaviour the model already has, scarce)", "builtin-align"),
                ("My files", "files"), ("Dataset (hub id or folder)", "hub"))
#: number inputs where 0 means "not set" (RunConfig reads 0 as none for them)
ZERO_IS_UNSET = tuple(f.name for f in fields(RunConfig) if f.metadata.get("none_if_zero"))


def format_columns(mapping: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (mapping or {}).items())


def to_config(values: dict) -> RunConfig:
    """Form values (by FIELD_NAMES; missing or None ones take RunConfig's defaults) -> a checked
    RunConfig. An empty ``out`` leaves RunConfig's default (see `explicit_out`)."""
    v = {k: x for k, x in values.items() if x is not None}
    for name, choices in (("model_source", MODEL_SOURCES), ("data_source", DATA_SOURCES)):
        if name in v and v[name] not in [value for _, value in choices]:
            raise UserError(f"{name}: {shown(v[name])} is not one of {', '.join(value for _, value in choices)}")
    data = {k: v[k] for k in CONFIG_NAMES if k in v}
    if v.get("model_source", "embedded") == "embedded":
        data["model"] = "default"
    else:
        data["model"] = str(v.get("model_name") or "").strip()
        if not data["model"]:
            raise UserError(f"{label('model')}: type a hub id or a local model folder, or pick the embedded default")
    if v.get("data_source", "builtin") in ("files", "hub"):
        for name in ("pool", "probe", "eval"):
            data[name] = str(v.get(f"{name}_path") or "").strip() or None
        if not data["pool"]:
            raise UserError(f"{label('pool')}: upload a pool file (or type its path), pick a dataset, or pick the "
                            "built-in task pool")
        data["target"] = None
    else:
        source = v.get("data_source")
        pool = source if source in BUILTIN_POOLS and source != "builtin" else None
        data.update(pool=pool, probe=None, eval=None, columns=None)
    if not str(data.get("out") or "").strip():
        data.pop("out", None)
    return RunConfig.from_dict(data).validate().require_probe()  # the app always scores heads


def explicit_out(values: dict) -> str | None:
    """The run folder typed in the form, or None for "a new folder in the session's workspace"."""
    return str(values.get("out") or "").strip() or None


def to_values(cfg: RunConfig, out_auto: bool = False) -> dict:
    """A RunConfig -> form values (by FIELD_NAMES). ``out_auto`` leaves the run folder empty (auto)."""
    values = {name: getattr(cfg, name) for name in CONFIG_NAMES}
    for name in ZERO_IS_UNSET:
        values[name] = values[name] or 0
    values["epochs"] = "" if cfg.epochs is None else f"{cfg.epochs:g}"  # a text box (see build_inputs)
    values["hidden_layer"] = "" if cfg.hidden_layer is None else str(cfg.hidden_layer)  # a text box too
    for name in ("min_head_layer", "max_head_layer"):  # text boxes too
        values[name] = "" if getattr(cfg, name) is None else str(getattr(cfg, name))
    if cfg.model in (None, "", "default"):
        values.update(model_source="embedded", model_name="")
    else:
        values.update(model_source="local" if looks_like_local_path(cfg.model) else "hub", model_name=cfg.model)
    values.update(data_source=_data_source(cfg.pool), pool_path=cfg.pool or "", probe_path=cfg.probe or "",
                  eval_path=cfg.eval or "", target=cfg.target or DEFAULT_TARGET, quantize=cfg.quantize or "none",
                  columns=format_columns(cfg.columns), projections=list(cfg.projections),
                  out="" if out_auto or cfg.out == RunConfig().out else cfg.out)
    return {name: values[name] for name in FIELD_NAMES}


def _data_source(pool: str | None) -> str:
    """builtin without a pool; hub for a dataset spec that is not a file; files otherwise."""
    from pathlib import Path

    from p2d.data.read_datasets import parse_dataset_spec

    if not pool:
        return "builtin"
    if pool in BUILTIN_POOLS:
        return pool
    if not Path(pool).expanduser().is_file() and parse_dataset_spec(pool) is not None:
        return "hub"
    return "files"


# ----------------------------------------------------------------------------------------- inputs


def _help(name: str) -> str:
    return config_field(name).metadata["help"]


def _label(name: str, hint: str = "") -> str:
    return config_field(name).metadata["label"] + (f" ({hint})" if hint else "")


def target_choices(data_source: str) -> list[str]:
    """The targets of a built-in pool (the plain one's available tasks, or the other pools' targets)."""
    if data_source in BUILTIN_POOLS and data_source != "builtin":
        return list(pool_targets(data_source))
    return list(available_tasks())


def build_inputs(limits: Limits, initial: dict) -> dict:
    """Every settings input, by name, created unrendered (each tab renders the ones it shows)."""
    import gradio as gr

    local = limits.allow_local_paths
    v = initial
    num = dict(render=False)

    def number(name, hint="", integer=True, **kw):
        return gr.Number(v[name], label=_label(name, hint), info=kw.pop("info", _help(name)),
                         precision=0 if integer else None, elem_id=name.replace("_", "-"), **num, **kw)

    def dropdown(name, choices=None, **kw):
        return gr.Dropdown(list(choices or choices_of(config_field(name))), value=v[name], label=_label(name),
                           info=kw.pop("info", _help(name)), elem_id=name.replace("_", "-"), **num, **kw)

    tasks = target_choices(v["data_source"])
    c = {
        # model
        "model_source": gr.Radio([m for m in MODEL_SOURCES if local or m[1] != "local"], value=v["model_source"],
                                 label="Model source", elem_id="model-source", **num),
        "model_name": gr.Textbox(v["model_name"], label="Hub id or local path" if local else "Hub id",
                                 placeholder="e.g. HuggingFaceTB/SmolLM2-360M-Instruct"
                                 + (", /path/to/model or model.gguf" if local else ""),
                                 info="ignored for the embedded default", elem_id="model-name",
                                 interactive=v["model_source"] != "embedded", **num),
        "device": dropdown("device", ["auto", "cpu", "cuda", "mps"], allow_custom_value=True),
        "dtype": dropdown("dtype"),
        "quantize": dropdown("quantize", ["none", *choices_of(config_field("quantize"))]),
        "inference_precision": dropdown("inference_precision"),
        "trust_remote_code": gr.Checkbox(v["trust_remote_code"], label=_label("trust_remote_code"),
                                         info=_help("trust_remote_code"), visible=local, **num),
        # data
        "data_source": gr.Radio([d for d in DATA_SOURCES if local or d[1] != "hub"], value=v["data_source"],
                                label="Data source", elem_id="data-source", **num),
        "target": dropdown("target", tasks if v["target"] in tasks else [v["target"], *tasks],
                           info="the task to specialise on; the rest of the pool is other tasks"),
        "pool_size": number("pool_size", info=_help("pool_size") + (f" (demo: at most {limits.max_pool})"
                                                                     if limits.max_pool else "")),
        "probe_size": number("probe_size"),
        "eval_size": number("eval_size"),
        "other_eval_size": number("other_eval_size", "0 = off"),
        "seed": number("seed"),
        "pool_path": gr.Textbox(v["pool_path"], label="Pool path", interactive=local, elem_id="pool-path",
                                placeholder="upload or type a path" if local else "upload a file", **num),
        "probe_path": gr.Textbox(v["probe_path"], label="Probe path", interactive=local, elem_id="probe-path", **num),
        "eval_path": gr.Textbox(v["eval_path"], label="Eval path (optional)", interactive=local, elem_id="eval-path",
                                **num),
        "columns": gr.Textbox(v["columns"], label=_label("columns"), elem_id="columns",
                              placeholder="prompt=question, answer=reply, task=category",
                              info="keys: prompt, input, answer, system, task, messages, text; formats are detected "
                                   "otherwise (alpaca, prompt/response, question/answer, messages, ShareGPT, text)",
                              **num),
        "max_length": number("max_length"),
        "batch_size": number("batch_size"),
        # stage 1 and 2
        "head_method": dropdown("head_method", info="how each head's importance for the probe set is measured"),
        "head_ratio": gr.Slider(0.01, 1.0, value=v["head_ratio"], step=0.01, label=_label("head_ratio"),
                                info=_help("head_ratio"), elem_id="head-ratio", **num),
        "positions": dropdown("positions"),
        "heads_precision": dropdown("heads_precision"),
        "min_head_layer": gr.Textbox(v["min_head_layer"], label=_label("min_head_layer", "empty = layer 0"),
                                     info=_help("min_head_layer"), placeholder="empty: layer 0",
                                     elem_id="min-head-layer", **num),
        "max_head_layer": gr.Textbox(v["max_head_layer"], label=_label("max_head_layer", "empty = the last layer"),
                                     info=_help("max_head_layer"), placeholder="empty: the last layer",
                                     elem_id="max-head-layer", **num),
        "select_method": dropdown("select_method", info="how each pool sample is scored with the selected heads"),
        "data_ratio": gr.Slider(0.01, 1.0, value=v["data_ratio"], step=0.01, label=_label("data_ratio"),
                                info=_help("data_ratio"), elem_id="data-ratio", **num),
        "hidden_layer": gr.Textbox(v["hidden_layer"], label=_label("hidden_layer", "empty = the middle layer"),
                                   info=_help("hidden_layer"), placeholder="empty: the middle layer",
                                   elem_id="hidden-layer", **num),
        # stage 3
        # a text box: a number box cannot stay empty in the browser, and empty means "the reference epochs"
        "epochs": gr.Textbox(v["epochs"], label=_label("epochs", "empty = the reference epochs"), info=_help("epochs"),
                             placeholder=f"empty: the reference epochs ({RunConfig().reference_epochs:g})",
                             elem_id="epochs", **num),
        "steps": number("steps", "0 = from epochs"),
        "max_steps": number("max_steps", "0 = no cap"),
        "lr": number("lr", integer=False, step=1e-4),
        "grad_accum": number("grad_accum"),
        "warmup_ratio": number("warmup_ratio", integer=False, step=0.01),
        "weight_decay": number("weight_decay", integer=False, step=0.01),
        "max_grad_norm": number("max_grad_norm", integer=False, step=0.1),
        "checkpoint_every": number("checkpoint_every", "0 = never"),
        "scheduler": dropdown("scheduler"),
        "adapter": dropdown("adapter"),
        "gradient_checkpointing": gr.Checkbox(v["gradient_checkpointing"], label=_label("gradient_checkpointing"),
                                              info=_help("gradient_checkpointing"), elem_id="gradient-checkpointing",
                                              **num),
        "val_ratio": number("val_ratio", "0 = none", integer=False, step=0.05),
        "val_every": number("val_every", "0 = ten times per run"),
        "report_to": dropdown("report_to"),
        "projections": gr.CheckboxGroup(list(choices_of(config_field("projections"))), value=v["projections"],
                                        label=_label("projections"), info=_help("projections"),
                                        elem_id="projections", **num),
        # evaluation and cost
        "eval_limit": number("eval_limit", "0 = all"),
        "max_new_tokens": number("max_new_tokens", "0 = from the gold answers"),
        "reference_epochs": number("reference_epochs", integer=False),
        "full_ft": gr.Radio([("estimate (time a sample of steps)", "estimate"), ("measure (run them all; slow)",
                                                                                "measure")],
                            value=v["full_ft"], label=_label("full_ft"), info=_help("full_ft"), elem_id="full-ft",
                            interactive=not limits.demo, **num),
        "out": gr.Textbox(v["out"], label=_label("out", "empty: a new folder per model/data setting"),
                          visible=local, elem_id="run-folder", **num),
    }
    assert tuple(sorted(c)) == tuple(sorted(FIELD_NAMES))
    return c
