"""Sparse head training (P2D Stage 3): train only the q/k/v/o slices of selected heads.

`train_heads` attaches a `HeadAdapter` (zero-initialised deltas on the selected heads' slices),
trains it with AdamW on the answer tokens of the samples (prompt tokens are not learned), and saves
it to ``out_dir/adapter/``.  The base model is left untouched: after the call its weights,
requires_grad flags and train/eval mode are what they were, and no adapter is attached (use
`p2d.adapter.load_adapter` to evaluate the result).

Schedule: linear warmup over ``ceil(warmup_ratio * steps)`` steps (step i of W uses lr*(i+1)/(W+1),
so no step has lr 0), then cosine decay towards 0 over the remaining steps.  One step = one
optimizer update over ``grad_accum`` batches; the loss is the mean over all answer tokens of those
batches.  Weight decay (AdamW) acts on the deltas only, never on frozen weights.  Batches are
shuffled per epoch (seed + epoch) and, by default, grouped by length to cut padding.

The model runs in train mode (dropout as its config says; 0 for Llama/SmolLM2, 0.1 for GPT-2).
Deltas and optimizer state are kept in fp32 whatever the model dtype (they are tiny); the forward
runs in the model dtype.  fp16 models get a warning (fp16 losses overflow to NaN; prefer bf16).

Supported: any model `p2d.geometry` supports, on CPU, CUDA or MPS; stop via ``should_stop()`` or
Ctrl-C (the current step finishes, adapter and log are saved, ``stopped=True``).  A NaN/inf loss or
gradient raises UserError without saving an adapter (the log so far stays on disk).
Not supported: resuming a stopped run, gradient checkpointing, multi-GPU, mixed-precision autocast,
training biases/MLPs/norms.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .adapter import ADAPTER_KINDS, PROJECTIONS, WEIGHTS_NAME, make_adapter, normalize_heads, normalize_projections
from .data.encoding import IGNORE_INDEX, collate, encode, iter_batches
from .errors import UserError, is_out_of_memory
from .gating import answer_token_losses

LOG_NAME = "train_log.jsonl"
ADAPTER_SUBDIR = "adapter"


@dataclass
class TrainConfig:
    """Settings of one head-training run (see the module docstring for the schedule)."""

    steps: int | None = None  # None: ceil(ceil(len(data) / batch_size) * epochs / grad_accum)
    epochs: float = 1.0
    lr: float = 1e-3  # worked for head training on the embedded model (docs/METHOD.md)
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    projections: tuple = PROJECTIONS
    weight_decay: float = 0.0  # decays the deltas only
    warmup_ratio: float = 0.05  # linear warmup, then cosine decay to 0
    max_grad_norm: float = 1.0  # 0 or None: no clipping
    seed: int = 0
    group_by_length: bool = True  # batches of similar length (less padding); batch order shuffled
    adapter: str = "heads"  # p2d.adapter.ADAPTER_KINDS: "heads" (q/k/v/o slices) or "offset" (LoFiT bias)

    def planned_steps(self, n_items: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        batches = math.ceil(n_items / self.batch_size)
        return max(1, math.ceil(batches * self.epochs / self.grad_accum))

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


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (AdamW fp32: 8 bytes per parameter; the scalar
    ``step`` counters are not counted)."""
    total = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr at 0-based ``step`` (see the module docstring)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def answer_loss(model, batch: dict, fast: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies over answer tokens, number of answer tokens); see
    `p2d.gating.answer_token_losses` for the fast path (LM head only at answer positions)."""
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


def _batches_forever(encoded, config: TrainConfig):
    epoch = 0
    while True:
        yield from iter_batches(encoded, config.batch_size, shuffle=True, seed=config.seed + epoch,
                                sort_by_length=config.group_by_length)
        epoch += 1


def train_heads(lm, heads, samples: list, config: TrainConfig, out_dir, progress: Callable | None = None,
                should_stop: Callable | None = None, on_log: Callable | None = None,
                overwrite: bool = False) -> TrainResult:
    """Train only the selected heads of ``lm`` (a LoadedModel) on ``samples`` (list of Sample).

    ``heads``: ``[[layer, head], ...]`` or a HeadScores-like object with ``.selected``.
    Writes ``out_dir/train_log.jsonl`` as it goes (one line per step: step, loss, lr, tokens_per_s,
    elapsed_s, plus grad_norm and tokens) and ``out_dir/adapter/`` at the end.  Calls
    ``progress(done, total, "train")`` and ``on_log(record)`` after each step; stops after the
    current step when ``should_stop()`` returns True or on Ctrl-C.  An existing adapter in
    ``out_dir`` is a UserError unless ``overwrite``.
    """
    config.check()
    model, tok = lm.model, lm.tokenizer
    attached = getattr(model, "_p2d_adapter_ref", None)
    if attached is not None and attached() is not None:
        raise UserError("the model has a head adapter attached (loaded for evaluation?): detach it before "
                        "training; training always starts from the base weights")
    heads = normalize_heads(heads, lm.geometry)
    if not heads:
        raise UserError("no heads selected: run head scoring first or give --heads")
    samples = list(samples or [])
    if not samples:
        raise UserError("no training samples: the training data is empty")
    out = Path(out_dir)
    adapter_dir, log_path = out / ADAPTER_SUBDIR, out / LOG_NAME
    if (adapter_dir / WEIGHTS_NAME).exists() and not overwrite:
        raise UserError(f"{adapter_dir} already holds an adapter: choose another output folder or delete it")
    encoded = encode(samples, tok, config.max_length)
    if not encoded:
        raise UserError(f"none of the {len(samples)} samples has an answer token left after encoding "
                        f"(max length {config.max_length}): raise --max-length or check the data")
    if lm.dtype == torch.float16 or next(model.parameters()).dtype == torch.float16:
        warnings.warn("training with an fp16 model: losses can overflow to NaN; use --dtype bf16 (or fp32)",
                      stacklevel=2)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    total = config.planned_steps(len(encoded))
    warmup = math.ceil(config.warmup_ratio * total)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    adapter = make_adapter(config.adapter, lm.geometry, heads, config.projections, dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    batches = _batches_forever(encoded, config)

    steps_done, tokens, answer_tokens, final_loss = 0, 0, 0, None
    stopped, stop_reason = False, None
    t0 = time.perf_counter()
    if progress:
        progress(0, total, "train")
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        model.train()
        adapter.attach(model)
        with open(log_path, "w", encoding="utf-8") as log, _Stop() as ctrl_c:
            try:
                while steps_done < total:
                    step = steps_done + 1
                    t_step = time.perf_counter()
                    lr = config.lr * lr_factor(steps_done, total, warmup)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    micro = [collate(next(batches), pad_id) for _ in range(config.grad_accum)]
                    n_answer = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
                    n_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    try:
                        for b in micro:
                            b = {k: v.to(device) for k, v in b.items()}
                            loss, _ = answer_loss(model, b)
                            loss_value = float(loss.detach())
                            if not math.isfinite(loss_value):
                                raise UserError(_nan_message("loss", step, config, lm.dtype))
                            (loss / max(1, n_answer)).backward()
                            loss_sum += loss_value
                    except Exception as exc:
                        if is_out_of_memory(exc):
                            optimizer.zero_grad(set_to_none=True)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                            raise UserError(f"out of memory at batch size {config.batch_size} x {config.max_length} "
                                            f"tokens on {device}: lower --batch-size (raise --grad-accum to keep "
                                            "the effective batch) or --max-length") from exc
                        raise
                    if config.max_grad_norm:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(adapter.parameters(), config.max_grad_norm))
                    else:
                        grad_norm = float(torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in adapter.parameters() if p.grad is not None])))
                    if not math.isfinite(grad_norm):
                        raise UserError(_nan_message("gradient", step, config, lm.dtype))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps_done = step
                    tokens += n_tokens
                    answer_tokens += n_answer
                    final_loss = loss_sum / max(1, n_answer)
                    now = time.perf_counter()
                    record = {"step": step, "loss": round(final_loss, 6), "lr": lr,
                              "tokens_per_s": round(n_tokens / max(now - t_step, 1e-9), 2),
                              "elapsed_s": round(now - t0, 3), "grad_norm": round(grad_norm, 6),
                              "tokens": n_tokens}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if progress:
                        progress(steps_done, total, "train")
                    if on_log:
                        on_log(record)
                    if ctrl_c.requested:
                        stopped, stop_reason = True, "interrupted (Ctrl-C)"
                        break
                    if should_stop is not None and steps_done < total and should_stop():
                        stopped, stop_reason = True, "stop requested"
                        break
            except KeyboardInterrupt:
                optimizer.zero_grad(set_to_none=True)  # a half-done step is discarded
                stopped, stop_reason = True, "interrupted (Ctrl-C)"
        elapsed = time.perf_counter() - t0
        if not all(torch.isfinite(p).all() for p in adapter.parameters()):
            raise UserError(_nan_message("weights", steps_done, config, lm.dtype))
        state_bytes = optimizer_state_bytes(optimizer)
        training = {
            "config": config.to_dict(), "steps_done": steps_done, "steps_planned": total,
            "final_loss": final_loss, "stopped": stopped, "stop_reason": stop_reason,
            "time_s": round(elapsed, 3), "samples": len(samples), "encoded": len(encoded),
            "dropped": len(encoded.dropped), "truncated": encoded.truncated, "tokens": tokens,
            "answer_tokens": answer_tokens, "device": str(device), "model_dtype": str(lm.dtype).replace("torch.", ""),
        }
        adapter.save(adapter_dir, base_model=lm.spec, training=training)
    finally:
        adapter.detach()
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return TrainResult(
        steps_done=steps_done, steps_planned=total, time_s=elapsed, final_loss=final_loss, stopped=stopped,
        stop_reason=stop_reason, tokens=tokens, trainable_params=adapter.num_params(),
        optimizer_state_bytes=state_bytes, adapter_dir=str(adapter_dir), log_path=str(log_path),
        extra={"n_samples": len(samples), "n_encoded": len(encoded), "dropped": list(encoded.dropped),
               "truncated": encoded.truncated, "answer_tokens": answer_tokens, "heads": heads},
    )


def _nan_message(what: str, step: int, config: TrainConfig, dtype) -> str:
    lower = f"{min(config.lr / 10, 1e-3):g}"
    tail = " or load the model in fp32/bf16 (--dtype fp32)" if dtype == torch.float16 else ""
    return (f"{what} became NaN/inf at step {step}: lower --lr (e.g. {lower}){tail}; "
            "no adapter was saved, the log up to the previous step is kept")
