"""`python -m p2d <command>`: every library job on the command line.

Flags are generated from dataclass fields (`p2d.config.RunConfig`, and each command's own options),
so a setting has one flag name everywhere (``--head-ratio``, ``--select-method``, ...) and every
command takes ``--config FILE.yaml`` (the file the app saves). Precedence: flags, then ``--config``,
then (stage commands only) the run folder's own ``config.yaml``, then the defaults.

Results are printed to stdout as one JSON object; progress goes to stderr. Errors the user can fix
print one line (``error: ...``) on stderr and exit with code 2; Ctrl-C exits with 130 after the
current step has been saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import typing
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from . import __version__
from .adapter import AdapterConfig, load_adapter, merge_and_save
from .bench.config import BenchConfig
from .bench.benchmark import run_bench
from .chat import compare_replies
from .config import PRESETS, RunConfig, choices_of, options_from
from .controls import CONTROLS, LORA_LR, LORA_RANK, run_controls
from .data.formats import Sample
from .data.loading import load_data
from .distributed import Processes, check_engine
from .errors import OOM_ADVICE, UserError, is_out_of_memory
from .evaluation import evaluate
from .explore import check_head, compare_head_maps, forgetting, inspect_head
from .export import EXPORT_FORMATS, export_peft
from .gguf_export import DEFAULT_TYPE, GGUF_TYPES, export_gguf
from .files import dumps
from .method.heads import HEADS_FILE, HeadScores
from .models import inference_copy
from .method.selection import SCORES_FILE, SELECTED_FILE, SELECTION_FILE
from .hub import model_card, push_run
from .pipeline import CONFIG_FILE, Run, build_builtin_pool, default_loader, fresh_folder, load_run_data
from .progress import ConsoleProgress
from .studio.options import StudioOptions
from .training import CHECKPOINT_SUBDIR, checkpoint_step

# which RunConfig groups each command takes
MODEL = ("model",)
STAGE_GROUPS = ("model", "data", "heads", "select", "train", "eval", "cost", "output")
COMMAND_GROUPS = {
    "info": ("model",),
    "eval": ("model", "data", "eval"),
    "heads": ("model", "data", "heads", "output"),
    "select": ("model", "data", "heads", "select", "output"),
    "train": ("model", "data", "heads", "select", "train", "output"),
    "merge": ("model",),
    "run": STAGE_GROUPS,
}
#: commands that run under ``accelerate launch`` with several processes (p2d.distributed)
DISTRIBUTED = ("heads", "select", "train", "run", "eval", "info")
#: what `pip install 'p2d-studio[studio]'` adds (the app's packages; the library never imports them)
STUDIO_PACKAGES = ("gradio", "plotly", "pandas", "starlette", "authlib", "itsdangerous")
EVAL_DATA = ("pool", "probe", "eval", "columns", "target", "pool_size", "probe_size", "eval_size", "seed",
             "max_length", "batch_size")


def _print(obj) -> None:
    """The command's result on stdout (once: by the main process when several run)."""
    if Processes.current().is_main:
        print(dumps(obj, indent=1))


def _progress():
    return ConsoleProgress()


