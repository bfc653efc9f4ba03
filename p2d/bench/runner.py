"""`python -m p2d bench`: run the benchmark units, resumably, and write the report.

Units (each saved as JSON under ``out/units/`` when it finishes): per target and seed the base
model's accuracy, P2D's heads and selection, random heads and the data they select, the random-head
precision draws, every training cell, and (first seed) the accuracy-vs-target-rows curve; once, the
learning-rate sweep on the probe set and the component figures. A unit records the settings it
depends on and is reused by a rerun whose settings agree on those (so the baseline cells survive a
change of P2D's methods). Every timed piece records wall seconds and the process's CPU seconds:
with ``threads 1`` the CPU seconds are what the work costs whatever else the machine is doing.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..files import read_json, write_json
from ..heads import HeadScores, score_heads, top_count
from ..models import load_model
from ..selection import Selection, select_data
from ..training import TrainConfig
from .cells import Split, build_split, curve_steps, eval_summary, model_facts, precision_auroc, trained
from .config import CELLS, BenchConfig

#: settings every unit depends on (the model, the data of a split, batching)
COMMON = ("model", "device", "dtype", "pool", "probe", "eval", "columns", "target_label", "pool_size", "probe_size",
          "eval_size", "other_eval_size", "max_length", "batch_size", "threads")
HEADS = ("head_method", "head_ratio", "positions")
SELECT = ("select_method", "data_ratio", "positions")


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


class Clock:
    """Wall and CPU seconds of a block (``with Clock() as c: ...; c.wall_s, c.cpu_s``)."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s, self.cpu_s = time.perf_counter() - self._w, time.process_time() - self._c
        return False


