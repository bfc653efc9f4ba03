"""The GPU check: what a session that is lent a GPU runs once, in one call (a few minutes).

For each case it loads the model, runs every pipeline stage (`p2d.pipeline.Run`) and records, per
stage, the wall time and the peak device memory (``torch.cuda.max_memory_allocated``, reset before
each stage), plus the run's own figures: head scoring, selection and training time, seconds per
training step, the full fine-tuning reference and the AER, the exact match before and after.

Cases (``--cases``, in this order):

- ``embedded``: the embedded SmolLM2-135M-Instruct end to end with the default settings, bf16;
- ``1b``: a ~1.1B-parameter Llama-family model (TinyLlama-1.1B's shape: 22 layers, hidden 2048,
  32 query / 4 kv heads, MLP 5632, the embedded tokenizer's vocabulary), random weights (there is no
  hub on the device machine; timing and memory do not depend on the weights), bf16;
- ``1b-4bit``: the same model with its frozen MLPs in 4-bit (``--quantize 4bit``, bitsandbytes).

The ``1b`` cases use a smaller budget than the defaults (``--pool-size``, ``--steps``) so that the
whole check fits in one device call. Results: ``--json`` (default ``runs/gpu_check.json``) and a
markdown table on stdout, for docs/BENCHMARKS.md.

On the device machine (one call, 10-minute limit)::

    HF_HUB_OFFLINE=1 python bench/gpu_check.py --json $OUT/gpu_check.json

A dry run on a CPU with a tiny model of the same family (what tests/test_bench.py runs)::

    python bench/gpu_check.py --device cpu --size tiny --cases 1b --pool-size 40 --steps 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # Llama-family shapes: (layers, hidden, query heads, kv heads, MLP)
    "1b": (22, 2048, 32, 4, 5632),
    "tiny": (2, 64, 4, 2, 128),
}


def build_llama(path: Path, size: str) -> str:
    """A random-weight Llama of ``size`` with the embedded tokenizer, saved in bf16 to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from p2d.models import load_tokenizer

    layers, hidden, heads, kv, mlp = SIZES[size]
    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)


def run_case(name: str, spec: str, quantize: str | None, settings: dict, args, out: Path) -> dict:
    """Load ``spec`` and run every stage; the figures of one case."""
    from p2d.config import STAGES, RunConfig
    from p2d.models import load_model
    from p2d.pipeline import METRICS_FILE, Run

    cfg = RunConfig(model=spec, device=args.device, dtype=args.dtype, quantize=quantize, out=str(out / name),
                    **settings)
    _peak_reset(args.device)
    t0 = time.perf_counter()
    lm = load_model(spec, device=args.device, dtype=args.dtype, quantize=quantize)
    stages = {"model": {"s": round(time.perf_counter() - t0, 2), "peak_gib": _peak_gib(args.device)}}
    run = Run(cfg, lm=lm)
    for stage in STAGES:  # "load" reads the data (the model is loaded above)
        _peak_reset(args.device)
        t0 = time.perf_counter()
        run.run([stage])
        stages[stage] = {"s": round(time.perf_counter() - t0, 2), "peak_gib": _peak_gib(args.device)}
    m = json.loads((Path(cfg.out) / METRICS_FILE).read_text())
    steps = max(1, m.get("steps_done") or 1)
    result = {"case": name, "model": spec, "params": m.get("total_params"), "quantize": quantize,
              "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device), "stages": stages,
              "time_heads_s": m.get("time_heads_s"), "time_select_s": m.get("time_select_s"),
              "time_train_s": m.get("time_train_s"), "steps": m.get("steps_done"),
              "s_per_step": round((m.get("time_train_s") or 0.0) / steps, 4),
              "time_full_s": m.get("time_full_s"), "aer": m.get("aer"),
              "exact_match_before": (m.get("eval_before") or {}).get("accuracy"),
              "exact_match_after": (m.get("eval_after") or {}).get("accuracy"),
              "settings": settings}
    del run, lm
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def table(results: list[dict]) -> str:
    rows = ["| case | params | load s | heads s | select s | train s (steps) | s/step | full FT ref s | AER | "
            "peak GiB (train) | exact match before -> after |", "|" + "---|" * 11]
    for r in results:
        peak = r["stages"]["train"]["peak_gib"]
        rows.append(f"| {r['case']} | {r['params'] / 1e6:.0f} M | {r['stages']['model']['s']} | {r['time_heads_s']} | "
                    f"{r['time_select_s']} | {r['time_train_s']:.1f} ({r['steps']}) | {r['s_per_step']} | "
                    f"{r['time_full_s']:.1f} | {r['aer']:.3f} | {peak if peak is not None else '-'} | "
                    f"{r['exact_match_before']} -> {r['exact_match_after']} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="embedded,1b,1b-4bit")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--size", default="1b", choices=sorted(SIZES), help="the shape of the 1b cases")
    ap.add_argument("--pool-size", type=int, default=400, help="the 1b cases' pool")
    ap.add_argument("--steps", type=int, default=40, help="the 1b cases' training steps")
    ap.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--json", default="runs/gpu_check.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this check is for a GPU machine (--device cpu for a dry run)")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"embedded", "1b", "1b-4bit"}
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        small = {"pool_size": args.pool_size, "probe_size": 32, "eval_size": 30, "other_eval_size": 0,
                 "steps": args.steps, "batch_size": 8, "max_length": 256}
        results = []
        model_dir = None
        for case in cases:
            if case == "embedded":
                results.append(run_case(case, "default", None, {}, args, out))
            else:
                model_dir = model_dir or build_llama(out / f"llama-{args.size}", args.size)
                results.append(run_case(case, model_dir, "4bit" if case.endswith("4bit") else None, small, args, out))
            print(json.dumps(results[-1]), flush=True)
    info = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
            "torch": torch.__version__, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
