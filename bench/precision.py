"""Reduced precision for the no-gradient passes (issue 28 item 3), and P2D's end-to-end time with the cost levers
(item 4), on the embedded model, measured in one process (ratios are taken within the same run)::

    python bench/precision.py --threads 1 --json docs/data/precision.json --md docs/data/precision.md
    nice -n 10 python bench/precision.py --threads 1 --parts heads,e2e --heads-precisions bf16,autocast \
        --e2e-splits builtin-hard:addition,builtin-hard:dates,builtin:addition,builtin-align:json \
        --levers "inference_precision=bf16,heads_precision=bf16" \
        --json docs/data/heads_precision.json --md docs/data/heads_precision.md
    nice -n 10 python bench/precision.py --threads 1 --parts e2e --e2e-splits builtin-align:json,builtin-hard:addition \
        --levers "heads_precision=bf16" --json docs/data/heads_precision_alone.json --md docs/data/heads_precision_alone.md

Part ``precision``: for each benchmark split (the benchmark's data settings, `p2d.bench.config.BenchConfig`: pool
400, probe 64, eval 300, max length 128, seed 0) the default heads are scored once in float32 (heads stay in the
model's dtype), then for each `p2d.config.RunConfig.inference_precision` (same = float32, bf16, int8) on its
`p2d.models.inference_copy`:

- the select stage's head-record pass over the pool (`p2d.method.features.head_norms`, every layer) and the
  default selection from it (`select_from_features`, the default method, 10%): its seconds, and against float32
  the Jaccard of the selected rows, the target-row share of each, the Spearman of the row scores;
- the forced evaluation of the eval set (`p2d.evaluation.forced_eval`): seconds, strict accuracy, the share of
  rows whose strict verdict agrees with float32, the mean absolute difference of the row losses;
- the generated evaluation (`p2d.evaluation.evaluate`, the run's own figure) of the first ``--gen-rows`` eval rows:
  seconds and accuracy;
- the copy's cost: seconds to make it and the MB its weights hold (`model_mb`; the float32 model holds 513 MB).

Part ``heads``: for each split the default heads (`p2d.method.heads.score_heads` with the run's settings) in
float32 and with each ``--heads-precisions`` (`p2d.config.RunConfig.heads_precision`: bf16 runs the forward and
backward on a bfloat16 copy; ``autocast``, for comparison only: float32 weights under ``torch.autocast`` to
bfloat16), ``--heads-repeats`` times each, interleaved with a float32 plain forward over the
probe (`p2d.bench.components.plain_forward_seconds`, the issue's "probe forward"): the median seconds (the copy
included), their ratio to that forward, and against float32 the Jaccard of the selected heads and the Spearman
of all head scores.

Part ``e2e``: P2D's end-to-end time (heads + selection + training, `p2d.pipeline.Run` stages) on ``--e2e-splits``
at the defaults, then with each lever set of ``--levers`` (``;``-separated ``name=value,...`` RunConfig changes),
each in a fresh run folder on the same loaded model: the stage seconds, their sum against the defaults', and the
Jaccard of the trained rows (and of the heads) against the defaults'.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import cpu_name, finish, jaccard  # noqa: E402
from p2d.bench.components import plain_forward_seconds  # noqa: E402
from p2d.bench.config import CHOICE_SPLITS, BenchConfig  # noqa: E402
from p2d.config import RunConfig  # noqa: E402
from p2d.evaluation import evaluate, forced_eval  # noqa: E402
from p2d.explore import spearman  # noqa: E402
from p2d.method.features import head_norms, select_from_features  # noqa: E402
from p2d.method.heads import score_heads  # noqa: E402
from p2d.models import inference_copy, load_model  # noqa: E402
from p2d.pipeline import Run, load_run_data  # noqa: E402

SPLITS = (*CHOICE_SPLITS, "builtin-align:json")
LEVERS = "inference_precision=bf16;inference_precision=bf16,max_head_layer=14;inference_precision=bf16,min_head_layer=15"
HEADS_PRECISIONS = ("bf16",)


#: sizes other than the benchmark's (``--pool-size``, ``--eval-size``; a smoke run)
SIZES: dict = {}


def split_config(split: str, **changes) -> RunConfig:
    """The benchmark's data settings for ``split`` (pool:target) at seed 0."""
    bc = BenchConfig()
    pool, target = split.split(":")
    return RunConfig(pool=pool, target=target, pool_size=SIZES.get("pool", bc.pool_size), probe_size=bc.probe_size,
                     eval_size=SIZES.get("eval", bc.eval_size), other_eval_size=bc.other_eval_size, max_length=bc.max_length,
                     batch_size=bc.batch_size, seed=0, **changes).validate()


