"""The falsification controls of one run, in one call: is it the heads, the data, or neither?

`run_controls(run)` (a run whose training and evaluation after it are done) trains, with the run's
own training settings (same steps/epochs, batch size, max length, seed, adapter, and the same number
of training rows), the comparison cells of `p2d.cells.CELLS` plus a head-free selection, and
evaluates each on the run's eval set (and the other tasks' held-out rows) exactly as the run was:

- ``randomheads-p2d``: as many random heads as P2D selected (`p2d.cells.random_heads`: the benchmark's
  random head set ``random0`` of the run's seed), trained on P2D's data (do the heads matter?);
- ``heads-random``: P2D's heads trained on a random sample of the pool of the selection's size
  (`p2d.cells.random_rows`: the benchmark's random rows of the run's seed; does the data matter?);
- ``heads-tfidf``: P2D's heads trained on the rows a selector without heads and without a model picks
  (TF-IDF of the prompt's words, cosine to the probe; `p2d.method.selection_baselines`): does the head-guided
  selection beat a cheap one? Its selection time counts in its cost;
- ``heads-shape_tfidf``: P2D's heads trained on the rows an answer reader picks (``shape_tfidf``: rows whose
  answer has the probe answers' shape, then prompt TF-IDF; no heads, no model): does the head-guided
  selection beat reading the answers' form? Its selection time counts in its cost;
- ``lora-p2d``: LoRA (q, k, v, o; rank 8, alpha 16) on P2D's data, the adapter most users know.

Every cell goes through `p2d.cells.train_cell` (head cells through `p2d.training.train_heads` like P2D
itself, LoRA through the same answer-token loss and batching) with the run's
`p2d.config.RunConfig.train_config`, and `p2d.cells.evaluate_cell`. Costs follow `p2d.cells.cell_cost`
(training, plus P2D's head scoring when a cell trains P2D's heads or uses its data, plus the selection
that picked its rows) and the AER (`p2d.cells.cell_aer`) divides by the run's own full fine-tuning
reference (None without one). LoRA's learning rate is a setting (default 3e-3, the benchmark's sweep choice on
the embedded model, ``docs/BENCHMARKS.md``); the head cells use the run's learning rate. One draw per
control: the benchmark has the spread.

Written to ``controls.json`` in the run folder as a `p2d.manifest` entry built on the run's heads,
selection and training (a rerun of any of them makes it stale: `read_controls` then returns None). A
stop request ends after the control being trained.
Not supported: quantised or remote-code base models for the LoRA cell (it loads a plain copy).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .cells import CELLS, Cell, cell_aer, cell_cost, evaluate_cell, random_heads, random_rows, train_cell
from .errors import UserError
from .files import read_json, write_json
from .manifest import fresh_digest, is_valid, make_entry
from .method.selection import select_data
from .progress import ProgressFn, StopFn, report

__all__ = ["CONTROLS", "run_controls", "read_controls", "CONTROLS_FILE"]

CONTROL_CELLS: dict[str, Cell] = {
    "randomheads-p2d": CELLS["randomheads-p2d"],
    "heads-random": CELLS["heads-random"],
    "heads-tfidf": Cell("heads", "tfidf", "p2d", label="P2D heads / TF-IDF data (no heads)"),
    "heads-shape_tfidf": Cell("heads", "shape_tfidf", "p2d", label="P2D heads / answer-shape + TF-IDF data (no heads)"),
    "lora-p2d": CELLS["lora-p2d"],
}
CONTROLS = tuple(CONTROL_CELLS)
LABELS = {**{k: c.label.replace(" 10%", " data") for k, c in CONTROL_CELLS.items()}, "p2d": CELLS["p2d"].label}
CONTROLS_FILE = "controls.json"
LORA_LR = 3e-3
LORA_RANK = 8
_BUILT_ON = ("heads", "select", "train")


def _inputs(run) -> dict:
    return {s: run.result_digest(s) for s in _BUILT_ON}


def read_controls(run) -> dict | None:
    """The run's controls.json when it was built on the run's current heads, selection and training."""
    data = read_json(Path(run.out) / CONTROLS_FILE)
    entry = (data or {}).get("entry")
    return data if entry and is_valid(entry, entry["settings"], _inputs(run)) else None


def _check(run) -> None:
    if run.config.inference_precision != "same":  # the controls' cells evaluate in the model's dtype
        raise UserError(f"the controls evaluate in the model's dtype, the run in {run.config.inference_precision}: "
                        "set No-gradient precision (inference_precision) to same and rerun the evaluation first")
    missing = [s for s in ("heads", "select", "train", "eval_after") if not run.is_done(s)]
    if missing:
        raise UserError(f"the controls compare with a finished P2D run: run {', '.join(missing)} first")


def run_controls(run, controls=CONTROLS, lora_lr: float = LORA_LR, lora_rank: int = LORA_RANK,
                 progress: ProgressFn = None, should_stop: StopFn = None) -> dict:
    """Train and evaluate ``controls`` (names from `CONTROLS`) for the finished run ``run`` (a
    `p2d.pipeline.Run` with its model and data loaded); returns and writes controls.json."""
    unknown = [c for c in controls if c not in CONTROLS]
    if unknown:
        raise UserError(f"unknown control {unknown[0]!r}: choose from {', '.join(CONTROLS)}")
    _check(run)
    run.require_loaded()
    if run.data.eval is None:
        raise UserError("the controls need an eval set to compare accuracy: give an eval file")
    c, lm = run.config, run.lm
    pool, probe = run.data.pool.samples, run.data.probe.samples
    selected = list(run.selection.selected)
    n = len(selected)
    data = {"p2d": selected, "random": random_rows(len(pool), n, c.seed)}
    select_s = {"p2d": run.selection.time_s}
    for method in dict.fromkeys(CONTROL_CELLS[name].data for name in controls):  # the head-free selectors' rows
        if method not in data:
            sel = select_data(lm, None, pool, method=method, ratio=n / len(pool), probe=probe)
            data[method], select_s[method] = sel.selected[:n], sel.time_s
    heads = {"p2d": run.heads}
    if "randomheads-p2d" in controls:
        heads["random"] = random_heads(lm, c.head_ratio, c.seed)
    t_heads = run.heads.time_s
    t_full = run.full.time_s if run.full is not None else None
    other = run.data.other.samples if run.data.other is not None else None
    results: dict[str, dict] = {}
    for i, name in enumerate(controls):
        if should_stop is not None and should_stop():
            break
        cell = CONTROL_CELLS[name]
        report(progress, i, len(controls), f"control {LABELS[name]}")
        tc = c.train_config()
        if cell.trainable == "lora":
            tc = dataclasses.replace(tc, lr=float(lora_lr))
        samples = [pool[j] for j in data[cell.data]]
        folder = Path(run.out) / "controls" / name
        with train_cell(cell, lm, samples, tc, folder, heads=heads.get(cell.heads), lora_rank=lora_rank,
                        progress=progress) as (model, res):
            ev = evaluate_cell(model, run.data.eval.samples, other, batch_size=max(16, c.batch_size),
                               max_length=c.max_length, limit=c.eval_limit, max_new_tokens=c.max_new_tokens,
                               n_examples=0)
        uses_p2d_heads = cell.heads == "p2d" or cell.data == "p2d"
        cost = cell_cost(res.train_s, t_heads if uses_p2d_heads else 0.0, select_s.get(cell.data, 0.0))
        results[name] = {"label": LABELS[name], "kind": cell.trainable, "data": cell.data, "rows": len(samples),
                         "lr": tc.lr, "steps": res.steps, "train_s": res.train_s, "cost_s": cost,
                         "aer": cell_aer(cost, t_full), "trainable_params": res.trainable_params,
                         "accuracy": ev.accuracy, "contains": ev.contains, "loss": ev.loss,
                         "other_tasks": ev.other_tasks}
    report(progress, len(results), len(controls), "controls")
    after, tr = run.eval_after, run.train_result
    p2d_cost = cell_cost(tr.time_s, t_heads, run.selection.time_s)
    settings = {"controls": list(controls), "lora_lr": float(lora_lr), "lora_rank": lora_rank}
    out = {"entry": make_entry(settings, _inputs(run), fresh_digest()),  # a stopped set is shown as incomplete
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": len(results) == len(controls),
           "lora_rank": lora_rank,
           "p2d": {"label": LABELS["p2d"], "rows": n, "lr": c.lr, "steps": tr.steps_done,
                   "train_s": tr.time_s, "cost_s": p2d_cost, "aer": cell_aer(p2d_cost, t_full),
                   "trainable_params": tr.trainable_params,
                   "accuracy": after.accuracy if after is not None else None,
                   "loss": after.loss if after is not None else None,
                   "other_tasks": after.other_tasks if after is not None else {}},
           "controls": results}
    write_json(Path(run.out) / CONTROLS_FILE, out)
    return out