class Units:
    """Finished units as JSON files; a unit is reused only when the settings it depends on agree."""

    def __init__(self, root: Path, cfg: BenchConfig, deadline: float | None = None):
        self.root = root
        self.cfg = cfg
        self.deadline = deadline

    def sig(self, *names: str, **extra) -> dict:
        return {n: getattr(self.cfg, n) for n in COMMON + names} | extra

    def path(self, parts) -> Path:
        return self.root.joinpath(*parts[:-1], parts[-1] + ".json")

    def get(self, parts, sig: dict):
        data = read_json(self.path(parts))
        if data and data.get("signature") == sig:
            return data["result"]
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise OutOfTime()  # not done, and no time to start it
        return None

    def put(self, result, parts, sig: dict):
        write_json(self.path(parts), {"signature": sig, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "machine": machine(), "result": result})
        return result

    def folder(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def _train_config(cfg: BenchConfig, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=cfg.epochs, lr=lr, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=seed)


class Bench:
    def __init__(self, cfg: BenchConfig, progress=None):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.out)
        deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else None
        self.units = Units(self.out / "units", cfg, deadline)
        self.lm = None
        self.lrs: dict | None = None

    def _key(self, split: Split, name: str) -> tuple:
        return (split.target, f"seed{split.seed}", name)

    def sig_for(self, name: str) -> dict | None:
        """The settings unit ``name`` depends on (None: unknown until the learning rates are chosen)."""
        u, cfg = self.units, self.cfg
        if name == "base":
            return u.sig()
        if name == "heads_p2d":
            return u.sig("head_ratio", "positions", head_method=cfg.head_method)
        if name == "heads_random":
            return u.sig("head_ratio", head_method="random")
        if name == "select_p2d":
            return u.sig(*HEADS, *SELECT)
        if name == "select_random_heads":
            return u.sig("head_ratio", *SELECT)
        if name == "random_head_draws":
            return u.sig("head_ratio", *SELECT, draws=cfg.random_head_draws)
        if self.lrs is None:
            return None
        if name.startswith("cell-"):
            return self.cell_sig(name[5:], self.lrs[CELLS[name[5:]][0]])
        if name == "target_rows":
            return u.sig("epochs", *HEADS, "data_ratio", lr=self.lrs["heads"], points=cfg.target_rows)
        raise KeyError(name)

    def result(self, target: str, seed: int, name: str):
        """A finished unit's result for the current settings, else None (for the report)."""
        sig = self.sig_for(name)
        data = read_json(self.units.path((target, f"seed{seed}", name)))
        return data["result"] if sig is not None and data and data.get("signature") == sig else None

    # -- per split ------------------------------------------------------------------------------
    def base(self, split: Split) -> dict:
        key, sig = self._key(split, "base"), self.sig_for("base")
        done = self.units.get(key, sig)
        if done is None:
            _say(f"{split.target} seed {split.seed}: base model")
            done = self.units.put(eval_summary(self.lm, split, self.cfg.batch_size, self.cfg.max_length), key, sig)
        return done

    def heads(self, split: Split, method: str, seed: int, name: str) -> HeadScores:
        key, sig = self._key(split, name), self.sig_for(name)
        folder = self.units.folder(*key)
        if self.units.get(key, sig) is not None:
            return HeadScores.load(folder)
        _say(f"{split.target} seed {split.seed}: heads ({method})")
        with Clock() as clock:
            hs = score_heads(self.lm, split.probe, method=method, ratio=self.cfg.head_ratio, pool=split.pool,
                             seed=seed, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                             positions=self.cfg.positions, progress=self.progress)
        hs.save(folder)
        self.units.put({"time_s": hs.time_s, "cpu_s": clock.cpu_s, "selected": hs.selected, "method": method}, key,
                       sig)
        return hs

    def selection(self, split: Split, heads: HeadScores, name: str) -> Selection:
        key, sig = self._key(split, name), self.sig_for(name)
        folder = self.units.folder(*key)
        if self.units.get(key, sig) is not None:
            return Selection.load(folder)
        _say(f"{split.target} seed {split.seed}: selection {name} ({self.cfg.select_method})")
        with Clock() as clock:
            sel = select_data(self.lm, heads, split.pool, method=self.cfg.select_method, ratio=self.cfg.data_ratio,
                              probe=split.probe, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                              seed=split.seed, positions=self.cfg.positions, progress=self.progress)
        sel.save(folder, split.pool)
        self.units.put({"time_s": sel.time_s, "cpu_s": clock.cpu_s,
                        **precision_auroc(sel.scores, sel.selected, split.is_target),
                        "task_counts": sel.task_counts(split.pool)}, key, sig)
        return sel

    def random_head_draws(self, split: Split) -> dict | None:
        key, sig = self._key(split, "random_head_draws"), self.sig_for("random_head_draws")
        done = self.units.get(key, sig)
        if done is not None or split.is_target is None:
            return done
        _say(f"{split.target} seed {split.seed}: {self.cfg.random_head_draws} random-head selection draws")
        draws = []
        for d in range(self.cfg.random_head_draws):
            hs = score_heads(self.lm, split.probe, method="random", ratio=self.cfg.head_ratio,
                             seed=10_000 * split.seed + d + 1)
            sel = select_data(self.lm, hs, split.pool, method=self.cfg.select_method, ratio=self.cfg.data_ratio,
                              probe=split.probe, batch_size=self.cfg.batch_size, max_length=self.cfg.max_length,
                              seed=split.seed, positions=self.cfg.positions)
            draws.append(precision_auroc(sel.scores, sel.selected, split.is_target))
        return self.units.put({"draws": draws}, key, sig)

    def cell_sig(self, name: str, lr: float) -> dict:
        kind, data, _ = CELLS[name]
        names = ["epochs"]
        if kind in ("heads", "random_heads"):
            names += HEADS
        if data in ("p2d", "rh_data"):
            names += SELECT
        if data == "random":
            names.append("data_ratio")
        extra = {"lr": lr, "curve_points": self.cfg.curve_points if name == "full-pool" else None}
        if kind == "lora":
            extra["lora_rank"] = self.cfg.lora_rank
        return self.units.sig(*dict.fromkeys(names), **extra)

    def cell(self, split: Split, name: str, data: dict, heads: dict, lrs: dict[str, float]) -> dict | None:
        kind, data_name, _ = CELLS[name]
        key, sig = self._key(split, f"cell-{name}"), self.cell_sig(name, lrs[kind])
        done = self.units.get(key, sig)
        if done is not None:
            return done
        if data.get(data_name) is None or (kind in ("heads", "random_heads")
                                           and heads.get("random" if kind == "random_heads" else "p2d") is None):
            return None  # its inputs are not part of this invocation (see the parts)
        samples = [split.pool[i] for i in data[data_name]]
        tc = _train_config(self.cfg, lrs[kind], split.seed)
        steps = tc.planned_steps(len(samples))
        points = curve_steps(steps, self.cfg.curve_points) if name == "full-pool" else set()

        def curve_eval(lm):
            from ..evaluation import evaluate

            return evaluate(lm, split.eval, batch_size=max(16, self.cfg.batch_size), max_length=self.cfg.max_length,
                            n_examples=0)

        _say(f"{split.target} seed {split.seed}: cell {name} ({len(samples)} rows, {steps} steps, lr {lrs[kind]:g})")
        cpu0 = time.process_time()
        with trained("heads" if kind == "random_heads" else kind, self.lm, samples, tc,
                     self.units.folder(*key), heads=heads.get("random" if kind == "random_heads" else "p2d"),
                     lora_rank=self.cfg.lora_rank, curve_steps=points, curve_eval=curve_eval) as (lm, res):
            train_cpu = time.process_time() - cpu0 - res.curve_cpu_s
            result = {"cell": name, "kind": kind, "data": data_name, "rows": len(samples), "lr": lrs[kind],
                      "cpu_s": train_cpu, **asdict(res),
                      **eval_summary(lm, split, self.cfg.batch_size, self.cfg.max_length)}
        return self.units.put(result, key, sig)

    def target_rows(self, split: Split, heads: HeadScores, lr: float) -> dict | None:
        """P2D heads trained on budget-sized sets holding a growing number of target rows."""
        key, sig = self._key(split, "target_rows"), self.sig_for("target_rows")
        done = self.units.get(key, sig)
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
        return self.units.put({"points": points}, key, sig)

    def components(self, split: Split, heads: HeadScores) -> dict:
        from .components import component_figures

        key, sig = ("components",), self.units.sig(*HEADS, *SELECT, "lora_rank")
        done = self.units.get(key, sig)
        if done is None:
            _say(f"component figures on {split.target} seed {split.seed}")
            done = self.units.put(component_figures(self.lm, split, self.cfg, heads.selected), key, sig)
        return done

    # -- learning rates ---------------------------------------------------------------------------
    def sweep(self, split: Split, heads: HeadScores | None) -> dict[str, float]:
        """Best learning rate per trainable kind: each grid value trains on a random data-budget sample of
        the first split and is scored on the probe set (exact match, then answer loss); never the eval
        set. One grid value (as with --quick) means no sweep."""
        from ..evaluation import evaluate

        cfg = self.cfg
        grids = {kind: [float(x) for x in getattr(cfg, attr)] for kind, attr in
                 (("heads", "lr_heads"), ("lora", "lr_lora"), ("full", "lr_full"))}
        chosen = {}
        budget = top_count(len(split.pool), cfg.data_ratio)
        samples = [split.pool[i] for i in split.random_subset(budget, split.seed)]
        for kind, grid in grids.items():
            if "sweep" not in cfg.parts or len(grid) == 1:
                chosen[kind] = grid[len(grid) // 2]
                continue
            if kind == "heads" and heads is None:
                continue  # needs P2D's heads, which this invocation does not compute
            key = ("sweep", kind)
            sig = self.units.sig("epochs", "data_ratio", *(HEADS if kind == "heads" else ()), grid=grid,
                                 split=[split.target, split.seed],
                                 lora_rank=cfg.lora_rank if kind == "lora" else None)
            done = self.units.get(key, sig)
            if done is None:
                rows = []
                for lr in grid:
                    _say(f"sweep {kind}: lr {lr:g}")
                    tc = _train_config(cfg, lr, split.seed)
                    with trained(kind, self.lm, samples, tc, self.units.folder("sweep", f"{kind}-{lr:g}"),
                                 heads=heads, lora_rank=cfg.lora_rank) as (lm, res):
                        ev = evaluate(lm, split.probe, batch_size=max(16, cfg.batch_size),
                                      max_length=cfg.max_length, n_examples=0)
                    rows.append({"lr": lr, "probe_accuracy": ev.accuracy, "probe_loss": ev.loss,
                                 "final_loss": res.final_loss})
                best = max(rows, key=lambda r: ((r["probe_accuracy"] or 0.0), -(r["probe_loss"] or 1e9)))
                done = self.units.put({"grid": rows, "chosen": best["lr"], "split": [split.target, split.seed]},
                                      key, sig)
            chosen[kind] = float(done["chosen"])
        return chosen

    def _sweep_on(self, split: Split, first_target: str, p2d_heads: HeadScores | None) -> dict[str, float]:
        """The sweep on the first target's split at ``sweep_seed`` (the current split when unset)."""
        seed = self.cfg.anchor_seed
        if (split.target, split.seed) == (first_target, seed):
            return self.sweep(split, p2d_heads)
        other = build_split(self.cfg, first_target, seed)
        heads = self.heads(other, self.cfg.head_method, seed, "heads_p2d") if p2d_heads is not None else None
        return self.sweep(other, heads)

    # -- the whole benchmark ---------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        _say(f"model {self.lm.spec} on {self.lm.device} ({self.lm.dtype}, {torch.get_num_threads()} threads); "
             f"targets {cfg.targets}, seeds {cfg.seed_list}, cells {cfg.cells}, parts {cfg.parts}")
        targets = ["custom"] if cfg.custom_data else cfg.targets
        complete = True
        try:
            self._all(targets)
        except OutOfTime:
            complete = False
            _say(f"time limit of {cfg.max_minutes:g} min reached: reporting what finished; rerun to continue")
        from .report import collect, write_report

        results = collect(self, machine(), model_facts(self.lm))
        results["time_s"] = time.perf_counter() - start
        results["complete"] = complete
        write_report(self.out, results)
        _say(f"done in {results['time_s']:.0f} s: {self.out / 'results.md'}")
        return {"results": str(self.out / "results.json"), "report": str(self.out / "results.md"),
                "figure": str(self.out / "aer_vs_accuracy.html"), "time_s": results["time_s"], "complete": complete,
                "summary": results.get("summary")}

    def _all(self, targets) -> None:
        cfg = self.cfg
        p2d_cells = [c for c in cfg.cells if CELLS[c][0] in ("heads", "random_heads") or CELLS[c][1] in ("p2d", "rh_data")]
        need_p2d = bool(p2d_cells) and "cells" in cfg.parts or "target_rows" in cfg.parts or "components" in cfg.parts
        for target in targets:
            for seed in cfg.seed_list:
                split = build_split(cfg, target, seed)
                self.base(split)
                p2d_heads = self.heads(split, cfg.head_method, seed, "heads_p2d") if need_p2d else None
                if self.lrs is None:
                    self.lrs = self._sweep_on(split, targets[0], p2d_heads)
                    self.lrs.setdefault("heads", float(cfg.lr_heads[len(cfg.lr_heads) // 2]))
                    self.lrs["random_heads"] = self.lrs["heads"]
                    _say(f"learning rates: {self.lrs}")
                budget = top_count(len(split.pool), cfg.data_ratio)
                data = {"pool": list(range(len(split.pool))), "random": split.random_subset(budget, seed)}
                heads = {}
                if need_p2d:
                    rnd_heads = self.heads(split, "random", 10_000 * seed, "heads_random")
                    p2d_sel = self.selection(split, p2d_heads, "select_p2d")
                    rh_sel = self.selection(split, rnd_heads, "select_random_heads")
                    self.random_head_draws(split)
                    data.update(p2d=p2d_sel.selected, rh_data=rh_sel.selected)
                    heads = {"p2d": p2d_heads, "random": rnd_heads}
                if "cells" in cfg.parts:
                    for name in sorted(cfg.cells, key=lambda c: (c.endswith("-pool"), c)):
                        self.cell(split, name, data, heads, self.lrs)
                if "target_rows" in cfg.parts and seed == cfg.anchor_seed:
                    self.target_rows(split, p2d_heads, self.lrs["heads"])
                if "components" in cfg.parts and target == targets[0] and seed == cfg.anchor_seed:
                    self.components(split, p2d_heads)


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    return Bench(cfg, progress=progress).run()
