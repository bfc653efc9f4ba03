"""A comparison cell: one trainable part trained on one set of rows, measured like every other cell.

P2D's claims are comparisons (P2D's heads against random heads, P2D's data against other data, head
training against LoRA and full fine-tuning). Every such comparison in P2D Studio goes through this
module, so that both sides train and are evaluated the same way:

- `Cell`: what is trained (``trainable``: head slices, LoRA or every weight; for heads, which head set
  and which ``adapter``) on which rows (``data``);
- `random_rows` and `random_heads`: the random rows and the random head sets of the controls, drawn
  one way for the app's controls and the benchmark alike (the controls of a run with seed s train
  the benchmark's draw 0 at seed s: the same rows, the same heads); `matched_heads`: a random head
  set with a reference set's heads per layer and kv groups per layer (the benchmark's heads test);
- `train_cell`: trains it with `p2d.training` (the same batching, answer-token loss, clipping and
  schedule for every trainable part, with the `p2d.training.TrainConfig` of
  `p2d.config.RunConfig.train_config`) and yields the model to evaluate;
- `evaluate_cell`: one evaluation of the target eval set plus the held-out rows of the pool's other
  tasks (greedy generation with exact match, or the cheaper teacher-forced strict match);
- `cell_cost` and `cell_aer`: the cost rule of a cell (training time, plus what its heads and its data
  cost) and its AER against the full fine-tuning reference (`p2d.cost.aer_ratio`: None without one).

Users: `p2d.pipeline.Run` (its training and evaluation), `p2d.controls` (the controls of one run) and
the benchmark (`p2d.bench`). Supported trainable parts: ``heads`` (adapters by name: ``qkvo``, ``qo``,
``offset``, ...: `p2d.adapter.ADAPTERS`), ``lora`` (q, k, v, o of every layer, alpha = 2 x rank) and
``full``. LoRA and full cells train a fresh copy of the model (not supported: quantised or remote-code
models); head cells leave the shared base untouched.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import math
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import load_adapter, parse_adapter
from .cost import aer_ratio
from .data.encoding import encode
from .data.formats import Sample
from .errors import UserError
from .evaluation import EvalResult, evaluate, forced_eval
from .method.heads import HeadScores, score_heads
from .models import LoadedModel, load_model, trainable
from .training import LOG_NAME, TrainConfig, TrainResult, train_heads, train_loop

__all__ = ["Cell", "CELLS", "TRAINABLES", "CellResult", "PeakMemory", "train_cell", "evaluate_cell",
           "cell_cost", "cell_aer", "curve_steps", "random_rows", "random_heads", "matched_heads", "LORA_TARGETS"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TRAINABLES = ("heads", "lora", "full")


@dataclass(frozen=True)
class Cell:
    """One comparison cell. ``data`` names where its rows come from (``p2d``: P2D's selection,
    ``random``: a seeded random sample of the same size, ``pool``: every row, or any other selection
    name); ``heads`` names the head set a head cell trains (``p2d``, ``random`` ...)."""

    trainable: str
    data: str
    heads: str | None = None
    adapter: str | None = None  # head cells: an adapter name (`p2d.adapter.parse_adapter`); None: as the training settings say
    label: str = ""

    def __post_init__(self):
        if self.trainable not in TRAINABLES:
            raise ValueError(f"unknown trainable part {self.trainable!r}")
        if self.adapter is not None:
            try:
                parse_adapter(self.adapter)
            except UserError:
                raise ValueError(f"unknown adapter {self.adapter!r}") from None

    @property
    def uses_heads(self) -> bool:
        return self.trainable == "heads"

    def train_config(self, tc: TrainConfig) -> TrainConfig:
        """``tc`` with this cell's adapter (head cells with an adapter; otherwise unchanged)."""
        if not self.uses_heads or self.adapter is None:
            return tc
        kind, projections = parse_adapter(self.adapter)
        return dataclasses.replace(tc, adapter=kind, projections=projections or tc.projections)


