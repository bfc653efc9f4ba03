"""Sparse head training (P2D Stage 3): train only the q/k/v/o slices of selected heads.

`train_heads` attaches a `HeadAdapter` (zero-initialised deltas on the selected heads' slices),
trains it with AdamW on the answer tokens of the samples (prompt tokens are not learned), and saves
it to ``out_dir/adapter/``.  The base model is left untouched: after the call its weights,
requires_grad flags and train/eval mode are what they were, and no adapter is attached (use
`p2d.adapter.load_adapter` to evaluate the result).

Schedule: linear warmup over ``ceil(warmup_ratio * steps)`` steps (step i of W uses lr*(i+1)/(W+1),
so no step has lr 0), then cosine (default) or linear decay towards 0, or a constant lr.
Options: gradient checkpointing; a validation share of the training samples whose answer loss is
logged (``val_loss``) every ``val_every`` steps, off the training clock.  One step = one
optimizer update over ``grad_accum`` batches; the loss is the mean over all answer tokens of those
batches.  Weight decay (AdamW) acts on the deltas only, never on frozen weights.  Batches are
shuffled per epoch (seed + epoch) and, by default, grouped by length to cut padding.

The model runs in train mode (dropout as its config says; 0 for Llama/SmolLM2, 0.1 for GPT-2).
Deltas and optimizer state are kept in fp32 whatever the model dtype (they are tiny); the forward
runs in the model dtype.  fp16 models get a warning (fp16 losses overflow to NaN; prefer bf16).

`train_loop` is the loop itself, shared with the benchmark's full and LoRA fine-tuning: the same
batching (`epoch_batches`), loss path (`loss_backward`, the LM head only at answer positions),
clipping and schedule, whatever is trained. The full fine-tuning reference (`p2d.cost`) times steps
of the same functions.

Supported: any model `p2d.geometry` supports, on CPU, CUDA or MPS; stop via ``should_stop()`` or
Ctrl-C (the current step finishes, adapter and log are saved, ``stopped=True``); checkpoints every
N steps and resuming after a kill (`Checkpointer`: same settings and data give the same adapter as an
uninterrupted run).  A NaN/inf loss or gradient raises UserError without saving an adapter (the log
so far stays on disk).
Several processes (``accelerate launch``): data parallel, each process takes its rows of a global
batch of ``batch_size`` x processes and the deltas' gradients are summed (`p2d.distributed`); one
process writes the log, checkpoints and the adapter.
Not supported: mixed-precision autocast, training biases/MLPs/norms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapter import ADAPTER_KINDS, PROJECTIONS, WEIGHTS_NAME, make_adapter, normalize_heads, normalize_projections
from .data.encoding import IGNORE_INDEX, collate, encode, filler_batch, iter_batches
from .distributed import Processes, is_shard
from .errors import UserError, is_out_of_memory
from .files import atomic_dir, read_json, remove, write_json, write_text
from .method.gating import answer_token_losses
from .models import trainable

LOG_NAME = "train_log.jsonl"
ADAPTER_SUBDIR = "adapter"


@dataclass
class TrainConfig:
    """Settings of one head-training run (see the module docstring for the schedule)."""

    steps: int | None = None  # None: ceil(ceil(len(data) / batch_size) * epochs / grad_accum)
    epochs: float = 1.0
    max_steps: int | None = None  # cap on the planned steps (the public demo uses it)
    lr: float = 1e-3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    projections: tuple = PROJECTIONS
    weight_decay: float = 0.0  # decays the deltas only
    warmup_ratio: float = 0.05  # linear warmup, then the scheduler's decay
    scheduler: str = "cosine"  # cosine, linear or constant after the warmup
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, ~30% slower)
    val_ratio: float = 0.0  # share of the training samples held out for a validation loss (0: none)
    val_every: int = 0  # validation loss every N steps (0: ten times per run); off the training clock
    max_grad_norm: float = 1.0  # 0 or None: no clipping
    seed: int = 0
    group_by_length: bool = True  # batches of similar length (less padding); batch order shuffled
    adapter: str = "heads"  # p2d.adapter.ADAPTER_KINDS: "heads" (q/k/v/o slices) or "offset" (LoFiT bias)

    def planned_steps(self, n_items: int) -> int:
        if self.steps is not None:
            steps = int(self.steps)
        else:
            batches = math.ceil(n_items / self.batch_size)
            steps = max(1, math.ceil(batches * self.epochs / self.grad_accum))
        return min(steps, self.max_steps) if self.max_steps else steps

    def check(self) -> None:
        if self.steps is not None and int(self.steps) < 1:
            raise UserError(f"steps must be at least 1 (got {self.steps})")
        if self.steps is None and not self.epochs > 0:
            raise UserError(f"epochs must be positive (got {self.epochs})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"learning rate must be a positive number (got {self.lr})")
        if int(self.batch_size) < 1:
            raise UserError(f"batch size must be at least 1 (got {self.batch_size})")
        if int(self.grad_accum) < 1:
            raise UserError(f"gradient accumulation must be at least 1 (got {self.grad_accum})")
        if int(self.max_length) < 2:
            raise UserError(f"max length must be at least 2 tokens (got {self.max_length})")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.weight_decay < 0:
            raise UserError(f"weight decay must not be negative (got {self.weight_decay})")
        if not 0 <= self.val_ratio <= 0.5:
            raise UserError(f"validation share must be in [0, 0.5] (got {self.val_ratio})")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"scheduler must be one of {', '.join(SCHEDULERS)} (got {self.scheduler!r})")
        normalize_projections(self.projections)
        if self.adapter not in ADAPTER_KINDS:
            raise UserError(f"unknown adapter kind {self.adapter!r}: use one of {', '.join(ADAPTER_KINDS)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["projections"] = list(normalize_projections(self.projections))
        return d


@dataclass
class TrainResult:
    steps_done: int
    steps_planned: int
    time_s: float
    final_loss: float | None  # loss of the last completed step
    stopped: bool  # stopped early by should_stop() or Ctrl-C
    stop_reason: str | None  # "stop requested" / "interrupted (Ctrl-C)"
    tokens: int  # non-padding tokens processed (prompt + answer)
    trainable_params: int
    optimizer_state_bytes: int
    adapter_dir: str
    log_path: str
    extra: dict = field(default_factory=dict)  # n_samples, dropped, truncated, answer_tokens, heads
    query_heads_changed: int | None = None  # query heads whose computation the adapter changes (GQA reach)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (AdamW fp32: 8 bytes per parameter; the scalar
    ``step`` counters are not counted)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


SCHEDULERS = ("cosine", "linear", "constant")


def lr_factor(step: int, total: int, warmup: int, scheduler: str = "cosine") -> float:
    """Multiplier of the base lr at 0-based ``step``: linear warmup (step i of W uses (i+1)/(W+1), so
    no step has lr 0), then cosine or linear decay towards 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if scheduler == "constant":
        return 1.0
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def answer_loss(model, batch: dict, fast: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over answer tokens, number of answer tokens); see
    `p2d.method.gating.answer_token_losses` for the fast path (LM head only at answer positions)."""
    token_loss, _ = answer_token_losses(model, batch, fast=fast)
    return token_loss.sum(), token_loss.numel()


class _Stop:
    """Ctrl-C becomes a request to stop after the current step (main thread only); a second Ctrl-C
    raises KeyboardInterrupt at once (still caught by the training loop, which then saves)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):
                self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def epoch_batches(encoded, batch_size: int, seed: int, epoch: int, group_by_length: bool = True) -> list[list]:
    """The batches of one epoch, exactly as training draws them: shuffled with ``seed + epoch`` and,
    with ``group_by_length``, grouped by length (the order of the groups is shuffled)."""
    return list(iter_batches(encoded, batch_size, shuffle=True, seed=seed + epoch, sort_by_length=group_by_length))


