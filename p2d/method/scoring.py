"""What head scoring (`p2d.method.heads`) and data selection (`p2d.method.selection`) share: the share checks and top
shares, samples encoded once into length-sorted batches with their answer-position masks
(`p2d.method.gating.POSITIONS`), the per-sample answer loss of such a batch, and the job record every
registered method receives (`HeadJob`, `SelectJob`: a method is one function of its job).

Two batch forms: `loss_batches` encodes and moves every batch to the model's device at once (head
scoring: a probe set and a pool sample, passed over several times); `EncodedBatches` keeps the
encoded items and builds each batch's tensors when asked (data selection: a whole pool, passed over
once, so only one batch is on the device at a time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data.encoding import collate, encode, iter_batches
from ..data.formats import Sample
from ..errors import UserError
from .gating import POSITIONS, answer_losses, position_mask, special_token_ids


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """``ratio`` as a float in (0, 1]; UserError naming ``what`` otherwise."""
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < r <= 1.0):
        raise UserError(f"{what} must be in (0, 1] (e.g. 0.1 for 10%), got {ratio!r}")
    return r


def top_count(n: int, ratio: float) -> int:
    """round(ratio * n) (halves up), at least 1, at most n."""
    return max(1, min(n, int(math.floor(ratio * n + 0.5))))


def top_samples(scores: list[float], ratio: float) -> list[int]:
    """Positions of the top ``ratio`` of ``scores`` (at least one), best first; NaN never kept."""
    order = sorted((i for i, v in enumerate(scores) if math.isfinite(v)), key=lambda i: (-scores[i], i))
    return order[:top_count(len(scores), ratio)]


def check_positions(positions: str) -> str:
    """``positions`` if it is one of `p2d.method.gating.POSITIONS`; UserError otherwise."""
    if positions not in POSITIONS:
        raise UserError(f"unknown answer positions {positions!r}: use one of {', '.join(POSITIONS)}")
    return positions


def loss_batches(lm, samples: list[Sample], batch_size: int, max_length: int, shuffle=False, seed=0,
                 positions: str = "all"):
    """Encoded, length-bucketed batches (dicts of tensors on the model's device); ``"positions"`` is
    the bool mask of the answer positions the loss is taken at (see `p2d.method.gating.POSITIONS`)."""
    encoded = encode(samples, lm.tokenizer, max_length)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    special = special_token_ids(lm.tokenizer) if positions == "content" else None
    out = []
    for items in iter_batches(encoded, batch_size, shuffle=shuffle, seed=seed, sort_by_length=True):
        b = collate(items, pad)
        b["positions"] = position_mask(b["labels"], positions, special)
        out.append({k: v.to(lm.device) for k, v in b.items()} | {"index": [it["index"] for it in items]})
    return out


def model_inputs(batch: dict) -> dict:
    """The keys of a batch the model's forward and `answer_losses` take."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def batch_losses(model, batch: dict) -> torch.Tensor:
    """Per-sample mean answer loss of a `loss_batches` batch, at its chosen positions ([B])."""
    return answer_losses(model, model_inputs(batch), positions=batch.get("positions"))


def padded_tokens(groups) -> int:
    """Tokens the batches ``groups`` (lists of encoded items) compute once padded to their longest member."""
    return sum(len(g) * max(len(it["input_ids"]) for it in g) for g in groups if g)


def batch_token_counts(batches) -> dict:
    """``tokens`` (real) and ``padded_tokens`` (computed once padded) of `loss_batches` batches, the keys
    `EncodedBatches.info` reports them under."""
    return {"tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
            "padded_tokens": int(sum(b["input_ids"].numel() for b in batches))}


class EncodedBatches:
    """Samples encoded once (``index`` = position in the given list), length-sorted batch groups, and
    the per-batch tensors / position masks."""

    def __init__(self, lm, samples: list[Sample], batch_size: int, max_length: int, positions: str):
        indexed = [dataclasses.replace(s, index=i) for i, s in enumerate(samples)]
        self.items = encode(indexed, lm.tokenizer, max_length)
        self.groups = list(iter_batches(self.items, batch_size, sort_by_length=True))
        self.pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self.device = lm.device
        self.positions = positions
        self.special = special_token_ids(lm.tokenizer) if positions == "content" else None
        self.batch_size = batch_size

    def tensors(self, items) -> dict:
        b = collate(items, self.pad)
        return {k: v.to(self.device) for k, v in b.items()}

    def mask(self, batch: dict):
        return position_mask(batch["labels"], self.positions, self.special)

    def info(self) -> dict:
        return {"unscored": len(self.items.dropped), "truncated": self.items.truncated,
                "tokens": sum(len(it["input_ids"]) for it in self.items), "padded_tokens": padded_tokens(self.groups),
                "batches": len(self.groups)}



@dataclass
class HeadJob:
    """What a head-scoring method (`p2d.method.heads.HEAD_METHODS`) is given: the model, the probe set and
    the pool, and `p2d.method.heads.score_heads`'s settings (checked there). ``tick`` reports progress
    (`p2d.progress.Ticker`); the method returns ``(scores [n_layers][n_q], extra, stopped)``."""

    method: str
    lm: Any
    probe: list
    pool: list | None
    seed: int
    batch_size: int
    max_length: int
    positions: str
    proxy_steps: int
    proxy_lr: float | None
    contrast: bool | str
    l1: float
    progress: Callable | None
    should_stop: Callable | None
    tick: Any = None


@dataclass
class SelectJob:
    """What a selection method (`p2d.method.selection.SELECT_METHODS`) is given: `select_data`'s inputs and
    settings (checked there), and where it writes: ``scores`` (one per pool row, NaN until scored) and
    ``extra``. A head-guided method also gets its heads by layer (``by_layer``), the encoded pool
    (``enc``) and this process's batches of it (``groups``), the encoded probe batches when it needs the
    probe (``probe_groups``), a progress ``bar`` and the processes (``procs``); ``owned`` lists the pool
    rows this process scored (a method that scores other rows replaces it). It returns True when stopped."""

    method: str
    lm: Any
    pool: list
    probe: list | None
    ratio: float
    seed: int
    batch_size: int
    max_length: int
    positions: str
    hidden_layer: int | None
    prefilter_factor: float
    progress: Callable | None
    should_stop: Callable | None
    scores: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    by_layer: dict = field(default_factory=dict)
    enc: Any = None
    groups: list = field(default_factory=list)
    probe_groups: list = field(default_factory=list)
    bar: Any = None
    procs: Any = None
    owned: list = field(default_factory=list)