#: the named cells of the classic comparison (the controls of a run use three of them)
CELLS: dict[str, Cell] = {
    "full-pool": Cell("full", "pool", label="full fine-tuning / whole pool (the AER reference, measured)"),
    "full-random": Cell("full", "random", label="full fine-tuning / random 10%"),
    "lora-pool": Cell("lora", "pool", label="LoRA q,k,v,o / whole pool"),
    "lora-random": Cell("lora", "random", label="LoRA q,k,v,o / random 10%"),
    "heads-random": Cell("heads", "random", "p2d", label="P2D heads / random 10%"),
    "randomheads-p2d": Cell("heads", "p2d", "random", label="random heads / P2D data"),
    "heads-rhdata": Cell("heads", "rh_data", "p2d", label="P2D heads / data picked by random heads"),
    "lora-p2d": Cell("lora", "p2d", label="LoRA q,k,v,o / P2D data"),
    "full-p2d": Cell("full", "p2d", label="full fine-tuning / P2D data"),
    "p2d": Cell("heads", "p2d", "p2d", label="P2D heads / P2D data (P2D)"),
}


# ----------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, else the process RSS sampled every 20 ms (both
    as the increase over the level at entry, in MB).

    On the CPU, freed tensors stay in the C allocator's heap (glibc keeps freed chunks below a live one, and
    raises its mmap threshold after large frees), so a block that reuses them would raise no RSS: the
    no-gradient passes read 0-1 MB after an earlier pass. Entry therefore returns the free heap pages to the
    system first (glibc's ``malloc_trim(0)``, `release_free_memory`); the reading is then what the block's own
    allocations need. Without glibc (macOS, musl) the reading may miss memory the block reuses."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        release_free_memory()
        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._max = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.02):
                self._max = max(self._max, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._proc.memory_info().rss)
            self.peak_mb = (self._max - self._base) / 2 ** 20
        return False


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``, every arena); False where
    there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@functools.lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------- training
@dataclass
class CellResult:
    train_s: float
    steps: int
    trainable_params: int
    optimizer_state_bytes: int
    peak_mem_mb: float | None
    final_loss: float | None
    curve: list[dict] = field(default_factory=list)  # [{"step", "train_s", ...evaluation}] (full/LoRA cells)
    curve_cpu_s: float = 0.0  # CPU seconds spent evaluating the curve (not training)
    cpu_s: float = 0.0  # CPU seconds of the training itself (curve evaluations excluded)
    query_heads_changed: int | None = None  # head cells: query heads whose computation the adapter changes
    train: TrainResult | None = None  # head cells: the whole training result (adapter folder, stop reason, ...)


def curve_steps(total_steps: int, points: int) -> set[int]:
    """``points`` steps spread evenly over training, the last step included."""
    return {max(1, math.ceil(total_steps * (i + 1) / points)) for i in range(points)}


