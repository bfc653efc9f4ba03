"""Cost accounting: stage timers, the full fine-tuning reference, and the Alignment Efficiency Ratio.

AER = (t_heads + t_select + t_train) / t_full, where t_full is the time full fine-tuning (all
parameters, AdamW) would take on the whole pool for the same number of epochs with the same batch
settings. Speed-up = 1 / AER.

t_full is either
- "estimated": a few real full fine-tuning steps (forward, backward, AdamW step) on random pool
  batches are timed after one warm-up step; the median seconds/step times the reference step count;
- "measured": every reference step is run and timed (slow: as long as full fine-tuning itself).
Both run AdamW with lr=0, which costs the same as a real step but leaves every weight bit-identical,
so the caller's model is not changed.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch

from .data.encoding import collate, encode
from .data.formats import Sample
from .errors import UserError, is_out_of_memory
from .progress import ProgressFn, StopFn, report


@contextmanager
def timed(record: dict, key: str):
    """`with timed(times, "heads"): ...` stores the wall-clock seconds in times["heads"]."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record[key] = time.perf_counter() - start


@dataclass
class FullFinetuneCost:
    time_s: float            # seconds full fine-tuning would take (or took) on the whole pool
    mode: str                # "estimated" or "measured"
    steps: int               # reference optimizer steps: ceil(n_pool / batch_size) * epochs
    s_per_step: float        # median seconds per full step
    timed_steps: int         # how many steps were actually timed
    epochs: float
    n_pool: int
    batch_size: int
    trainable_params: int
    optimizer_state_bytes: int

    def to_dict(self) -> dict:
        return asdict(self)

    def for_epochs(self, epochs: float) -> "FullFinetuneCost":
        """The same per-step timing extrapolated to another number of epochs ("estimated")."""
        steps = reference_steps(self.n_pool, self.batch_size, epochs)
        return replace(self, time_s=self.s_per_step * steps, mode="estimated", steps=steps, epochs=epochs)


def reference_steps(n_pool: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(math.ceil(n_pool / batch_size) * epochs))


def full_finetune_cost(lm, pool: list[Sample], epochs: float, batch_size: int = 8, max_length: int = 256,
                       mode: str = "estimate", timed_steps: int = 3, seed: int = 0,
                       progress: ProgressFn = None, should_stop: StopFn = None) -> FullFinetuneCost:
    """Time full fine-tuning steps (all parameters, AdamW, lr=0 so weights stay identical)."""
    if not pool:
        raise UserError("cannot estimate full fine-tuning cost on an empty pool")
    model = lm.model
    steps = reference_steps(len(pool), batch_size, epochs)
    # estimate: one warm-up step + `timed_steps` timed ones; measure: every reference step, all timed
    n_runs = steps if mode == "measure" else min(max(1, timed_steps), steps) + 1
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    need = n_runs * batch_size
    picks = [pool[order[i % len(order)]] for i in range(need)]
    encoded = encode(picks, lm.tokenizer, max_length=max_length)
    if not encoded:
        raise UserError("no pool sample has answer tokens within max length: raise --max-length")
    params = [p for p in model.parameters()]
    old_flags = [p.requires_grad for p in params]
    was_training = model.training
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    durations: list[float] = []
    try:
        model.train()
        for i in range(n_runs):
            if should_stop is not None and should_stop():
                break
            chunk = [encoded[(i * batch_size + j) % len(encoded)] for j in range(batch_size)]
            batch = {k: v.to(lm.device) for k, v in collate(chunk, lm.tokenizer.pad_token_id).items()}
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            durations.append(time.perf_counter() - start)
            report(progress, i + 1, n_runs, "full fine-tuning reference")
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise UserError(f"out of memory timing full fine-tuning at batch size {batch_size}: lower --batch-size "
                        "or --max-length (the reference needs all weights, gradients and AdamW state)") from exc
    finally:
        n_params = sum(p.numel() for p in params)
        state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                          if torch.is_tensor(t) and t.dim() > 0)
        del opt
        for p, flag in zip(params, old_flags):
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    if mode == "measure" and len(durations) == steps:
        return FullFinetuneCost(sum(durations), "measured", steps, statistics.median(durations), len(durations),
                                epochs, len(pool), batch_size, n_params, state_bytes)
    timed = durations[1:]  # step 0 is warm-up (allocations, kernel selection)
    if not timed:
        raise UserError("full fine-tuning reference was stopped before one step was timed")
    s_per_step = statistics.median(timed)
    return FullFinetuneCost(s_per_step * steps, "estimated", steps, s_per_step, len(timed), epochs, len(pool),
                            batch_size, n_params, state_bytes)


def aer(t_heads: float, t_select: float, t_train: float, t_full: float) -> dict:
    """AER and speed-up from stage times (seconds)."""
    spent = t_heads + t_select + t_train
    ratio = spent / t_full if t_full > 0 else float("inf")
    return {"aer": ratio, "speedup": (1 / ratio) if ratio > 0 else float("inf"), "time_p2d_s": spent}