def batch_stream(encoded, batch_size: int, seed: int, group_by_length: bool = True, skip: int = 0):
    """Endless batches, epoch after epoch (see `epoch_batches`), after skipping the first ``skip``."""
    epoch = 0
    while True:
        batches = epoch_batches(encoded, batch_size, seed, epoch, group_by_length)
        if skip >= len(batches):
            skip -= len(batches)
        else:
            yield from batches[skip:]
            skip = 0
        epoch += 1


class NonFinite(Exception):
    """A loss or gradient became NaN/inf (``what`` says which)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def loss_backward(model, micro: list[dict], device, n_answer_total: int | None = None) -> tuple[float, int, int]:
    """Forward and backward of one optimizer step: the mean cross-entropy over all answer tokens of
    the micro-batches (collated dicts). Returns (summed token loss, answer tokens, non-padding
    tokens). Raises NonFinite("loss"). This is the loss path of head training, of the benchmark's
    full and LoRA fine-tuning and of the full fine-tuning reference. ``n_answer_total``: the answer
    tokens of the whole step when these micro-batches are one process's share of it (the divisor)."""
    n_answer = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    divisor = n_answer if n_answer_total is None else n_answer_total
    n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    loss_sum = 0.0
    for b in micro:
        b = {k: v.to(device) for k, v in b.items()}
        loss, _ = answer_loss(model, b)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFinite("loss")
        (loss / max(1, divisor)).backward()
        loss_sum += value
    return loss_sum, n_answer, n_tokens