@contextmanager
def train_cell(cell: Cell, base: LoadedModel, samples: list[Sample], tc: TrainConfig, out: Path, heads=None,
               lora_rank: int = 8, curve_at=(), curve_eval=None, progress=None, should_stop=None, on_log=None,
               resume: bool = False, checkpoint_every: int = 0, attach: bool = True):
    """Train ``cell`` on ``samples``; yield (the model to evaluate, `CellResult`); clean up afterwards.

    Head cells train ``heads`` (HeadScores or [[layer, head], ...]) with the cell's adapter through
    `p2d.training.train_heads` (``on_log``, ``resume`` and ``checkpoint_every`` as it takes them) and
    evaluate the shared base with the adapter attached (detached on exit); with ``attach=False`` nothing
    is attached and the model yielded is None (the caller evaluates the saved adapter later, as a run's
    evaluation stage does). LoRA and full cells train a fresh copy of ``base`` through the same
    `train_loop`; ``curve_eval(lm) -> dict`` runs after each step in ``curve_at`` off the clock (the
    learning curve).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    if cell.uses_heads:
        if heads is None:
            raise ValueError("a head cell needs its heads")
        with PeakMemory(base.device) as mem:
            tr = train_heads(base, heads, samples, cell.train_config(tc), out, progress=progress,
                             should_stop=should_stop, on_log=on_log, overwrite=True, resume=resume,
                             checkpoint_every=checkpoint_every)
        res = CellResult(tr.time_s, tr.steps_done, tr.trainable_params, tr.optimizer_state_bytes, mem.peak_mb,
                         tr.final_loss, cpu_s=time.process_time() - cpu0, query_heads_changed=tr.query_heads_changed,
                         train=tr)
        if not attach:
            yield None, res
            return
        adapter = load_adapter(base, tr.adapter_dir)
        try:
            yield base, res
        finally:
            adapter.detach()
        return
    lm = None
    try:
        lm = load_model(base.spec, device=str(base.device), dtype=_dtype_name(base.dtype))
        model = lm.model
        if cell.trainable == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            torch.manual_seed(tc.seed)
            cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
            model = inject_adapter_in_model(cfg, model)
            params = [p for n, p in model.named_parameters() if "lora_" in n]
        else:
            params = list(model.parameters())
        encoded = encode(samples, lm.tokenizer, tc.max_length)
        if not encoded:
            raise UserError("no training sample has answer tokens within the max length")
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        curve: list[dict] = []
        last = {"elapsed_s": 0.0}
        paused = [0.0]

        def between(step):
            if step in curve_at and curve_eval is not None:
                c0 = time.process_time()
                cpu_s = c0 - cpu0 - paused[0]  # CPU seconds so far as cpu_s counts them (no curve evaluations)
                with torch.no_grad():
                    point = curve_eval(lm)
                paused[0] += time.process_time() - c0
                curve.append({"step": step, "train_s": last["elapsed_s"], "cpu_s": cpu_s, **point})

        with PeakMemory(lm.device) as mem, trainable(model, params):
            loop = train_loop(model, params, encoded, tc, out / LOG_NAME, pad, lm.device,
                              progress=progress, on_log=lambda r: last.update(r), between_steps=between,
                              should_stop=should_stop)
        yield lm, CellResult(loop.time_s, loop.steps_done, sum(p.numel() for p in params), loop.state_bytes,
                             mem.peak_mb, loop.final_loss, curve, paused[0],
                             cpu_s=time.process_time() - cpu0 - paused[0])
    finally:
        lm = None  # drop the trained copy before the next cell loads its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "auto")


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_cell(lm, eval_samples: list[Sample], other: list[Sample] | None = None, batch_size: int = 16,
                  max_length: int = 256, limit: int | None = None, max_new_tokens: int | None = None,
                  forced: bool = False, n_examples: int = 5, progress=None, should_stop=None) -> EvalResult:
    """The target eval set and, when given, the held-out rows of the pool's other tasks
    (``other_tasks``: accuracy per task, what tuning changed elsewhere).

    ``forced=False``: greedy generation, exact match after normalisation (`p2d.evaluation.evaluate`;
    the run's and the app's figure); a row with a behaviour check (`p2d.checks`) is scored by its check,
    and ``other_checks`` holds the other rows' check parts (the false-refusal rate of the alignment
    pools' ``refusal`` target). ``forced=True``: teacher-forced strict greedy match and answer loss per
    row (`p2d.evaluation.forced_eval`, about ten times cheaper; the benchmark's figure, but only a proxy
    on rows with a behaviour check), with the per-row values in ``per_row`` for paired statistics. A stop
    request ends early (``partial``).
    """
    eval_samples = list(eval_samples)[:limit] if limit else list(eval_samples)
    if forced:
        fe = forced_eval(lm, eval_samples, batch_size=batch_size, max_length=max_length)
        res = EvalResult(fe.accuracy, fe.mean_loss, len(eval_samples), metric="strict", by_task=fe.by_task(),
                         per_row={"strict": fe.to_dict()["strict"], "loss": fe.to_dict()["row_loss"]}, tokens=fe.tokens)
        if other:
            res.other_tasks = forced_eval(lm, other, batch_size=batch_size, max_length=max_length).by_task()
        return res
    res = evaluate(lm, eval_samples, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
                   n_examples=n_examples, progress=progress, should_stop=should_stop)
    if other and not res.partial:
        oth = evaluate(lm, other, batch_size=batch_size, max_length=max_length, n_examples=0, progress=progress,
                       should_stop=should_stop)
        res.other_tasks, res.other_checks, res.partial = oth.by_task, oth.checks, oth.partial
    return res


# ----------------------------------------------------------------------------------------- cost
def cell_cost(train_s: float, heads_s: float = 0.0, select_s: float = 0.0) -> float:
    """A cell's cost in seconds: its training, plus the head scoring it relies on (``heads_s``: the
    scored heads it trains, or that chose its data) and the selection pass that picked its rows
    (``select_s``). Random heads and random rows cost nothing to pick."""
    return train_s + heads_s + select_s


def cell_aer(cost_s: float, reference_s: float | None) -> float | None:
    """A cell's AER: its cost over the full fine-tuning reference's time; None without a reference
    (the one rule of `p2d.cost.aer_ratio`)."""
    return aer_ratio(cost_s, reference_s)


# ----------------------------------------------------------------------------------------- random draws
#: the seed domain of `random_rows` (the benchmark's since its first units: they stay reproducible)
RANDOM_ROWS_SALT = "bench-random"


def random_rows(n_pool: int, n: int, seed: int) -> list[int]:
    """``n`` pool positions (at most the pool) drawn at random for seed ``seed``, sorted: the rows of
    the random-data control of a run and of the benchmark's random selection."""
    return sorted(random.Random(f"{RANDOM_ROWS_SALT}:{seed}").sample(range(n_pool), min(n, n_pool)))


