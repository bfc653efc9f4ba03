"""The whole P2D run: load -> heads -> select -> train -> evaluate before/after -> metrics.

`Run` executes one `RunConfig` in its output folder, one step at a time (the app calls the steps
from its tabs) or all at once (`run_all`, used by `python -m p2d run`). Every step writes its files
as soon as it finishes, so a crash or a stop keeps what was done:

    config.yaml         the settings used
    data/               pool/probe/eval as JSONL (the built-in pool only)
    heads.json          stage 1
    selected.jsonl, scores.jsonl, selection.json   stage 2
    train_log.jsonl, adapter/                      stage 3
    eval_before.json, eval_after.json, full_ft.json
    metrics.json        AER, times, accuracy before/after, parameter counts
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .cost import FullFinetuneCost, aer, full_finetune_cost
from .data.formats import Sample
from .data.loading import LoadedData, load_data, load_records
from .errors import UserError
from .evaluation import EvalResult, evaluate
from .heads import HeadScores, score_heads
from .models import LoadedModel, count_params, load_model
from .progress import ProgressFn, StopFn
from .selection import Selection, select_data
from .training import TrainConfig, TrainResult, train_heads


@dataclass
class RunData:
    pool: LoadedData
    probe: LoadedData
    eval: LoadedData | None

    def summary(self) -> dict:
        return {name: d.summary() for name, d in (("pool", self.pool), ("probe", self.probe), ("eval", self.eval))
                if d is not None}


def load_run_data(config: RunConfig, out_dir: Path | None = None) -> RunData:
    """The pool, probe and eval sets of a config: files, or the built-in task pool."""
    if not config.pool:
        from .data.builtin import build_task_pool

        tp = build_task_pool(target=config.target, seed=config.seed, pool_size=config.pool_size,
                             probe_size=config.probe_size, eval_size=config.eval_size)
        if out_dir is not None:
            tp.write(out_dir / "data")
        return RunData(load_records(tp.pool, source=f"built-in pool ({config.target})"),
                       load_records(tp.probe, source="built-in probe"),
                       load_records(tp.eval, source="built-in eval"))
    mapping = config.columns
    pool = load_data(config.pool, mapping=mapping)
    probe = load_data(config.probe, mapping=mapping)
    ev = load_data(config.eval, mapping=mapping) if config.eval else None
    return RunData(pool, probe, ev)


def _save_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)


class Run:
    """One P2D run of `config` in folder `config.out`. Steps must be called in pipeline order."""

    def __init__(self, config: RunConfig, progress: ProgressFn = None, should_stop: StopFn = None,
                 lm: LoadedModel | None = None):
        self.config = config.validate()
        self.out = Path(config.out)
        self.progress = progress
        self.should_stop = should_stop
        self.lm = lm
        self.data: RunData | None = None
        self.heads: HeadScores | None = None
        self.selection: Selection | None = None
        self.train_result: TrainResult | None = None
        self.eval_before: EvalResult | None = None
        self.eval_after: EvalResult | None = None
        self.full: FullFinetuneCost | None = None
        self.times: dict[str, float] = {}

    # -- steps ------------------------------------------------------------------------------------
    def load(self) -> RunData:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        c.save(self.out / "config.yaml")
        if self.lm is None:
            self.lm = load_model(c.model, device=c.device, dtype=c.dtype, trust_remote_code=c.trust_remote_code,
                                 quantize=c.quantize)
        self.data = load_run_data(c, self.out)
        _save_json(self.out / "data_summary.json", self.data.summary())
        return self.data

    def find_heads(self) -> HeadScores:
        c = self.config
        self.heads = score_heads(self.lm, self.data.probe.samples, method=c.head_method, ratio=c.head_ratio,
                                 pool=self.data.pool.samples, seed=c.seed, batch_size=c.batch_size,
                                 max_length=c.max_length, progress=self.progress, should_stop=self.should_stop)
        self.times["heads"] = self.heads.time_s
        self.heads.save(self.out)
        return self.heads

    def select(self) -> Selection:
        c = self.config
        pool = self.data.pool.samples
        self.selection = select_data(self.lm, self.heads, pool, method=c.select_method, ratio=c.data_ratio,
                                     probe=self.data.probe.samples, batch_size=c.batch_size,
                                     max_length=c.max_length, seed=c.seed, progress=self.progress,
                                     should_stop=self.should_stop)
        self.times["select"] = self.selection.time_s
        self.selection.save(self.out, pool)
        return self.selection

    def selected_samples(self) -> list[Sample]:
        return self.selection.selected_samples(self.data.pool.samples)

    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(steps=c.steps, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size, max_length=c.max_length,
                           projections=tuple(c.projections), seed=c.seed)

    def train(self, on_log=None) -> TrainResult:
        self.train_result = train_heads(self.lm, self.heads, self.selected_samples(), self.train_config(), self.out,
                                        progress=self.progress, should_stop=self.should_stop, on_log=on_log,
                                        overwrite=True)
        self.times["train"] = self.train_result.time_s
        return self.train_result

    def evaluate(self, when: str) -> EvalResult | None:
        """Evaluate the base model (`when="before"`) or base + trained adapter (`"after"`)."""
        if self.data.eval is None:
            return None
        c = self.config
        adapter = None
        if when == "after":
            from .adapter import load_adapter

            adapter = load_adapter(self.lm, self.train_result.adapter_dir)
        try:
            res = evaluate(self.lm, self.data.eval.samples, batch_size=max(c.batch_size, 16), limit=c.eval_limit,
                           max_new_tokens=c.max_new_tokens, max_length=c.max_length, progress=self.progress)
        finally:
            if adapter is not None:
                adapter.detach()
        setattr(self, f"eval_{when}", res)
        _save_json(self.out / f"eval_{when}.json", res.to_dict(with_examples=True))
        return res

    def trained_epochs(self) -> float:
        """Epochs over the selected data that training did (or, before it ran, will do)."""
        n_sel = max(1, len(self.selection.selected))
        tr = self.train_result
        steps = tr.steps_done if tr and tr.steps_done else self.train_config().planned_steps(n_sel)
        return steps * self.config.batch_size / n_sel

    def full_finetune_reference(self, epochs: float | None = None) -> FullFinetuneCost:
        """Full fine-tuning on the whole pool for `epochs` (default: the epochs trained).

        An earlier estimate (e.g. timed before training for a live AER) is rescaled to the new epochs
        instead of being timed again; `full_ft: measure` always runs every reference step.
        """
        c = self.config
        epochs = self.trained_epochs() if epochs is None else epochs
        if self.full is not None and self.full.mode == "estimated" and c.full_ft == "estimate":
            self.full = self.full.for_epochs(epochs)
        else:
            self.full = full_finetune_cost(self.lm, self.data.pool.samples, epochs=epochs, batch_size=c.batch_size,
                                           max_length=c.max_length, mode=c.full_ft, seed=c.seed,
                                           progress=self.progress, should_stop=self.should_stop)
        _save_json(self.out / "full_ft.json", self.full.to_dict())
        return self.full

    # -- summary ----------------------------------------------------------------------------------
    @property
    def stages_done(self) -> list[str]:
        """Steps whose results this run holds, in pipeline order."""
        results = [("load", self.data), ("heads", self.heads), ("select", self.selection),
                   ("eval before", self.eval_before), ("train", self.train_result), ("eval after", self.eval_after),
                   ("full reference", self.full)]
        return [name for name, result in results if result is not None]

    def metrics(self) -> dict:
        t_heads = self.times.get("heads", 0.0)
        t_select = self.times.get("select", 0.0)
        t_train = self.times.get("train", 0.0)
        m: dict = {"model": self.config.model, "time_heads_s": t_heads, "time_select_s": t_select,
                   "time_train_s": t_train, "stages_done": list(self.stages_done)}
        if self.full is not None:
            m.update(aer(t_heads, t_select, t_train, self.full.time_s))
            m["aer_mode"] = self.full.mode
            m["time_full_s"] = self.full.time_s
            m["full_ft"] = self.full.to_dict()
        for when in ("before", "after"):
            res = getattr(self, f"eval_{when}")
            m[f"eval_{when}"] = res.to_dict() if res is not None else None
        tr = self.train_result
        m["total_params"] = count_params(self.lm.model) if self.lm is not None else None
        if tr is not None:
            m.update({"trainable_params": tr.trainable_params, "optimizer_state_bytes": tr.optimizer_state_bytes,
                      "steps_done": tr.steps_done, "stopped": tr.stopped, "final_loss": tr.final_loss})
            if self.full is not None:
                m["full_optimizer_state_bytes"] = self.full.optimizer_state_bytes
        if self.heads is not None:
            m["selected_heads"] = self.heads.selected
            m["head_method"] = self.heads.method
        if self.selection is not None:
            m["n_selected"] = self.selection.n_selected
            m["n_pool"] = self.selection.n_pool
            m["select_method"] = self.selection.method
            counts = self.selection.task_counts(self.data.pool.samples)
            if counts is not None:
                m["selected_task_counts"] = counts
        return m

    def write_metrics(self) -> dict:
        m = self.metrics()
        _save_json(self.out / "metrics.json", m)
        return m

    def run_all(self) -> dict:
        """All steps in order; returns (and writes) metrics.json. A stop request ends after the
        current step (training: after the current optimizer step) and still writes metrics.json."""
        start = time.perf_counter()
        steps = [self.load, self.find_heads, self.select, lambda: self.evaluate("before"), self.train,
                 lambda: self.evaluate("after"), self.full_finetune_reference]
        for step in steps:
            if self.should_stop is not None and self.should_stop():
                break  # a stop request keeps what is done; metrics.json lists the stages that ran
            step()
        m = self.metrics()
        m["time_total_s"] = time.perf_counter() - start
        _save_json(self.out / "metrics.json", m)
        return m
