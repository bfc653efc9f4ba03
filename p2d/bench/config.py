"""Benchmark settings (`python -m p2d bench` flags and its --config YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import normalize_fields, setting
from ..heads import DEFAULT_HEAD_METHOD, HEAD_METHODS
from ..selection import DEFAULT_POSITIONS, DEFAULT_SELECT_METHOD, POSITIONS, SELECT_METHODS

#: trainable part x training data; every cell trains the same epochs over its own data
CELLS = {
    "full-pool": ("full", "pool", "full fine-tuning / whole pool (the AER reference, measured)"),
    "full-random": ("full", "random", "full fine-tuning / random 10%"),
    "lora-pool": ("lora", "pool", "LoRA q,k,v,o / whole pool"),
    "lora-random": ("lora", "random", "LoRA q,k,v,o / random 10%"),
    "heads-random": ("heads", "random", "P2D heads / random 10%"),
    "randomheads-p2d": ("random_heads", "p2d", "random heads / P2D data"),
    "heads-rhdata": ("heads", "rh_data", "P2D heads / data picked by random heads"),
    "lora-p2d": ("lora", "p2d", "LoRA q,k,v,o / P2D data"),
    "full-p2d": ("full", "p2d", "full fine-tuning / P2D data"),
    "p2d": ("heads", "p2d", "P2D heads / P2D data (P2D)"),
}
PARTS = ("sweep", "cells", "target_rows", "components")
DEFAULT_TARGETS = ("addition", "capitals")  # a numeric and a word answer (exact match is meaningful)


@dataclass
class BenchConfig:
    """Benchmark P2D against full fine-tuning, LoRA and its own controls at equal data budget and epochs.

    Every cell is measured (no estimates). Results go to ``out``: ``results.json``, ``results.md``
    and ``aer_vs_accuracy.html``; finished units are kept and skipped by a rerun (resumable).
    """

    model: str = setting("default", "model", "Model", "model spec (default: the embedded SmolLM2-135M-Instruct)")
    device: str = setting("auto", "model", "Device", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = setting("auto", "model", "Precision", "auto (bf16 on CUDA, else fp32), fp32, bf16 or fp16",
                         choices=("auto", "fp32", "bf16", "fp16"))
    pool: str | None = setting(None, "data", "Pool file", "your pool file (none: the built-in task pool)")
    probe: str | None = setting(None, "data", "Probe file", "your probe file (target examples)")
    eval: str | None = setting(None, "data", "Eval file", "your eval file (target task)")
    columns: dict | None = setting(None, "data", "Column mapping", "column mapping for your files")
    target_label: str | None = setting(None, "data", "Target label", "your files: the pool's task label of the target "
                                       "rows (gives selection precision and AUROC)")
    targets: list[str] = setting(None, "data", "Targets", "built-in targets, each benchmarked on its own pool",
                                 factory=lambda: list(DEFAULT_TARGETS))
    seeds: int = setting(3, "data", "Seeds", "seeds per target (pool, training order, random controls)", minimum=1)
    first_seed: int = setting(0, "data", "First seed", "seeds are first_seed, first_seed+1, ...", minimum=0)
    sweep_seed: int | None = setting(None, "data", "Sweep seed", "seed of the first target's split the learning "
                                     "rates are swept on (none: the first seed); lets seeds run in separate "
                                     "processes with one sweep", minimum=0)
    pool_size: int = setting(400, "data", "Pool size", "built-in pool rows (10% target)", minimum=20)
    probe_size: int = setting(64, "data", "Probe size", "target rows used to find heads and to sweep learning rates",
                              minimum=4)
    eval_size: int = setting(50, "data", "Eval size", "target rows the accuracy is measured on", minimum=4)
    other_eval_size: int = setting(5, "data", "Forgetting rows", "held-out rows of every other task (forgetting)",
                                   minimum=0)
    max_length: int = setting(256, "data", "Max tokens per sample", "samples are truncated to this many tokens",
                              minimum=8)
    batch_size: int = setting(8, "data", "Batch size", "samples per step in every cell", minimum=1)
    head_method: str = setting(DEFAULT_HEAD_METHOD, "heads", "Head method", "P2D's head scoring", choices=HEAD_METHODS)
    select_method: str = setting(DEFAULT_SELECT_METHOD, "select", "Selection method", "P2D's data selection",
                                 choices=SELECT_METHODS)
    positions: str = setting(DEFAULT_POSITIONS, "heads", "Answer positions", "where P2D's head and sample statistics "
                             "are taken (all answer positions, or content ones)", choices=POSITIONS)
    head_ratio: float = setting(0.1, "heads", "Share of heads", "share of query heads P2D trains", above=0.0,
                                maximum=1.0)
    data_ratio: float = setting(0.1, "select", "Share of the pool", "data budget of the 10% cells", above=0.0,
                                maximum=1.0)
    epochs: float = setting(3.0, "train", "Epochs", "passes over each cell's own data (the reference's too)",
                            above=0.0)
    cells: list[str] = setting(None, "train", "Cells", "which cells to run", choices=tuple(CELLS),
                               factory=lambda: list(CELLS))
    lr_heads: list[str] = setting(None, "train", "Head learning rates", "sweep grid for head training",
                                  factory=lambda: ["3e-4", "1e-3", "3e-3"])
    lr_lora: list[str] = setting(None, "train", "LoRA learning rates", "sweep grid for LoRA",
                                 factory=lambda: ["3e-4", "1e-3", "3e-3"])
    lr_full: list[str] = setting(None, "train", "Full learning rates", "sweep grid for full fine-tuning",
                                 factory=lambda: ["1e-5", "3e-5", "1e-4"])
    lora_rank: int = setting(8, "train", "LoRA rank", "LoRA rank (alpha = 2 x rank)", minimum=1)
    random_head_draws: int = setting(10, "heads", "Random-head draws", "draws of random heads for the selection "
                                     "precision control", minimum=1)
    curve_points: int = setting(4, "cost", "Curve points", "evaluations along full fine-tuning (AER at equal accuracy)",
                                minimum=1)
    target_rows: list[str] = setting(None, "data", "Target-row points", "shares of the data budget filled with target "
                                     "rows for the accuracy-vs-target-rows curve",
                                     factory=lambda: ["0", "0.25", "0.5", "1"])
    parts: list[str] = setting(None, "output", "Parts", "what to run", choices=PARTS, factory=lambda: list(PARTS))
    quick: bool = setting(False, "output", "Quick", "smoke size: 1 target, 1 seed, small pool, no sweep (30 min on "
                          "the 2-core development machine, with the test suite running beside it for 13 of them)")
    threads: int = setting(0, "output", "Threads", "torch CPU threads (0: torch's default); with 1 the CPU seconds "
                           "of each unit are robust to other load on the machine", minimum=0)
    max_minutes: float | None = setting(None, "output", "Time limit", "start no new unit after this many minutes; "
                                        "the report covers what finished (rerun to continue)", above=0.0)
    out: str = setting("runs/bench", "output", "Output folder", "results and finished units (rerun to resume)")

    def __post_init__(self):
        normalize_fields(self)
        for name in ("lr_heads", "lr_lora", "lr_full", "target_rows"):
            try:
                setattr(self, name, [str(float(x)) for x in getattr(self, name)])
            except ValueError:
                from ..errors import UserError

                raise UserError(f"{name} must be a list of numbers, got {getattr(self, name)!r}") from None
        if self.quick:
            self.targets = self.targets[:1]
            self.seeds = 1
            self.pool_size = min(self.pool_size, 160)
            self.probe_size = min(self.probe_size, 24)
            self.eval_size = min(self.eval_size, 24)
            self.other_eval_size = min(self.other_eval_size, 3)
            self.max_length = min(self.max_length, 128)
            self.random_head_draws = min(self.random_head_draws, 2)
            self.curve_points = min(self.curve_points, 2)
            self.target_rows = [self.target_rows[0], self.target_rows[-1]]
            for name in ("lr_heads", "lr_lora", "lr_full"):  # no sweep: the middle of each grid
                grid = getattr(self, name)
                setattr(self, name, [grid[len(grid) // 2]])

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def anchor_seed(self) -> int:
        """The seed the learning rates are swept on and the one-seed parts (target rows, components) run at."""
        return self.first_seed if self.sweep_seed is None else self.sweep_seed

    @property
    def custom_data(self) -> bool:
        return bool(self.pool)
