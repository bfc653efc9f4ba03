"""The whole P2D run: one step sequence that the command line and the app both drive.

`Run` executes a `RunConfig` in its run folder, stage by stage, in the order of `STAGES`:

    load         model and data                   data/, data_summary.json
    heads        stage 1: head scores             heads.json
    select       stage 2: pool scores, selection  selected.jsonl, scores.jsonl, selection.json
    eval_before  the base model on the eval set   eval_before.json
    reference    full fine-tuning reference       full_ft.json
    train        stage 3: head training           train_log.jsonl, adapter/ (checkpoint/ while running)
    eval_after   base + trained heads             eval_after.json

plus ``head_record.f16`` / ``head_record_lengths.npy`` (the select stage's per-row statistic of every
head, `p2d.method.features`: an activation-family selection with other heads, another method of that
family or a control reselects from it without the model; its manifest entry ``head_record`` says what it
was made with), ``config.yaml``, ``metrics.json`` (AER, times, accuracy; rewritten after every stage) and
``stages.json``, the manifest that makes the folder trustworthy. A stage clears its own outputs when
it starts and is entered in the manifest last, with the settings it used and whether it finished or
was stopped (``partial``). A result counts as done only when its entry is complete and matches the
current settings and the results it was built on; anything else is rerun, never silently reused.

- `run(stages)` executes the given stages (and any upstream stage not done yet) in sequence order;
  it stops after a stage that was stopped or a stop request.
- `reconfigure(config)` switches to new settings and drops exactly the results they invalidate
  (a new head or data share re-cuts the existing scores instead of rescoring).
- `reset_from(stage)` drops a stage and everything built on it.
- `use_heads(heads, source)` and `train_on(samples, source)` take a head map or training data from
  outside; the manifest records them as external (their source) and later stages keep them.
- `Run.open(folder)` reads a run folder back (results, settings) without loading the model;
  ``resume=True`` continues a killed or stopped run from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .adapter import CONFIG_NAME as ADAPTER_CONFIG
from .adapter import load_adapter
from .cells import CELLS, evaluate_cell, train_cell
from .config import STAGES, RunConfig
from .cost import REFERENCE_FILE, FullFinetuneCost, aer, full_finetune_cost
from .data.builtin import build_task_pool
from .data.builtin_align import ALIGN_POOL, build_align_pool
from .data.builtin_hard import HARD_POOL, build_hard_pool
from .data.formats import Sample
from .data.loading import LoadedData, load_data, load_records
from .distributed import Processes
from .errors import UserError
from .evaluation import EVAL_FILES, EvalResult
from .files import read_json, remove, write_json
from .manifest import Manifest, content_digest, fresh_digest, is_valid, make_entry
from .method.features import (RECORD_FILE, RECORD_LENGTHS_FILE, RECORD_METHODS, HeadFeatures, head_norms,
                              load_record, record_settings, save_record, select_from_features)
from .method.heads import HEADS_FILE, HeadScores, score_heads
from .method.selection import SCORES_FILE, SELECTED_FILE, SELECTION_FILE, Selection, head_list, select_data
from .models import LoadedModel, count_params, inference_copy, load_model
from .progress import ProgressFn, StopFn
from .tracking import open_tracker, stage_values
from .training import ADAPTER_SUBDIR, CHECKPOINT_SUBDIR, LOG_NAME, TrainResult

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "stages.json"
RECORD_ENTRY = "head_record"  # the manifest entry of the head record (`Run.head_record`)
DATA_DIR = "data"
DATA_SUMMARY_FILE = "data_summary.json"

#: the results each stage is built on
UPSTREAM: dict[str, tuple[str, ...]] = {
    "load": (), "heads": ("load",), "select": ("heads",), "eval_before": ("load",), "reference": ("load",),
    "train": ("select",), "eval_after": ("train",),
}
#: the files (or folders) each stage writes in the run folder
OUTPUTS: dict[str, tuple[str, ...]] = {
    "load": (DATA_DIR, DATA_SUMMARY_FILE),
    "heads": (HEADS_FILE,),
    "select": (SELECTION_FILE, SELECTED_FILE, SCORES_FILE),
    "eval_before": (EVAL_FILES["before"],),
    "reference": (REFERENCE_FILE,),
    "train": (LOG_NAME, ADAPTER_SUBDIR, CHECKPOINT_SUBDIR),  # tensorboard/ accumulates across stages
    "eval_after": (EVAL_FILES["after"],),
}
LABELS = {"load": "loading model and data", "heads": "scoring heads", "select": "selecting data",
          "eval_before": "evaluating the base model", "reference": "timing full fine-tuning (AER reference)",
          "train": "training the heads", "eval_after": "evaluating the trained heads"}

#: what a result given from outside is built on: heads checked against the loaded model (`Run.use_heads`),
#: a training on given data built on the heads, not on a selection (`Run.train_on`)
EXTERNAL_UPSTREAM: dict[str, tuple[str, ...]] = {"heads": ("load",), "train": ("heads",)}

assert tuple(UPSTREAM) == STAGES and tuple(OUTPUTS) == STAGES


def downstream(stage: str) -> list[str]:
    """``stage`` and every stage built on it, in sequence order."""
    out = {stage}
    for s in STAGES:
        if any(u in out for u in UPSTREAM[s]):
            out.add(s)
    return [s for s in STAGES if s in out]


def upstream_closure(stages) -> list[str]:
    """The given stages plus everything they are built on, in sequence order."""
    need = set(stages)
    for s in reversed(STAGES):
        if s in need:
            need.update(UPSTREAM[s])
    return [s for s in STAGES if s in need]


class RunData:
    """The pool, probe and eval sets; ``other``: held-out rows of the pool's other tasks (built-in pool).
    Without a probe file (heads given from elsewhere) the probe set is empty."""

    def __init__(self, pool: LoadedData, probe: LoadedData, eval: LoadedData | None, other: LoadedData | None = None):
        self.pool, self.probe, self.eval, self.other = pool, probe, eval, other

    def summary(self) -> dict:
        return {name: d.summary() for name, d in (("pool", self.pool), ("probe", self.probe), ("eval", self.eval),
                                                  ("other_eval", self.other)) if d is not None}


def load_run_data(config: RunConfig, out_dir: Path | None = None, max_rows: dict | None = None,
                  max_bytes: int | None = None, max_field_chars: int | None = None) -> RunData:
    """The pool, probe and eval sets of a config: files, or the built-in task pool. For files,
    ``max_rows`` ({"pool": n, "probe": n, "eval": n}), ``max_bytes`` and ``max_field_chars`` are
    `load_data`'s caps (a server taking files from strangers sets them; the built-in pool has its own
    sizes)."""
    if config.builtin_pool:
        tp = build_builtin_pool(config)
        if out_dir is not None:
            tp.write(out_dir / DATA_DIR)
        kind = "built-in" if config.builtin_pool == "builtin" else config.builtin_pool
        return RunData(load_records(tp.pool, source=f"{kind} pool ({config.target})"),
                       load_records(tp.probe, source=f"{kind} probe"),
                       load_records(tp.eval, source=f"{kind} eval") if tp.eval else None,
                       load_records(tp.other_eval, source=f"{kind} other tasks") if tp.other_eval else None)
    mapping, rows = config.columns, max_rows or {}
    caps = dict(max_bytes=max_bytes, max_field_chars=max_field_chars)
    pool = load_data(config.pool, mapping=mapping, max_rows=rows.get("pool"), **caps)
    probe = load_data(config.probe, mapping=mapping, max_rows=rows.get("probe"), **caps) \
        if config.probe else LoadedData(samples=[], format="none", columns=[], source="no probe file")
    ev = load_data(config.eval, mapping=mapping, max_rows=rows.get("eval"), **caps) if config.eval else None
    return RunData(pool, probe, ev)


def build_builtin_pool(config: RunConfig):
    """The `TaskPool` of a config whose pool is built in (``config.builtin_pool``), at its sizes and seed."""
    build = {HARD_POOL: build_hard_pool, ALIGN_POOL: build_align_pool}.get(config.builtin_pool, build_task_pool)
    return build(target=config.target, seed=config.seed, pool_size=config.pool_size, probe_size=config.probe_size,
                 eval_size=config.eval_size, other_eval_size=config.other_eval_size)


def _file_stamp(path: str | None):
    """Size and modification time of a data file, so an edited file invalidates what was built on it."""
    if not path:
        return None
    try:
        st = Path(path).expanduser().stat()
        return [st.st_size, int(st.st_mtime)]
    except OSError:
        return None


class Run:
    """One P2D run of ``config`` in the folder ``config.out``.

    ``model_loader(config) -> LoadedModel`` is how the model is loaded (default: `load_model`; the app
    passes its shared cache). ``progress`` and ``should_stop`` are the library callbacks; `bind`
    changes them between jobs. ``data_limits`` (``max_rows``, ``max_bytes``, ``max_field_chars``) cap what
    data files are read (see `load_run_data`).
    """

    def __init__(self, config: RunConfig, progress: ProgressFn = None, should_stop: StopFn = None,
                 model_loader: Callable[[RunConfig], LoadedModel] | None = None, lm: LoadedModel | None = None,
                 data_limits: dict | None = None):
        self.config = config.validate()
        self.out = Path(self.config.out)
        self.progress = progress
        self.should_stop = should_stop
        self.model_loader = model_loader or default_loader
        self.lm = lm
        self.data_limits = dict(data_limits or {})
        self.data: RunData | None = None
        self.results: dict[str, object] = {}
        self.manifest = Manifest(self.out / MANIFEST_FILE)  # stages.json: the entry of every finished stage
        self.resume = False
        self._given_samples: list[Sample] | None = None  # training data given from outside (train_on)
        self.tracker = None  # opened on the first stage that reports (p2d.tracking)
        self.launch_processes = 1  # the training runs in this many processes elsewhere (the app's launcher)
        self._record_cache: tuple[str, HeadFeatures] | None = None  # the head record of this process's pass
        self._inference: tuple | None = None  # (model, precision, its copy): `inference_lm`

    # -- results by name ---------------------------------------------------------------------------
    heads: HeadScores | None = property(lambda self: self.results.get("heads"))
    selection: Selection | None = property(lambda self: self.results.get("select"))
    eval_before: EvalResult | None = property(lambda self: self.results.get("eval_before"))
    eval_after: EvalResult | None = property(lambda self: self.results.get("eval_after"))
    full: FullFinetuneCost | None = property(lambda self: self.results.get("reference"))
    train_result: TrainResult | None = property(lambda self: self.results.get("train"))

    def bind(self, progress: ProgressFn = None, should_stop: StopFn = None) -> None:
        self.progress, self.should_stop = progress, should_stop

    # -- state ---------------------------------------------------------------------------------------
    def is_done(self, stage: str) -> bool:
        """A complete result for the current settings, built on the current upstream results
        (`p2d.manifest.is_valid`)."""
        entry = self.manifest.get(stage)
        built_on = EXTERNAL_UPSTREAM[stage] if entry and entry.get("external") else UPSTREAM[stage]
        return bool(entry) and is_valid(entry, self._settings(stage), {u: self.result_digest(u) for u in built_on})

    @property
    def stages_done(self) -> list[str]:
        return [s for s in STAGES if self.is_done(s)]

    @property
    def stages_partial(self) -> list[str]:
        return [s for s in STAGES if self.manifest.get(s, {}).get("partial")]

    def result_digest(self, stage: str) -> str | None:
        """The digest of ``stage``'s finished result (None when it is not done): it changes whenever the
        stage is redone, so anything derived from the result can tell it is out of date."""
        return self.manifest[stage]["digest"] if self.is_done(stage) else None

    def _settings(self, stage: str, external: dict | None = None) -> dict:
        """The settings a result of ``stage`` depends on. A result given from outside (``external``, or the
        one recorded) depends on its source instead, a training on given data on its training settings too."""
        external = external or (self.manifest.get(stage) or {}).get("external")
        if external:
            return {"external": external, **(self.config.stage_settings(stage) if stage == "train" else {})}
        s = self.config.stage_settings(stage)
        if stage == "load":
            s["files"] = [_file_stamp(self.config.pool), _file_stamp(self.config.probe), _file_stamp(self.config.eval)]
        return s

    # -- the sequence --------------------------------------------------------------------------------
    def run(self, stages=STAGES) -> dict:
        """Execute ``stages`` and whatever they need that is not done, in sequence order; return the
        metrics. Stops after a stage that ended partial (stopped) or when a stop is requested."""
        if "heads" in upstream_closure(stages) and not self.is_done("heads"):
            self.config.require_probe()  # before any loading
        try:
            for stage in upstream_closure(stages):
                if self.is_done(stage):
                    continue
                if self.should_stop is not None and self.should_stop():
                    break
                self.execute(stage)
                if not self.is_done(stage):  # stopped part-way
                    break
            m = self.write_metrics()
            if self.tracker is not None:
                self._track({"cost/aer": m.get("aer"), "cost/speedup": m.get("speedup"),
                             "cost/time_p2d_s": m.get("time_p2d_s")})
            return m
        finally:
            self.close_tracker()

    def _track(self, values: dict, step: int | None = None) -> None:
        if self.tracker is None:
            self.tracker = open_tracker(self.config.report_to, self.out, self.config.to_dict())
        self.tracker.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close_tracker(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def run_all(self) -> dict:
        start = time.perf_counter()
        m = self.run(STAGES)
        m["time_total_s"] = time.perf_counter() - start
        write_json(self.out / METRICS_FILE, m)
        return m

    def execute(self, stage: str, on_partial: bool = False, external: dict | None = None):
        """Run one stage now: clear its outputs, compute, record. Its upstream stages must be done;
        with ``on_partial`` a stopped (partial) upstream result is accepted too (e.g. to evaluate the
        adapter of a stopped training), and the new result is recorded as partial. ``external``: the
        stage computes on inputs given from outside (recorded as its source; see `train_on`)."""
        built_on = EXTERNAL_UPSTREAM[stage] if external else UPSTREAM[stage]
        missing = [u for u in built_on if not self.is_done(u)
                   and not (on_partial and u in self.results and self.manifest.get(u, {}).get("partial"))]
        if missing:
            raise UserError(f"{LABELS[stage]} needs {', '.join(LABELS[m] for m in missing)} first")
        built_on_partial = any(not self.is_done(u) for u in built_on)
        if stage != "load":
            self.require_loaded()
        self._clear(stage, keep=(CHECKPOINT_SUBDIR, LOG_NAME) if stage == "train" and self.resume else ())
        cpu0 = time.process_time()
        with _fault_injection(self, stage):
            result, partial = getattr(self, f"_stage_{stage}")()
        self.results[stage] = result
        self._record(stage, partial=partial or built_on_partial, result=result, external=external,
                     cpu_s=round(time.process_time() - cpu0, 3))
        self.write_metrics()
        Processes.current().barrier()  # several processes: what the main one wrote is there for all
        if stage != "load":
            self._track(stage_values(stage, result))
        return result

    # -- invalidation ----------------------------------------------------------------------------
    def reset_from(self, stage: str) -> list[str]:
        """Drop ``stage`` and every stage built on it (results, files, manifest entries)."""
        dropped = []
        for s in downstream(stage):
            if s in self.manifest or s in self.results:
                dropped.append(s)
            self._clear(s)
        self.write_metrics()
        return dropped

    def reconfigure(self, config: RunConfig) -> list[str]:
        """Switch to ``config``; drop the results it invalidates and return their stages.

        A changed head share or data share re-cuts the existing scores (no rescoring); the later
        stages are kept when the selected heads or rows come out the same. The run folder stays.
        """
        config = config.replace(out=str(self.out)).validate()
        old = self.config
        self.config = config
        if any(old.stage_settings("load").get(k) != v for k, v in config.stage_settings("load").items()):
            self.lm = None if (old.model, old.device, old.dtype, old.quantize, old.trust_remote_code) != \
                (config.model, config.device, config.dtype, config.quantize, config.trust_remote_code) else self.lm
            self._inference = None if self.lm is None else self._inference  # a reduced copy of a dropped model goes too
            self.data = None
        self._recut("heads", "head_ratio")
        self._recut("select", "data_ratio")
        dropped = []
        for s in STAGES:
            if s in self.manifest and not self.is_done(s) and not self.manifest[s].get("partial"):
                dropped += [d for d in self.reset_from(s) if d not in dropped]
        self.config.save(self.out / CONFIG_FILE)
        return dropped

    def _recut(self, stage: str, ratio_field: str) -> None:
        entry = self.manifest.get(stage)
        result = self.results.get(stage)
        if entry is None or result is None or entry.get("partial") or entry.get("external"):
            return
        wanted = self._settings(stage)
        if {k: v for k, v in entry["settings"].items() if k != ratio_field} != \
                {k: v for k, v in wanted.items() if k != ratio_field}:
            return
        if not all(entry.get("inputs", {}).get(u) == self.result_digest(u) for u in UPSTREAM[stage]):
            return
        new = result.with_ratio(getattr(self.config, ratio_field))
        if stage == "heads":
            new.save(self.out)
        else:
            self.require_loaded()
            new.save(self.out, self.data.pool.samples)
        self.results[stage] = new
        self._record(stage, partial=False, result=new)

    # -- giving results from outside ------------------------------------------------------------------
    def use_heads(self, heads: HeadScores, source: str) -> None:
        """Use head scores made elsewhere (e.g. another run's heads.json) instead of scoring heads.

        They are recorded as built on this run's load stage (done first if it is not), so later stages keep
        them until the model or the data change; no probe set is needed."""
        if not self.is_done("load"):
            self.execute("load")
        self.require_loaded()
        g = self.lm.geometry
        if (heads.n_layers, heads.n_q_heads) != (g.n_layers, g.n_q_heads):
            raise UserError(f"the head map {source} is {heads.n_layers} layers x {heads.n_q_heads} heads, but "
                            f"{self.config.model} has {g.n_layers} x {g.n_q_heads}: use a map of the same model")
        self._clear("heads")
        heads.save(self.out)
        self.results["heads"] = heads
        self._record("heads", partial=False, result=heads, external={"source": str(source)})
        self.write_metrics()

    def train_on(self, samples: list[Sample], source: str) -> TrainResult:
        """Train the heads on ``samples`` given from outside (e.g. a training file) instead of the run's
        selection. The heads are scored first if they are not done (or give them with `use_heads`). The
        training is the run's train stage, recorded as built on the heads with ``source`` as its data, and
        reports to the trackers like any run's; the evaluation after training is then redone for it."""
        self.run(["heads"])
        if not self.is_done("heads"):
            raise UserError("head scoring was stopped: score the heads before training on a file")
        self._given_samples = list(samples)
        try:
            self.execute("train", external={"source": str(source)})
        finally:
            self._given_samples = None
            self.close_tracker()
        return self.train_result

    # -- stages -------------------------------------------------------------------------------------
    def require_loaded(self) -> None:
        """Load the model and the data if they are not in memory (a reopened or reconfigured run)."""
        if self.lm is None:
            self.lm = self.model_loader(self.config)
        self.require_data()

    def require_data(self) -> None:
        """Load the data (not the model) if it is not in memory: enough to show a reopened run."""
        if self.data is None:
            self.data = load_run_data(self.config, self.out, **self.data_limits)

    def _stage_load(self):
        self.out.mkdir(parents=True, exist_ok=True)
        self.config.save(self.out / CONFIG_FILE)
        if self.lm is None:
            self.lm = self.model_loader(self.config)
        self.data = load_run_data(self.config, self.out, **self.data_limits)
        summary = self.data.summary()
        write_json(self.out / DATA_SUMMARY_FILE, summary)
        return summary, False

    def heads_of(self, method: str) -> HeadScores:
        """The heads ``method`` scores with this run's data and settings (the heads stage's own call, for any
        method; nothing is recorded: the benchmark's head candidates)."""
        c = self.config
        self.require_loaded()
        return score_heads(self.lm, self.data.probe.samples, method=method, ratio=c.head_ratio,
                           pool=self.data.pool.samples, seed=c.seed, batch_size=c.batch_size, max_length=c.max_length,
                           progress=self.progress, should_stop=self.should_stop, positions=c.positions,
                           min_layer=c.min_head_layer, max_layer=c.max_head_layer, precision=c.heads_precision)

    def selection_of(self, heads, method: str, hidden_layer: int | None = None) -> Selection:
        """The pool rows ``method`` selects with ``heads`` and this run's data and settings (the select
        stage's own call, for any method and head set; ``hidden_layer`` None: the run's; nothing is
        recorded: the benchmark's other selectors). An activation-family method (`RECORD_METHODS`) is
        computed from the run's head record (`head_record`: made by the first such call, reused after);
        the others run the model."""
        c = self.config
        self.require_loaded()
        if method in RECORD_METHODS and Processes.current().world == 1 and heads is not None and \
                max(layer for layer, _ in head_list(heads, self.lm.geometry)) < self._record_layers():
            return select_from_features(self.head_record(), heads, method, c.data_ratio, self.lm.geometry)
        lm = self.inference_lm() if method in RECORD_METHODS else self.lm
        return select_data(lm, heads, self.data.pool.samples, method=method, ratio=c.data_ratio,
                           probe=self.data.probe.samples, batch_size=c.batch_size, max_length=c.max_length,
                           seed=c.seed, progress=self.progress, should_stop=self.should_stop, positions=c.positions,
                           hidden_layer=c.hidden_layer if hidden_layer is None else hidden_layer)

    def head_record(self) -> HeadFeatures:
        """Every head's activation statistic for every pool row (`p2d.method.features.head_norms`): this
        process's own pass (float32), else the run folder's record when its manifest entry matches the
        current model, pool, positions and max length (float16, memory-mapped), else one pass over the pool
        now, saved to the folder (not when stopped part-way: that pass's rows still serve its selection). One
        process only (`selection_of` runs the model under several)."""
        c = self.config
        self.require_loaded()
        pool = self.data.pool.samples
        n_layers = self._record_layers()
        settings = record_settings(c.model, c.dtype, c.quantize, pool, c.positions, c.max_length, n_layers,
                                   c.inference_precision)
        key = content_digest(settings)
        if self._record_cache is not None and self._record_cache[0] == key:
            return self._record_cache[1]
        entry = self.manifest.get(RECORD_ENTRY)
        feats = load_record(self.out, entry) if is_valid(entry, settings, {}) else None
        if feats is None:
            feats = head_norms(self.inference_lm(), pool, c.batch_size, c.max_length, (c.positions,), self.progress,
                               self.should_stop, n_layers=n_layers)[c.positions]
            if feats.extra["stopped"]:
                return feats
            self.manifest.drop(RECORD_ENTRY)
            self.manifest.put(RECORD_ENTRY, make_entry(settings, {}, key, **save_record(feats, self.out)))
        self._record_cache = (key, feats)
        return feats

    def inference_lm(self) -> LoadedModel:
        """The model the no-gradient passes run (the activation-family selection pass, evaluation): the loaded
        model, or its reduced copy for `RunConfig.inference_precision` (`p2d.models.inference_copy`, made once
        per loaded model and precision)."""
        self.require_loaded()
        precision = self.config.inference_precision
        if self._inference is None or self._inference[0] is not self.lm or self._inference[1] != precision:
            self._inference = None  # the old copy goes before the new one is made
            self._inference = (self.lm, precision, inference_copy(self.lm, precision))
        return self._inference[2]

    def _record_layers(self) -> int:
        """How many layers the head record covers: up to the highest head layer (`RunConfig.max_head_layer`),
        so its pass stops there; every layer without one."""
        n, top = self.lm.geometry.n_layers, self.config.max_head_layer
        return n if top is None else min(n, top + 1)

    def _stage_heads(self):
        c = self.config.require_probe()
        hs = self.heads_of(c.head_method)
        g = self.lm.geometry  # grouped-query attention: training k/v rows changes every query head of the group
        hs.extra["query_heads_changed"] = {"with k/v (q,k,v,o)": len(g.query_heads_changed(hs.selected)),
                                           "without k/v (q,o or offset)": len(hs.selected)}
        hs.save(self.out)
        return hs, bool(hs.extra.get("stopped"))

    def _stage_select(self):
        sel = self.selection_of(self.heads, self.config.select_method)
        sel.save(self.out, self.data.pool.samples)
        return sel, bool(sel.extra.get("stopped"))

    def _evaluate(self, when: str):
        if self.data.eval is None:
            return None, False
        c = self.config
        lm = self.inference_lm()
        adapter = None
        if when == "after":
            adapter = load_adapter(lm, self.train_result.adapter_dir)
        try:
            res = evaluate_cell(lm, self.data.eval.samples, self.data.other.samples if self.data.other else None,
                                batch_size=max(c.batch_size, 16), max_length=c.max_length, limit=c.eval_limit,
                                max_new_tokens=c.max_new_tokens, progress=self.progress, should_stop=self.should_stop)
        finally:
            if adapter is not None:
                adapter.detach()
        write_json(self.out / EVAL_FILES[when], res.to_dict(with_examples=True))
        return res, res.partial

    def _stage_eval_before(self):
        return self._evaluate("before")

    def _stage_eval_after(self):
        return self._evaluate("after")

    def _stage_reference(self):
        c = self.config
        full = full_finetune_cost(self.lm, self.data.pool.samples, epochs=c.reference_epochs, batch_size=c.batch_size,
                                  max_length=c.max_length, mode=c.full_ft, seed=c.seed,
                                  max_grad_norm=c.max_grad_norm, progress=self.progress, should_stop=self.should_stop)
        write_json(self.out / REFERENCE_FILE, full.to_dict())
        return full, False

    def training_samples(self) -> list[Sample]:
        """What the heads train on: the selected rows of the pool, or the samples given to `train_on`."""
        if self._given_samples is not None:
            return self._given_samples
        return self.selection.selected_samples(self.data.pool.samples)

    def planned_steps(self) -> int | None:
        """Optimizer steps training will do (known once the data is selected); with several processes
        (this one's, or ``launch_processes`` of a launched training) the global batch counts."""
        if self.selection is None:
            return None
        procs = max(Processes.current().world, self.launch_processes)
        tc = self.config.train_config()
        config = dataclasses.replace(tc, batch_size=tc.batch_size * procs)
        return config.planned_steps(max(1, len(self.selection.selected)))

    def _stage_train(self):
        def on_log(record: dict) -> None:
            self._track({f"train/{k}": record.get(k) for k in ("loss", "lr", "tokens_per_s", "grad_norm", "val_loss")},
                        step=record["step"])

        with train_cell(CELLS["p2d"], self.lm, self.training_samples(), self.config.train_config(), self.out,
                        heads=self.heads, progress=self.progress, should_stop=self.should_stop, on_log=on_log,
                        resume=self.resume, checkpoint_every=self.config.checkpoint_every, attach=False) as (_, res):
            tr = res.train
        return tr, tr.stopped

    # -- files and the manifest ---------------------------------------------------------------------
    def _clear(self, stage: str, keep: tuple = ()) -> None:
        self.results.pop(stage, None)
        self.manifest.drop(stage)
        for name in OUTPUTS[stage]:
            if name not in keep:
                remove(self.out / name)

    def _record(self, stage: str, partial: bool, result, external: dict | None = None,
                cpu_s: float | None = None) -> None:
        built_on = EXTERNAL_UPSTREAM[stage] if external else UPSTREAM[stage]
        extra = {"external": external} if external else {}
        if cpu_s is not None:
            extra["cpu_s"] = cpu_s  # this process's CPU seconds of the stage (robust to other load with one thread)
        if stage == "train" and result is not None:
            extra["result"] = asdict(result)
        self.manifest.put(stage, make_entry(self._settings(stage, external), {u: self.result_digest(u) for u in built_on},
                                            self._digest_of(stage, result), partial=partial, **extra))

    def _digest_of(self, stage: str, result) -> str:
        if stage == "heads":
            return content_digest(result.selected)
        if stage == "select":
            return content_digest([result.method, result.selected, result.n_pool])
        if stage == "load":
            return content_digest(self._settings("load"))
        return fresh_digest()

    # -- reopening a folder -----------------------------------------------------------------------------
    @classmethod
    def open(cls, folder, config: RunConfig | None = None, **kwargs) -> "Run":
        """The run in ``folder`` with its finished results (from its files; the model is loaded later,
        when a stage needs it). ``config`` (default: the folder's config.yaml) decides which results
        still count as done."""
        folder = Path(folder)
        if config is None:
            if not (folder / CONFIG_FILE).is_file():
                raise UserError(f"{folder} is not a P2D run folder (no {CONFIG_FILE})")
            config = RunConfig.load(folder / CONFIG_FILE)
        run = cls(config.replace(out=str(folder)), **kwargs)
        run.manifest = Manifest.read(folder / MANIFEST_FILE)
        for stage in STAGES:
            if stage in run.manifest:
                try:
                    result = run._read_result(stage)
                except UserError:
                    result = None
                if result is None and stage != "load":
                    del run.manifest.entries[stage]
                else:
                    run.results[stage] = result
        return run

    def _read_result(self, stage: str):
        out = self.out
        if stage == "load":
            return read_json(out / DATA_SUMMARY_FILE)
        if stage == "heads":
            return HeadScores.load(out / HEADS_FILE)
        if stage == "select":
            return Selection.load(out)
        if stage in ("eval_before", "eval_after"):
            d = read_json(out / EVAL_FILES[stage.split("_")[1]])
            return EvalResult.from_dict(d) if d else None
        if stage == "reference":
            d = read_json(out / REFERENCE_FILE)
            return FullFinetuneCost.from_dict(d) if d else None
        d = self.manifest[stage].get("result")
        if not d or not (out / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file():
            return None
        return TrainResult(**d)

    # -- summary --------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        hs, sel, tr, full = self.heads, self.selection, self.train_result, self.full
        t_heads = hs.time_s if hs is not None else 0.0
        t_select = sel.time_s if sel is not None else 0.0
        t_train = tr.time_s if tr is not None else 0.0
        m: dict = {"model": self.config.model, "run_dir": str(self.out), "time_heads_s": t_heads,
                   "time_select_s": t_select, "time_train_s": t_train, "stages_done": self.stages_done,
                   "stages_partial": self.stages_partial, "processes": Processes.current().world,
                   "sharded": Processes.current().sharded}
        if self.lm is not None and "params_per_process" in self.lm.extra:
            m["params_per_process"] = self.lm.extra["params_per_process"]
        if full is not None:
            m.update(aer(t_heads, t_select, t_train, full.time_s))
            m.update(aer_mode=full.mode, time_full_s=full.time_s, time_full_stderr_s=full.stderr_s,
                     reference_epochs=full.epochs, full_ft=full.to_dict())
        for when in ("before", "after"):
            res = self.results.get(f"eval_{when}")
            m[f"eval_{when}"] = res.to_dict() if res is not None else None
        m["total_params"] = count_params(self.lm.model) if self.lm is not None else None
        if tr is not None:
            m.update({"trainable_params": tr.trainable_params, "optimizer_state_bytes": tr.optimizer_state_bytes,
                      "steps_done": tr.steps_done, "steps_planned": tr.steps_planned, "stopped": tr.stopped,
                      "final_loss": tr.final_loss, "train_epochs": self.config.train_epochs,
                      "query_heads_changed": tr.query_heads_changed})
            if full is not None:
                m["full_optimizer_state_bytes"] = full.optimizer_state_bytes
        if hs is not None:
            m["selected_heads"] = hs.selected
            m["head_method"] = hs.method
        if sel is not None:
            m.update(n_selected=sel.n_selected, n_pool=sel.n_pool, select_method=sel.method)
            if self.data is not None:
                counts = sel.task_counts(self.data.pool.samples)
            else:
                counts = (read_json(self.out / SELECTION_FILE) or {}).get("task_counts")
            if counts is not None:
                m["selected_task_counts"] = counts
        return m

    def write_metrics(self) -> dict:
        m = self.metrics()
        if self.out.exists():
            write_json(self.out / METRICS_FILE, m)
        return m


@contextlib.contextmanager
def _fault_injection(run: "Run", stage: str):
    """Crash tests: with ``P2D_FAULT=kill:<stage>[:<n>]`` in the environment the process SIGKILLs
    itself at the n-th progress report (default 2) of that stage, as a power cut would;
    ``P2D_FAULT=oom:<stage>[:<n>]`` raises there the error torch raises when a GPU runs out of memory."""
    fault = os.environ.get("P2D_FAULT", "")
    parts = fault.split(":")
    if len(parts) < 2 or parts[0] not in ("kill", "oom") or parts[1] != stage:
        yield
        return
    at, seen, inner = int(parts[2]) if len(parts) > 2 else 2, [0], run.progress

    def progress(done, total, desc):
        seen[0] += 1
        if seen[0] >= at and parts[0] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if seen[0] >= at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by P2D_FAULT)")
        if inner is not None:
            inner(done, total, desc)

    run.progress = progress
    try:
        yield
    finally:
        run.progress = inner


def default_loader(config: RunConfig) -> LoadedModel:
    """The model of ``config`` loaded with `p2d.models.load_model` (how `Run` loads unless given a loader)."""
    return load_model(config.model, device=config.device, dtype=config.dtype,
                      trust_remote_code=config.trust_remote_code, quantize=config.quantize)


def fresh_folder(out) -> None:
    """Remove what a previous run left in ``out`` (its stage outputs, manifest and metrics); other
    files stay. Under several processes only the main one removes them (`p2d.files.remove`)."""
    out = Path(out)
    for name in [n for stage in STAGES for n in OUTPUTS[stage]] + [MANIFEST_FILE, METRICS_FILE, RECORD_FILE,
                                                                     RECORD_LENGTHS_FILE]:
        remove(out / name)
