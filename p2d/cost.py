"""Cost accounting: the full fine-tuning reference and the Alignment Efficiency Ratio.

AER = (t_heads + t_select + t_train) / t_full; speed-up = 1 / AER; lower AER is better.

t_full, the reference, is full fine-tuning of all parameters (AdamW) on the *whole pool* for a fixed
number of epochs (``reference_epochs``, default 3), with the same batch size, max length,
length-grouped batching and loss path (LM head only at answer positions, `p2d.training.loss_backward`,
gradient clipping) as head training. It never depends on how long P2D itself trains.

- ``estimate``: the reference's batches are built exactly as training would build them; a sample of
  them, stratified over their padded size (tokens), is timed (after one warm-up step), a
  seconds-per-token line ``t = a + b * tokens`` is fitted by least squares, and the time of every
  reference step is predicted from its size. The standard error of that prediction is reported
  (``stderr_s``); it covers the fit, not machine noise between runs.
- ``measure``: every reference step is run and timed (as slow as full fine-tuning itself).

Under several processes (`p2d.distributed`) the reference is timed as P2D's heads train there: data
parallel over a global batch of ``batch_size`` x processes, all gradients summed across processes
(here: all of the model's), each step as long as its slowest process; so the AER compares like
with like. The sum is a plain all-reduce after the backward (no overlap with it, as DDP would do).
With a sharded (FSDP) model the layers' gradients are reduce-scattered by FSDP during the backward and
the optimizer holds each process's shard, as full fine-tuning under FSDP would.

A quantised model (``quantize``: bitsandbytes 8/4-bit MLPs) cannot be fully fine-tuned: its
reference trains every floating-point weight and leaves the integer ones frozen (``quantized_params``
counts them), so it is cheaper than full fine-tuning of the unquantised model and its AER is
conservative (higher) for P2D.

Both step with AdamW at lr=0, which costs what a real step costs and leaves every weight
bit-identical. A step whose gradient is not finite is timed but its optimizer step is skipped (an
lr=0 step would still write NaN into the weights), so a shared model is never changed. Evaluation and
the timing of the reference itself are not part of the AER.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .data.encoding import collate, encode
from .data.formats import Sample
from .distributed import Processes, is_shard
from .errors import UserError, is_out_of_memory
from .models import trainable
from .progress import ProgressFn, StopFn, report
from .training import NonFinite, backward_shared, clip_gradients, epoch_batches, loss_backward

REFERENCE_MODES = ("estimate", "measure")
REFERENCE_FILE = "full_ft.json"


@dataclass
class FullFinetuneCost:
    """The full fine-tuning reference of a run."""

    time_s: float            # seconds full fine-tuning takes (or took) on the whole pool
    mode: str                # "estimated" or "measured"
    epochs: float            # reference epochs over the whole pool
    steps: int               # reference optimizer steps: ceil(batches per epoch * epochs)
    n_pool: int              # pool samples with answer tokens (what full fine-tuning trains on)
    batch_size: int
    max_length: int
    tokens: int              # padded tokens over all reference steps
    s_per_step: float        # mean seconds per reference step
    timed_steps: int         # steps actually timed (warm-up excluded)
    stderr_s: float | None   # standard error of time_s (estimate; None when measured)
    trainable_params: int
    optimizer_state_bytes: int
    skipped_steps: int = 0   # steps whose gradient was not finite (optimizer step skipped)
    processes: int = 1       # timed data parallel over this many processes (global batch = batch_size x processes)
    quantized_params: int = 0  # integer (quantised) weights left frozen: the reference trains the rest
    fit: dict = field(default_factory=dict)  # {"intercept_s", "s_per_token"} of the estimate

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FullFinetuneCost":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class Clock:
    """Wall and CPU seconds of a block (``with Clock() as c: ...; c.wall_s, c.cpu_s``)."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s, self.cpu_s = time.perf_counter() - self._w, time.process_time() - self._c
        return False


def reference_steps(n_batches_per_epoch: int, epochs: float) -> int:
    """Optimizer steps of the reference: ceil(batches per epoch * epochs), at least 1."""
    return max(1, math.ceil(n_batches_per_epoch * epochs))


def reference_batches(encoded, batch_size: int, epochs: float, seed: int = 0, group_by_length: bool = True):
    """Every reference step's batch, in order (epoch after epoch, as `p2d.training` draws them)."""
    per_epoch = math.ceil(len(encoded) / batch_size)
    steps = reference_steps(per_epoch, epochs)
    out, epoch = [], 0
    while len(out) < steps:
        out += epoch_batches(encoded, batch_size, seed, epoch, group_by_length)
        epoch += 1
    return out[:steps]


