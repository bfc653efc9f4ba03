"""The benchmark's units of work: data splits, what is trained, and one measured training cell.

Every cell trains with `p2d.training.train_loop` (the same batching, loss path, clipping and schedule)
for the same number of epochs over its own data; only the trainable part differs:

- ``heads``: the head adapter of `p2d.training.train_heads` (q/k/v/o slices of the chosen heads);
- ``lora``: LoRA on q, k, v and o of every layer (peft's ``inject_adapter_in_model``; alpha = 2r);
- ``full``: every parameter.

Full and LoRA cells train a fresh copy of the model; head cells leave the shared base untouched.
"""

from __future__ import annotations

import gc
import math
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.encoding import encode
from ..data.formats import Sample
from ..errors import UserError
from ..evaluation import evaluate
from ..models import LoadedModel, count_params, load_model, trainable
from ..training import TrainConfig, train_heads, train_loop

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Split:
    """The data of one (target, seed): pool, probe, eval and held-out rows of the other tasks."""

    target: str
    seed: int
    pool: list[Sample]
    probe: list[Sample]
    eval: list[Sample]
    other_eval: list[Sample] = field(default_factory=list)
    target_label: str | None = None

    @property
    def is_target(self) -> list[bool] | None:
        if self.target_label is None or not any(s.task is not None for s in self.pool):
            return None
        return [s.task == self.target_label for s in self.pool]

    def random_subset(self, n: int, seed: int) -> list[int]:
        return sorted(random.Random(f"bench-random:{seed}").sample(range(len(self.pool)), min(n, len(self.pool))))


def build_split(cfg, target: str, seed: int) -> Split:
    """A built-in pool for ``target`` (or the user's files) at ``seed``."""
    from ..data.loading import load_data, load_records

    if cfg.custom_data:
        if not cfg.probe or not cfg.eval:
            raise UserError("a benchmark on your own pool needs probe and eval files too")
        pool = load_data(cfg.pool, mapping=cfg.columns).samples
        probe = load_data(cfg.probe, mapping=cfg.columns).samples
        ev = load_data(cfg.eval, mapping=cfg.columns).samples
        return Split(target, seed, pool, probe, ev, [], cfg.target_label)
    from ..data.builtin import build_task_pool

    tp = build_task_pool(target=target, seed=seed, pool_size=cfg.pool_size, probe_size=cfg.probe_size,
                         eval_size=cfg.eval_size, other_eval_size=cfg.other_eval_size)
    return Split(target, seed, load_records(tp.pool).samples, load_records(tp.probe).samples,
                 load_records(tp.eval).samples, load_records(tp.other_eval).samples if tp.other_eval else [], target)


