"""One split of the benchmark at one seed: a `p2d.pipeline.Run`, and the folder its units go in.

A split is a pool and a target (``builtin-hard:addition``, ``builtin:dates``, or ``custom``: your
files). At a seed it is the run of `p2d.bench.config.BenchConfig.run_config` in the unit folder
``units/<split>/seed<seed>/``: the run's load stage gives the data, its heads and select stages
P2D's heads and P2D's selection, kept and checked by the run's own manifest (``stages.json``) like
any run's. The benchmark's units of that split and seed (`p2d.manifest.EntryFiles`, one JSON file
each) sit beside the run's files; what a unit trains or writes goes into its own subfolder.

Two benchmark processes working on the same split and seed at once may both compute a stage of its
run (the result is the same; the last write wins).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..manifest import EntryFiles
from ..method.scoring import top_count
from ..pipeline import Run
from .config import BenchConfig

__all__ = ["Split", "folder_name"]


def folder_name(split: str) -> str:
    """The folder (and unit-key part) of a split: ``builtin-hard:addition`` -> ``builtin-hard-addition``."""
    return split.replace(":", "-")


class Split:
    """The split ``name`` at ``seed``: its run (``run``; the model ``lm`` is shared, ``progress`` its
    callback), the run's data (``pool``, ``probe``, ``eval``, ``other``: held-out rows of the pool's
    other tasks), the target label and the pool's labels, the data budget (``budget`` rows) and the
    unit key prefix (``key``)."""

    def __init__(self, cfg: BenchConfig, name: str, seed: int, units: EntryFiles, lm=None, progress=None):
        self.name, self.seed = name, seed
        self.key = (folder_name(name), f"seed{seed}")
        self.units = units
        root = units.root.joinpath(*self.key)
        config = cfg.run_config(name, seed).replace(out=str(root), report_to="none")
        self.run = Run.open(root, config=config, lm=lm, progress=progress)
        if self.run.is_done("load"):
            self.run.require_data()
        else:
            self.run.run(["load"])
        data = self.run.data
        self.pool = data.pool.samples
        self.probe = data.probe.samples
        self.eval = data.eval.samples if data.eval is not None else []
        self.other = data.other.samples if data.other is not None else []
        if not self.eval:
            raise UserError(f"the split {name} has no eval rows: raise eval_size or give an eval file")
        self.target = cfg.target_label if name == "custom" else self.config.target
        self.labels = [s.task for s in self.pool]
        self.budget = top_count(len(self.pool), cfg.data_ratio)

    @property
    def config(self):
        """The run settings of this split and seed (`p2d.config.RunConfig`)."""
        return self.run.config

    def folder(self, unit: str) -> Path:
        """The subfolder of ``unit`` (created)."""
        p = self.units.root.joinpath(*self.key, unit)
        p.mkdir(parents=True, exist_ok=True)
        return p