# -- flags from dataclasses ----------------------------------------------------------------------
def _metavar(name: str, hint) -> str:
    special = {"model": "SPEC", "pool": "FILE|ID", "probe": "FILE|ID", "eval": "FILE|ID", "out": "DIR", "runs": "DIR"}
    if name in special:
        return special[name]
    text = str(hint)
    if "int" in text:
        return "N"
    if "float" in text:
        return "X"
    if "list" in text:
        return "A,B"
    if "dict" in text:
        return "K=V,..."
    return "NAME"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, names=None, required=()) -> None:
    """One flag per field of ``cls`` (those in ``names``, default all); unset flags stay None so a
    config file or the defaults fill them. Help texts come from the field metadata."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        help_ = meta.get("help", "").replace("%", "%%")
        choices = choices_of(f) if meta.get("choices") is not None else None
        if choices:
            help_ += f" [{', '.join(choices)}]"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_} (default: {'on' if default else 'off'})")
            continue
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        suffix = f" (default: {shown})" if shown not in (None, "") else ""
        parser.add_argument(flag, dest=f.name, default=None, metavar=_metavar(f.name, hints[f.name]), required=f.name in required,
                            help=help_ + suffix)


def _group_fields(groups) -> list[str]:
    return [f.name for f in fields(RunConfig) if f.metadata["group"] in groups]


def _given(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def config_from_args(args, names, folder_config: bool = False) -> RunConfig:
    """Defaults < the run folder's config.yaml (``folder_config``) < --preset < --config < flags."""
    given = _given(args, names)
    file_values = _raw_yaml(args.config) if getattr(args, "config", None) else {}
    merged: dict = {}
    if folder_config:
        out = given.get("out") or file_values.get("out") or RunConfig().out
        own = Path(out) / CONFIG_FILE
        if own.is_file():
            merged.update(_raw_yaml(own))
    preset = getattr(args, "preset", None)
    if preset:
        merged.update(PRESETS[preset])  # argparse's choices checked the name
    merged.update(file_values)
    merged.update(given)
    return RunConfig.from_dict(merged).validate()


def _raw_yaml(path) -> dict:
    """The settings a YAML file sets (only those; unknown names are an error)."""
    cfg_path = Path(path)
    loaded = RunConfig.load(cfg_path)  # validates names and values
    data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    return {k: getattr(loaded, k) for k in data}


def _announce(config: RunConfig, command: str) -> None:
    print("# settings used (save as YAML and pass with --config to rerun):", file=sys.stderr)
    print(config.to_yaml(), file=sys.stderr)
    print(f"# equivalent command: {config.to_command(command)}", file=sys.stderr)


def _load_lm(config: RunConfig):
    return default_loader(config)


# -- commands ------------------------------------------------------------------------------------
def cmd_info(args) -> None:
    _print(_load_lm(config_from_args(args, _group_fields(MODEL))).info())


def cmd_data(args) -> None:
    config = config_from_args(args, ["columns"])
    _print(load_data(args.file, mapping=config.columns, split=args.split, limit=args.limit).summary())


def cmd_demo_data(args) -> None:
    config = config_from_args(args, ["pool", "target", "pool_size", "probe_size", "eval_size", "seed"])
    if not config.builtin_pool:
        raise UserError("demo-data writes a built-in pool: --pool builtin, builtin-hard or builtin-align")
    tp = build_builtin_pool(config.replace(other_eval_size=0))
    paths = tp.write(args.out)
    _print({"files": paths, "target": tp.target, "pool_tasks": tp.counts(), "probe": len(tp.probe),
            "eval": len(tp.eval)})


def cmd_eval(args) -> None:
    config = config_from_args(args, _group_fields(COMMAND_GROUPS["eval"]))
    if not config.builtin_pool and not config.eval:
        raise UserError("give the eval file (--eval FILE); without files the built-in eval set is used")
    if config.eval:
        data = load_data(config.eval, mapping=config.columns)
        samples, skipped = data.samples, sum(data.skipped.values())
    else:
        ev = load_run_data(config).eval
        if ev is None:
            raise UserError("the built-in eval set is empty (eval_size 0): raise eval_size or give --eval FILE")
        samples, skipped = ev.samples, 0
    lm = inference_copy(_load_lm(config), config.inference_precision)
    if args.adapter:
        load_adapter(lm, args.adapter)
    res = evaluate(lm, samples, batch_size=max(config.batch_size, 16), max_new_tokens=config.max_new_tokens,
                   limit=config.eval_limit, max_length=config.max_length, progress=_progress())
    out = res.to_dict(with_examples=args.examples)
    out["skipped"] = skipped
    _print(out)


def _stage_run(args, command: str):
    """The run in the folder of the settings, with what it already finished."""
    config = config_from_args(args, _group_fields(COMMAND_GROUPS[command]), folder_config=True)
    _announce(config, command)
    if (Path(config.out) / CONFIG_FILE).is_file():
        run = Run.open(config.out, config=config, progress=_progress())
    else:
        run = Run(config, progress=_progress())
    run.resume = bool(getattr(args, "resume", False))
    Processes.current().barrier()  # several processes: all have read the folder before the main one changes it
    return run