def padded_tokens(batch: list[dict]) -> int:
    return len(batch) * max(len(it["input_ids"]) for it in batch)


def stratified_sample(sizes: list[int], k: int) -> list[int]:
    """Indices of ``k`` items spread evenly over the sorted ``sizes`` (smallest and largest included)."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    if k >= len(order):
        return order
    if k == 1:
        return [order[len(order) // 2]]
    picks = sorted({order[round(j * (len(order) - 1) / (k - 1))] for j in range(k)})
    return picks


def fit_line(x: list[float], y: list[float]) -> tuple[float, float, list[list[float]], float]:
    """Least squares ``y = a + b x``: (a, b, covariance of (a, b), residual variance).

    With fewer than three points, or no spread in ``x``, the line is flat (b = 0, a = mean)."""
    n = len(x)
    mean_y = sum(y) / n
    sxx = sum((xi - sum(x) / n) ** 2 for xi in x)
    if n < 3 or sxx <= 0:
        var = sum((yi - mean_y) ** 2 for yi in y) / max(1, n - 1)
        return mean_y, 0.0, [[var / n, 0.0], [0.0, 0.0]], var
    mean_x = sum(x) / n
    b = sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(x, y)) / sxx
    a = mean_y - b * mean_x
    resid = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y)) / (n - 2)
    cov_bb = resid / sxx
    cov_ab = -mean_x * cov_bb
    cov_aa = resid / n + mean_x ** 2 * cov_bb
    return a, b, [[cov_aa, cov_ab], [cov_ab, cov_bb]], resid


def full_finetune_cost(lm, pool: list[Sample], epochs: float = 3.0, batch_size: int = 8, max_length: int = 256,
                       mode: str = "estimate", timed_steps: int = 6, seed: int = 0, max_grad_norm: float = 1.0,
                       progress: ProgressFn = None, should_stop: StopFn = None) -> FullFinetuneCost:
    """Time full fine-tuning on ``pool`` (see the module docstring). The model is left unchanged."""
    if mode not in REFERENCE_MODES:
        raise UserError(f"full fine-tuning reference must be one of {', '.join(REFERENCE_MODES)}, got {mode!r}")
    if not pool:
        raise UserError("cannot time full fine-tuning on an empty pool")
    model, tok = lm.model, lm.tokenizer
    encoded = encode(pool, tok, max_length)
    if not encoded:
        raise UserError("no pool sample has answer tokens within the max length: raise the max length")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    procs = Processes.current()  # several: data parallel like head training, the global batch split
    should_stop = procs.agreed(should_stop)
    batches = reference_batches(encoded, batch_size * procs.world, epochs, seed)
    sizes = [padded_tokens(b) for b in batches]
    if mode == "measure":
        runs = list(range(len(batches)))
        warmup = None
    else:
        per_epoch = batches[:math.ceil(len(encoded) / (batch_size * procs.world))]
        picks = stratified_sample([padded_tokens(b) for b in per_epoch], max(1, timed_steps))
        runs = picks
        warmup = stratified_sample(sizes, 1)[0]
    # every floating-point weight; a quantised model's integer weights (bitsandbytes) cannot train
    params = [p for p in model.parameters() if p.is_floating_point()]
    frozen_quantized = sum(p.numel() for p in model.parameters() if not p.is_floating_point())
    # a sharded model: FSDP reduces its layers' gradients itself (a mean over processes, made a sum
    # below: FSDP's own divide factor of 1 needs PREMUL_SUM, which gloo lacks); the whole weights
    # (embeddings, norm, LM head) are summed like head training's deltas
    whole = [p for p in params if not is_shard(p)]
    shards = [p for p in params if is_shard(p)]
    durations: list[float] = []
    skipped = 0
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, foreach=False if shards else None)
    todo = ([warmup] if warmup is not None else []) + runs
    try:
        with trainable(model, params):
            for n, i in enumerate(todo):
                if should_stop is not None and should_stop():
                    break
                mine = procs.shard(batches[i])
                micro = [collate(mine, pad)] if mine else []
                sync()
                start = time.perf_counter()
                ok = True
                try:
                    if procs.world == 1:
                        loss_backward(model, micro, lm.device)
                    else:
                        backward_shared(model, whole, micro, lm.device, procs,
                                         fillers=1 if procs.sharded and not micro else 0)
                        for p in shards:
                            if p.grad is not None:
                                p.grad.mul_(procs.world)
                    ok = math.isfinite(clip_gradients(params, max_grad_norm))
                except NonFinite:
                    ok = False
                if ok:
                    opt.step()
                else:
                    skipped += 1
                opt.zero_grad(set_to_none=True)
                sync()
                if not (warmup is not None and n == 0):
                    durations.append(time.perf_counter() - start)
                report(progress, n + 1, len(todo), "full fine-tuning reference")
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise UserError(f"out of memory timing full fine-tuning at batch size {batch_size}: lower the batch size or "
                        "the max length (the reference needs all weights, gradients and AdamW state)") from exc
    finally:
        del opt
    if procs.world > 1:  # a data-parallel step takes as long as its slowest process
        durations = [max(step) for step in zip(*procs.gather(durations))]
    n_params = sum(p.numel() for p in params)
    state_bytes = 2 * sum(p.numel() * p.element_size() for p in params)  # AdamW: exp_avg + exp_avg_sq
    steps = len(batches)
    common = dict(epochs=epochs, steps=steps, n_pool=len(encoded), batch_size=batch_size, max_length=max_length,
                  tokens=sum(sizes), trainable_params=n_params, optimizer_state_bytes=state_bytes,
                  skipped_steps=skipped, processes=procs.world, quantized_params=frozen_quantized)
    if mode == "measure":
        if len(durations) < steps:
            raise UserError("the full fine-tuning reference was stopped before every step was measured")
        total = sum(durations)
        return FullFinetuneCost(time_s=total, mode="measured", s_per_step=total / steps, timed_steps=steps,
                                stderr_s=None, **common)
    if not durations:
        raise UserError("the full fine-tuning reference was stopped before one step was timed")
    x = [float(sizes[i]) for i in runs[:len(durations)]]
    a, b, cov, _ = fit_line(x, durations)
    if b < 0:  # noise on a narrow size range: fall back to a flat mean
        a, b, cov, _ = fit_line([0.0] * len(x), durations)
    total_tokens = float(sum(sizes))
    time_s = max(1e-9, a * steps + b * total_tokens)
    var = steps ** 2 * cov[0][0] + 2 * steps * total_tokens * cov[0][1] + total_tokens ** 2 * cov[1][1]
    return FullFinetuneCost(time_s=time_s, mode="estimated", s_per_step=time_s / steps, timed_steps=len(durations),
                            stderr_s=math.sqrt(max(0.0, var)), fit={"intercept_s": a, "s_per_token": b}, **common)


def aer_ratio(spent_s: float, reference_s: float | None) -> float | None:
    """The AER of ``spent_s`` seconds against a full fine-tuning reference of ``reference_s`` seconds;
    None when there is no reference (missing or not positive): the one rule for a missing reference."""
    return spent_s / reference_s if reference_s is not None and reference_s > 0 else None


def aer(t_heads: float, t_select: float, t_train: float, t_full: float | None) -> dict:
    """AER and speed-up from stage times (seconds); both None without a reference (`aer_ratio`)."""
    spent = t_heads + t_select + t_train
    ratio = aer_ratio(spent, t_full)
    return {"aer": ratio, "speedup": (1 / ratio) if ratio else None, "time_p2d_s": spent}


def time_to_reach(curve: list[dict], accuracy: float | None, base_accuracy: float | None,
                  key: str = "accuracy") -> float | None:
    """Training seconds full fine-tuning needed to reach ``accuracy``, read off its learning curve
    (``[{"train_s", key}, ...]`` in training order) that starts at (0 s, ``base_accuracy``) and is
    interpolated linearly between points: 0 when the base model is already there, None when the curve
    never gets there (or an accuracy is unknown)."""
    if accuracy is None or base_accuracy is None:
        return None
    prev_t, prev_a = 0.0, base_accuracy
    if prev_a >= accuracy:
        return 0.0
    for point in curve:
        a = point.get(key)
        if a is None:
            continue
        if a >= accuracy:
            frac = (accuracy - prev_a) / (a - prev_a) if a > prev_a else 1.0
            return prev_t + max(0.0, min(1.0, frac)) * (point["train_s"] - prev_t)
        prev_t, prev_a = point["train_s"], a
    return None