# ----------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, else the process RSS sampled every 20 ms (both
    as the increase over the level at entry, in MB)."""

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


# ----------------------------------------------------------------------------------------- training
@dataclass
class CellResult:
    train_s: float
    steps: int
    trainable_params: int
    optimizer_state_bytes: int
    peak_mem_mb: float | None
    final_loss: float | None
    curve: list[dict] = field(default_factory=list)  # [{"step", "train_s", "accuracy", "contains"}]
    curve_cpu_s: float = 0.0  # CPU seconds spent evaluating the curve (not training)


@contextmanager
def trained(kind: str, base: LoadedModel, samples: list[Sample], tc: TrainConfig, out: Path, heads=None,
            lora_rank: int = 8, curve_steps=(), curve_eval=None, progress=None):
    """Train ``kind`` on ``samples``; yield (model to evaluate, CellResult); clean up afterwards.

    ``curve_eval(lm) -> EvalResult`` runs after each step in ``curve_steps`` off the clock.
    """
    out.mkdir(parents=True, exist_ok=True)
    if kind == "heads":
        from ..adapter import load_adapter

        with PeakMemory(base.device) as mem:
            tr = train_heads(base, heads, samples, tc, out, progress=progress, overwrite=True)
        adapter = load_adapter(base, tr.adapter_dir)
        try:
            yield base, CellResult(tr.time_s, tr.steps_done, tr.trainable_params, tr.optimizer_state_bytes,
                                   mem.peak_mb, tr.final_loss)
        finally:
            adapter.detach()
        return
    lm = None
    try:
        lm = load_model(base.spec, device=str(base.device), dtype=_dtype_name(base.dtype))
        model = lm.model
        if kind == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            torch.manual_seed(tc.seed)
            cfg = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
            model = inject_adapter_in_model(cfg, model)
            params = [p for n, p in model.named_parameters() if "lora_" in n]
        elif kind == "full":
            params = list(model.parameters())
        else:
            raise ValueError(kind)
        encoded = encode(samples, lm.tokenizer, tc.max_length)
        if not encoded:
            raise UserError("no training sample has answer tokens within the max length")
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        curve: list[dict] = []
        last = {"elapsed_s": 0.0}

        paused = [0.0]

        def between(step):
            if step in curve_steps and curve_eval is not None:
                cpu0 = time.process_time()
                with torch.no_grad():
                    res = curve_eval(lm)
                paused[0] += time.process_time() - cpu0
                curve.append({"step": step, "train_s": last["elapsed_s"], "accuracy": res.accuracy,
                              "contains": res.contains, "loss": res.loss})

        with PeakMemory(lm.device) as mem, trainable(model, params):
            loop = train_loop(model, params, encoded, tc, out / "train_log.jsonl", pad, lm.device,
                              progress=progress, on_log=lambda r: last.update(r), between_steps=between)
        yield lm, CellResult(loop.time_s, loop.steps_done, sum(p.numel() for p in params), loop.state_bytes,
                             mem.peak_mb, loop.final_loss, curve, paused[0])
    finally:
        lm = None  # drop the trained copy before the next cell loads its own
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "auto")


def curve_steps(total_steps: int, points: int) -> set[int]:
    """``points`` steps spread evenly over training, the last step included."""
    return {max(1, math.ceil(total_steps * (i + 1) / points)) for i in range(points)}


def eval_summary(lm, split: Split, batch_size: int, max_length: int) -> dict:
    """Target accuracy/contains/loss on the eval set and per-task accuracy on the other tasks' held-out rows."""
    res = evaluate(lm, split.eval, batch_size=max(16, batch_size), max_length=max_length)
    out = {"accuracy": res.accuracy, "contains": res.contains, "loss": res.loss, "n": res.n,
           "examples": res.examples[:3]}
    if split.other_eval:
        other = evaluate(lm, split.other_eval, batch_size=max(16, batch_size), max_length=max_length, n_examples=0)
        out["other_tasks"] = other.by_task
        accs = [v["accuracy"] for v in other.by_task.values()]
        out["other_accuracy"] = sum(accs) / len(accs) if accs else None
    return out


def time_to_reach(curve: list[dict], accuracy: float | None, key: str = "accuracy") -> float | None:
    """Training seconds full fine-tuning needed to reach ``accuracy`` (linear between curve points;
    None when it never did)."""
    if accuracy is None:
        return None
    prev_t, prev_a = 0.0, None
    for point in curve:
        a = point.get(key)
        if a is not None and a >= accuracy:
            if prev_a is None or a == prev_a:
                return point["train_s"]
            frac = (accuracy - prev_a) / (a - prev_a)
            return prev_t + max(0.0, min(1.0, frac)) * (point["train_s"] - prev_t)
        prev_t, prev_a = point["train_s"], a if a is not None else prev_a
    return None


def precision_auroc(scores: list[float], selected: list[int], is_target: list[bool] | None) -> dict:
    """Target share of the selected rows and the AUROC of the scores (labelled pools only)."""
    if is_target is None:
        return {}
    hits = sum(is_target[i] for i in selected)
    return {"precision": hits / max(1, len(selected)), "auroc": auroc(scores, is_target),
            "pool_share": sum(is_target) / max(1, len(is_target))}


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pairs = [(s, p) for s, p in zip(scores, positive) if s is not None and math.isfinite(s)]
    n_pos = sum(p for _, p in pairs)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return None
    pairs.sort(key=lambda t: t[0])
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average ranks over ties
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        rank_sum += ((i + j) / 2 + 1) * sum(p for _, p in pairs[i:j + 1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def model_facts(lm: LoadedModel) -> dict:
    return {"model": lm.spec, "params": count_params(lm.model), "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""), **lm.geometry.to_dict()}