def backward_shared(model, params: list, micro: list[dict], device, procs, fillers: int = 0) -> tuple[float, int, int]:
    """This process's share of a step (possibly empty), scaled by the step's answer tokens over every
    process; the gradients of ``params`` and the counts summed over the processes (every process ends
    with the same). ``fillers``: micro-batches this process has no rows of, run on a one-token filler
    whose gradient is zero (a sharded model needs every process to run each forward and backward)."""
    local = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)], dtype=torch.float64)
    procs.all_reduce_([local])
    loss_sum, n_answer, n_tokens = loss_backward(model, micro, device, n_answer_total=int(local.item())) \
        if micro else (0.0, 0, 0)
    for _ in range(fillers):
        filler = {k: v.to(device) for k, v in filler_batch(getattr(model.config, "pad_token_id", None)).items()}
        answer_loss(model, filler)[0].backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    procs.all_reduce_([p.grad for p in params])
    counts = torch.tensor([loss_sum, n_answer, n_tokens], dtype=torch.float64)
    procs.all_reduce_([counts])
    return float(counts[0]), int(counts[1]), int(counts[2])


def clip_gradients(params: list, max_grad_norm: float | None) -> float:
    """Clip to ``max_grad_norm`` (0/None: no clipping) and return the total norm before clipping.
    Gradients of a sharded model's weights (DTensor shards) count with their whole tensors."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(is_shard(p.grad) for p in grads):
        return _clip_sharded(grads, max_grad_norm)
    if max_grad_norm:
        return float(torch.nn.utils.clip_grad_norm_(grads, max_grad_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in grads])))


def _clip_sharded(params: list, max_grad_norm: float | None) -> float:
    """`clip_gradients` over a mix of DTensor shards and whole tensors: the shards' squared norms are
    summed over the processes (one all-reduce), the whole tensors' (the same on every process) once."""
    shards = [p.grad.to_local().detach().float() for p in params if is_shard(p.grad)]
    whole = [p.grad.detach().float() for p in params if not is_shard(p.grad)]
    device = (shards or whole)[0].device
    sharded_sq = torch.stack([g.pow(2).sum() for g in shards]).sum() if shards else torch.zeros((), device=device)
    Processes.current().all_reduce_([sharded_sq])
    whole_sq = sum((float(g.pow(2).sum()) for g in whole), 0.0)
    total = math.sqrt(float(sharded_sq) + whole_sq)
    if max_grad_norm and math.isfinite(total):
        coef = min(1.0, max_grad_norm / (total + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
    return total


@dataclass
class LoopResult:
    steps_done: int
    steps_planned: int
    time_s: float
    final_loss: float | None
    stopped: bool
    stop_reason: str | None
    tokens: int
    answer_tokens: int
    state_bytes: int
    resumed_from: int | None = None


CHECKPOINT_SUBDIR = "checkpoint"


def train_loop(model, params: list, encoded, config: TrainConfig, log_path, pad_id: int, device,
               progress: Callable | None = None, should_stop: Callable | None = None,
               on_log: Callable | None = None, checkpoint: "Checkpointer | None" = None,
               between_steps: Callable[[int], None] | None = None, val_encoded=None) -> LoopResult:
    """Train ``params`` of ``model`` (already trainable and in train mode) on ``encoded`` items.

    The shared loop of head training and the benchmark's full/LoRA cells: AdamW, warmup + cosine
    schedule, `loss_backward`, gradient clipping, one log line per step in ``log_path``, progress,
    stop requests and Ctrl-C (the current step finishes). A NaN/inf loss or gradient raises
    NonFinite; out of memory raises UserError with advice. With ``checkpoint``, the state is saved
    every ``checkpoint.every`` steps and, if a checkpoint exists, training continues from it.
    ``between_steps(step)`` runs after each step off the clock (its time is not training time; the
    benchmark evaluates learning curves there). With ``val_encoded`` items, the validation loss is
    computed every ``config.val_every`` steps (and at the last), also off the clock, and logged as
    ``val_loss`` in that step's line.
    """
    procs = Processes.current()  # several: each takes its rows of a global batch of batch_size x processes
    global_batch = config.batch_size * procs.world
    total = dataclasses.replace(config, batch_size=global_batch).planned_steps(len(encoded))
    warmup = math.ceil(config.warmup_ratio * total)
    val_every = config.val_every or max(1, math.ceil(total / 10))
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_done, tokens, answer_tokens, final_loss, resumed_from = 0, 0, 0, None, None
    elapsed_before = 0.0
    torch.manual_seed(config.seed)
    if checkpoint is not None:
        state = checkpoint.load(params, optimizer)
        if state is not None:
            steps_done = resumed_from = state["step"]
            tokens, answer_tokens = state["tokens"], state["answer_tokens"]
            final_loss, elapsed_before = state["final_loss"], state["elapsed_s"]
            _truncate_log(log_path, steps_done)
    batches = batch_stream(encoded, global_batch, config.seed, config.group_by_length,
                           skip=steps_done * config.grad_accum)
    stopped, stop_reason = False, None
    t0 = time.perf_counter() - elapsed_before
    if progress:
        progress(steps_done, total, "train")
    log_file = log_path if procs.is_main else os.devnull  # one process writes the log
    with open(log_file, "a" if resumed_from else "w", encoding="utf-8") as log, _Stop() as ctrl_c:
        try:
            while steps_done < total:
                step = steps_done + 1
                t_step = time.perf_counter()
                lr = config.lr * lr_factor(steps_done, total, warmup, config.scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                shares = [procs.shard(next(batches)) for _ in range(config.grad_accum)]
                micro = [collate(items, pad_id) for items in shares if items]
                optimizer.zero_grad(set_to_none=True)
                try:
                    if procs.world == 1:
                        loss_sum, n_answer, n_tokens = loss_backward(model, micro, device)
                    else:
                        fillers = len(shares) - len(micro) if procs.sharded else 0
                        loss_sum, n_answer, n_tokens = backward_shared(model, params, micro, device, procs, fillers)
                except Exception as exc:
                    optimizer.zero_grad(set_to_none=True)
                    if is_out_of_memory(exc):
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        raise UserError(f"out of memory at batch size {config.batch_size} x {config.max_length} "
                                        f"tokens on {device}: lower the batch size (raise gradient accumulation "
                                        "to keep the effective batch) or the max length") from exc
                    if isinstance(exc, NonFinite):
                        raise NonFinite(f"loss at step {step}") from None
                    raise
                grad_norm = clip_gradients(params, config.max_grad_norm)
                if not math.isfinite(grad_norm):
                    raise NonFinite(f"gradient at step {step}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps_done = step
                tokens += n_tokens
                answer_tokens += n_answer
                final_loss = loss_sum / max(1, n_answer)
                now = time.perf_counter()
                record = {"step": step, "loss": round(final_loss, 6), "lr": lr,
                          "tokens_per_s": round(n_tokens / max(now - t_step, 1e-9), 2),
                          "elapsed_s": round(now - t0, 3), "grad_norm": round(grad_norm, 6), "tokens": n_tokens}
                if val_encoded and (step % val_every == 0 or step == total):
                    record["val_loss"] = round(validation_loss(model, val_encoded, config.batch_size, pad_id, device), 6)
                    t0 += time.perf_counter() - now  # off the clock
                log.write(json.dumps(record) + "\n")
                log.flush()
                if checkpoint is not None and checkpoint.due(step, total):
                    checkpoint.save(params, optimizer, {"step": step, "tokens": tokens, "answer_tokens": answer_tokens,
                                                        "final_loss": final_loss, "elapsed_s": now - t0})
                if progress:
                    progress(steps_done, total, "train")
                if on_log:
                    on_log(record)
                if between_steps is not None:
                    paused = time.perf_counter()
                    between_steps(step)
                    t0 += time.perf_counter() - paused
                interrupted = ctrl_c.requested
                asked = should_stop is not None and steps_done < total and should_stop()
                if procs.world > 1:  # every process stops after the same step (or the others would wait)
                    flags = torch.tensor([float(interrupted), float(asked)], dtype=torch.float64)
                    procs.all_reduce_([flags])
                    interrupted, asked = bool(flags[0] > 0), bool(flags[1] > 0)
                if interrupted:
                    stopped, stop_reason = True, "interrupted (Ctrl-C)"
                    break
                if asked:
                    stopped, stop_reason = True, "stop requested"
                    break
        except KeyboardInterrupt:
            optimizer.zero_grad(set_to_none=True)  # a half-done step is discarded
            stopped, stop_reason = True, "interrupted (Ctrl-C)"
    if not all(torch.isfinite(p).all() for p in params):
        raise NonFinite(f"weights at step {steps_done}")
    return LoopResult(steps_done=steps_done, steps_planned=total, time_s=time.perf_counter() - t0,
                      final_loss=final_loss, stopped=stopped, stop_reason=stop_reason, tokens=tokens,
                      answer_tokens=answer_tokens, state_bytes=optimizer_state_bytes(optimizer),
                      resumed_from=resumed_from)


def validation_loss(model, encoded, batch_size: int, pad_id: int, device) -> float:
    """Mean cross-entropy over all answer tokens of ``encoded`` (no grad, eval mode for the call)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for items in iter_batches(encoded, batch_size, sort_by_length=True):
                b = {k: v.to(device) for k, v in collate(items, pad_id).items()}
                loss, n = answer_loss(model, b)
                total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(1, count)


def split_validation(samples: list, ratio: float, seed: int) -> tuple[list, list]:
    """(training samples, validation samples): a seeded ``ratio`` share held out (at least one when
    ratio > 0 and there are two or more samples)."""
    if ratio <= 0 or len(samples) < 2:
        return list(samples), []
    n_val = min(len(samples) - 1, max(1, round(ratio * len(samples))))
    idx = set(random.Random(f"p2d-val:{seed}").sample(range(len(samples)), n_val))
    return [s for i, s in enumerate(samples) if i not in idx], [s for i, s in enumerate(samples) if i in idx]


@contextlib.contextmanager
def checkpointing(model, enabled: bool):
    """Gradient checkpointing (non-reentrant, so frozen inputs still pass gradients) for the block."""
    # transformers 5 renamed it activation checkpointing (the old names still work, with a warning)
    name = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if not enabled or not hasattr(model, f"{name}_checkpointing_enable"):
        yield
        return
    getattr(model, f"{name}_checkpointing_enable")(**{f"{name}_checkpointing_kwargs": {"use_reentrant": False}})
    try:
        yield
    finally:
        getattr(model, f"{name}_checkpointing_disable")()


def _truncate_log(log_path, step: int) -> None:
    """Keep the log lines of steps 1..step (a resumed run rewrites what came after its checkpoint)."""
    path = Path(log_path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break
    write_text(path, "".join(line + "\n" for line in keep))


class Checkpointer:
    """Saves and restores the training state in ``folder`` every ``every`` steps (and at the end).

    The state: the trained tensors, the optimizer state, the step, token counters and the torch RNG
    state; the data position follows from the step (batches are a function of seed and epoch). A
    checkpoint is written to a temporary folder and renamed, so it is whole or absent; it records the
    settings it was made with (``signature``) and is only used when they match.
    """

    def __init__(self, folder, every: int, signature: dict):
        self.folder = Path(folder)
        self.every = int(every)
        self.signature = signature

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and step < total and step % self.every == 0

    def save(self, params: list, optimizer, state: dict) -> None:
        with atomic_dir(self.folder) as tmp:
            torch.save({"params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       tmp / "state.pt")
            write_json(tmp / "checkpoint.json", {**state, "signature": self.signature})

    def load(self, params: list, optimizer) -> dict | None:
        """Restore into ``params`` and ``optimizer``; the saved counters, or None without a usable
        checkpoint (missing, or made with other settings)."""
        meta = read_json(self.folder / "checkpoint.json")
        if not meta or meta.get("signature") != self.signature or not (self.folder / "state.pt").is_file():
            return None
        saved = torch.load(self.folder / "state.pt", map_location="cpu", weights_only=False)
        if len(saved["params"]) != len(params) or any(a.shape != b.shape for a, b in zip(saved["params"], params)):
            return None
        with torch.no_grad():
            for p, value in zip(params, saved["params"]):
                p.copy_(value.to(device=p.device, dtype=p.dtype))
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        return meta

    def clear(self) -> None:
        remove(self.folder)


def checkpoint_step(out_dir) -> int | None:
    """The step of the training checkpoint in ``out_dir`` (None without one). Whether it is used depends on
    the settings and data it was made with (`Checkpointer.load`)."""
    meta = read_json(Path(out_dir) / CHECKPOINT_SUBDIR / "checkpoint.json")
    return meta.get("step") if isinstance(meta, dict) else None


def train_heads(lm, heads, samples: list, config: TrainConfig, out_dir, progress: Callable | None = None,
                should_stop: Callable | None = None, on_log: Callable | None = None,
                overwrite: bool = False, resume: bool = False, checkpoint_every: int = 0) -> TrainResult:
    """Train only the selected heads of ``lm`` (a LoadedModel) on ``samples`` (list of Sample).

    ``heads``: ``[[layer, head], ...]`` or a HeadScores-like object with ``.selected``.
    Writes ``out_dir/train_log.jsonl`` as it goes (one line per step: step, loss, lr, tokens_per_s,
    elapsed_s, grad_norm, tokens) and ``out_dir/adapter/`` at the end (whole or not at all).  Calls
    ``progress(done, total, "train")`` and ``on_log(record)`` after each step; stops after the
    current step when ``should_stop()`` returns True or on Ctrl-C.  An existing adapter in
    ``out_dir`` is a UserError unless ``overwrite`` or ``resume``.  ``checkpoint_every`` N saves the
    state every N steps in ``out_dir/checkpoint/``; ``resume`` continues from it (same settings and
    data required; otherwise training starts over).
    """
    config.check()
    model, tok = lm.model, lm.tokenizer
    attached = getattr(model, "_p2d_adapter_ref", None)
    if attached is not None and attached() is not None:
        raise UserError("the model has a head adapter attached (loaded for evaluation?): detach it before "
                        "training; training always starts from the base weights")
    heads = normalize_heads(heads, lm.geometry)
    if not heads:
        raise UserError("no heads selected: run head scoring first or give a heads.json")
    samples = list(samples or [])
    if not samples:
        raise UserError("no training samples: the training data is empty")
    out = Path(out_dir)
    adapter_dir, log_path = out / ADAPTER_SUBDIR, out / LOG_NAME
    if (adapter_dir / WEIGHTS_NAME).exists() and not (overwrite or resume):
        raise UserError(f"{adapter_dir} already holds an adapter: choose another output folder or delete it")
    samples, val_samples = split_validation(samples, config.val_ratio, config.seed)
    encoded = encode(samples, tok, config.max_length)
    if not encoded:
        raise UserError(f"none of the {len(samples)} samples has an answer token left after encoding "
                        f"(max length {config.max_length}): raise the max length or check the data")
    val_encoded = encode(val_samples, tok, config.max_length) if val_samples else None
    if lm.dtype == torch.float16 or next(model.parameters()).dtype == torch.float16:
        warnings.warn("training with an fp16 model: losses can overflow to NaN; use dtype bf16 (or fp32)",
                      stacklevel=2)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    adapter = make_adapter(config.adapter, lm.geometry, heads, config.projections, dtype=torch.float32, device=device)
    reach = lm.geometry.query_heads_changed(heads, adapter.projections)
    signature = {"config": config.to_dict(), "heads": heads, "data": _fingerprint(encoded)}
    ckpt = Checkpointer(out / CHECKPOINT_SUBDIR, checkpoint_every, signature) if (checkpoint_every or resume) else None
    if ckpt is not None and not resume:
        ckpt.clear()
    try:
        with trainable(model, []), checkpointing(model, config.gradient_checkpointing):
            adapter.attach(model)
            loop = train_loop(model, list(adapter.parameters()), encoded, config, log_path, pad_id, device,
                              progress=progress, should_stop=should_stop, on_log=on_log, checkpoint=ckpt,
                              val_encoded=val_encoded)
            training = {
                "config": config.to_dict(), "steps_done": loop.steps_done, "steps_planned": loop.steps_planned,
                "final_loss": loop.final_loss, "stopped": loop.stopped, "stop_reason": loop.stop_reason,
                "time_s": round(loop.time_s, 3), "samples": len(samples), "encoded": len(encoded),
                "dropped": len(encoded.dropped), "truncated": encoded.truncated, "tokens": loop.tokens,
                "answer_tokens": loop.answer_tokens, "device": str(device), "resumed_from": loop.resumed_from,
                "validation_samples": len(val_samples),
                "model_dtype": str(lm.dtype).replace("torch.", ""),
                "processes": Processes.current().world,
                "global_batch_size": config.batch_size * Processes.current().world,
                "query_heads_changed": len(reach),
            }
            with atomic_dir(adapter_dir) as tmp:
                adapter.save(tmp, base_model=lm.spec, training=training)
    except NonFinite as exc:
        raise UserError(_nan_message(str(exc), config, lm.dtype)) from None
    finally:
        adapter.detach()
    if ckpt is not None and not loop.stopped:
        ckpt.clear()
    return TrainResult(
        steps_done=loop.steps_done, steps_planned=loop.steps_planned, time_s=loop.time_s, final_loss=loop.final_loss,
        stopped=loop.stopped, stop_reason=loop.stop_reason, tokens=loop.tokens,
        trainable_params=adapter.num_params(), optimizer_state_bytes=loop.state_bytes, adapter_dir=str(adapter_dir),
        log_path=str(log_path), query_heads_changed=len(reach),
        extra={"n_samples": len(samples), "n_encoded": len(encoded), "dropped": list(encoded.dropped),
               "truncated": encoded.truncated, "answer_tokens": loop.answer_tokens, "heads": heads,
               "resumed_from": loop.resumed_from, "processes": Processes.current().world},
    )


def _fingerprint(encoded) -> str:
    """A short hash of the encoded training items (a checkpoint only resumes on the same data)."""
    h = hashlib.sha256()
    for item in encoded:
        h.update(bytes(str(item["input_ids"]), "ascii"))
        h.update(bytes(str(item["labels"]), "ascii"))
    return h.hexdigest()[:16]


def _nan_message(what: str, config: TrainConfig, dtype) -> str:
    lower = f"{min(config.lr / 10, 1e-3):g}"
    tail = " or load the model in fp32 or bf16 (dtype)" if dtype == torch.float16 else ""
    return (f"{what} became NaN/inf: lower the learning rate (lr, e.g. {lower}){tail}; "
            "no adapter was saved, the log up to the previous step is kept")
