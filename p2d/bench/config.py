"""Benchmark settings (`python -m p2d bench` flags and its --config YAML).

The settings a benchmark shares with a run (model, data sizes, batching, P2D's methods) are
RunConfig's own fields (`p2d.config.inherited`: same label, help, choices and range; another default
where the benchmark needs one); the rest are the benchmark's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..adapter import ADAPTERS
from ..config import BUILTIN_POOLS, RunConfig, inherited, normalize_fields, pool_targets, setting
from ..errors import UserError
from ..method.heads import HEAD_METHODS

#: the parts of the benchmark, in the order they run for each split (see p2d/bench/benchmark.py)
PARTS = ("precision", "sweep", "rule", "selectors", "heads", "classic", "aer", "components", "heads_test",
         "frontier")
#: what runs without --parts (the component figures of the earlier report, the heads test across a learning-rate
#: grid (p2d/bench/heads_test.py) and the frontier (p2d/bench/frontier.py) are on request)
DEFAULT_PARTS = ("precision", "sweep", "rule", "selectors", "heads", "classic", "aer")
#: selection cells: how the training rows of the same budget are picked (P2D's selection first)
SELECTORS = ("p2d", "tfidf", "bm25", "hidden", "rh-alignment", "random", "answer_shape", "answer_tfidf", "shape_tfidf")
SELECTOR_LABELS = {
    "p2d": "P2D: the selected heads (activation)",
    "tfidf": "TF-IDF of the prompt (no heads, no model)",
    "bm25": "BM25 of the prompt (no heads, no model)",
    "hidden": "mean hidden state, one layer (no heads)",
    "rh-alignment": "gradient alignment on random heads",
    "random": "random rows",
    "answer_shape": "the probe answers' shape (no heads, no model)",
    "answer_tfidf": "TF-IDF of the answer (no heads, no model)",
    "shape_tfidf": "answer shape, then prompt TF-IDF (no heads, no model)",
}
#: cells of the classic comparison kept for continuity (LoRA and full fine-tuning at the same budget)
CLASSIC = ("lora-p2d", "full-p2d", "lora-random", "full-random")
DEFAULT_CLASSIC = ("lora-p2d", "full-p2d")
DEFAULT_SPLITS = ("builtin-hard:addition", "builtin-hard:alphabetical", "builtin-hard:dates",
                  "builtin-hard:past_tense", "builtin:addition", "builtin:dates")
#: where the defaults are chosen (at the choice seed); the other splits were never used for a choice
CHOICE_SPLITS = ("builtin-hard:addition", "builtin-hard:dates", "builtin:addition")
#: the selectors whose rows ``--quick`` trains on (P2D, a prompt reader, an answer reader, random rows)
QUICK_TRAINED = ("p2d", "tfidf", "shape_tfidf", "random")
#: the alignment split of ``--quick`` (a behaviour the base model already has, scarce in the pool)
QUICK_ALIGN_SPLIT = "builtin-align:json"
#: where the heads comparison, the classic cells and the equal-accuracy AER run
HEADS_SPLITS = ("builtin:addition", "builtin-hard:addition")


def _split_choices():
    return tuple(f"{pool}:{t}" for pool in BUILTIN_POOLS for t in pool_targets(pool)) + ("custom",)


#: how the rule judged by training (`p2d.bench.choose`) aggregates over the choice splits: ``worst informative
#: split`` (the second rule, the default) takes the worst of the splits where some candidate learned something
#: measurable (its gain over the untrained model on the held-out rows has a 95% interval above zero); ``worst
#: split`` (the first rule, the one docs/data/rule200 was judged by) takes the worst of all splits, so one split
#: where nothing is learned makes every candidate tie and the rule a cost rule
RULE_AGGREGATES = ("worst informative split", "worst split")


@dataclass
class BenchConfig:
    """Benchmark P2D against selectors without heads, random heads, LoRA and full fine-tuning at equal
    data budget and epochs, on pools where surface words mislead (builtin-hard) and on the plain
    built-in pool.

    Every cell is measured (no estimates). Results go to ``out``: ``results.json``, ``results.md``
    and ``aer_vs_accuracy.html``; finished units are kept and skipped by a rerun (resumable).
    """

    model: str = inherited("model")
    device: str = inherited("device")
    dtype: str = inherited("dtype")
    pool: str | None = inherited("pool", help="your pool file for the split 'custom' (none: the built-in pools)")
    probe: str | None = inherited("probe")
    eval: str | None = inherited("eval")
    columns: dict | None = inherited("columns")
    target_label: str | None = setting(None, "data", "Target label", "your files: the pool's task label of the target "
                                       "rows (gives selection precision and AUROC)")
    splits: list[str] = setting(None, "data", "Splits", "pool:target pairs to benchmark, each on its own pool "
                                "(builtin-hard: the surface words mislead; custom: your files)",
                                choices=_split_choices, factory=lambda: list(DEFAULT_SPLITS))
    choice_splits: list[str] = setting(None, "data", "Choice splits", "the splits the defaults are chosen on "
                                       "(at the choice seed only)", choices=_split_choices,
                                       factory=lambda: list(CHOICE_SPLITS))
    seeds: int = setting(3, "data", "Seeds", "reporting seeds per split (pool, training order, random controls)",
                         minimum=1)
    first_seed: int = setting(0, "data", "First seed", "reporting seeds are first_seed, first_seed+1, ...", minimum=0)
    choice_seed: int = setting(100, "data", "Choice seed", "the seed learning rates and defaults are chosen on "
                               "(never a reporting seed)", minimum=0)
    rule_seeds: int = setting(2, "data", "Rule seeds", "choice seeds the rule judged by training runs at: "
                              "choice_seed, choice_seed+1, ... (p2d/bench/choose.py; never a reporting seed)", minimum=2)
    rule_aggregate: str = setting(RULE_AGGREGATES[0], "data", "Rule aggregate", "how the rule judged by "
                                  "training aggregates over the choice splits: worst informative split (the splits "
                                  "where some candidate beats the untrained model) or worst split (the first rule)",
                                  choices=RULE_AGGREGATES)
    pool_size: int = inherited("pool_size", 400)
    probe_size: int = inherited("probe_size", 64)
    eval_size: int = inherited("eval_size", 300, help="target rows the accuracy is measured on (capped by what a "
                               "task can give)")
    other_eval_size: int = inherited("other_eval_size", 3)
    max_length: int = inherited("max_length", 128)
    batch_size: int = inherited("batch_size")
    head_method: str = inherited("head_method")
    select_method: str = inherited("select_method")
    positions: str = inherited("positions")
    head_ratio: float = inherited("head_ratio")
    data_ratio: float = inherited("data_ratio")
    hidden_layer: int | None = inherited("hidden_layer")
    adapter: str = setting("qkvo", "train", "Adapter", "what the selector cells train on P2D's heads",
                           choices=tuple(ADAPTERS))
    selectors: list[str] = setting(None, "select", "Selectors", "selection cells: the same budget picked by P2D "
                                   "and by selectors without heads", choices=SELECTORS, factory=lambda: list(SELECTORS))
    trained_selectors: list[str] = setting(None, "select", "Trained selectors", "the selectors whose rows are also "
                                           "trained on (the others: selection figures only)", choices=SELECTORS,
                                           factory=lambda: [s for s in SELECTORS if s != "bm25"])
    head_candidates: list[str] = setting(None, "heads", "Head candidates", "head methods whose heads are trained "
                                         "next to P2D's (heads chosen for training value; importance: gate "
                                         "importance on the probe without a contrast)",
                                         choices=lambda: tuple(HEAD_METHODS),
                                         factory=lambda: ["importance", "lofit"])
    adapters: list[str] = setting(None, "heads", "Adapters", "the regimes of the heads comparison",
                                  choices=tuple(ADAPTERS), factory=lambda: list(ADAPTERS))
    heads_splits: list[str] = setting(None, "heads", "Heads splits", "splits the heads comparison (random-head "
                                      "draws, candidates, adapters), the classic cells and the equal-accuracy AER "
                                      "run on", choices=_split_choices, factory=lambda: list(HEADS_SPLITS))
    random_head_draws: int = setting(10, "heads", "Random-head draws", "random head sets per seed: the null "
                                     "distribution of selection precision and of training", minimum=1)
    training_draws: int = setting(10, "heads", "Training draws", "random head sets trained per seed and adapter "
                                  "(at most random_head_draws)", minimum=0)
    classic: list[str] = setting(None, "train", "Classic cells", "LoRA and full fine-tuning cells at the same "
                                 "budget", choices=CLASSIC, factory=lambda: list(DEFAULT_CLASSIC))
    epochs: float = setting(3.0, "train", "Epochs", "passes over each cell's own data (the reference's too)",
                            above=0.0)
    lr_qkvo: list[str] = setting(None, "train", "Head learning rates", "first sweep grid of q,k,v,o head slices "
                                 "(extended while the best is at an edge)", factory=lambda: ["3e-4", "1e-3", "3e-3"])
    lr_qo: list[str] = setting(None, "train", "q,o learning rates", "first sweep grid of q,o head slices",
                               factory=lambda: ["3e-4", "1e-3", "3e-3"])
    lr_offset: list[str] = setting(None, "train", "Offset learning rates", "first sweep grid of the LoFiT-style "
                                   "scale and offset", factory=lambda: ["3e-3", "1e-2", "3e-2"])
    lr_lora: list[str] = setting(None, "train", "LoRA learning rates", "first sweep grid of LoRA",
                                 factory=lambda: ["1e-3", "3e-3", "1e-2"])
    lr_full: list[str] = setting(None, "train", "Full learning rates", "first sweep grid of full fine-tuning",
                                 factory=lambda: ["1e-5", "3e-5", "1e-4"])
    sweep_extend: int = setting(2, "train", "Sweep extensions", "how many times a grid is extended (x3.16) while "
                                "its best value is at an edge", minimum=0)
    lora_rank: int = setting(8, "train", "LoRA rank", "LoRA rank (alpha = 2 x rank)", minimum=1)
    curve_points: int = setting(10, "cost", "Curve points", "evaluations along full fine-tuning of the whole pool "
                                "(the equal-accuracy AER is interpolated on them, from the base model at 0 s)",
                                minimum=1)
    test_draws: int = setting(10, "heads", "Heads-test random draws", "random head sets per seed trained at every "
                              "point of the heads test's learning-rate grid (p2d/bench/heads_test.py)", minimum=1)
    matched_draws: int = setting(10, "heads", "Heads-test matched draws", "random head sets per seed matched to "
                                 "P2D's by layer distribution and kv groups touched (p2d.cells.matched_heads)",
                                 minimum=0)
    test_grid_points: int = setting(3, "heads", "Heads-test grid points", "at least this many learning rates in "
                                    "the heads test's shared grid per adapter (x3.16 apart beyond the sweep grid)",
                                    minimum=3)
    frontier_every: int = setting(0, "cost", "Frontier curve step", "evaluate full fine-tuning of the whole pool "
                                  "every this many steps over its first epoch (0: about ten points)", minimum=0)
    bootstrap: int = setting(2000, "output", "Bootstrap draws", "resamples for the 95% intervals", minimum=100)
    parts: list[str] = setting(None, "output", "Parts", "what to run (components: the cost of each part of a "
                               "step, on request)", choices=PARTS, factory=lambda: list(DEFAULT_PARTS))
    report_only: bool = setting(False, "output", "Report only", "rebuild the report from the finished units; "
                                "compute nothing")
    quick: bool = setting(False, "output", "Quick", "smoke size: one words-mislead split (with the heads "
                          "comparison) and one alignment split (selection and selector cells), one seed, small pool, "
                          "few draws, no sweep (about 15 minutes on 2 idle cores)")
    threads: int = setting(0, "output", "Threads", "torch CPU threads (0: torch's default); with 1 the CPU seconds "
                           "of each unit are robust to other load on the machine", minimum=0)
    max_minutes: float | None = setting(None, "output", "Time limit", "start no new unit after this many minutes; "
                                        "the report covers what finished (rerun to continue)", above=0.0)
    out: str = setting("runs/bench", "output", "Output folder", "results and finished units (rerun to resume)")

    def __post_init__(self):
        normalize_fields(self)
        for name in ("lr_qkvo", "lr_qo", "lr_offset", "lr_lora", "lr_full"):
            try:
                setattr(self, name, [str(float(x)) for x in getattr(self, name)])
            except ValueError:
                raise UserError(f"{name} must be a list of numbers, got {getattr(self, name)!r}") from None
        if self.custom_data and not (self.probe and self.eval):
            raise UserError("a benchmark on your own pool needs probe and eval files too")
        if self.custom_data:
            self.splits = ["custom"]
        if self.quick:
            self.splits = self.splits[:1] if self.custom_data else ["builtin-hard:addition", QUICK_ALIGN_SPLIT]
            self.heads_splits = self.splits[:1]
            self.choice_splits = []
            self.seeds = 1
            self.pool_size = min(self.pool_size, 160)
            self.probe_size = min(self.probe_size, 24)
            self.eval_size = min(self.eval_size, 60)
            self.other_eval_size = min(self.other_eval_size, 2)
            self.max_length = min(self.max_length, 96)
            self.random_head_draws = min(self.random_head_draws, 3)
            self.training_draws = min(self.training_draws, 2)
            self.head_candidates = self.head_candidates[:1]
            self.adapters = [self.adapter, "offset"] if self.adapter != "offset" else ["offset"]
            self.selectors = [s for s in self.selectors if s != "bm25"]
            self.trained_selectors = [s for s in self.trained_selectors if s in QUICK_TRAINED]  # the rest: selection only
            self.classic = []
            self.curve_points = min(self.curve_points, 4)
            self.bootstrap = min(self.bootstrap, 500)
            self.sweep_extend = 0
            for name in ("lr_qkvo", "lr_qo", "lr_offset", "lr_lora", "lr_full"):  # no sweep: the middle of each grid
                grid = getattr(self, name)
                setattr(self, name, [grid[len(grid) // 2]])
        self.training_draws = min(self.training_draws, self.random_head_draws)
        rule = set(range(self.choice_seed, self.choice_seed + self.rule_seeds))
        if rule & set(self.seed_list):
            raise UserError(f"the choice seeds {sorted(rule)} overlap the reporting seeds {self.seed_list}: "
                            "move choice_seed or first_seed")
        bad = [s for s in self.splits if s != "custom" and s.split(":")[0] not in BUILTIN_POOLS]
        if bad:
            raise UserError(f"unknown split {bad[0]!r}: use pool:target with a built-in pool")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def custom_data(self) -> bool:
        return bool(self.pool)

    def run_config(self, split: str, seed: int) -> RunConfig:
        """The run settings of one split at one seed: the benchmark's shared fields and epochs, the split's
        pool and target (what `p2d.pipeline.load_run_data`, the stage functions and every cell's training,
        `RunConfig.train_config`, read; the other training settings are RunConfig's defaults)."""
        shared = {name: getattr(self, name) for name in ("model", "device", "dtype", "columns", "pool_size",
                                                          "probe_size", "eval_size", "other_eval_size", "max_length",
                                                          "batch_size", "head_method", "select_method", "positions",
                                                          "head_ratio", "data_ratio", "hidden_layer")}
        shared["epochs"] = self.epochs  # every cell trains this many passes over its own rows
        if split == "custom":
            return RunConfig(**shared, pool=self.pool, probe=self.probe, eval=self.eval, seed=seed).validate()
        pool, target = split.split(":", 1)
        return RunConfig(**shared, pool=pool, target=target, seed=seed).validate()
