"""`python -m p2d <command>`: every library job on the command line.

Results are printed to stdout as one JSON object; progress goes to stderr. Errors the user can fix
print one line (`error: ...`) on stderr and exit with code 2; Ctrl-C exits with 130 after the
current step has been saved.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from .data.formats import parse_mapping
from .errors import OOM_ADVICE, UserError, is_out_of_memory


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, ensure_ascii=False, default=str))


def _progress():
    from .progress import ConsoleProgress

    return ConsoleProgress()


def _model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default="default", required=required,
                   help="model spec: default (embedded SmolLM2-135M-Instruct), hub id, folder or .gguf file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--quantize", choices=("8bit", "4bit"),
                   help="load the frozen MLPs with bitsandbytes (saves GPU memory; slower on CPU)")


def _load_lm(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      quantize=getattr(args, "quantize", None))


# -- commands ------------------------------------------------------------------------------------
def cmd_info(args) -> None:
    _print(_load_lm(args).info())


def cmd_data(args) -> None:
    from .data.loading import load_data

    _print(load_data(args.file, mapping=parse_mapping(args.columns), split=args.split, limit=args.limit).summary())


def cmd_demo_data(args) -> None:
    from .data.builtin import DEFAULT_TARGET, build_task_pool

    tp = build_task_pool(target=args.target or DEFAULT_TARGET, seed=args.seed, pool_size=args.pool_size,
                         probe_size=args.probe_size, eval_size=args.eval_size)
    paths = tp.write(args.out)
    _print({"files": paths, "target": tp.target, "pool_tasks": tp.counts(),
            "probe": len(tp.probe), "eval": len(tp.eval)})


def cmd_eval(args) -> None:
    from .data.loading import load_data
    from .evaluation import evaluate

    data = load_data(args.eval, mapping=parse_mapping(args.columns))
    lm = _load_lm(args)
    if args.adapter:
        from .adapter import load_adapter

        load_adapter(lm, args.adapter)
    res = evaluate(lm, data.samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   limit=args.limit, max_length=args.max_length, progress=_progress())
    out = res.to_dict(with_examples=args.examples)
    out["skipped"] = sum(data.skipped.values())
    _print(out)


def cmd_heads(args) -> None:
    from .data.loading import load_data
    from .heads import score_heads

    probe = load_data(args.probe, mapping=parse_mapping(args.columns))
    pool = load_data(args.pool, mapping=parse_mapping(args.columns)) if args.pool else None
    lm = _load_lm(args)
    hs = score_heads(lm, probe.samples, method=args.method, ratio=args.ratio,
                     pool=pool.samples if pool else None, seed=args.seed, batch_size=args.batch_size,
                     max_length=args.max_length, proxy_steps=args.proxy_steps, progress=_progress())
    path = hs.save(args.out)
    _print({"heads": str(path), "method": hs.method, "selected": hs.selected, "time_s": hs.time_s})


def cmd_select(args) -> None:
    from .data.loading import load_data
    from .heads import HeadScores
    from .selection import select_data

    heads = HeadScores.load(args.heads)
    pool = load_data(args.pool, mapping=parse_mapping(args.columns))
    probe = load_data(args.probe, mapping=parse_mapping(args.columns)) if args.probe else None
    lm = _load_lm(args)
    sel = select_data(lm, heads, pool.samples, method=args.method, ratio=args.ratio,
                      probe=probe.samples if probe else None, batch_size=args.batch_size,
                      max_length=args.max_length, seed=args.seed, progress=_progress())
    paths = sel.save(args.out, pool.samples)
    _print({"files": {k: str(v) for k, v in paths.items()}, "method": sel.method, "n_pool": sel.n_pool,
            "n_selected": sel.n_selected, "time_s": sel.time_s, "task_counts": sel.task_counts(pool.samples)})


def cmd_train(args) -> None:
    from .data.loading import load_data
    from .heads import HeadScores
    from .training import TrainConfig, train_heads

    heads = HeadScores.load(args.heads)
    data = load_data(args.data, mapping=parse_mapping(args.columns))
    lm = _load_lm(args)
    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      max_length=args.max_length, projections=tuple(args.projections.split(",")), seed=args.seed)
    res = train_heads(lm, heads, data.samples, cfg, args.out, progress=_progress(), overwrite=args.overwrite)
    _print(asdict(res))
    if res.stopped:
        print(f"stopped early ({res.stop_reason}); adapter and log saved in {args.out}", file=sys.stderr)


def cmd_merge(args) -> None:
    from .adapter import merge_and_save

    lm = _load_lm(args)
    _print({"merged_model": str(merge_and_save(lm, args.adapter, args.out))})


def cmd_run(args) -> None:
    from .config import RunConfig
    from .pipeline import Run

    config = RunConfig.load(args.config) if args.config else RunConfig()
    for f in fields(RunConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            if f.name == "columns":
                value = parse_mapping(value)
            elif f.name == "projections":
                value = [p.strip() for p in value.split(",") if p.strip()]
            setattr(config, f.name, value)
    config.validate()
    print("# config used (save as YAML and pass with --config to rerun):", file=sys.stderr)
    print(config.to_yaml(), file=sys.stderr)
    print(f"# equivalent command: {config.to_command()}", file=sys.stderr)
    metrics = Run(config, progress=_progress()).run_all()
    _print(metrics)


# -- parser --------------------------------------------------------------------------------------
def _run_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; unset flags keep the config file's (or default) value."""
    from .config import RunConfig

    for f in fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not None and not callable(f.default) else None
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        suffix = f" (default: {default})" if default not in (None, "") and not isinstance(default, bool) else ""
        p.add_argument(flag, dest=f.name, type=kind, default=None, help=help_ + suffix)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m p2d", description="P2D Studio: find task-sensitive attention "
                                     "heads, select data with them, and fine-tune only those heads.")
    parser.add_argument("--version", action="version", version=f"p2d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="model facts and head geometry as JSON")
    _model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("data", help="load a dataset file and print its detected format and counts")
    p.add_argument("file", help="JSONL, JSON, CSV, TSV, Parquet, a save_to_disk folder or a hub dataset id")
    p.add_argument("--columns", help="column mapping, e.g. prompt=question,answer=reply,task=label")
    p.add_argument("--split", default="train", help="split for folders / hub datasets (default: train)")
    p.add_argument("--limit", type=int, help="read at most this many usable rows")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("demo-data", help="write the built-in task pool as pool/probe/eval JSONL")
    p.add_argument("--out", required=True, help="folder to write pool.jsonl, probe.jsonl, eval.jsonl into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", help="target task (default: the built-in default)")
    p.add_argument("--pool-size", type=int, default=1000)
    p.add_argument("--probe-size", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=100)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("eval", help="exact-match accuracy and answer loss on an eval file")
    _model_args(p)
    p.add_argument("--eval", required=True, help="eval file (any format `data` reads)")
    p.add_argument("--adapter", help="head adapter folder to apply first")
    p.add_argument("--limit", type=int, help="evaluate at most N rows")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="generation cap (default: longest gold answer + 8, max 64)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--columns", help="column mapping, e.g. prompt=question,answer=reply")
    p.add_argument("--examples", action="store_true", help="include a few predictions in the output")
    p.set_defaults(func=cmd_eval)

    from .adapter import PROJECTIONS
    from .heads import DEFAULT_HEAD_METHOD, HEAD_METHODS
    from .selection import DEFAULT_SELECT_METHOD, SELECT_METHODS

    p = sub.add_parser("heads", help="stage 1: score every attention head on a probe set")
    _model_args(p)
    p.add_argument("--probe", required=True, help="~100 examples of the target task")
    p.add_argument("--pool", help="pool file (used by the gradient method's task contrast)")
    p.add_argument("--method", choices=HEAD_METHODS, default=DEFAULT_HEAD_METHOD)
    p.add_argument("--ratio", type=float, default=0.1, help="share of all query heads to select (default 0.1)")
    p.add_argument("--proxy-steps", type=int, default=20, help="shift method: proxy fine-tuning steps")
    p.add_argument("--out", required=True, help="folder for heads.json")
    _common_run_args(p)
    p.set_defaults(func=cmd_heads)

    p = sub.add_parser("select", help="stage 2: score a pool with the selected heads and keep the top ratio")
    _model_args(p)
    p.add_argument("--heads", required=True, help="heads.json from `heads` (or its folder)")
    p.add_argument("--pool", required=True, help="pool file to select from")
    p.add_argument("--probe", help="probe file (needed by the alignment method)")
    p.add_argument("--method", choices=SELECT_METHODS, default=DEFAULT_SELECT_METHOD)
    p.add_argument("--ratio", type=float, default=0.1, help="share of the pool to keep (default 0.1)")
    p.add_argument("--out", required=True, help="folder for selected.jsonl, scores.jsonl, selection.json")
    _common_run_args(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("train", help="stage 3: train only the selected heads; writes adapter/ and train_log.jsonl")
    _model_args(p)
    p.add_argument("--heads", required=True, help="heads.json from `heads` (or its folder)")
    p.add_argument("--data", required=True, help="training data (e.g. selected.jsonl from `select`)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--projections", default=",".join(PROJECTIONS), help="subset of q,k,v,o to train")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter/log in --out")
    p.add_argument("--out", required=True, help="folder for adapter/ and train_log.jsonl")
    _common_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge a head adapter into the base model and save_pretrained it")
    _model_args(p)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("run", help="the whole pipeline: heads, select, train, eval before/after, AER")
    p.add_argument("--config", help="YAML config (as saved by the app); flags override it")
    _run_flags(p)
    p.set_defaults(func=cmd_run)
    return parser


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--columns", help="column mapping, e.g. prompt=question,answer=reply")


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
