"""`python -m p2d bench`: run the benchmark units, resumably, and write the report.

Units (each saved as JSON under ``out/units/`` when it finishes; a rerun with the same settings skips
it): per target and seed the base model's accuracy, P2D's heads and selection, random heads and
the data they select, the random-head precision draws, every training cell, and (first seed) the
accuracy-vs-target-rows curve; once, the learning-rate sweep on the probe set.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..files import read_json, write_json
from ..heads import HeadScores, score_heads, top_count
from ..models import load_model
from ..selection import Selection, select_data
from ..training import TrainConfig
from .cells import Split, build_split, curve_steps, eval_summary, model_facts, precision_auroc, trained
from .config import CELLS, BenchConfig

KIND_LR = {"heads": "lr_heads", "random_heads": "lr_heads", "lora": "lr_lora", "full": "lr_full"}


class OutOfTime(Exception):
    """The time limit (max_minutes) is reached: no new unit starts."""


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Units:
    """Finished units as JSON files; a unit is reused only when its settings signature matches."""

    def __init__(self, root: Path, signature: dict, deadline: float | None = None):
        self.root = root
        self.signature = signature
        self.deadline = deadline

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts[:-1], parts[-1] + ".json")

    def get(self, *parts: str):
        data = read_json(self.path(*parts))
        if data and data.get("signature") == self.signature:
            return data["result"]
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise OutOfTime()  # not done, and no time to start it
        return None

    def put(self, result, *parts: str):
        write_json(self.path(*parts), {"signature": self.signature, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                       "machine": machine(), "result": result})
        return result

    def folder(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def _signature(cfg: BenchConfig) -> dict:
    skip = {"targets", "seeds", "first_seed", "cells", "parts", "out", "quick", "random_head_draws", "curve_points",
            "target_rows"}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}


def _train_config(cfg: BenchConfig, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, lr=lr, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed)


class Bench:
    def __init__(self, cfg: BenchConfig, progress=None):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out)
        deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else None
        self.units = Units(self.out / "units", _signature(cfg), deadline)
        self.lm = None
        self.lrs: dict | None = None

    # -- per split ------------------------------------------------------------------------------
    def base(self, split: Split) -> dict:
        key = (split.target, f"seed{split.seed}", "base")
        return self.units.get(*key) or self.units.put(
            eval_summary(self.lm, split, self.cfg.batch_size, self.cfg.max_length), *key)

    def heads(self, split: Split, method: str, seed: int, name: str) -> HeadScores:
        folder = self.units.folder(split.target, f"seed{split.seed}", name)
        if self.units.get(split.target, f"seed{split.seed}", name) is not None:
            return HeadScores.load(folder)
        _say(f"{split.target} seed {split.seed}: heads ({method})")
        hs = score_heads(self.lm, split.probe, method=method, ratio=self.cfg.head_ratio, pool=split.pool, seed=seed,
                         batch_size=self.cfg.batch_size, max_length=self.cfg.max_length, progress=self.progress)
        hs.save(folder)
        self.units.put({"time_s": hs.time_s, "selected": hs.selected, "method": method}, split.target,
                       f"seed{split.seed}", name)
        return hs

    def selection(self, split: Split, heads: HeadScores, name: str) -> Selection:
        folder = self.units.folder(split.target, f"seed{split.seed}", name)
        if self.units.get(split.target, f"seed{split.seed}", name) is not None:
            return Selection.load(folder)
        _say(f"{split.target} seed {split.seed}: selection {name} ({self.cfg.select_method})")
        sel = select_data(self.lm, heads, split.pool, method=self.cfg.select_method, ratio=self.cfg.data_ratio,
                          probe=split.probe, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                          seed=split.seed, progress=self.progress)
        sel.save(folder, split.pool)
        self.units.put({"time_s": sel.time_s, **precision_auroc(sel.scores, sel.selected, split.is_target),
                        "task_counts": sel.task_counts(split.pool)}, split.target, f"seed{split.seed}", name)
        return sel

    def random_head_draws(self, split: Split) -> dict | None:
        key = (split.target, f"seed{split.seed}", "random_head_draws")
        done = self.units.get(*key)
        if done is not None or split.is_target is None:
            return done
        _say(f"{split.target} seed {split.seed}: {self.cfg.random_head_draws} random-head selection draws")
        draws = []
        for d in range(self.cfg.random_head_draws):
            hs = score_heads(self.lm, split.probe, method="random", ratio=self.cfg.head_ratio,
                             seed=10_000 * split.seed + d + 1)
            sel = select_data(self.lm, hs, split.pool, method=self.cfg.select_method, ratio=self.cfg.data_ratio,
                              probe=split.probe, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                              seed=split.seed)
            draws.append(precision_auroc(sel.scores, sel.selected, split.is_target))
        return self.units.put({"draws": draws}, *key)

    def cell(self, split: Split, name: str, data: dict[str, list[int]], heads: dict[str, HeadScores],
             lrs: dict[str, float]) -> dict:
        key = (split.target, f"seed{split.seed}", f"cell-{name}")
        done = self.units.get(*key)
        if done is not None:
            return done
        kind, data_name, _ = CELLS[name]
        samples = [split.pool[i] for i in data[data_name]]
        tc = _train_config(self.cfg, lrs[kind], split.seed)
        steps = tc.planned_steps(len(samples))
        points = curve_steps(steps, self.cfg.curve_points) if name == "full-pool" else set()

        def curve_eval(lm):
            from ..evaluation import evaluate

            return evaluate(lm, split.eval, batch_size=max(16, self.cfg.batch_size), max_length=self.cfg.max_length,
                            n_examples=0)

        _say(f"{split.target} seed {split.seed}: cell {name} ({len(samples)} rows, {steps} steps, lr {lrs[kind]:g})")
        with trained("heads" if kind == "random_heads" else kind, self.lm, samples, tc,
                     self.units.folder(split.target, f"seed{split.seed}", f"cell-{name}"),
                     heads=heads.get("random" if kind == "random_heads" else "p2d"),
                     lora_rank=self.cfg.lora_rank, curve_steps=points, curve_eval=curve_eval) as (lm, res):
            result = {"cell": name, "kind": kind, "data": data_name, "rows": len(samples), "lr": lrs[kind],
                      **asdict(res), **eval_summary(lm, split, self.cfg.batch_size, self.cfg.max_length)}
        return self.units.put(result, *key)

    def target_rows(self, split: Split, heads: HeadScores, lr: float) -> dict | None:
        """P2D heads trained on budget-sized sets holding a growing number of target rows."""
        key = (split.target, f"seed{split.seed}", "target_rows")
        done = self.units.get(*key)
        if done is not None or split.is_target is None:
            return done
        import random

        from ..evaluation import evaluate

        budget = top_count(len(split.pool), self.cfg.data_ratio)
        target_idx = [i for i, t in enumerate(split.is_target) if t]
        other_idx = [i for i, t in enumerate(split.is_target) if not t]
        rng = random.Random(f"bench-target-rows:{split.seed}")
        rng.shuffle(target_idx)
        rng.shuffle(other_idx)
        points = []
        for share in self.cfg.target_rows:
            k = min(len(target_idx), round(float(share) * budget))
            rows = target_idx[:k] + other_idx[:budget - k]
            _say(f"{split.target} seed {split.seed}: target-rows curve, {k} of {budget} rows are target rows")
            tc = _train_config(self.cfg, lr, split.seed)
            folder = self.units.folder(split.target, f"seed{split.seed}", f"target_rows_{k}")
            with trained("heads", self.lm, [split.pool[i] for i in rows], tc, folder, heads=heads) as (lm, r):
                ev = evaluate(lm, split.eval, batch_size=max(16, self.cfg.batch_size), max_length=self.cfg.max_length,
                              n_examples=0)
            points.append({"target_rows": k, "budget": budget, "accuracy": ev.accuracy, "contains": ev.contains,
                           "loss": ev.loss, "train_s": r.train_s})
        return self.units.put({"points": points}, *key)

    def components(self, split: Split, heads: HeadScores) -> dict:
        from .components import component_figures

        done = self.units.get("components")
        if done is None:
            _say(f"component figures on {split.target} seed {split.seed}")
            done = self.units.put(component_figures(self.lm, split, self.cfg, heads.selected), "components")
        return done

    # -- learning rates ---------------------------------------------------------------------------
    def sweep(self, lm_split: Split, heads: HeadScores) -> dict[str, float]:
        """Best learning rate per trainable kind: each grid value trains on a random data-budget sample of
        the first split and is scored on the probe set (exact match, then answer loss); never the eval set."""
        from ..evaluation import evaluate

        cfg = self.cfg
        grids = {kind: [float(x) for x in getattr(cfg, attr)] for kind, attr in
                 (("heads", "lr_heads"), ("lora", "lr_lora"), ("full", "lr_full"))}
        if "sweep" not in cfg.parts or all(len(g) == 1 for g in grids.values()):
            return {k: g[len(g) // 2] for k, g in grids.items()}
        chosen = {}
        budget = top_count(len(lm_split.pool), cfg.data_ratio)
        samples = [lm_split.pool[i] for i in lm_split.random_subset(budget, lm_split.seed)]
        for kind, grid in grids.items():
            key = ("sweep", kind)
            done = self.units.get(*key)
            if done is None:
                rows = []
                for lr in grid:
                    _say(f"sweep {kind}: lr {lr:g}")
                    tc = _train_config(cfg, lr, lm_split.seed)
                    with trained(kind, self.lm, samples, tc, self.units.folder("sweep", f"{kind}-{lr:g}"),
                                 heads=heads, lora_rank=cfg.lora_rank) as (lm, res):
                        ev = evaluate(lm, lm_split.probe, batch_size=max(16, cfg.batch_size),
                                      max_length=cfg.max_length, n_examples=0)
                    rows.append({"lr": lr, "probe_accuracy": ev.accuracy, "probe_loss": ev.loss,
                                 "final_loss": res.final_loss})
                best = max(rows, key=lambda r: ((r["probe_accuracy"] or 0.0), -(r["probe_loss"] or 1e9)))
                done = self.units.put({"grid": rows, "chosen": best["lr"], "split": [lm_split.target, lm_split.seed]},
                                      *key)
            chosen[kind] = float(done["chosen"])
        return chosen

    # -- the whole benchmark ---------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        self.lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        _say(f"model {self.lm.spec} on {self.lm.device} ({self.lm.dtype}); targets {cfg.targets}, seeds "
             f"{cfg.seed_list}, cells {cfg.cells}")
        targets = ["custom"] if cfg.custom_data else cfg.targets
        complete = True
        try:
            self._all(targets)
        except OutOfTime:
            complete = False
            _say(f"time limit of {cfg.max_minutes:g} min reached: reporting what finished; rerun to continue")
        from .report import collect, write_report

        results = collect(self.out / "units", cfg, machine(), model_facts(self.lm), self.lrs or {})
        results["time_s"] = time.perf_counter() - start
        results["complete"] = complete
        write_report(self.out, results)
        _say(f"done in {results['time_s']:.0f} s: {self.out / 'results.md'}")
        return {"results": str(self.out / "results.json"), "report": str(self.out / "results.md"),
                "figure": str(self.out / "aer_vs_accuracy.html"), "time_s": results["time_s"], "complete": complete,
                "summary": results.get("summary")}

    def _all(self, targets) -> None:
        cfg = self.cfg
        lrs = None
        for target in targets:
            for seed in cfg.seed_list:
                split = build_split(cfg, target, seed)
                self.base(split)
                p2d_heads = self.heads(split, cfg.head_method, seed, "heads_p2d")
                if lrs is None:
                    lrs = self.sweep(split, p2d_heads)
                    lrs["random_heads"] = lrs["heads"]
                    self.lrs = lrs
                    _say(f"learning rates: {lrs}")
                rnd_heads = self.heads(split, "random", 10_000 * seed, "heads_random")
                p2d_sel = self.selection(split, p2d_heads, "select_p2d")
                rh_sel = self.selection(split, rnd_heads, "select_random_heads")
                self.random_head_draws(split)
                budget = top_count(len(split.pool), cfg.data_ratio)
                data = {"pool": list(range(len(split.pool))), "random": split.random_subset(budget, seed),
                        "p2d": p2d_sel.selected, "rh_data": rh_sel.selected}
                heads = {"p2d": p2d_heads, "random": rnd_heads}
                if "cells" in cfg.parts:
                    for name in sorted(cfg.cells, key=lambda c: (c.endswith("-pool"), c)):
                        self.cell(split, name, data, heads, lrs)
                if "target_rows" in cfg.parts and seed == cfg.first_seed:
                    self.target_rows(split, p2d_heads, lrs["heads"])
                if "components" in cfg.parts and target == targets[0] and seed == cfg.first_seed:
                    self.components(split, p2d_heads)


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    return Bench(cfg, progress=progress).run()