def random_heads(lm, ratio: float, seed: int, draw: int = 0) -> HeadScores:
    """The ``draw``-th random head set of seed ``seed``: the ``random`` head method
    (`p2d.method.heads.score_heads`) at torch seed ``10_000 * seed + draw + 1``, ``ratio`` of the heads.
    A run's random-heads control (seed s) is draw 0 of seed s, the benchmark's ``random0``."""
    return score_heads(lm, [], method="random", ratio=ratio, seed=10_000 * int(seed) + int(draw) + 1)


#: matched draws use torch seeds ``10_000 * seed + MATCHED_OFFSET + draw + 1``, apart from `random_heads`'
MATCHED_OFFSET = 5_000


def matched_heads(lm, reference, seed: int, draw: int = 0) -> HeadScores:
    """The ``draw``-th random head set of seed ``seed`` matched to ``reference`` (HeadScores or
    [[layer, head], ...]): in every layer as many query heads as the reference there, spread over as
    many kv groups (grouped-query attention) as the reference touches there, so the same layer
    distribution, kv groups touched and (for every adapter) trainable parameters. The randomness is
    `random_heads`' recipe (the ``random`` head method's uniform scores, at torch seed
    ``10_000 * seed + MATCHED_OFFSET + draw + 1``): per layer the kv groups whose best head scores
    highest, the best head of each, then the best remaining heads of those groups."""
    geo = lm.geometry
    ref = reference.selected if isinstance(reference, HeadScores) else reference
    per_layer: dict[int, set[int]] = {}
    for layer, head in ref:
        per_layer.setdefault(int(layer), set()).add(int(head))
    hs = score_heads(lm, [], method="random", ratio=len(ref) / geo.n_heads_total,
                     seed=10_000 * int(seed) + MATCHED_OFFSET + int(draw) + 1)
    chosen: list[tuple[float, list[int]]] = []
    for layer, heads in per_layer.items():
        score = hs.scores[layer]
        groups: dict[int, list[int]] = {}
        for h in range(geo.n_q_heads):
            groups.setdefault(geo.kv_head(h), []).append(h)
        for g in groups.values():
            g.sort(key=lambda h: -score[h])
        n_groups = len({geo.kv_head(h) for h in heads})
        picked_groups = sorted(groups, key=lambda g: -score[groups[g][0]])[:n_groups]
        picked = [groups[g][0] for g in picked_groups]
        rest = sorted((h for g in picked_groups for h in groups[g][1:]), key=lambda h: -score[h])
        picked += rest[:len(heads) - len(picked)]
        chosen += [(score[h], [layer, h]) for h in picked]
    selected = [lh for _, lh in sorted(chosen, key=lambda x: -x[0])]
    return dataclasses.replace(hs, method="matched", selected=selected,
                               extra={**hs.extra, "matched_to": [list(map(int, x)) for x in ref]})
