"""The falsification controls of one run, in one call: is it the heads, the data, or neither?

`run_controls(run)` (a run whose training and evaluation after it are done) trains, with the run's
own training settings (same steps/epochs, batch size, max length, seed, and the same number of
training rows), the benchmark's control cells
(`p2d.bench.config.CELLS`) and evaluates each on the run's eval set:

- ``randomheads-p2d``: as many random heads as P2D selected, trained on P2D's data (do the heads matter?);
- ``heads-random``: P2D's heads trained on a random sample of the pool of the selection's size (does the
  data matter?);
- ``lora-p2d``: LoRA (q, k, v, o; rank 8, alpha 16) on P2D's data, the adapter most users know.

Every cell goes through the benchmark's training code (`p2d.bench.cells.trained`): the head cells
through `p2d.training.train_heads` like P2D itself, LoRA through the same answer-token loss and
batching. Costs follow the benchmark's rule (training time, plus P2D's head scoring when a cell uses
P2D's heads or data, plus P2D's selection for P2D's data) and the AER divides by the run's own
full fine-tuning reference, so the figures sit next to P2D's in Results. LoRA's learning rate is a
setting (default 3e-3, the benchmark's sweep choice on the embedded model, ``docs/BENCHMARKS.md``);
the head cells use the run's learning rate. One draw per control: the benchmark has the spread.

Written to ``controls.json`` in the run folder, with the digests of the stages it was built on (a
rerun of heads, selection or training makes it stale: `read_controls` then returns None). A stop
request ends after the control being trained.
Not supported: quantised or remote-code base models for the LoRA cell (it loads a plain copy).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from .errors import UserError
from .evaluation import evaluate
from .files import read_json, write_json
from .progress import ProgressFn, StopFn, report

__all__ = ["CONTROLS", "run_controls", "read_controls", "CONTROLS_FILE"]

CONTROLS = ("randomheads-p2d", "heads-random", "lora-p2d")
LABELS = {"randomheads-p2d": "random heads / P2D data", "heads-random": "P2D heads / random data",
          "lora-p2d": "LoRA q,k,v,o / P2D data", "p2d": "P2D heads / P2D data (P2D)"}
CONTROLS_FILE = "controls.json"
LORA_LR = 3e-3
LORA_RANK = 8


def _built_on(run) -> dict:
    return {s: run.result_digest(s) for s in ("heads", "select", "train")}


def read_controls(run) -> dict | None:
    """The run's controls.json when it was built on the run's current heads, selection and training."""
    data = read_json(Path(run.out) / CONTROLS_FILE)
    if not data or data.get("built_on") != _built_on(run):
        return None
    return data


def _check(run) -> None:
    missing = [s for s in ("heads", "select", "train", "eval_after") if not run.is_done(s)]
    if missing:
        raise UserError(f"the controls compare with a finished P2D run: run {', '.join(missing)} first")


def run_controls(run, controls=CONTROLS, lora_lr: float = LORA_LR, lora_rank: int = LORA_RANK,
                 progress: ProgressFn = None, should_stop: StopFn = None) -> dict:
    """Train and evaluate ``controls`` (names from `CONTROLS`) for the finished run ``run`` (a
    `p2d.pipeline.Run` with its model and data loaded); returns and writes controls.json."""
    from .bench.cells import trained
    from .bench.config import CELLS
    from .bench.report import cell_cost
    from .heads import score_heads

    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise UserError(f"unknown control {unknown[0]!r}: choose from {', '.join(CONTROLS)}")
    _check(run)
    run.require_loaded()
    if run.data.eval is None:
        raise UserError("the controls need an eval set to compare accuracy: give an eval file")
    c, lm = run.config, run.lm
    pool = run.data.pool.samples
    selected = list(run.selection.selected)
    n = len(selected)
    data = {"p2d": selected,
            "random": sorted(random.Random(f"p2d-controls:{c.seed}").sample(range(len(pool)), min(n, len(pool))))}
    heads = {"p2d": run.heads}
    if "randomheads-p2d" in controls:
        heads["random"] = score_heads(lm, run.data.probe.samples[:1], method="random", ratio=c.head_ratio,
                                      seed=10_000 + c.seed, batch_size=c.batch_size, max_length=c.max_length)
    t_heads, t_select = run.heads.time_s, run.selection.time_s
    t_full = run.full.time_s if run.full is not None else None
    ev_set, other = run.data.eval.samples, (run.data.other.samples if run.data.other is not None else [])
    results: dict[str, dict] = {}
    for i, name in enumerate(controls):
        if should_stop is not None and should_stop():
            break
        kind, data_name, _ = CELLS[name]
        label = LABELS[name]
        report(progress, i, len(controls), f"control {label}")
        tc = run.train_config()
        if kind == "lora":
            import dataclasses

            tc = dataclasses.replace(tc, lr=float(lora_lr))
        samples = [pool[j] for j in data[data_name]]
        folder = Path(run.out) / "controls" / name
        with trained("heads" if kind == "random_heads" else kind, lm, samples, tc, folder,
                     heads=heads["random" if kind == "random_heads" else "p2d"], lora_rank=lora_rank,
                     progress=progress) as (model, res):
            ev = evaluate(model, ev_set, batch_size=max(16, c.batch_size), limit=c.eval_limit,
                          max_new_tokens=c.max_new_tokens, max_length=c.max_length, n_examples=0)
            oth = evaluate(model, other, batch_size=max(16, c.batch_size), max_length=c.max_length,
                           n_examples=0) if other else None
        cost = cell_cost(name, {"train_s": res.train_s}, t_heads, t_select, 0.0)
        results[name] = {"label": label, "kind": kind, "data": data_name, "rows": len(samples), "lr": tc.lr,
                         "steps": res.steps, "train_s": res.train_s, "cost_s": cost,
                         "aer": cost / t_full if t_full else None, "trainable_params": res.trainable_params,
                         "accuracy": ev.accuracy, "contains": ev.contains, "loss": ev.loss,
                         "other_tasks": oth.by_task if oth is not None else {}}
    report(progress, len(results), len(controls), "controls")
    after, tr = run.eval_after, run.train_result
    p2d_cost = cell_cost("p2d", {"train_s": tr.time_s}, t_heads, t_select, 0.0)
    out = {"built_on": _built_on(run), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "complete": len(results) == len(controls), "lora_rank": lora_rank,
           "p2d": {"label": LABELS["p2d"], "rows": n, "lr": c.lr, "steps": tr.steps_done,
                   "train_s": tr.time_s, "cost_s": p2d_cost, "aer": p2d_cost / t_full if t_full else None,
                   "trainable_params": tr.trainable_params,
                   "accuracy": after.accuracy if after is not None else None,
                   "loss": after.loss if after is not None else None,
                   "other_tasks": after.other_tasks if after is not None else {}},
           "controls": results}
    write_json(Path(run.out) / CONTROLS_FILE, out)
    return out
