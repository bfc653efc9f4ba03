"""Stage 2: score every pool sample with the selected heads H and keep the top ``ratio``.

Scores (NOTES §1); higher = more wanted:

- ``ablation``: answer-token loss with the heads of H gated to zero minus the loss of the full model
  (AttentionInfluence-style): how much the sample relies on H. Two no-grad forwards per batch on the
  same encoded batch.
- ``alignment``: cosine between the sample's gate-gradient vector on H (dL_i/dgate for each head of
  H, gates at 1) and the probe set's mean gate-gradient vector: a gradient-matching score in head
  space (LESS does this in LoRA space). Needs ``probe``. Per-sample gates ``[B, n_q]`` give every
  sample's gradient from one backward per batch; autograd only runs down to the lowest layer of H.
- ``activation``: mean output norm of the heads of H on the answer tokens, each relative to the mean
  norm of all heads of its layer, averaged over H. One forward that stops right after the last layer
  of H (no logits).
- ``random``: a seeded control (``random.Random(seed)``), no model pass.

"Answer tokens" are the positions that predict answer tokens (where the loss is taken), see
`p2d.gating.answer_positions`; every loss is the sample's *mean* answer-token cross-entropy.

Cost control (NOTES §7): samples are encoded once, sorted by length into batches of at most
``batch_size`` (little padding; memory bounded by ``batch_size x max_length`` tokens), only the
layers of H are hooked, logits are computed only at answer positions, and ``activation`` stops the
forward after the last layer it needs. Every parameter is frozen during scoring and restored after.

Samples that end up without answer tokens (see `p2d.data.encoding.encode`) get score NaN, are never
selected and are counted in ``extra["unscored"]``. ``should_stop()`` returning True ends scoring
early; the selection is then made among the samples scored so far and ``extra["stopped"]`` is True.

``scores.jsonl`` / ``selection.json`` write NaN as null.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.encoding import collate, encode, iter_batches
from .data.formats import Sample
from .errors import UserError
from .gating import HeadGate, answer_losses, answer_positions, heads_by_layer
from .geometry import normalize_heads
from .heads import HeadScores, _jsonable, check_ratio, frozen, top_count
from .progress import Ticker

SELECT_METHODS = ("ablation", "alignment", "activation", "random")
#: Chosen with bench/select_quality.py (embedded SmolLM2-135M, built-in pool of 400, 10% target, top 10% kept):
#: with contrasted gradient heads, activation reached target precision 0.675 (addition) / 0.75 (units),
#: AUROC 0.98, at ~70 s per 1,000 samples on a 2-core CPU; alignment 0.625 / 0.725 at ~195 s; ablation
#: 0.275 at ~160 s. Activation needs no probe at selection time; with random heads it falls to 0 (the
#: falsification control works), while alignment keeps 0.5-0.575 with random heads.
DEFAULT_SELECT_METHOD = "activation"

__all__ = ["SELECT_METHODS", "DEFAULT_SELECT_METHOD", "Selection", "select_data", "head_list"]

SELECTED_FILE = "selected.jsonl"    # the kept pool rows (with their score as p2d_score), best first
SCORES_FILE = "scores.jsonl"        # every pool row's score, in pool order
SELECTION_FILE = "selection.json"   # method, counts, kept positions, extra


# ------------------------------------------------------------------------------------------ result


def _count(labels) -> dict[str, int]:
    c: dict[str, int] = {}
    for t in labels:
        if t is not None:
            c[t] = c.get(t, 0) + 1
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _default(obj):
    """json.dumps fallback for values rows may carry (numpy scalars/arrays, dates, bytes...)."""
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, TypeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return str(obj)


def _dump(obj) -> str:
    return json.dumps(_jsonable(obj), ensure_ascii=False, default=_default)


@dataclass
class Selection:
    """Per-sample scores for a pool and the kept positions (indices into that pool list), best first."""

    method: str
    ratio: float
    n_pool: int
    n_selected: int
    time_s: float
    scores: list[float]
    selected: list[int]
    extra: dict = field(default_factory=dict)

    def task_counts(self, pool: list[Sample]) -> dict[str, int] | None:
        """Task label -> count among the selected samples; None when the pool has no labels."""
        if not any(s.task is not None for s in pool):
            return None
        return _count(pool[i].task for i in self.selected)

    def with_ratio(self, ratio: float) -> "Selection":
        """The same scores with a different share kept (no rescoring)."""
        selected = top_samples(self.scores, check_ratio(ratio, "data ratio"))
        return dataclasses.replace(self, ratio=ratio, selected=selected, n_selected=len(selected))

    def selected_samples(self, pool: list[Sample]) -> list[Sample]:
        return [pool[i] for i in self.selected]

    def save(self, out_dir, pool: list[Sample]) -> dict[str, Path]:
        """Write selected.jsonl, scores.jsonl and selection.json into ``out_dir``; returns their paths.

        ``pool`` must be the list the selection was computed on.
        """
        if len(pool) != self.n_pool:
            raise ValueError(f"pool has {len(pool)} samples but the selection was made on {self.n_pool}")
        from .files import write_json, write_jsonl

        out = Path(out_dir)
        paths = {"selected": out / SELECTED_FILE, "scores": out / SCORES_FILE, "selection": out / SELECTION_FILE}
        write_jsonl(paths["selected"], ({**pool[i].row, "p2d_score": self.scores[i]} for i in self.selected))
        write_jsonl(paths["scores"], ({"index": s.index, "score": score, "task": s.task}
                                      for s, score in zip(pool, self.scores)))
        summary = {"method": self.method, "ratio": self.ratio, "n_pool": self.n_pool, "n_selected": self.n_selected,
                   "time_s": self.time_s}
        counts = self.task_counts(pool)
        if counts is not None:
            summary["task_counts"] = counts
            summary["pool_task_counts"] = _count(s.task for s in pool)
        summary["extra"] = self.extra
        summary["selected"] = self.selected
        write_json(paths["selection"], summary)  # written last: its presence means the files are complete
        return paths

    @classmethod
    def load(cls, out_dir) -> "Selection":
        """Read what `save` wrote into ``out_dir`` (UserError when missing or inconsistent)."""
        out = Path(out_dir)
        try:
            summary = json.loads((out / SELECTION_FILE).read_text(encoding="utf-8"))
            scores = [json.loads(line)["score"] for line in (out / SCORES_FILE).read_text(encoding="utf-8").splitlines()
                      if line.strip()]
            selected = [int(i) for i in summary["selected"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{out} holds no complete selection ({exc}); run the selection stage again") from None
        scores = [float("nan") if s is None else float(s) for s in scores]
        if len(scores) != summary.get("n_pool") or any(not 0 <= i < len(scores) for i in selected):
            raise UserError(f"{out}: {SCORES_FILE} does not match {SELECTION_FILE}; run the selection stage again")
        return cls(method=summary["method"], ratio=float(summary["ratio"]), n_pool=len(scores),
                   n_selected=len(selected), time_s=float(summary.get("time_s") or 0.0), scores=scores,
                   selected=selected, extra=dict(summary.get("extra") or {}))


# ---------------------------------------------------------------------------------------- helpers


def head_list(heads, geometry) -> list[list[int]]:
    """[[layer, head], ...] from a HeadScores or a list of pairs, validated, deduplicated, sorted."""
    if heads is None:
        raise UserError("no heads given: run the heads stage first or pass [[layer, head], ...]")
    out = normalize_heads(heads, geometry)
    if not out:
        raise UserError("the head list is empty: select at least one head")
    return out


def _gate_vectors(lm, gate: HeadGate, by_layer: dict[int, list[int]], batch: dict) -> torch.Tensor:
    """Per-sample gate gradients on H: [B, |H|] (heads ordered by layer, then head)."""
    n = batch["input_ids"].shape[0]
    n_q = lm.geometry.n_q_heads
    gates = {layer: torch.ones(n, n_q, device=lm.device, dtype=torch.float32, requires_grad=True) for layer in by_layer}
    for layer, g in gates.items():
        gate.set_gate(layer, g)
    try:
        with torch.enable_grad():
            loss = answer_losses(lm.model, batch).sum()
        grads = torch.autograd.grad(loss, [gates[layer] for layer in by_layer], allow_unused=True)
    finally:
        gate.clear_gates()
    cols = []
    for (layer, heads), gr in zip(by_layer.items(), grads):
        gr = torch.zeros(n, n_q, device=lm.device) if gr is None else gr
        cols.append(gr.detach()[:, heads].float())
    return torch.cat(cols, dim=1).cpu()


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


# ----------------------------------------------------------------------------------------- select


def select_data(lm, heads, pool: list[Sample], method: str = DEFAULT_SELECT_METHOD, ratio: float = 0.1,
                probe: list[Sample] | None = None, batch_size: int = 8, max_length: int = 256, seed: int = 0,
                progress=None, should_stop=None) -> Selection:
    """Score every sample of ``pool`` with heads ``heads`` (HeadScores or [[layer, head], ...]) and
    keep the top ``ratio`` (at least one). See the module docstring for the methods."""
    if method not in SELECT_METHODS:
        raise UserError(f"unknown selection method {method!r}: use one of {', '.join(SELECT_METHODS)}")
    ratio = check_ratio(ratio, "data ratio")
    pool = list(pool or [])
    if not pool:
        raise UserError("the pool is empty: give at least one sample to select from")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    geo = lm.geometry
    hl = head_list(heads, geo)
    by_layer = heads_by_layer(hl)
    if method == "alignment" and not probe:
        raise UserError("the alignment score needs a probe set (a few target-task samples): pass --probe, "
                        "or pick another selection method")
    start = time.perf_counter()
    n = len(pool)
    scores = [float("nan")] * n
    extra: dict = {"heads": hl, "n_heads": len(hl), "layers": sorted(by_layer)}
    if isinstance(heads, HeadScores):
        extra["head_method"] = heads.method
    stopped = False

    if method == "random":
        rng = random.Random(seed)
        scores = [rng.random() for _ in range(n)]
        extra["seed"] = seed
        if progress is not None:
            progress(1, 1, "random scores")
    else:
        # encode once, with positions as indices so results map back to the pool list
        indexed = [dataclasses.replace(s, index=i) for i, s in enumerate(pool)]
        encoded = encode(indexed, lm.tokenizer, max_length)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        groups = list(iter_batches(encoded, batch_size, sort_by_length=True))
        extra.update(unscored=len(encoded.dropped), truncated=encoded.truncated,
                     tokens=sum(len(it["input_ids"]) for it in encoded), batches=len(groups))

        def tensors(items):
            b = collate(items, pad)
            return {k: v.to(lm.device) for k, v in b.items()}

        probe_batches = []
        if method == "alignment":
            penc = encode(list(probe), lm.tokenizer, max_length)
            if not penc:
                raise UserError("no probe sample has answer tokens within the max length; raise max_length")
            probe_batches = list(iter_batches(penc, batch_size, sort_by_length=True))
        bar = Ticker(progress, len(groups) + len(probe_batches))

        with frozen(lm.model):
            if method == "ablation":
                stopped = _ablation(lm, by_layer, groups, tensors, scores, bar, should_stop)
            elif method == "activation":
                stopped = _activation(lm, by_layer, groups, tensors, scores, bar, should_stop)
            else:
                stopped, info = _alignment(lm, by_layer, probe_batches, groups, tensors, scores, bar, should_stop)
                extra.update(info)

    extra["stopped"] = stopped
    selected = top_samples(scores, ratio)
    return Selection(method=method, ratio=ratio, n_pool=n, n_selected=len(selected),
                     time_s=round(time.perf_counter() - start, 3), scores=scores, selected=selected, extra=extra)


def top_samples(scores: list[float], ratio: float) -> list[int]:
    """Positions of the top ``ratio`` of ``scores`` (at least one), best first; NaN never kept."""
    order = sorted((i for i, v in enumerate(scores) if math.isfinite(v)), key=lambda i: (-scores[i], i))
    return order[:top_count(len(scores), ratio)]


def _ablation(lm, by_layer, groups, tensors, scores, bar, should_stop) -> bool:
    geo = lm.geometry
    off = {}
    for layer, heads in by_layer.items():
        g = torch.ones(geo.n_q_heads, device=lm.device)
        g[heads] = 0.0
        off[layer] = g
    with torch.no_grad(), HeadGate(lm.model, geo, layers=list(by_layer)) as gate:
        for items in groups:
            if should_stop is not None and should_stop():
                return True
            batch = _inputs(tensors(items))
            gate.clear_gates()
            full = answer_losses(lm.model, batch)
            for layer, g in off.items():
                gate.set_gate(layer, g)
            ablated = answer_losses(lm.model, batch)
            gate.clear_gates()
            for it, a, f in zip(items, ablated.tolist(), full.tolist()):
                scores[it["index"]] = a - f
            bar.step(f"ablation: {bar.done + 1}/{bar.total} batches")
    return False


def _activation(lm, by_layer, groups, tensors, scores, bar, should_stop) -> bool:
    geo = lm.geometry
    model = lm.model
    body = getattr(model, "base_model", None) or model
    last = max(by_layer)
    with torch.no_grad(), HeadGate(model, geo, layers=list(by_layer), stop_after=last) as gate:
        for items in groups:
            if should_stop is not None and should_stop():
                return True
            batch = tensors(items)
            gate.capture(answer_positions(batch["labels"]))
            gate.run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            rel = []
            for layer, heads in by_layer.items():
                norms = gate.norms[layer]  # [B, n_q]
                rel.append(norms[:, heads] / norms.mean(dim=1, keepdim=True).clamp_min(1e-12))
            value = torch.cat(rel, dim=1).mean(dim=1)
            for it, v in zip(items, value.tolist()):
                scores[it["index"]] = v
            gate.capture(None)
            bar.step(f"activation: {bar.done + 1}/{bar.total} batches")
    return False


def _alignment(lm, by_layer, probe_batches, groups, tensors, scores, bar, should_stop):
    info: dict = {}
    with HeadGate(lm.model, lm.geometry, layers=list(by_layer)) as gate:
        total, count = None, 0
        for items in probe_batches:
            if should_stop is not None and should_stop():
                return True, info
            v = _gate_vectors(lm, gate, by_layer, _inputs(tensors(items)))
            total = v.sum(0) if total is None else total + v.sum(0)
            count += v.shape[0]
            bar.step(f"probe gradients: {count} samples")
        target = total / count
        info.update(probe_samples=count, probe_grad_norm=float(target.norm()))
        target_unit = target / target.norm().clamp_min(1e-12)
        for items in groups:
            if should_stop is not None and should_stop():
                return True, info
            v = _gate_vectors(lm, gate, by_layer, _inputs(tensors(items)))
            cos = (v @ target_unit) / v.norm(dim=1).clamp_min(1e-12)
            for it, c in zip(items, cos.tolist()):
                scores[it["index"]] = c
            bar.step(f"alignment: {bar.done + 1}/{bar.total} batches")
    return False, info
