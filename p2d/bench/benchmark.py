"""`python -m p2d bench`: the benchmark's units in order, resumably, then the report.

Every split (a pool and a target: ``builtin-hard:addition`` ...) at every seed is a `p2d.bench.split.Split`:
a `p2d.pipeline.Run` whose load, heads and select stages give the data, P2D's heads and P2D's selection
(checked and kept by the run's manifest like any run's). This module adds what a benchmark adds on
top, as units, and orders them:

- at the **choice seed** (never reported as evidence): P2D's heads and selection, one random head
  set, and the learning-rate sweeps of every trainable kind on the data it will train on (P2D's
  selection), judged by the probe loss; on the choice splits also the selection study every default
  is chosen from (`p2d.bench.choose`);
- at each **reporting seed**: the base model; the heads of P2D's method and of the candidate head
  methods (the run's `heads_of`); every selector's rows (the run's `selection_of`; ``precision``:
  target-skill rows, twins, pool shares, time) and the null distribution of random heads; then the
  training cells (`p2d.cells`) — every selector's rows trained the same way (``selectors``), P2D's
  heads against candidate and random head sets in each adapter regime (``heads``), LoRA and full
  fine-tuning at the same budget (``classic``), and full fine-tuning of the whole pool with its
  learning curve (``aer``, first reporting seed).

Each unit is a `p2d.manifest` entry file under ``out/units/`` with the settings it depends on and the
digests of the units it was built on; a rerun reuses exactly the valid ones, so the benchmark can run
in parts, in several processes (different seeds or parts) and across sessions. Every timed unit
records wall and process CPU seconds (``--threads 1`` makes the CPU seconds independent of other load).
The statistics are `p2d.bench.stats`; the report is `p2d.bench.report`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..adapter import ADAPTERS
from ..cells import CELLS, Cell, curve_steps, evaluate_cell, random_heads, random_rows, train_cell
from ..cost import Clock
from ..evaluation import forced_eval
from ..manifest import EntryFiles, content_digest
from ..method.features import activation_from_features, alignment_from_features, head_features
from ..method.heads import HeadScores, from_maps
from ..method.scoring import top_samples
from ..method.selection import Selection, select_data
from ..models import count_params, load_model
from ..training import TrainConfig
from . import frontier, heads_test
from .choose import RULE_ADAPTERS, WINDOW_MARK, parse_windowed, rule_cells, selection_unit_name
from .components import component_figures
from .config import BenchConfig
from .report import collect, write_report
from .split import Split
from .stats import mean_other_accuracy, target_stats

#: sweep kinds: the trainable part whose learning rate is chosen (``<adapter>-<head set>``, lora, full)
GRID_OF = {"qkvo": "lr_qkvo", "qo": "lr_qo", "offset": "lr_offset", "lora": "lr_lora", "full": "lr_full"}
EXTEND = 10 ** 0.5  # a grid is extended by this factor while its best value sits at an edge


#: head sets read off the gate-gradient importance maps of one scoring pass (`p2d.method.heads.from_maps`)
DERIVED_HEADS = ("gradient", "gradient_layer", "gradient_logratio", "importance")
#: the method whose scoring pass the others in DERIVED_HEADS are read from, whatever head_method is, so that
#: changing head_method does not redo the derived sets
DERIVED_SOURCE = "gradient_logratio"


class OutOfTime(Exception):
    """The time limit (max_minutes) is reached: no new unit starts."""


def _judged_on(judge: list) -> str:
    """The digest of the rule's held-out rows a judged unit was evaluated on."""
    return content_digest([[t.get("content") for t in r.prompt] + [r.answer] for r in judge])


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The commit of the p2d checkout that runs (``git rev-parse HEAD``) and whether its tracked files differ
    from it (``dirty``); both None outside a git checkout of the project (an installed package). Read once
    per process: every unit of an invocation records it."""
    pkg = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(pkg), *args], capture_output=True, text=True, timeout=30, check=True
                              ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() / "p2d" != pkg:
            return {"commit": None, "dirty": None}
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def eval_record(res) -> dict:
    """A forced evaluation as stored in a unit: accuracy, loss, per-row values, other tasks."""
    other = res.other_tasks or {}
    return {"accuracy": res.accuracy, "loss": res.loss, "n": res.n, "strict": res.per_row["strict"],
            "row_loss": res.per_row["loss"], "other_tasks": other, "other_accuracy": mean_other_accuracy(other)}


class Bench:
    """The benchmark of ``cfg``: its units (``out/units``), in the order of `run`."""

    def __init__(self, cfg: BenchConfig, progress=None):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out)
        self.units = EntryFiles(self.out / "units")
        self.deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else None
        self.lm = None
        self.skipped: list[str] = []
        self.touched: dict[tuple, dict] = {}  # every valid unit of this invocation, for the report
        self.read_only = cfg.report_only  # units are read, never computed

    # -- units ----------------------------------------------------------------------------------
    def common(self, sp: Split) -> dict:
        c = self.cfg
        return {"model": c.model, "device": c.device, "dtype": c.dtype, "threads": c.threads,
                "load": sp.config.stage_settings("load"), "batch_size": c.batch_size, "max_length": c.max_length}

    def unit(self, key: tuple, settings: dict, inputs: dict, compute, what: str) -> dict | None:
        """The valid entry of ``key``, else ``compute()`` -> (result, digest or None), stored; with
        ``report_only`` (or an input that is missing) None instead of computing."""
        if any(d is None for d in inputs.values()):
            return None
        done = self.units.valid(key, settings, inputs)
        if done is None and self.cfg.report_only:
            done = self._made_with_other_threads(key, settings, inputs)
        if done is None:
            if self.read_only:
                return None
            if self.deadline is not None and time.perf_counter() > self.deadline:
                raise OutOfTime()
            _say(what)
            result, digest = compute()
            done = self.units.put(key, settings, inputs, result, digest, code=code_version())
        self.touched[key] = done
        return done

    def _made_with_other_threads(self, key: tuple, settings: dict, inputs: dict) -> dict | None:
        """Report only: the unit of ``key`` when it differs from ``settings`` in the thread count alone (the
        count changes a unit's seconds, not its result; a run recomputes such a unit, a report reads it)."""
        entry = self.units.get(key)
        threads = (entry or {}).get("settings", {}).get("threads")
        if threads is None or "threads" not in settings:
            return None
        return self.units.valid(key, {**settings, "threads": threads}, inputs)

    # -- stages ---------------------------------------------------------------------------------
    def base(self, sp: Split) -> dict:
        def compute():
            res = evaluate_cell(self.lm, sp.eval, sp.other, batch_size=max(16, self.cfg.batch_size),
                                max_length=self.cfg.max_length, forced=True)
            return eval_record(res), None

        return self.unit(sp.key + ("base",), self.common(sp), {}, compute, f"{sp.name} seed {sp.seed}: base model")

    def base_judged(self, sp: Split, judge: list) -> dict:
        """The untrained model on the rule's held-out rows ``judge`` (`p2d.bench.choose`: what a split's
        candidates must beat for the split to be informative), evaluated as a judged cell is."""
        def compute():
            res = evaluate_cell(self.lm, judge, None, batch_size=max(16, self.cfg.batch_size),
                                max_length=self.cfg.max_length, forced=True)
            return eval_record(res), None

        return self.unit(sp.key + ("base-judged",), {**self.common(sp), "judged_on": _judged_on(judge)}, {}, compute,
                         f"{sp.name} seed {sp.seed}: base model on the rule's held-out rows")

    def heads(self, sp: Split, method: str) -> tuple[HeadScores, str]:
        """Heads of ``method`` (``random<d>``: the d-th random draw of this seed, `p2d.cells.random_heads`,
        no unit needed). P2D's method is the split's run's heads stage; the other contrasts of P2D's gate
        gradients (``gradient``, ``gradient_layer``, ``gradient_logratio``) and ``importance`` (gate
        importance on the probe alone, no contrast) are read off the importance maps of one
        ``gradient_logratio`` scoring pass (`p2d.method.heads.from_maps`): the same model pass, so the same
        cost; any other method is scored with the run's settings (`p2d.pipeline.Run.heads_of`). Every
        unit keeps its heads.json in its folder."""
        c = self.cfg
        if method.startswith("random"):
            d = int(method[6:] or 0)
            hs = random_heads(self.lm, c.head_ratio, sp.seed, d)
            return hs, content_digest(hs.selected)
        if WINDOW_MARK in method:
            return self._windowed_heads(sp, method)
        derived = method in DERIVED_HEADS and method not in (DERIVED_SOURCE, c.head_method)
        source, source_digest = self.heads(sp, DERIVED_SOURCE) if derived else (None, None)
        folder = sp.folder(f"heads-{method}")

        def compute():
            with Clock() as clock:
                if derived:
                    hs = from_maps(source, method)
                elif method == c.head_method:  # P2D's heads: the run's stage (kept by its manifest)
                    if (sp.run.manifest.get("heads") or {}).get("external"):  # given from a unit: score them
                        sp.run.reset_from("heads")
                    if not sp.run.is_done("heads"):
                        sp.run.run(["heads"])
                    hs = sp.run.heads
                else:
                    hs = sp.run.heads_of(method)
            hs.save(folder)
            time_s = source.time_s if derived else hs.time_s
            cpu_s = (source.extra.get("cpu_s", 0.0) if derived
                     else sp.run.manifest["heads"].get("cpu_s", clock.cpu_s) if method == c.head_method else clock.cpu_s)
            return {"time_s": time_s, "cpu_s": cpu_s, "selected": hs.selected, "method": method,
                    "derived_from": DERIVED_SOURCE if derived else None}, content_digest(hs.selected)

        settings = {**self.common(sp), "method": method, "head_ratio": c.head_ratio, "positions": c.positions,
                    "derived": derived}
        entry = self.unit(sp.key + (f"heads-{method}",), settings, {"source": source_digest} if derived else {},
                          compute, f"{sp.name} seed {sp.seed}: heads ({method})")
        if entry is None:
            return None, None
        hs = HeadScores.load(folder)
        hs.time_s, hs.extra["cpu_s"] = entry["result"]["time_s"], entry["result"]["cpu_s"]
        return hs, entry["digest"]

    def _windowed_heads(self, sp: Split, method: str) -> tuple[HeadScores, str]:
        """``<method>@<lo>-<hi>``: the heads of ``method`` re-picked inside the layer window [lo, hi]
        (`p2d.method.heads.HeadScores.with_window`, what ``min_head_layer``/``max_head_layer`` give a run;
        every head is still scored, so the cost is the unwindowed scoring's)."""
        base, window = parse_windowed(method, self.lm.geometry.n_layers)
        source, source_digest = self.heads(sp, base)
        if source is None:
            return None, None
        folder = sp.folder(f"heads-{method}")

        def compute():
            hs = source.with_window(window)
            hs.save(folder)
            return {"time_s": source.time_s, "cpu_s": source.extra.get("cpu_s", 0.0), "selected": hs.selected,
                    "method": method, "derived_from": base, "layer_window": window}, content_digest(hs.selected)

        entry = self.unit(sp.key + (f"heads-{method}",), {**self.common(sp), "method": method, "window": window},
                          {"source": source_digest}, compute, f"{sp.name} seed {sp.seed}: heads ({method})")
        if entry is None:
            return None, None
        hs = HeadScores.load(folder)
        hs.time_s, hs.extra["cpu_s"] = entry["result"]["time_s"], entry["result"]["cpu_s"]
        return hs, entry["digest"]

    def windowed_selection(self, sp: Split, heads_method: str) -> dict:
        """P2D's selection (its select method) with the windowed heads ``heads_method`` (``<method>@lo-hi``),
        by the model pass a run with that window makes: it stops after the deepest selected head's layer,
        so a highest-layer window shortens it (timed here; no head record is reused)."""
        c = self.cfg
        heads, digest = self.heads(sp, heads_method)
        unit = selection_unit_name("p2d", heads_method)
        name = unit.removeprefix("select-")
        folder = sp.folder(unit)

        def compute():
            with Clock() as clock:
                sel = select_data(self.lm, heads, sp.pool, method=c.select_method, ratio=c.data_ratio,
                                  probe=sp.probe, batch_size=c.batch_size, max_length=c.max_length, seed=sp.seed,
                                  positions=c.positions, hidden_layer=c.hidden_layer)
            sel.save(folder, sp.pool)
            return {"selected": sel.selected, "time_s": sel.time_s, "cpu_s": clock.cpu_s, "heads_s": heads.time_s,
                    "heads_cpu_s": heads.extra.get("cpu_s", 0.0), "method": c.select_method, "heads": heads_method,
                    **target_stats(sel.selected, sel.scores, sp.labels, sp.target)}, content_digest(sel.selected)

        settings = {**self.common(sp), "selector": name, "method": c.select_method, "data_ratio": c.data_ratio,
                    "positions": c.positions}
        return self.unit(sp.key + (unit,), settings, {"heads": digest}, compute,
                         f"{sp.name} seed {sp.seed}: selection {name}") if digest is not None else None

    def selection(self, sp: Split, selector: str, layer: int | None = None, features: dict | None = None) -> dict:
        """The rows ``selector`` picks (P2D's: the selected heads' activation; rh-alignment: gradient
        alignment on the first random head set; the head-free ones; random rows). With a feature pass
        of this seed, rh-alignment's scores are read from it (`p2d.method.features.alignment_from_features`,
        equal to `select_data`'s) and its cost is the one measured at the choice seed."""
        c = self.cfg
        name = selector if layer is None else f"{selector}-L{layer}"
        if selector == "rh-alignment" and features is not None and sp.seed != c.choice_seed:
            return self._rh_alignment_from_features(sp, features)
        inputs, heads = {}, None
        if selector in ("p2d", "rh-alignment"):
            heads, digest = self.heads(sp, c.head_method if selector == "p2d" else "random0")
            inputs["heads"] = digest  # None (heads not done, report only): no selection either
        method = {"p2d": c.select_method, "rh-alignment": "alignment"}.get(selector, selector)
        folder = sp.folder(f"select-{name}")

        def compute():
            if selector == "random":
                rows = random_rows(len(sp.pool), sp.budget, sp.seed)
                chosen = set(rows)
                scores = [1.0 if i in chosen else 0.0 for i in range(len(sp.pool))]
                sel = Selection(method="random", ratio=c.data_ratio, n_pool=len(sp.pool), n_selected=len(rows),
                                time_s=0.0, scores=scores, selected=rows)
                cpu_s = 0.0
            elif selector == "p2d":  # P2D's selection: the run's stage, on the heads unit's heads (given to the
                # run when its own heads stage does not hold them, e.g. units made before splits were runs)
                if sp.run.result_digest("heads") != inputs["heads"]:
                    sp.run.use_heads(heads, source=f"benchmark unit heads-{c.head_method}")
                if not sp.run.is_done("select"):
                    sp.run.run(["select"])
                sel, cpu_s = sp.run.selection, sp.run.manifest["select"].get("cpu_s", 0.0)
            else:
                with Clock() as clock:
                    sel = sp.run.selection_of(heads, method, hidden_layer=layer)
                cpu_s = clock.cpu_s
            if selector != "p2d":
                sel.save(folder, sp.pool)
            heads_s = heads.time_s if heads is not None and selector == "p2d" else 0.0
            return {"selected": sel.selected, "time_s": sel.time_s, "cpu_s": cpu_s, "heads_s": heads_s,
                    "heads_cpu_s": heads.extra.get("cpu_s", 0.0) if heads_s else 0.0, "method": method,
                    **target_stats(sel.selected, sel.scores, sp.labels, sp.target)}, content_digest(sel.selected)

        settings = {**self.common(sp), "selector": selector, "method": method, "data_ratio": c.data_ratio,
                    "positions": c.positions, "hidden_layer": layer if layer is not None else c.hidden_layer}
        return self.unit(sp.key + (f"select-{name}",), settings, inputs, compute,
                         f"{sp.name} seed {sp.seed}: selection {name}")

    def _rh_alignment_from_features(self, sp: Split, features: dict) -> dict | None:
        c = self.cfg
        choice = self.units.get((sp.key[0], f"seed{c.choice_seed}", "select-rh-alignment"))
        folder = sp.folder("select-rh-alignment")

        def compute():
            scores = [float("nan") if v is None else v for v in features["result"]["rh_alignment_scores"]]
            selected = top_samples(scores, c.data_ratio)
            cost = (choice or {}).get("result", {})
            sel = Selection(method="alignment", ratio=c.data_ratio, n_pool=len(sp.pool), n_selected=len(selected),
                            time_s=cost.get("time_s", 0.0), scores=scores, selected=selected,
                            extra={"from_features": True})
            sel.save(folder, sp.pool)
            return {"selected": selected, "time_s": cost.get("time_s"), "cpu_s": cost.get("cpu_s"), "heads_s": 0.0,
                    "method": "alignment", "cost_from": f"seed{c.choice_seed}",
                    **target_stats(selected, scores, sp.labels, sp.target)}, content_digest(selected)

        settings = {**self.common(sp), "selector": "rh-alignment", "from_features": True, "data_ratio": c.data_ratio}
        return self.unit(sp.key + ("select-rh-alignment",), settings, {"features": features["digest"]}, compute,
                         f"{sp.name} seed {sp.seed}: selection rh-alignment (from the feature pass)")

    def features_study(self, sp: Split, methods: list[str]) -> dict:
        """Precision of every head method's heads (activation and alignment) and of the random-head null
        distribution, from one feature pass over pool and probe (`p2d.method.features.head_features`)."""
        c = self.cfg
        heads = {m: self.heads(sp, m) for m in methods}
        draws = {f"random{d}": self.heads(sp, f"random{d}") for d in range(c.random_head_draws)}
        if any(h is None for h, _ in heads.values()):
            return None

        def compute():
            with Clock() as clock:
                rc = sp.config
                pf = head_features(self.lm, sp.pool, rc.batch_size, rc.max_length, rc.positions, progress=self.progress)
                qf = head_features(self.lm, sp.probe, rc.batch_size, rc.max_length, rc.positions)
            out = {"features_s": clock.wall_s, "features_cpu_s": clock.cpu_s, "methods": {}, "random": []}

            def stats(hs):
                res = {}
                for score, fn in (("activation", lambda h: activation_from_features(pf, h)),
                                  ("alignment", lambda h: alignment_from_features(pf, qf, h))):
                    scores = fn(hs.selected)
                    res[score] = target_stats(top_samples(scores, c.data_ratio), scores, sp.labels, sp.target)
                return res

            for m, (hs, _) in heads.items():
                out["methods"][m] = {**stats(hs), "heads_s": hs.time_s}
            out["random"] = [stats(hs) for hs, _ in draws.values()]
            out["rh_alignment_scores"] = [None if not math.isfinite(v) else round(v, 7)
                                          for v in alignment_from_features(pf, qf, draws["random0"][0].selected)]
            return out, None

        inputs = {m: d for m, (_, d) in heads.items()}
        settings = {**self.common(sp), "methods": methods, "draws": c.random_head_draws, "head_ratio": c.head_ratio,
                    "positions": c.positions, "data_ratio": c.data_ratio}
        return self.unit(sp.key + ("features",), settings, inputs, compute,
                         f"{sp.name} seed {sp.seed}: feature pass (head methods {methods}, "
                         f"{c.random_head_draws} random draws)")

    # -- training cells -------------------------------------------------------------------------
    @staticmethod
    def train_config(sp: Split, lr: float) -> TrainConfig:
        """The split's run settings' training (`p2d.config.RunConfig.train_config`) at learning rate ``lr``."""
        return sp.config.replace(lr=lr).train_config()

    def cell(self, sp: Split, cell: Cell, rows: dict, heads: tuple | None, lr: float, curve: bool = False,
             tag: str = "", probe: bool = False, curve_at=None, judge: list | None = None) -> dict:
        """Train ``cell`` on ``rows`` (a selection unit's entry) and evaluate it (forced, per row).
        ``tag`` ends the unit's name (another unit of the same cell: the heads test's ``@lr<rate>``);
        ``probe`` also records the probe rows' loss (for choices: never eval rows); ``curve_at(steps)``
        gives the learning curve's steps instead of `curve_steps`. With ``judge`` (rows held out from this
        split's data: `p2d.bench.choose`'s rule) the trained model is evaluated on those rows instead of the
        eval and other-task rows (which are then never read); its own unit, ``<cell>-judged``."""
        c = self.cfg
        if rows is None or (heads is not None and heads[0] is None):
            return None
        hs, heads_digest = heads if heads is not None else (None, None)
        samples = [sp.pool[i] for i in rows["result"]["selected"]] if cell.data != "pool" else list(sp.pool)
        name = f"cell-{cell.heads or cell.trainable}-{cell.adapter or cell.trainable}-{cell.data}{tag}"
        name += "-judged" if judge is not None else ""
        eval_rows, other_rows = (sp.eval, sp.other) if judge is None else (judge, None)
        tc = self.train_config(sp, lr)
        steps = tc.planned_steps(len(samples))
        at = (set(curve_at(steps)) if curve_at is not None else curve_steps(steps, c.curve_points)) if curve else set()

        def curve_eval(lm):
            fe = forced_eval(lm, sp.eval, batch_size=max(16, c.batch_size), max_length=c.max_length)
            return {"accuracy": fe.accuracy, "loss": fe.mean_loss, "strict": fe.to_dict()["strict"]}

        def compute():
            with train_cell(cell, self.lm, samples, tc, sp.folder(name), heads=hs, lora_rank=c.lora_rank,
                            curve_at=at, curve_eval=curve_eval) as (lm, res):
                ev = evaluate_cell(lm, eval_rows, other_rows, batch_size=max(16, c.batch_size),
                                   max_length=c.max_length, forced=True)
                pe = forced_eval(lm, sp.probe, batch_size=max(16, c.batch_size), max_length=c.max_length) if probe else None
            extra = {"probe_loss": pe.mean_loss, "probe_strict": pe.accuracy} if probe else {}
            return {**extra, "cell": dataclasses.asdict(cell), "rows": len(samples), "lr": lr, "train_s": res.train_s,
                    "cpu_s": res.cpu_s, "steps": res.steps, "trainable_params": res.trainable_params,
                    "optimizer_state_bytes": res.optimizer_state_bytes, "final_loss": res.final_loss,
                    "peak_mem_mb": res.peak_mem_mb, "curve": res.curve, "query_heads_changed": res.query_heads_changed,
                    **eval_record(ev)}, None

        settings = {**self.common(sp), "cell": dataclasses.asdict(cell), "lr": lr, "epochs": c.epochs,
                    "lora_rank": c.lora_rank if cell.trainable == "lora" else None, "curve": c.curve_points if curve else 0}
        if probe:
            settings["probe"] = True
        if curve and curve_at is not None:
            settings["curve"] = sorted(at)
        if judge is not None:
            settings["judged_on"] = _judged_on(judge)
        inputs = {"rows": rows["digest"]}
        if heads_digest is not None:
            inputs["heads"] = heads_digest
        return self.unit(sp.key + (name,), settings, inputs, compute,
                         f"{sp.name} seed {sp.seed}: {name} ({len(samples)} rows, {steps} steps, lr {lr:g})")

    # -- learning rates ---------------------------------------------------------------------------
    def sweep(self, sp: Split, kind: str) -> float | None:
        """The learning rate of ``kind`` (``<adapter>-p2d``, ``<adapter>-random``, ``lora``, ``full``) for
        this split: each grid value trains on P2D's selection at the choice seed and is scored by the
        probe loss (never eval rows); the grid is extended while the best value sits at its edge."""
        c = self.cfg
        base_kind = kind.split("-")[0]
        grid = sorted(float(x) for x in getattr(c, GRID_OF[base_kind]))
        if len(grid) == 1:
            return grid[0]
        rows = self.selection(sp, "p2d")
        if base_kind in ADAPTERS:
            cell = Cell("heads", "p2d", kind.split("-")[1], base_kind)
            heads = self.heads(sp, c.head_method if cell.heads == "p2d" else "random0")
        else:
            cell, heads = Cell(base_kind, "p2d"), None
        if rows is None or (heads is not None and heads[0] is None):
            return None
        samples = [sp.pool[i] for i in rows["result"]["selected"]]
        settings = {**self.common(sp), "kind": kind, "grid": grid, "extend": c.sweep_extend, "epochs": c.epochs,
                    "lora_rank": c.lora_rank if base_kind == "lora" else None}
        inputs = {"rows": rows["digest"], **({"heads": heads[1]} if heads else {})}

        def compute():
            points: dict[float, dict] = {}

            def run(lr):
                tc = self.train_config(sp, lr)
                with train_cell(cell, self.lm, samples, tc, sp.folder(f"sweep-{kind}"), heads=heads[0] if heads else None,
                                lora_rank=c.lora_rank) as (lm, res):
                    fe = forced_eval(lm, sp.probe, batch_size=max(16, c.batch_size), max_length=c.max_length)
                _say(f"  sweep {kind}: lr {lr:g} probe loss {fe.mean_loss:.4f}")
                points[lr] = {"lr": lr, "probe_loss": fe.mean_loss, "probe_strict": fe.accuracy,
                              "final_loss": res.final_loss}

            todo = list(grid)
            for _ in range(c.sweep_extend + 1):
                for lr in todo:
                    if lr not in points:
                        run(lr)
                ranked = sorted(points.values(), key=lambda p: (math.inf if p["probe_loss"] is None
                                                                else p["probe_loss"]))
                best, lrs = ranked[0]["lr"], sorted(points)
                if best == lrs[0]:
                    todo = [best / EXTEND]
                elif best == lrs[-1]:
                    todo = [best * EXTEND]
                else:
                    break
            lrs = sorted(points)
            return {"points": [points[x] for x in lrs], "chosen": best,
                    "interior": lrs[0] < best < lrs[-1]}, None

        entry = self.unit(sp.key[:1] + ("sweep", kind), settings, inputs, compute,
                          f"{sp.name}: learning-rate sweep {kind} (seed {sp.seed})")
        return float(entry["result"]["chosen"]) if entry else None

    def rates(self, sp_choice: Split | None, kinds: list[str]) -> dict[str, float]:
        """The learning rate of every kind for a split: swept at the choice seed, or the middle of the grid
        when a grid has one value (``--quick``) or the sweep is not part of this invocation and not done."""
        out = {}
        for kind in kinds:
            grid = getattr(self.cfg, GRID_OF[kind.split("-")[0]])
            if len(grid) == 1 or sp_choice is None:
                out[kind] = float(grid[len(grid) // 2])
                continue
            read_only = self.read_only
            self.read_only = read_only or "sweep" not in self.cfg.parts  # without the part: finished sweeps only
            try:
                lr = self.sweep(sp_choice, kind)
            finally:
                self.read_only = read_only
            if lr is None:
                self.skipped.append(f"{sp_choice.name}: no {kind} sweep yet")
                continue
            out[kind] = lr
        return out

    # -- the whole benchmark ---------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        _say(f"model {self.lm.spec} on {self.lm.device} ({self.lm.dtype}, {torch.get_num_threads()} threads); "
             f"splits {cfg.splits}, seeds {cfg.seed_list} (choice seed {cfg.choice_seed}), parts {cfg.parts}")
        complete = True
        try:
            for split in cfg.splits:
                self.split(split)
        except OutOfTime:
            complete = False
            _say(f"time limit of {cfg.max_minutes:g} min reached: reporting what finished; rerun to continue")
        results = collect(self, machine(), {"model": self.lm.spec, "params": count_params(self.lm.model),
                                            "device": str(self.lm.device),
                                            "dtype": str(self.lm.dtype).replace("torch.", ""),
                                            **self.lm.geometry.to_dict()})
        results["time_s"] = time.perf_counter() - start
        results["complete"] = complete and not self.skipped
        results["skipped"] = self.skipped
        write_report(self.out, results)
        _say(f"done in {results['time_s']:.0f} s: {self.out / 'results.md'}")
        return {"results": str(self.out / "results.json"), "report": str(self.out / "results.md"),
                "time_s": results["time_s"], "complete": results["complete"], "skipped": self.skipped}

    def kinds(self, split: str) -> list[str]:
        """The learning rates a split needs."""
        c = self.cfg
        kinds = [f"{c.adapter}-p2d"] if "selectors" in c.parts or "aer" in c.parts else []
        if split in c.choice_splits and "sweep" in c.parts:  # the adapter rule compares every adapter's probe loss
            kinds += [f"{a}-p2d" for a in c.adapters]
        if split in c.choice_splits and "rule" in c.parts:  # the rule judged by training: every candidate adapter
            kinds += [f"{a}-p2d" for a in RULE_ADAPTERS]
        if split in c.heads_splits:
            if "heads" in c.parts:
                kinds += [f"{a}-{h}" for a in c.adapters for h in ("p2d", "random")]
            if "classic" in c.parts:
                kinds += sorted({CELLS[n].trainable for n in c.classic})
            if "aer" in c.parts:
                kinds.append("full")
        if "frontier" in c.parts:  # every selector x adapter, LoRA and full fine-tuning (p2d/bench/frontier.py)
            kinds += [f"{a}-p2d" for a in c.adapters] + ["lora", "full"]
        return list(dict.fromkeys(kinds))

    def split(self, split: str) -> None:
        cfg = self.cfg
        choice = None
        if split != "custom" and ({"sweep", "selectors", "heads", "classic", "aer", "frontier"} & set(cfg.parts)
                                  or split in cfg.choice_splits):
            choice = self.split_at(split, cfg.choice_seed)
            if "precision" in cfg.parts and split in cfg.choice_splits:
                self.choice_study(choice)
            if "precision" in cfg.parts and "rh-alignment" in cfg.selectors:
                self.selection(choice, "rh-alignment")  # its cost, measured once (the reporting seeds read it)
        lrs = self.rates(choice, self.kinds(split))
        if "rule" in cfg.parts and split in cfg.choice_splits:  # at the choice seeds, before any reporting seed
            rule_cells(self, split, lrs)
        if not set(cfg.parts) - {"sweep", "rule"}:  # the sweeps and the rule alone touch no reporting seed
            return
        if "heads_test" in cfg.parts and split in cfg.heads_splits and split != "custom":  # after the sweeps: its
            choice = choice or self.split_at(split, cfg.choice_seed)  # grid spans their winners
            heads_test.run(self, choice, self.selection(choice, "p2d"))  # each kind's best rate is read here
        for seed in cfg.seed_list:
            sp = self.split_at(split, seed)
            self.base(sp)
            heads_split = split in cfg.heads_splits
            methods = [cfg.head_method] + ([m for m in cfg.head_candidates if m != cfg.head_method]
                                           if heads_split else [])
            rows, features = {}, None
            if "precision" in cfg.parts:
                features = self.features_study(sp, methods)
            if "precision" in cfg.parts or {"selectors", "heads", "classic", "aer", "frontier"} & set(cfg.parts):
                rows = {s: self.selection(sp, s, features=features) for s in cfg.selectors}
                rows.setdefault("p2d", self.selection(sp, "p2d"))
                rows.setdefault("random", self.selection(sp, "random"))
            p2d = self.heads(sp, cfg.head_method)
            default = f"{cfg.adapter}-p2d"
            if "selectors" in cfg.parts and default in lrs:
                for s in cfg.selectors:
                    if s in cfg.trained_selectors:
                        self.cell(sp, Cell("heads", s, "p2d", cfg.adapter), rows[s], p2d, lrs[default])
            if "heads" in cfg.parts and heads_split:
                for adapter in cfg.adapters:
                    lr_p2d, lr_rnd = lrs.get(f"{adapter}-p2d"), lrs.get(f"{adapter}-random")
                    if lr_p2d is None or lr_rnd is None:
                        continue
                    for m in methods:
                        self.cell(sp, Cell("heads", "p2d", "p2d" if m == cfg.head_method else m, adapter),
                                  rows["p2d"], self.heads(sp, m), lr_p2d)
                    for d in range(cfg.training_draws):
                        self.cell(sp, Cell("heads", "p2d", f"random{d}", adapter), rows["p2d"],
                                  self.heads(sp, f"random{d}"), lr_rnd)
            if "classic" in cfg.parts and heads_split:
                for name in cfg.classic:
                    cell = CELLS[name]
                    if cell.trainable in lrs:
                        self.cell(sp, cell, rows[cell.data], None, lrs[cell.trainable])
            if "aer" in cfg.parts and heads_split and seed == cfg.seed_list[0] and "full" in lrs:
                pool_rows = {"result": {"selected": list(range(len(sp.pool)))}, "digest": content_digest(len(sp.pool))}
                self.cell(sp, CELLS["full-pool"], pool_rows, None, lrs["full"], curve=True)
            if "heads_test" in cfg.parts and heads_split:
                heads_test.run(self, sp, rows.get("p2d") or self.selection(sp, "p2d"))
            if "frontier" in cfg.parts:
                frontier.run(self, sp, rows, lrs)
            if "components" in cfg.parts and split == cfg.splits[0] and seed == cfg.seed_list[0]:
                self.components(sp, p2d[0])

    def split_at(self, split: str, seed: int) -> Split:
        return Split(self.cfg, split, seed, self.units, lm=self.lm, progress=self.progress)

    def components(self, sp: Split, heads: HeadScores) -> dict:
        """The cost of each part of a step and of every scoring method (`p2d.bench.components`)."""
        return self.unit(("components",), {**self.common(sp), "head_ratio": self.cfg.head_ratio,
                                           "data_ratio": self.cfg.data_ratio, "lora_rank": self.cfg.lora_rank},
                         {"heads": content_digest(heads.selected)},
                         lambda: (component_figures(self.lm, sp, self.cfg, heads.selected), None),
                         f"component figures on {sp.name} seed {sp.seed}")

    def choice_study(self, sp: Split) -> None:
        """At the choice seed of a choice split: every selector (hidden at three layers) and every head
        method's heads with activation and alignment, for the rule in `p2d.bench.choose`."""
        cfg = self.cfg
        n = self.lm.geometry.n_layers
        for s in cfg.selectors:
            self.selection(sp, s)
        if "hidden" in cfg.selectors:
            for layer in sorted({n // 4, (3 * n) // 4}):
                self.selection(sp, "hidden", layer)
        methods = list(dict.fromkeys([cfg.head_method, *DERIVED_HEADS, *cfg.head_candidates]))
        self.features_study(sp, methods)


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    return Bench(cfg, progress=progress).run()