def _check_processes(command: str) -> None:
    """Under ``accelerate launch`` with several processes, only the commands in DISTRIBUTED run (not under
    DeepSpeed)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return
    check_engine()
    if command not in DISTRIBUTED:
        raise UserError(f"`{command}` runs in one process so far (several processes: {', '.join(DISTRIBUTED)}); "
                        "start it with python -m p2d instead of accelerate launch")


def cmd_heads(args) -> None:
    run = _stage_run(args, "heads")
    run.run(["heads"])
    hs = run.heads
    _print({"heads": str(run.out / HEADS_FILE), "method": hs.method, "selected": hs.selected,
            "time_s": hs.time_s, "partial": "heads" in run.stages_partial})


def cmd_select(args) -> None:
    run = _stage_run(args, "select")
    if args.heads:
        run.use_heads(HeadScores.load(args.heads), source=args.heads)
    run.run(["select"])
    sel = run.selection
    _print({"files": {k: str(run.out / k) for k in (SELECTED_FILE, SCORES_FILE, SELECTION_FILE)},
            "method": sel.method, "n_pool": sel.n_pool, "n_selected": sel.n_selected, "time_s": sel.time_s,
            "task_counts": sel.task_counts(run.data.pool.samples), "partial": "select" in run.stages_partial,
            "from_record": bool(sel.extra.get("from_record"))})


def cmd_train(args) -> None:
    run = _stage_run(args, "train")
    data = None
    if args.data:  # train on a given file instead of the run's selection (read before the model loads)
        data = load_data(args.data, mapping=run.config.columns)
    if args.heads:
        run.use_heads(HeadScores.load(args.heads), source=args.heads)
    trains = data is not None or not run.is_done("train")
    saved = checkpoint_step(run.out) if args.resume and trains else None
    if args.resume and trains and saved is None:
        print(f"no checkpoint in {run.out / CHECKPOINT_SUBDIR} to resume from: training starts at step 0",
              file=sys.stderr)
    if data is not None:
        res = run.train_on(data.samples, source=args.data)
    else:
        run.run(["train"])
        res = run.train_result
    if saved is not None and res.extra.get("resumed_from") is None:
        print(f"the checkpoint in {run.out / CHECKPOINT_SUBDIR} was made with other settings or data: trained from "
              "step 0", file=sys.stderr)
    _print(asdict(res))
    if res.stopped:
        print(f"stopped early ({res.stop_reason}); adapter and log saved in {res.adapter_dir}; continue with "
              "--resume", file=sys.stderr)


def cmd_merge(args) -> None:
    lm = _load_lm(config_from_args(args, _group_fields(MODEL)))
    _print({"merged_model": str(merge_and_save(lm, args.adapter, args.out))})


def cmd_export(args) -> None:
    if getattr(args, "model", None) is None:  # default: the model the adapter was trained on
        args.model = AdapterConfig.read(args.adapter).base_model or "default"
    config = config_from_args(args, _group_fields(MODEL))
    if args.format == "gguf":
        out = export_gguf(_load_lm(config), args.adapter, args.out, args.gguf_type)
    else:
        out = export_peft(_load_lm(config), args.adapter, args.out, base_model_name=args.base_model_name)
    _print({"format": args.format, "folder": str(out), "files": sorted(p.name for p in out.iterdir())})


def cmd_push(args) -> None:
    if args.card_only:
        print(model_card(args.run, args.repo))
        return
    _print(push_run(args.run, args.repo, merged=args.merged, private=args.private))


def cmd_compare_heads(args) -> None:
    out = compare_head_maps(HeadScores.load(args.a), HeadScores.load(args.b), name_a=args.a, name_b=args.b)
    if not args.map:
        out.pop("rank_difference")
    _print(out)


def _open_run(folder: str):
    """A finished run folder (its own settings), the model loaded when needed."""
    return Run.open(folder, progress=_progress())


def _sampling(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "seed": args.seed}


def cmd_chat(args) -> None:
    if args.run:
        run = _open_run(args.run)
        run.require_loaded()
        lm, adapter = run.lm, (run.train_result.adapter_dir if run.train_result is not None else None)
    else:
        lm, adapter = _load_lm(config_from_args(args, _group_fields(MODEL))), args.adapter
    last: dict = {}
    for last in compare_replies(lm, adapter, args.prompt, **_sampling(args)):
        pass
    _print(last)


def cmd_inspect_head(args) -> None:
    run = _open_run(args.run)
    if run.heads is None:
        raise UserError(f"{args.run} has no head scores ({HEADS_FILE}): run its heads stage first")
    check_head(run.heads.n_layers, run.heads.n_q_heads, args.layer, args.head)  # before the model loads
    run.require_loaded()
    if args.prompt:
        sample = Sample(prompt=[{"role": "user", "content": args.prompt}], answer="", task=None, row={}, index=0)
    else:
        rows = run.data.eval.samples if run.data.eval is not None else run.data.probe.samples
        if not 0 <= args.sample < len(rows):
            raise UserError(f"--sample must be between 0 and {len(rows) - 1} (rows of the eval set)")
        sample = rows[args.sample]
    out = inspect_head(run.lm, run.heads, args.layer, args.head, sample, run.data.probe.samples,
                       max_probe=args.probe_rows, max_length=run.config.max_length)
    if not args.pattern:
        out["pattern"].pop("weights")
    _print(out)


def cmd_controls(args) -> None:
    run = _open_run(args.run)
    _print(run_controls(run, controls=[c.strip() for c in args.controls.split(",") if c.strip()],
                        lora_lr=args.lora_lr, lora_rank=args.lora_rank, progress=_progress()))


def cmd_forgetting(args) -> None:
    run = _open_run(args.run)
    if run.eval_after is None:
        raise UserError(f"{args.run} has no evaluation after training: run `python -m p2d run --resume --out "
                        f"{args.run}` first")
    _print(forgetting(run.eval_before, run.eval_after))


def cmd_run(args) -> None:
    if args.resume:
        run = _stage_run(args, "run")
    else:
        config = config_from_args(args, _group_fields(COMMAND_GROUPS["run"]))
        _announce(config, "run")
        fresh_folder(config.out)
        Processes.current().barrier()  # several processes: the folder is fresh before any starts
        run = Run(config, progress=_progress())
    metrics = run.run_all()
    _print(metrics)
    if metrics.get("stages_partial"):
        print(f"stopped during {', '.join(metrics['stages_partial'])}; continue with --resume", file=sys.stderr)


def options_from_args(cls, args):
    """An options dataclass (StudioOptions, BenchConfig) from --config and the flags."""
    return options_from(cls, getattr(args, "config", None), _given(args, [f.name for f in fields(cls)]))


def cmd_bench(args) -> None:
    _print(run_bench(options_from_args(BenchConfig, args), progress=_progress()))


def cmd_studio(args) -> None:
    # the one import inside a function: gradio loads only when the app starts, so `python -m p2d --help` and the
    # library's commands start fast and run where the app's packages are not installed

    try:
        from .studio.server import launch
    except ModuleNotFoundError as exc:  # the library and CLI install without the app's packages
        if (exc.name or "").split(".")[0] not in STUDIO_PACKAGES:
            raise
        raise UserError(f"the app needs the studio extra ({exc.name} is not installed): pip install "
                        "'p2d-studio[studio]'") from None

    # --config here is the run settings the form starts with (StudioOptions.config), not serving options
    launch(options_from(StudioOptions, None, _given(args, [f.name for f in fields(StudioOptions)])))


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m p2d", description="P2D Studio: find task-sensitive attention "
                                     "heads, select data with them, and fine-tune only those heads.")
    parser.add_argument("--version", action="version", version=f"p2d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, func, groups=None, names=None):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", metavar="FILE.yaml", help="settings file (as the app saves it); flags override it")
        wanted = names if names is not None else _group_fields(groups or ())
        add_dataclass_flags(p, RunConfig, wanted)
        p.set_defaults(func=func)
        return p

    command("info", "model facts and head geometry as JSON", cmd_info, MODEL)

    p = command("data", "load a dataset file and print its detected format and counts", cmd_data, names=["columns"])
    p.add_argument("file", help="JSONL, JSON, CSV, TSV, Parquet, a save_to_disk folder or a dataset "
                   "ID[:CONFIG][@SPLIT[START:STOP]] (a hub id or a dataset folder)")
    p.add_argument("--split", default="train", help="split for folders / datasets without @SPLIT (default: train)")
    p.add_argument("--limit", type=int, help="read at most this many usable rows")

    p = command("demo-data", "write a built-in task pool (--pool builtin, builtin-hard or builtin-align) as "
                "pool/probe/eval JSONL",
                cmd_demo_data, names=["pool", "target", "pool_size", "probe_size", "eval_size", "seed"])
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write pool.jsonl, probe.jsonl, eval.jsonl "
                   "into")

    p = command("eval", "accuracy (exact match, contains) and answer loss on the eval set", cmd_eval,
                names=_group_fields(MODEL + ("eval",)) + list(EVAL_DATA))
    p.add_argument("--adapter", help="head adapter folder to apply first")
    p.add_argument("--examples", action="store_true", help="include a few predictions in the output")

    p = command("heads", "stage 1: score every attention head on the probe set (heads.json in the run folder)",
                cmd_heads, COMMAND_GROUPS["heads"])
    p = command("select", "stage 2: score the pool with the selected heads and keep the top share", cmd_select,
                COMMAND_GROUPS["select"])
    p.add_argument("--heads", metavar="HEADS.json", help="use these heads (e.g. another run's) instead of the run "
                   "folder's")
    p = command("train", "stage 3: train only the selected heads (adapter/ and train_log.jsonl)", cmd_train,
                COMMAND_GROUPS["train"])
    p.add_argument("--heads", metavar="HEADS.json", help="use these heads instead of the run folder's")
    p.add_argument("--data", metavar="FILE", help="train on this file instead of the run's selected data")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the run folder")

    p = command("merge", "merge a head adapter into the base model and save it (save_pretrained)", cmd_merge, MODEL)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the merged model")

    p = command("export", "convert a head adapter to another format (peft: a LoRA adapter PEFT, vLLM and TGI load; "
                "gguf: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio; Llama-family models)",
                cmd_export, MODEL)
    p.add_argument("--adapter", required=True, help="P2D adapter folder (a run's adapter/)")
    p.add_argument("--format", default="peft", choices=EXPORT_FORMATS, help="output format (default: peft)")
    p.add_argument("--gguf-type", default=DEFAULT_TYPE, choices=GGUF_TYPES, help="with --format gguf: the tensor "
                   f"type (default: {DEFAULT_TYPE}; norms stay f32; k-quants: llama.cpp's llama-quantize on the f16 "
                   "file)")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the exported adapter (gguf: for "
                   "model-TYPE.gguf)")
    p.add_argument("--base-model-name", help="base model id recorded in adapter_config.json (default: --model)")

    p = sub.add_parser("compare-heads", help="compare two head maps (heads.json): overlap of the selected heads, "
                       "rank correlation", description="compare two head maps (heads.json or run folders): Jaccard "
                       "overlap of the selected heads, Spearman rank correlation of all scores")
    p.add_argument("a", help="heads.json or a run folder holding one")
    p.add_argument("b", help="heads.json or a run folder holding one")
    p.add_argument("--map", action="store_true", help="also print the per-head rank-difference map (a minus b)")
    p.set_defaults(func=cmd_compare_heads)

    p = command("chat", "one prompt answered by the base model and by base + a trained adapter", cmd_chat, MODEL)
    p.add_argument("--prompt", required=True, help="the user turn (the model's chat template is applied)")
    p.add_argument("--run", metavar="DIR", help="a run folder: its model and its trained adapter")
    p.add_argument("--adapter", metavar="DIR", help="head adapter folder (without --run; with --model)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length cap (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")

    p = sub.add_parser("inspect-head", help="open a head of a run: attention pattern, score and rank, probe loss "
                       "change when gated off", description="open a head of a run: its attention pattern on a "
                       "sample, its score and rank, and the probe answer loss change when it (and the whole "
                       "selected set) is gated off")
    p.add_argument("--run", required=True, metavar="DIR", help="run folder with heads.json")
    p.add_argument("--layer", type=int, required=True, help="layer (0-based)")
    p.add_argument("--head", type=int, required=True, help="query head (0-based)")
    p.add_argument("--sample", type=int, default=0, help="eval row whose attention pattern is shown (default: 0)")
    p.add_argument("--prompt", help="show the pattern on this prompt instead of an eval row")
    p.add_argument("--probe-rows", type=int, default=32, help="probe rows the gate-off loss is measured on")
    p.add_argument("--pattern", action="store_true", help="also print the token x token weights")
    p.set_defaults(func=cmd_inspect_head)

    p = sub.add_parser("controls", help="train a finished run's controls (random heads, random data, TF-IDF data, "
                       "LoRA) at the "
                       "same budget", description="train a finished run's controls at the same budget and compare "
                       "accuracy, trainable parameters and AER with P2D's (controls.json in the run folder)")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder with training and evaluation done")
    p.add_argument("--controls", default=",".join(CONTROLS), help=f"which (default: {','.join(CONTROLS)})")
    p.add_argument("--lora-lr", type=float, default=LORA_LR, help=f"LoRA learning rate (default: {LORA_LR:g})")
    p.add_argument("--lora-rank", type=int, default=LORA_RANK, help=f"LoRA rank (default: {LORA_RANK})")
    p.set_defaults(func=cmd_controls)

    p = sub.add_parser("forgetting", help="per-task accuracy before and after training (eval tasks and the pool's "
                       "other tasks)", description="per-task accuracy before and after training: the eval set's "
                       "tasks and held-out rows of the pool's other tasks")
    p.add_argument("--run", required=True, metavar="DIR", help="a run folder with evaluations before and after")
    p.set_defaults(func=cmd_forgetting)

    p = sub.add_parser("push", help="upload a run's adapter (PEFT format) and a model card to the Hugging Face Hub",
                       description="upload a run's adapter (PEFT format) and a model card to the Hugging Face Hub")
    p.add_argument("--run", required=True, metavar="DIR", help="run folder (with adapter/, config.yaml, metrics.json)")
    p.add_argument("--repo", required=True, metavar="ID", help="hub repo id, e.g. you/smollm2-addition-p2d")
    p.add_argument("--merged", action="store_true", help="also upload the merged model (subfolder merged/)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--card-only", action="store_true", help="print the model card and upload nothing")
    p.set_defaults(func=cmd_push)

    p = command("run", "the whole pipeline: heads, select, train, eval before/after, AER", cmd_run,
                COMMAND_GROUPS["run"])
    p.add_argument("--resume", action="store_true", help="keep the finished stages of the run folder and continue "
                   "training from its last checkpoint")
    p.add_argument("--preset", choices=tuple(PRESETS), help="start from a named preset (quick-tour: the whole "
                   "pipeline in a few minutes on a CPU; p2d-paper: P2D as the paper describes it, whatever the "
                   "defaults are); --config and flags override it")

    p = sub.add_parser("studio", help="start the P2D Studio app (Gradio)", description="start the P2D Studio app")
    p.add_argument("--config", metavar="FILE.yaml", help="run settings (the YAML the app saves) to fill the form with")
    add_dataclass_flags(p, StudioOptions, [f.name for f in fields(StudioOptions) if f.name != "config"])
    p.set_defaults(func=cmd_studio)

    p = sub.add_parser("bench", help="benchmark P2D against full fine-tuning, LoRA and its controls",
                       description=BenchConfig.__doc__.replace("%", "%%"))
    p.add_argument("--config", metavar="FILE.yaml", help="benchmark settings file; flags override it")
    add_dataclass_flags(p, BenchConfig)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        try:
            _check_processes(args.command)
            args.func(args)
        finally:
            ConsoleProgress.close_all()  # a bar cut short ends its line before any message
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"error: {OOM_ADVICE}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"error: {exc.strerror or 'no space left'} writing {exc.filename or 'a file'}: free some disk space or "
              "choose another folder, then continue with --resume", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
