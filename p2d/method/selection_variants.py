"""The selection variants `p2d.method.selection.select_data` offers besides its default (``activation`` and
``random`` live in `p2d.method.selection`); formulas and sources also in docs/METHOD.md. Each scores the
batches of a `p2d.method.scoring.SelectJob` (its encoded pool) into ``job.scores`` (indexed by pool position)
and is one line of `p2d.method.selection.SELECT_METHODS`.

- ``ablation``: answer-token loss with the heads of H gated to zero minus the loss of the full model
  (AttentionInfluence-style): how much the sample relies on H. Two no-grad forwards per batch on the
  same encoded batch.
- ``alignment``: cosine between the sample's gate-gradient vector on H (dL_i/dgate for each head of
  H, gates at 1) and the probe set's mean gate-gradient vector: a gradient-matching score in head
  space (LESS does this in LoRA space). Needs ``probe``. Per-sample gates ``[B, n_q]`` give every
  sample's gradient from one backward per batch. Only the layers of H are hooked and only their gates
  require grad (every weight is frozen), so autograd runs from the loss down to the lowest layer of H
  and no further; the forward itself still runs the whole model (the loss needs the logits).
- ``activation_length_z``: ``activation`` z-scored within buckets of samples with similar numbers of
  scored positions (`length_z`), so a score that merely tracks answer length is removed. Buckets:
  the pool's distinct position counts, shortest first, merged until each bucket holds at least
  ``max(10, N // 20)`` samples (a short remainder joins the last bucket).
- ``prefilter_alignment``: two passes. ``activation`` over the whole pool keeps the top
  ``min(1, prefilter_factor * ratio)`` share (default ``PREFILTER_FACTOR`` = 3x the final ratio), then
  ``alignment`` scores only those. Kept samples score their cosine in [-1, 1]; the others score in
  (-3, -2), ordered by their activation, so they always rank below the kept ones and a later
  `Selection.with_ratio` beyond the prefilter share falls back to the activation order.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..data.encoding import iter_batches
from .gating import HeadGate, answer_losses
from .scoring import SelectJob, model_inputs, top_samples

__all__ = ["score_ablation", "score_alignment", "score_length_z", "score_prefilter_alignment", "rank_below_kept",
           "length_z", "finite_range", "PREFILTER_FACTOR", "LENGTH_BUCKET_MIN", "LENGTH_BUCKETS"]

#: prefilter_alignment: the first (activation) pass keeps this many times the final ratio
PREFILTER_FACTOR = 3.0
#: activation_length_z: smallest bucket is max(LENGTH_BUCKET_MIN, N // LENGTH_BUCKETS) samples
LENGTH_BUCKET_MIN = 10
LENGTH_BUCKETS = 20


def score_ablation(job: SelectJob) -> bool:
    """``ablation`` of the batches ``job.groups`` into ``job.scores``; True when stopped."""
    lm, by_layer, enc, groups, scores, bar, should_stop = (job.lm, job.by_layer, job.enc, job.groups, job.scores,
                                                           job.bar, job.should_stop)
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
            batch = model_inputs(enc.tensors(items))
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


def score_alignment(job: SelectJob) -> bool:
    """``alignment`` of the batches ``job.groups`` into ``job.scores`` (its probe facts into ``job.extra``);
    True when stopped."""
    stopped, info = _alignment(job.lm, job.by_layer, job.enc, job.probe_groups, job.groups, job.scores, job.bar,
                               job.should_stop)
    job.extra.update(info)
    return stopped


def _alignment(lm, by_layer, enc, probe_groups, groups, scores, bar, should_stop):
    info: dict = {}
    with HeadGate(lm.model, lm.geometry, layers=list(by_layer)) as gate:
        total, count = None, 0
        for items in probe_groups:
            if should_stop is not None and should_stop():
                return True, info
            batch = model_inputs(enc.tensors(items))
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
            batch = model_inputs(enc.tensors(items))
            v = _gate_vectors(lm, gate, by_layer, batch, enc.mask(batch))
            cos = (v @ target_unit) / v.norm(dim=1).clamp_min(1e-12)
            for it, c in zip(items, cos.tolist()):
                scores[it["index"]] = c
            bar.step(f"alignment: {bar.done + 1}/{bar.total} batches")
    return False, info


def score_prefilter_alignment(job: SelectJob, first_pass) -> bool:
    """Activation on the whole pool (``first_pass``: `p2d.method.selection`'s activation scorer), then
    alignment on the top ``prefilter_factor x ratio``; the rows this process aligned become ``job.owned``.
    True when stopped."""
    lm, by_layer, enc, scores, bar, should_stop, procs = (job.lm, job.by_layer, job.enc, job.scores, job.bar,
                                                          job.should_stop, job.procs)
    t0 = time.perf_counter()
    n = len(scores)
    first = [float("nan")] * n
    mine, own = procs.padded(enc.groups)
    stopped = first_pass(dataclasses.replace(job, scores=first, groups=mine))
    first = procs.merge(first, [it["index"] for g in mine[:own] for it in g])
    share = min(1.0, job.prefilter_factor * job.ratio)
    keep = set(top_samples(first, share))
    info: dict = {"prefilter_factor": job.prefilter_factor, "prefilter_share": share, "prefilter_kept": len(keep),
                  "first_pass_s": round(time.perf_counter() - t0, 3)}
    rank_below_kept(first, keep, scores)
    job.extra.update(info)
    if stopped:
        job.owned = []
        return True
    kept_items = [it for it in enc.items if it["index"] in keep]
    groups, own = procs.padded(list(iter_batches(kept_items, enc.batch_size, sort_by_length=True)))
    bar.total = bar.done + len(job.probe_groups) + len(groups)
    t1 = time.perf_counter()
    stopped, align_info = _alignment(lm, by_layer, enc, job.probe_groups, groups, scores, bar, should_stop)
    job.extra.update(align_info, alignment_s=round(time.perf_counter() - t1, 3))
    if stopped:  # kept samples not reached yet keep a score below the aligned ones, above the rest
        for i in keep:
            if not math.isfinite(scores[i]):
                scores[i] = -1.5
    job.owned = [it["index"] for g in groups[:own] for it in g]
    return stopped


def rank_below_kept(first: list[float], keep: set[int], scores: list[float]) -> None:
    """prefilter_alignment's scores of the samples its first pass dropped (scored, not in ``keep``): in
    (-3, -2), in their first-pass order, so they rank below every kept sample."""
    rest = sorted((i for i in range(len(first)) if math.isfinite(first[i]) and i not in keep), key=lambda i: (-first[i], i))
    for r, i in enumerate(rest):
        scores[i] = -2.0 - (r + 1) / (len(rest) + 1)


# ------------------------------------------------------------------------------------- length_z


def score_length_z(job: SelectJob, first_pass) -> bool:
    """``activation_length_z``: the activation scores (``first_pass``) z-scored within buckets of similar
    answer length (`length_z`), over the whole pool (several processes: merged first); True when stopped."""
    lengths = [0] * len(job.scores)
    stopped = first_pass(job, lengths)
    lengths = job.procs.merge(lengths, job.owned)
    job.scores = job.procs.merge(job.scores, job.owned)
    job.extra["raw_scores_range"] = finite_range(job.scores)
    job.scores = length_z(job.scores, lengths)
    return stopped


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


def finite_range(values) -> list[float] | None:
    f = [v for v in values if math.isfinite(v)]
    return [min(f), max(f)] if f else None
