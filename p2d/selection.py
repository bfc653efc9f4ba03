"""Stage 2: score every pool sample with the selected heads H and keep the top ``ratio``.

Scores (``SELECT_METHODS``; formulas and sources also in docs/METHOD.md); higher = more wanted:

- ``ablation``: answer-token loss with the heads of H gated to zero minus the loss of the full model
  (AttentionInfluence-style): how much the sample relies on H. Two no-grad forwards per batch on the
  same encoded batch.
- ``alignment``: cosine between the sample's gate-gradient vector on H (dL_i/dgate for each head of
  H, gates at 1) and the probe set's mean gate-gradient vector: a gradient-matching score in head
  space (LESS does this in LoRA space). Needs ``probe``. Per-sample gates ``[B, n_q]`` give every
  sample's gradient from one backward per batch. Only the layers of H are hooked and only their gates
  require grad (every weight is frozen), so autograd runs from the loss down to the lowest layer of H
  and no further; the forward itself still runs the whole model (the loss needs the logits).
- ``activation``: mean output norm of the heads of H on the answer positions, each relative to the
  mean norm of all heads of its layer at the same positions, averaged over H. One forward that stops
  right after the last layer of H (no logits).
- ``activation_length_z``: ``activation`` z-scored within buckets of samples with similar numbers of
  scored positions (`length_z`), so a score that merely tracks answer length is removed. Buckets:
  the pool's distinct position counts, shortest first, merged until each bucket holds at least
  ``max(10, N // 20)`` samples (a short remainder joins the last bucket).
- ``prefilter_alignment``: two passes. ``activation`` over the whole pool keeps the top
  ``min(1, prefilter_factor * ratio)`` share (default ``PREFILTER_FACTOR`` = 3x the final ratio), then
  ``alignment`` scores only those. Kept samples score their cosine in [-1, 1]; the others score in
  (-3, -2), ordered by their activation, so they always rank below the kept ones and a later
  `Selection.with_ratio` beyond the prefilter share falls back to the activation order.
- ``random``: a seeded control (``random.Random(seed)``), no model pass.

Answer positions (``positions``, one of ``POSITIONS``; `p2d.gating`): ``"all"`` (default) takes every
position that predicts an answer token, which with a chat template includes the end-of-turn marker
and the template's trailing newline; ``"content"`` drops those (positions predicting the first
special token of the answer and everything after it). It applies to activation (where the norms are
averaged), ablation and alignment (where the loss is taken), and to the first pass of
prefilter_alignment. Every loss is the sample's *mean* cross-entropy over the chosen positions.

Cost control: samples are encoded once, sorted by length into batches of at most ``batch_size``
(little padding; memory bounded by ``batch_size x max_length`` tokens), only the layers of H are
hooked, logits are computed only at answer positions, and activation stops the forward after the
last layer it needs. Every parameter is frozen during scoring and restored after.
`plain_forward_seconds` times one plain no-grad forward over the same samples and batching, the unit
in which the benchmark reports selection cost.

Per-sample features for benchmarks: `head_features` records, for every sample, the activation
statistic and the gate gradient of *every* (layer, head) in one pass; `activation_from_features` and
`alignment_from_features` then score any head set without rerunning the model (they reproduce
`select_data`'s activation / alignment scores to float rounding).

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
from .distributed import Processes
from .data.formats import Sample
from .errors import UserError
from .gating import POSITIONS, HeadGate, answer_losses, heads_by_layer, position_mask, special_token_ids
from .geometry import normalize_heads
from .heads import HeadScores, check_ratio, top_count
from .models import frozen
from .progress import Ticker
from .selection_baselines import BASELINE_HELP, BASELINE_METHODS, baseline_scores

SELECT_METHODS = ("ablation", "alignment", "activation", "random", "activation_length_z", "prefilter_alignment",
                  *BASELINE_METHODS)
#: one line per selection method, for UIs and CLI help
SELECT_METHOD_HELP = {
    "ablation": "ablation: answer loss with the selected heads gated off minus with them on",
    "alignment": "alignment: cosine between a sample's head-gate gradient and the probe set's mean",
    "activation": "activation: output norm of the selected heads on the answer tokens (one forward)",
    "random": "random: a seeded control",
    "activation_length_z": "activation_length_z: activation z-scored among samples of similar answer length",
    "prefilter_alignment": "prefilter_alignment: activation keeps the top 3x share, alignment ranks those",
    **{m: f"{m}: {h}" for m, h in BASELINE_HELP.items()},
}
#: answer positions used by default (see `p2d.gating.POSITIONS`): all answer positions beat content-only ones
#: with gradient, gradient_layer and gradient_logratio heads in the same study (bench/choose_defaults.py)
DEFAULT_POSITIONS = "all"
#: prefilter_alignment: the first (activation) pass keeps this many times the final ratio
PREFILTER_FACTOR = 3.0
#: activation_length_z: smallest bucket is max(LENGTH_BUCKET_MIN, N // LENGTH_BUCKETS) samples
LENGTH_BUCKET_MIN = 10
LENGTH_BUCKETS = 20
#: Chosen with the head method (see `p2d.heads.DEFAULT_HEAD_METHOD`, bench/choose_defaults.py): activation at
#: all answer positions gave the highest mean precision over the seven built-in targets; the length z-score
#: lowered it on every target (answer length is itself task information on the built-in pool); alignment
#: (measured on a 300-row pool, docs/BENCHMARKS.md) was at or below activation at ~3x its cost, and finds
#: the target with random heads too (its signal is gradient similarity, not the heads).
DEFAULT_SELECT_METHOD = "activation"

__all__ = ["SELECT_METHODS", "SELECT_METHOD_HELP", "DEFAULT_SELECT_METHOD", "POSITIONS", "DEFAULT_POSITIONS", "PREFILTER_FACTOR",
           "Selection", "select_data", "head_list", "length_z", "HeadFeatures", "head_features",
           "activation_from_features", "alignment_from_features", "plain_forward_seconds"]

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


def _check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise UserError(f"unknown answer positions {positions!r}: use one of {', '.join(POSITIONS)}")
    return positions


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
                "tokens": sum(len(it["input_ids"]) for it in self.items), "batches": len(self.groups)}


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _gate_vectors(lm, gate: HeadGate, by_layer: dict[int, list[int]], batch: dict, positions=None) -> torch.Tensor:
    """Per-sample gate gradients on H: [B, |H|] (heads ordered by layer, then head)."""
    n = batch["input_ids"].shape[0]
    n_q = lm.geometry.n_q_heads
    gates = {layer: torch.ones(n, n_q, device=lm.device, dtype=torch.float32, requires_grad=True) for layer in by_layer}
    for layer, g in gates.items():
        gate.set_gate(layer, g)
    try:
        with torch.enable_grad():
            loss = answer_losses(lm.model, batch, positions=positions).sum()
        grads = torch.autograd.grad(loss, [gates[layer] for layer in by_layer], allow_unused=True)
    finally:
        gate.clear_gates()
    cols = []
    for (layer, heads), gr in zip(by_layer.items(), grads):
        gr = torch.zeros(n, n_q, device=lm.device) if gr is None else gr
        cols.append(gr.detach()[:, heads].float())
    return torch.cat(cols, dim=1).cpu()


# ----------------------------------------------------------------------------------------- select


def select_data(lm, heads, pool: list[Sample], method: str = DEFAULT_SELECT_METHOD, ratio: float = 0.1,
                probe: list[Sample] | None = None, batch_size: int = 8, max_length: int = 256, seed: int = 0,
                progress=None, should_stop=None, positions: str = DEFAULT_POSITIONS,
                prefilter_factor: float = PREFILTER_FACTOR, hidden_layer: int | None = None) -> Selection:
    """Score every sample of ``pool`` with heads ``heads`` (HeadScores or [[layer, head], ...]) and
    keep the top ``ratio`` (at least one). See the module docstring for the methods, ``positions``
    (one of ``POSITIONS``) and ``prefilter_factor`` (prefilter_alignment only). The head-free methods
    (`p2d.selection_baselines`: tfidf, bm25, hidden) ignore ``heads`` (None is fine) and
    ``positions``; ``hidden_layer`` is hidden's layer (None: the middle one)."""
    if method not in SELECT_METHODS:
        raise UserError(f"unknown selection method {method!r}: use one of {', '.join(SELECT_METHODS)}")
    ratio = check_ratio(ratio, "data ratio")
    positions = _check_positions(positions)
    pool = list(pool or [])
    if not pool:
        raise UserError("the pool is empty: give at least one sample to select from")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    if method == "prefilter_alignment" and not (isinstance(prefilter_factor, (int, float)) and prefilter_factor >= 1
                                                and math.isfinite(prefilter_factor)):
        raise UserError(f"the prefilter factor must be a number >= 1 (got {prefilter_factor!r})")
    if method in BASELINE_METHODS:
        start = time.perf_counter()
        scores, extra, stopped = baseline_scores(method, lm, pool, probe, batch_size, max_length, hidden_layer,
                                                 progress, should_stop)
        extra["stopped"] = stopped
        selected = top_samples(scores, ratio)
        return Selection(method=method, ratio=ratio, n_pool=len(pool), n_selected=len(selected),
                         time_s=round(time.perf_counter() - start, 3), scores=scores, selected=selected, extra=extra)
    geo = lm.geometry
    hl = head_list(heads, geo)
    by_layer = heads_by_layer(hl)
    if method in ("alignment", "prefilter_alignment") and not probe:
        raise UserError(f"the {method} score needs a probe set (a few target-task samples): give a probe file (probe), "
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
        procs = Processes.current()
        should_stop = procs.agreed(should_stop)
        enc = EncodedBatches(lm, pool, batch_size, max_length, positions)
        extra.update(enc.info(), positions=positions)
        groups, own = procs.padded(enc.groups)  # a sharded model: padded with copies, never merged
        owned = [it["index"] for g in groups[:own] for it in g]
        probe_groups = []
        if method in ("alignment", "prefilter_alignment"):
            penc = encode(list(probe), lm.tokenizer, max_length)
            if not penc:
                raise UserError("no probe sample has answer tokens within the max length; raise max_length")
            probe_groups = list(iter_batches(penc, batch_size, sort_by_length=True))
        bar = Ticker(progress, len(groups) + len(probe_groups))

        with frozen(lm.model):
            if method == "ablation":
                stopped = _ablation(lm, by_layer, enc, groups, scores, bar, should_stop)
            elif method in ("activation", "activation_length_z"):
                lengths = [0] * n
                stopped = _activation(lm, by_layer, enc, groups, scores, bar, should_stop, lengths)
                lengths = procs.merge(lengths, owned)
                if method == "activation_length_z":
                    scores = procs.merge(scores, owned)
                    extra["raw_scores_range"] = _finite_range(scores)
                    scores = length_z(scores, lengths)
            elif method == "alignment":
                stopped, info = _alignment(lm, by_layer, enc, probe_groups, groups, scores, bar, should_stop)
                extra.update(info)
            else:
                stopped, info, owned = _prefilter_alignment(lm, by_layer, enc, probe_groups, scores, ratio,
                                                            float(prefilter_factor), bar, should_stop, procs)
                extra.update(info)
        scores = procs.merge(scores, owned)
        stopped = any(procs.gather(stopped))
        extra.update(procs.summary(len(owned)))

    extra["stopped"] = stopped
    selected = top_samples(scores, ratio)
    return Selection(method=method, ratio=ratio, n_pool=n, n_selected=len(selected),
                     time_s=round(time.perf_counter() - start, 3), scores=scores, selected=selected, extra=extra)


def top_samples(scores: list[float], ratio: float) -> list[int]:
    """Positions of the top ``ratio`` of ``scores`` (at least one), best first; NaN never kept."""
    order = sorted((i for i, v in enumerate(scores) if math.isfinite(v)), key=lambda i: (-scores[i], i))
    return order[:top_count(len(scores), ratio)]


def _finite_range(values) -> list[float] | None:
    f = [v for v in values if math.isfinite(v)]
    return [min(f), max(f)] if f else None


def length_z(scores: list[float], lengths: list[int], min_bucket: int | None = None) -> list[float]:
    """Scores z-scored within buckets of similar length (see the module docstring); NaN stays NaN.

    ``min_bucket`` defaults to ``max(LENGTH_BUCKET_MIN, N // LENGTH_BUCKETS)`` with N the number of
    finite scores. A bucket with zero spread gets z = 0.
    """
    idx = [i for i, v in enumerate(scores) if math.isfinite(v)]
    out = [float("nan")] * len(scores)
    if not idx:
        return out
    size = min_bucket if min_bucket is not None else max(LENGTH_BUCKET_MIN, len(idx) // LENGTH_BUCKETS)
    by_len: dict[int, list[int]] = {}
    for i in idx:
        by_len.setdefault(int(lengths[i]), []).append(i)
    buckets: list[list[int]] = []
    current: list[int] = []
    for length in sorted(by_len):
        current += by_len[length]
        if len(current) >= size:
            buckets.append(current)
            current = []
    if current:
        if buckets:
            buckets[-1] += current
        else:
            buckets.append(current)
    for bucket in buckets:
        vals = torch.tensor([scores[i] for i in bucket], dtype=torch.float64)
        mean = vals.mean()
        std = vals.std(unbiased=False) if len(bucket) > 1 else torch.tensor(0.0, dtype=torch.float64)
        for i, v in zip(bucket, vals.tolist()):
            out[i] = float((v - mean) / std) if std > 0 else 0.0
    return out


def _ablation(lm, by_layer, enc, groups, scores, bar, should_stop) -> bool:
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
            batch = _inputs(enc.tensors(items))
            mask = enc.mask(batch)
            gate.clear_gates()
            full = answer_losses(lm.model, batch, positions=mask)
            for layer, g in off.items():
                gate.set_gate(layer, g)
            ablated = answer_losses(lm.model, batch, positions=mask)
            gate.clear_gates()
            for it, a, f in zip(items, ablated.tolist(), full.tolist()):
                scores[it["index"]] = a - f
            bar.step(f"ablation: {bar.done + 1}/{bar.total} batches")
    return False


def _activation(lm, by_layer, enc, groups, scores, bar, should_stop, lengths=None) -> bool:
    geo = lm.geometry
    model = lm.model
    body = getattr(model, "base_model", None) or model
    last = max(by_layer)
    with torch.no_grad(), HeadGate(model, geo, layers=list(by_layer), stop_after=last) as gate:
        for items in groups:
            if should_stop is not None and should_stop():
                return True
            batch = enc.tensors(items)
            mask = enc.mask(batch)
            gate.capture(mask)
            gate.run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            rel = []
            for layer, heads in by_layer.items():
                norms = gate.norms[layer]  # [B, n_q]
                rel.append(norms[:, heads] / norms.mean(dim=1, keepdim=True).clamp_min(1e-12))
            value = torch.cat(rel, dim=1).mean(dim=1)
            counts = mask.sum(dim=1).tolist()
            for it, v, c in zip(items, value.tolist(), counts):
                scores[it["index"]] = v
                if lengths is not None:
                    lengths[it["index"]] = int(c)
            gate.capture(None)
            bar.step(f"activation: {bar.done + 1}/{bar.total} batches")
    return False


def _alignment(lm, by_layer, enc, probe_groups, groups, scores, bar, should_stop):
    info: dict = {}
    with HeadGate(lm.model, lm.geometry, layers=list(by_layer)) as gate:
        total, count = None, 0
        for items in probe_groups:
            if should_stop is not None and should_stop():
                return True, info
            batch = _inputs(enc.tensors(items))
            v = _gate_vectors(lm, gate, by_layer, batch, enc.mask(batch))
            total = v.sum(0) if total is None else total + v.sum(0)
            count += v.shape[0]
            bar.step(f"probe gradients: {count} samples")
        target = total / count
        info.update(probe_samples=count, probe_grad_norm=float(target.norm()))
        target_unit = target / target.norm().clamp_min(1e-12)
        for items in groups:
            if should_stop is not None and should_stop():
                return True, info
            batch = _inputs(enc.tensors(items))
            v = _gate_vectors(lm, gate, by_layer, batch, enc.mask(batch))
            cos = (v @ target_unit) / v.norm(dim=1).clamp_min(1e-12)
            for it, c in zip(items, cos.tolist()):
                scores[it["index"]] = c
            bar.step(f"alignment: {bar.done + 1}/{bar.total} batches")
    return False, info


def _prefilter_alignment(lm, by_layer, enc, probe_groups, scores, ratio, factor, bar, should_stop, procs):
    """Activation on the whole pool, then alignment on the top ``factor x ratio``; returns (stopped, info,
    the indices this process aligned)."""
    t0 = time.perf_counter()
    n = len(scores)
    first = [float("nan")] * n
    mine, own = procs.padded(enc.groups)
    stopped = _activation(lm, by_layer, enc, mine, first, bar, should_stop)
    first = procs.merge(first, [it["index"] for g in mine[:own] for it in g])
    share = min(1.0, factor * ratio)
    keep = set(top_samples(first, share))
    info: dict = {"prefilter_factor": factor, "prefilter_share": share, "prefilter_kept": len(keep),
                  "first_pass_s": round(time.perf_counter() - t0, 3)}
    rest = sorted((i for i in range(n) if math.isfinite(first[i]) and i not in keep), key=lambda i: (-first[i], i))
    for r, i in enumerate(rest):
        scores[i] = -2.0 - (r + 1) / (len(rest) + 1)
    if stopped:
        return True, info, []
    kept_items = [it for it in enc.items if it["index"] in keep]
    groups, own = procs.padded(list(iter_batches(kept_items, enc.batch_size, sort_by_length=True)))
    bar.total = bar.done + len(probe_groups) + len(groups)
    t1 = time.perf_counter()
    stopped, align_info = _alignment(lm, by_layer, enc, probe_groups, groups, scores, bar, should_stop)
    info.update(align_info, alignment_s=round(time.perf_counter() - t1, 3))
    if stopped:  # kept samples not reached yet keep a score below the aligned ones, above the rest
        for i in keep:
            if not math.isfinite(scores[i]):
                scores[i] = -1.5
    return stopped, info, [it["index"] for g in groups[:own] for it in g]


# ------------------------------------------------------------------------------------- features


@dataclass
class HeadFeatures:
    """Per-sample statistics of every (layer, head), from `head_features`.

    norms: [N, L, H] mean head-output norm over the chosen answer positions (NaN rows: unscored);
    grads: [N, L, H] per-sample gate gradient dL_i/dgate (gates at 1), or None when not computed;
    lengths: [N] number of positions averaged (0 when unscored); positions: "all" or "content".
    """

    norms: torch.Tensor
    grads: torch.Tensor | None
    lengths: torch.Tensor
    positions: str
    time_s: float
    extra: dict = field(default_factory=dict)


def head_features(lm, samples: list[Sample], batch_size: int = 8, max_length: int = 256,
                  positions: str = DEFAULT_POSITIONS, gradients: bool = True, progress=None,
                  should_stop=None) -> HeadFeatures:
    """Activation statistic and (with ``gradients``) gate gradient of every head for every sample.

    One pass over ``samples``: with ``gradients`` a forward with per-sample gates at 1 on every layer
    (capturing the head-output norms on the way) and one backward down to layer 0; without, a no-grad
    forward that stops after the last layer. Same encoding and batching as `select_data`, so
    `activation_from_features` / `alignment_from_features` reproduce its scores.
    """
    positions = _check_positions(positions)
    samples = list(samples or [])
    if not samples:
        raise UserError("no samples to compute head features for")
    geo = lm.geometry
    L, H = geo.n_layers, geo.n_q_heads
    n = len(samples)
    norms = torch.full((n, L, H), float("nan"), dtype=torch.float32)
    grads = torch.full((n, L, H), float("nan"), dtype=torch.float32) if gradients else None
    lengths = torch.zeros(n, dtype=torch.long)
    start = time.perf_counter()
    enc = EncodedBatches(lm, samples, batch_size, max_length, positions)
    bar = Ticker(progress, len(enc.groups))
    stopped = False
    model = lm.model
    layers = list(range(L))
    with frozen(model), HeadGate(model, geo, layers=layers, stop_after=None if gradients else L - 1) as gate:
        for items in enc.groups:
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = enc.tensors(items)
            mask = enc.mask(batch)
            rows = torch.tensor([it["index"] for it in items])
            gate.capture(mask)
            if gradients:
                b = batch["input_ids"].shape[0]
                gates = [torch.ones(b, H, device=lm.device, dtype=torch.float32, requires_grad=True) for _ in layers]
                for layer in layers:
                    gate.set_gate(layer, gates[layer])
                try:
                    with torch.enable_grad():
                        loss = answer_losses(model, _inputs(batch), positions=mask).sum()
                    gr = torch.autograd.grad(loss, gates, allow_unused=True)
                finally:
                    gate.clear_gates()
                grads[rows] = torch.stack([torch.zeros(b, H) if g is None else g.detach().float().cpu() for g in gr], 1)
            else:
                with torch.no_grad():
                    body = getattr(model, "base_model", None) or model
                    gate.run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            norms[rows] = torch.stack([gate.norms[layer].float().cpu() for layer in layers], 1)
            lengths[rows] = mask.sum(dim=1).cpu()
            gate.capture(None)
            bar.step(f"head features: {bar.done + 1}/{bar.total} batches")
    extra = enc.info() | {"stopped": stopped, "gradients": gradients}
    return HeadFeatures(norms=norms, grads=grads, lengths=lengths, positions=positions,
                        time_s=round(time.perf_counter() - start, 3), extra=extra)


def _feature_heads(features: HeadFeatures, heads) -> tuple[torch.Tensor, torch.Tensor]:
    hl = normalize_heads(heads)
    if not hl:
        raise UserError("the head list is empty: select at least one head")
    _, L, H = features.norms.shape
    bad = [h for h in hl if not (0 <= h[0] < L and 0 <= h[1] < H)]
    if bad:
        raise UserError(f"head {bad[0]} is outside the {L} x {H} feature table")
    return torch.tensor([l for l, _ in hl]), torch.tensor([h for _, h in hl])


def activation_from_features(features: HeadFeatures, heads, debias: str | None = None) -> list[float]:
    """`select_data`'s ``activation`` score of any head set (HeadScores or [[layer, head], ...]) from
    features; ``debias="length"`` gives ``activation_length_z``. NaN for unscored samples."""
    layers, hs = _feature_heads(features, heads)
    norms = features.norms.double()
    rel = norms / norms.mean(dim=2, keepdim=True).clamp_min(1e-12)
    scores = rel[:, layers, hs].mean(dim=1).tolist()
    if debias == "length":
        return length_z(scores, features.lengths.tolist())
    if debias is not None:
        raise ValueError(f"debias must be None or 'length', not {debias!r}")
    return scores


def alignment_from_features(features: HeadFeatures, probe_features: HeadFeatures, heads) -> list[float]:
    """`select_data`'s ``alignment`` score of any head set from pool and probe features (both with
    gradients, same ``positions``). NaN for unscored samples."""
    if features.grads is None or probe_features.grads is None:
        raise UserError("alignment needs gate gradients: compute the features with gradients=True")
    layers, hs = _feature_heads(features, heads)
    v = features.grads[:, layers, hs].double()
    p = probe_features.grads[:, layers, hs].double()
    p = p[torch.isfinite(p).all(dim=1)]
    if not len(p):
        raise UserError("the probe features hold no scored sample")
    target = p.mean(dim=0)
    target = target / target.norm().clamp_min(1e-12)
    cos = (v @ target) / v.norm(dim=1).clamp_min(1e-12)
    return cos.tolist()


# ----------------------------------------------------------------------------------------- timing


def plain_forward_seconds(lm, samples: list[Sample], batch_size: int = 8, max_length: int = 256) -> float:
    """Wall seconds of one plain no-grad forward of the model (full logits, as ``model(**inputs)``)
    over ``samples``, encoded and batched exactly as `select_data` does (encoding included, as in
    ``Selection.time_s``). The unit for selection-cost ratios."""
    samples = list(samples or [])
    if not samples:
        raise UserError("no samples to time")
    start = time.perf_counter()
    enc = EncodedBatches(lm, samples, batch_size, max_length, "all")
    with frozen(lm.model), torch.no_grad():
        for items in enc.groups:
            batch = enc.tensors(items)
            lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return time.perf_counter() - start