def model_mb(model) -> float:
    """MB of a model's weights and buffers as stored (int8 packed weights at one byte per value); shared
    tensors (tied embeddings) once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = (t.data_ptr(), t.numel()) if not t.is_quantized else id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        elif isinstance(t, (tuple, list)):
            for x in t:
                add(x)

    for t in model.state_dict().values():
        add(t)
    return total / 2 ** 20


def precision_part(lm, split: str, precisions, gen_rows: int, log) -> dict:
    cfg = split_config(split)
    data = load_run_data(cfg)
    pool, probe, ev = data.pool.samples, data.probe.samples, data.eval.samples
    bs, ml = cfg.batch_size, cfg.max_length
    t = time.perf_counter()
    heads = score_heads(lm, probe, cfg.head_method, cfg.head_ratio, pool=pool, seed=cfg.seed, batch_size=bs,
                        max_length=ml, positions=cfg.positions)
    out: dict = {"split": split, "pool_rows": len(pool), "eval_rows": len(ev), "heads_s": time.perf_counter() - t,
                 "select_method": cfg.select_method, "target": cfg.target, "rows": {}}
    log(split, "heads", round(out["heads_s"], 1))
    ref = None
    for p in ("same", *precisions):
        t = time.perf_counter()
        m = inference_copy(lm, p)
        copy_s, copy_mb = time.perf_counter() - t, (model_mb(m.model) if m is not lm else 0.0)
        feats = head_norms(m, pool, bs, ml, (cfg.positions,))[cfg.positions]
        sel = select_from_features(feats, heads, cfg.select_method, cfg.data_ratio, lm.geometry)
        fe_t = time.perf_counter()
        fe = forced_eval(m, ev, batch_size=max(16, bs), max_length=ml)
        fe_s = time.perf_counter() - fe_t
        gen_t = time.perf_counter()
        gen = evaluate(m, ev[:gen_rows], batch_size=max(16, bs), max_length=ml, n_examples=0)
        gen_s = time.perf_counter() - gen_t
        strict = fe.to_dict()["strict"]
        losses = fe.to_dict()["row_loss"]
        row = {"copy_s": copy_s, "copy_mb": copy_mb, "select_pass_s": feats.time_s,
               "selected": sel.selected, "target_share": sum(pool[i].task == cfg.target for i in sel.selected)
               / len(sel.selected), "forced_eval_s": fe_s, "forced_accuracy": fe.accuracy, "generate_s": gen_s,
               "generate_rows": len(ev[:gen_rows]), "generate_accuracy": gen.accuracy, "padded_tokens":
               feats.extra.get("padded_tokens"), "tokens": feats.extra.get("tokens")}
        if ref is None:
            ref = {"scores": sel.scores, "strict": strict, "losses": losses, **row}
        else:
            agree = [a == b for a, b in zip(strict, ref["strict"]) if a is not None and b is not None]
            diffs = [abs(a - b) for a, b in zip(losses, ref["losses"]) if a is not None and b is not None]
            row.update(jaccard=jaccard(sel.selected, ref["selected"]), spearman=spearman(sel.scores, ref["scores"]),
                       select_speed=ref["select_pass_s"] / feats.time_s, forced_speed=ref["forced_eval_s"] / fe_s,
                       generate_speed=ref["generate_s"] / gen_s, strict_agreement=sum(agree) / len(agree),
                       loss_abs_diff=sum(diffs) / len(diffs))
        out["rows"][p] = row
        log(split, p, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "selected"})
        del m, feats
    return out


def heads_part(lm, split: str, precisions, repeats: int, log) -> dict:
    """The default heads (`p2d.method.heads.score_heads`, the run's settings) in float32 and in each of
    ``precisions`` (`p2d.config.RunConfig.heads_precision`), ``repeats`` times each, interleaved; the median
    seconds (the copy included) against a float32 plain forward over the probe (timed between them), the
    Jaccard of the selected heads and the Spearman of all head scores against float32."""
    cfg = split_config(split)
    data = load_run_data(cfg)
    probe, pool = data.probe.samples, data.pool.samples
    bs, ml = cfg.batch_size, cfg.max_length
    times: dict = {p: [] for p in ("same", *precisions)}
    result: dict = {}
    fwd = []
    for _ in range(repeats):
        fwd.append(plain_forward_seconds(lm, probe, bs, ml))
        for p in times:
            # "autocast": the alternative to the bf16 copy, float32 weights under torch.autocast (bench only)
            ctx = torch.autocast(lm.device.type, dtype=torch.bfloat16) if p == "autocast" else contextlib.nullcontext()
            with ctx:
                hs = score_heads(lm, probe, cfg.head_method, cfg.head_ratio, pool=pool, seed=cfg.seed, batch_size=bs,
                                 max_length=ml, positions=cfg.positions, precision="same" if p == "autocast" else p)
            times[p].append(hs.time_s)
            result[p] = hs
    probe_fwd = statistics.median(fwd)
    out: dict = {"split": split, "method": cfg.head_method, "probe_rows": len(probe),
                 "pool_sample_rows": result["same"].extra.get("pool_samples"), "repeats": repeats,
                 "probe_forward_s": probe_fwd, "probe_forward_all_s": fwd, "rows": {}}
    ref = result["same"]
    flat = lambda hs: [x for r in hs.scores for x in r]  # noqa: E731
    for p, hs in result.items():
        sec = statistics.median(times[p])
        row = {"time_s": sec, "all_s": times[p], "probe_forwards": sec / probe_fwd, "selected": hs.selected}
        if p != "same":
            row.update(speedup=statistics.median(times["same"]) / sec,
                       jaccard=jaccard(map(tuple, hs.selected), map(tuple, ref.selected)),
                       spearman=spearman(flat(hs), flat(ref)))
        out["rows"][p] = row
        log(split, "heads", p, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                 if k != "selected"})
    return out


def e2e_part(lm, split: str, levers: list[dict], log) -> dict:
    runs = []
    for changes in [{}, *levers]:
        cfg = split_config(split, **changes)
        folder = tempfile.mkdtemp(prefix="p2d-e2e-")
        run = Run(cfg.replace(out=folder), lm=lm)
        t = time.perf_counter()
        m = run.run(["train"])
        wall = time.perf_counter() - t
        row = {"changes": changes, "heads_s": m["time_heads_s"], "select_s": m["time_select_s"],
               "train_s": m["time_train_s"], "wall_s": wall, "selected": list(run.selection.selected),
               "heads": run.heads.selected, "steps": m.get("steps_done"),
               "target_share": sum(run.data.pool.samples[i].task == cfg.target for i in run.selection.selected)
               / len(run.selection.selected)}
        row["p2d_s"] = row["heads_s"] + row["select_s"] + row["train_s"]
        if runs:
            base = runs[0]
            row.update(speedup=base["p2d_s"] / row["p2d_s"], wall_speedup=base["wall_s"] / wall,
                       jaccard=jaccard(row["selected"], base["selected"]),
                       heads_jaccard=jaccard(map(tuple, row["heads"]), map(tuple, base["heads"])))
        runs.append(row)
        log(split, "e2e", changes, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                    if k not in ("selected", "heads")})
        del run
        gc.collect()
    return {"split": split, "runs": runs}


def parse_levers(text: str) -> list[dict]:
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        out.append(dict(kv.split("=", 1) for kv in part.split(",")))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="precision,heads,e2e")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--precisions", default="bf16,int8")
    ap.add_argument("--gen-rows", type=int, default=32)
    ap.add_argument("--heads-precisions", default=",".join(HEADS_PRECISIONS))
    ap.add_argument("--heads-repeats", type=int, default=1, help="heads part: timings per precision (median)")
    ap.add_argument("--e2e-splits", default="builtin-hard:addition")
    ap.add_argument("--levers", default=LEVERS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pool-size", type=int, default=None, help="default: the benchmark's")
    ap.add_argument("--eval-size", type=int, default=None, help="default: the benchmark's")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    SIZES.update({k: v for k, v in (("pool", args.pool_size), ("eval", args.eval_size)) if v is not None})
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.1f}s]", *a, flush=True)  # noqa: E731
    lm = load_model("default", device="cpu")
    parts = args.parts.split(",")
    res: dict = {"model": "SmolLM2-135M-Instruct (embedded), fp32, CPU", "threads": args.threads,
                 "cpu": cpu_name(), "sizes": dict(SIZES) or "the benchmark's", "load_before": os.getloadavg(),
                 "precision": [], "heads": [], "e2e": []}
    if "precision" in parts:
        for split in args.splits.split(","):
            res["precision"].append(precision_part(lm, split, args.precisions.split(","), args.gen_rows, log))
    if "heads" in parts:
        for split in args.splits.split(","):
            res["heads"].append(heads_part(lm, split, args.heads_precisions.split(","), args.heads_repeats, log))
    if "e2e" in parts:
        for split in filter(None, args.e2e_splits.split(",")):
            res["e2e"].append(e2e_part(lm, split, parse_levers(args.levers), log))
    return finish(res, t0, markdown, args.json, args.md)


def markdown(r: dict) -> str:
    f = lambda x, d=2: "—" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [f"Embedded model, CPU ({r['cpu']}), {r['threads']} thread(s); load average before "
             f"{', '.join(f'{x:.1f}' for x in r['load_before'])}, after {', '.join(f'{x:.1f}' for x in r['load_after'])}; "
             f"total {r['total_s']:.0f} s.", ""]
    if r["precision"]:
        lines += ["| split | precision | select pass s | speed vs fp32 | Jaccard | target share (fp32) | Spearman | "
                  "forced eval s | speed vs fp32 | strict acc (fp32) | strict rows agree | generate s | speed vs fp32 | "
                  "generated acc (fp32) | copy MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for sp in r["precision"]:
            base = sp["rows"]["same"]
            for p, row in sp["rows"].items():
                ref = p == "same"

                def own(key, d=2):
                    return "—" if ref else f(row[key], d)

                def vs(key, d=2):
                    return f(row[key], d) + ("" if ref else " (" + f(base[key], d) + ")")

                lines.append(
                    f"| {sp['split']} | {'fp32 (same)' if ref else p} | {f(row['select_pass_s'], 1)} | "
                    f"{'1.00' if ref else own('select_speed')} | {own('jaccard', 3)} | {vs('target_share')} | "
                    f"{own('spearman', 4)} | {f(row['forced_eval_s'], 1)} | {'1.00' if ref else own('forced_speed')} | "
                    f"{vs('forced_accuracy', 3)} | {own('strict_agreement', 3)} | {f(row['generate_s'], 1)} | "
                    f"{'1.00' if ref else own('generate_speed')} | {vs('generate_accuracy', 3)} | "
                    f"{f(row['copy_mb'], 0)} |")
        lines.append("")
    if r.get("heads"):
        lines += ["| split | heads precision | heads s (median) | probe forwards (fp32 plain forward over the probe) | "
                  "speed vs fp32 | Jaccard of heads | Spearman of head scores |", "|---|---|---|---|---|---|---|"]
        for sp in r["heads"]:
            for p, row in sp["rows"].items():
                lines.append(f"| {sp['split']} | {'fp32 (same)' if p == 'same' else p} | {f(row['time_s'], 1)} | "
                             f"{f(row['probe_forwards'])} ({f(sp['probe_forward_s'], 1)} s) | "
                             f"{f(row.get('speedup', 1.0))} | {f(row.get('jaccard'), 3)} | {f(row.get('spearman'), 4)} |")
        lines.append("")
    if r["e2e"]:
        lines += ["| split | settings | heads s | select s | train s | P2D s (sum) | speed-up vs defaults | wall s | "
                  "Jaccard of rows vs defaults | Jaccard of heads vs defaults | target share |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for sp in r["e2e"]:
            for row in sp["runs"]:
                name = ", ".join(f"{k}={v}" for k, v in row["changes"].items()) or "defaults"
                lines.append(f"| {sp['split']} | {name} | {f(row['heads_s'], 1)} | {f(row['select_s'], 1)} | "
                             f"{f(row['train_s'], 1)} | {f(row['p2d_s'], 1)} | {f(row.get('speedup'))} | "
                             f"{f(row['wall_s'], 1)} | {f(row.get('jaccard'), 3)} | {f(row.get('heads_jaccard'), 3)} | "
                             f"{f(row['target_share'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
