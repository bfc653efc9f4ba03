"""Per-sample head statistics for benchmarks: score any head set without rerunning the model.

`head_features` records, for every sample, the activation statistic and the gate gradient of *every*
(layer, head) in one pass; `head_norms` records the activation statistic alone for several
answer-position settings from one no-grad forward. `activation_from_features` and
`alignment_from_features` then give `p2d.method.selection.select_data`'s activation / activation_length_z /
alignment scores of any head set (equal to float rounding; tests/test_selection.py).

The benchmark (`p2d.bench`) reads every head set's selection precision and its random-head nulls off
one feature pass. A run (`p2d.pipeline.Run`) keeps the activation statistic of every head for every pool
row as its *head record*: a float16 memory map (`RECORD_FILE`, [rows, layers, heads]) plus the answer
lengths (`RECORD_LENGTHS_FILE`) in the run folder, entered in the run's manifest with what it depends on
(`record_settings`: model, dtype, quantisation, pool content, positions, max length, recorded layers, and the
precision the pass ran in, `p2d.config.RunConfig.inference_precision`).
`select_from_features` then makes any activation-family selection (`RECORD_METHODS`: any head set,
ratio or control) from it without the model. Methods that need more than this statistic (alignment,
ablation, prefilter_alignment; the head-free baselines) are not served by the record: they run the model.
Scores from a record read back from disk carry float16 rounding (relative error under 1e-3 per norm).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.formats import Sample
from ..errors import UserError
from ..geometry import normalize_heads
from ..manifest import content_digest
from ..models import frozen
from ..progress import Ticker
from .gating import HeadGate, StopInside, answer_losses, stop_inside
from .heads import HeadScores
from .scoring import EncodedBatches, check_positions, check_ratio, model_inputs, top_samples
from .selection import DEFAULT_POSITIONS, Selection, head_list
from .selection_variants import finite_range, length_z

__all__ = ["HeadFeatures", "head_features", "head_norms", "activation_from_features", "alignment_from_features",
           "RECORD_METHODS", "RECORD_FILE", "RECORD_LENGTHS_FILE", "record_settings", "save_record", "load_record",
           "select_from_features"]

#: the float16 per-row record of every head's activation statistic in a run folder, and its answer lengths
RECORD_FILE = "head_record.f16"
RECORD_LENGTHS_FILE = "head_record_lengths.npy"
#: selection methods computed from the recorded statistic alone: name -> `activation_from_features`'s debias
RECORD_METHODS = {"activation": None, "activation_length_z": "length"}


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
    (capturing the head-output norms on the way) and one backward down to layer 0; without, the
    no-grad forward of `head_norms`. Same encoding and batching as `select_data`, so
    `activation_from_features` / `alignment_from_features` reproduce its scores.
    """
    positions = check_positions(positions)
    if not gradients:
        return head_norms(lm, samples, batch_size, max_length, (positions,), progress, should_stop)[positions]
    samples = _check_samples(samples)
    geo = lm.geometry
    L, H = geo.n_layers, geo.n_q_heads
    n = len(samples)
    norms = torch.full((n, L, H), float("nan"), dtype=torch.float32)
    grads = torch.full((n, L, H), float("nan"), dtype=torch.float32)
    lengths = torch.zeros(n, dtype=torch.long)
    start = time.perf_counter()
    enc = EncodedBatches(lm, samples, batch_size, max_length, positions)
    bar = Ticker(progress, len(enc.groups))
    stopped = False
    model = lm.model
    layers = list(range(L))
    with frozen(model), HeadGate(model, geo, layers=layers) as gate:
        for items in enc.groups:
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = enc.tensors(items)
            mask = enc.mask(batch)
            rows = torch.tensor([it["index"] for it in items])
            gate.capture(mask)
            b = batch["input_ids"].shape[0]
            gates = [torch.ones(b, H, device=lm.device, dtype=torch.float32, requires_grad=True) for _ in layers]
            for layer in layers:
                gate.set_gate(layer, gates[layer])
            try:
                with torch.enable_grad():
                    loss = answer_losses(model, model_inputs(batch), positions=mask).sum()
                gr = torch.autograd.grad(loss, gates, allow_unused=True)
            finally:
                gate.clear_gates()
            grads[rows] = torch.stack([torch.zeros(b, H) if g is None else g.detach().float().cpu() for g in gr], 1)
            norms[rows] = torch.stack([gate.norms[layer].float().cpu() for layer in layers], 1)
            lengths[rows] = mask.sum(dim=1).cpu()
            gate.capture(None)
            bar.step(f"head features: {bar.done + 1}/{bar.total} batches")
    extra = enc.info() | {"stopped": stopped, "gradients": True}
    return HeadFeatures(norms=norms, grads=grads, lengths=lengths, positions=positions,
                        time_s=round(time.perf_counter() - start, 3), extra=extra)


def head_norms(lm, samples: list[Sample], batch_size: int = 8, max_length: int = 256,
               positions=(DEFAULT_POSITIONS,), progress=None, should_stop=None,
               n_layers: int | None = None) -> dict[str, HeadFeatures]:
    """The activation statistic of every head for every sample (no gradients), for each answer-position
    setting in ``positions``, from one no-grad forward that stops after the last recorded layer (one
    capture hook per setting): {setting: HeadFeatures}. ``n_layers``: record layers 0 .. n_layers - 1
    only (default: all), and stop the forward there."""
    positions = [check_positions(p) for p in dict.fromkeys(positions)]
    if not positions:
        raise UserError("no answer-position setting given")
    samples = _check_samples(samples)
    geo = lm.geometry
    L = geo.n_layers if n_layers is None else int(n_layers)
    if not 1 <= L <= geo.n_layers:
        raise UserError(f"the layers to record must be 1 .. {geo.n_layers} (got {n_layers})")
    H, n = geo.n_q_heads, len(samples)
    norms = {p: torch.full((n, L, H), float("nan"), dtype=torch.float32) for p in positions}
    lengths = {p: torch.zeros(n, dtype=torch.long) for p in positions}
    start = time.perf_counter()
    encs = {p: EncodedBatches(lm, samples, batch_size, max_length, p) for p in positions}
    enc = encs[positions[0]]  # the same items and batches for every setting; only the masks differ
    bar = Ticker(progress, len(enc.groups))
    stopped = False
    model = lm.model
    body = getattr(model, "base_model", None) or model
    with frozen(model), torch.no_grad(), contextlib.ExitStack() as stack:
        gates = {p: stack.enter_context(HeadGate(model, geo, layers=list(range(L)),
                                                 stop_after=L - 1 if i == len(positions) - 1 else None))
                 for i, p in enumerate(positions)}
        stack.enter_context(stop_inside(model, should_stop))
        for items in enc.groups:
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = enc.tensors(items)
            rows = torch.tensor([it["index"] for it in items])
            masks = {p: encs[p].mask(batch) for p in positions}
            for p in positions:
                gates[p].capture(masks[p])
            try:
                gates[positions[-1]].run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False)
            except StopInside:  # part-way through this batch: the batches before it are recorded
                stopped = True
                break
            for p in positions:
                norms[p][rows] = torch.stack([gates[p].norms[layer].float().cpu() for layer in range(L)], 1)
                lengths[p][rows] = masks[p].sum(dim=1).cpu()
                gates[p].capture(None)
            bar.step(f"head features: {bar.done + 1}/{bar.total} batches")
    time_s, extra = round(time.perf_counter() - start, 3), enc.info() | {"stopped": stopped, "gradients": False}
    return {p: HeadFeatures(norms=norms[p], grads=None, lengths=lengths[p], positions=p, time_s=time_s, extra=dict(extra))
            for p in positions}


def _check_samples(samples) -> list[Sample]:
    samples = list(samples or [])
    if not samples:
        raise UserError("no samples to compute head features for")
    return samples


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
    features; ``debias="length"`` gives ``activation_length_z``. NaN for unscored samples. Reads only
    the layers of the head set (a float16 record stays on disk for the others)."""
    layers, hs = _feature_heads(features, heads)
    uniq = torch.unique(layers)  # sorted
    norms = features.norms[:, uniq].double()
    rel = norms / norms.mean(dim=2, keepdim=True).clamp_min(1e-12)
    scores = rel[:, torch.searchsorted(uniq, layers), hs].mean(dim=1).tolist()
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



# ------------------------------------------------------------------------------------------ the head record


def record_settings(model: str, dtype, quantize, pool: list[Sample], positions: str, max_length: int,
                    n_layers: int, precision: str = "same") -> dict:
    """What a head record depends on (its manifest entry's settings): the model and how it is loaded,
    the pool's content (prompt, answer, kind of every row, as a digest), the answer positions, the max
    length, the number of recorded layers (0 .. n_layers - 1) and the precision its pass ran in
    (``precision``: `p2d.models.inference_copy`'s, so a bf16 or int8 record is never reused for float32).
    Batch size is not in it: padding is masked and never reaches a row's statistic."""
    return {"model": str(model), "dtype": dtype, "quantize": quantize, "positions": positions,
            "max_length": int(max_length), "n_layers": int(n_layers), "n_rows": len(pool),
            "pool": content_digest([[s.prompt, s.answer, s.kind] for s in pool]), "precision": precision}


def save_record(features: HeadFeatures, folder) -> dict:
    """Write ``features.norms`` as a float16 memory map and the answer lengths into ``folder``; returns
    what to keep in the manifest entry (shape, bytes, the pass's seconds and batch info)."""
    folder = Path(folder)
    n, L, H = features.norms.shape
    mm = np.lib.format.open_memmap(folder / RECORD_FILE, mode="w+", dtype=np.float16, shape=(n, L, H))
    mm[:] = features.norms.numpy().astype(np.float16)
    mm.flush()
    del mm
    np.save(folder / RECORD_LENGTHS_FILE, features.lengths.numpy().astype(np.int32))
    return {"shape": [n, L, H], "bytes": (folder / RECORD_FILE).stat().st_size, "pass_s": features.time_s,
            "positions": features.positions,
            "pass": {k: features.extra.get(k) for k in ("unscored", "truncated", "tokens", "padded_tokens", "batches")}}


def load_record(folder, entry: dict) -> HeadFeatures | None:
    """The head record in ``folder`` described by its manifest ``entry`` (memory-mapped, read lazily), or
    None when the files are missing or do not match the entry."""
    folder = Path(folder)
    try:
        norms = np.load(folder / RECORD_FILE, mmap_mode="c")
        lengths = np.load(folder / RECORD_LENGTHS_FILE)
    except (OSError, ValueError):
        return None
    if list(norms.shape) != list(entry.get("shape") or []) or norms.dtype != np.float16 or len(lengths) != norms.shape[0]:
        return None
    extra = dict(entry.get("pass") or {}) | {"stopped": False, "gradients": False, "record": True}
    return HeadFeatures(norms=torch.from_numpy(norms), grads=None, lengths=torch.from_numpy(lengths.astype(np.int64)),
                        positions=str(entry.get("positions")), time_s=float(entry.get("pass_s") or 0.0), extra=extra)


def select_from_features(features: HeadFeatures, heads, method: str = "activation", ratio: float = 0.1,
                         geometry=None) -> Selection:
    """`select_data`'s selection for an activation-family ``method`` (`RECORD_METHODS`) of any head set,
    computed from recorded ``features`` without the model. ``time_s`` is the recording pass's seconds
    plus this selection's (what the selection cost in all); ``extra["reselect_s"]`` is this selection's
    alone. ``geometry`` (optional) validates the heads against the model's."""
    if method not in RECORD_METHODS:
        raise UserError(f"the {method} selection needs more than the recorded head statistic: it runs the model "
                        f"(methods served by the record: {', '.join(RECORD_METHODS)})")
    ratio = check_ratio(ratio, "data ratio")
    start = time.perf_counter()
    hl = head_list(heads, geometry) if geometry is not None else normalize_heads(heads)
    debias = RECORD_METHODS[method]
    extra = {"heads": hl, "n_heads": len(hl), "layers": sorted({layer for layer, _ in hl})}
    if isinstance(heads, HeadScores):
        extra["head_method"] = heads.method
    scores = activation_from_features(features, hl)
    if debias == "length":
        extra["raw_scores_range"] = finite_range(scores)
        scores = length_z(scores, features.lengths.tolist())
    selected = top_samples(scores, ratio)
    reselect_s = time.perf_counter() - start
    extra.update({k: features.extra.get(k) for k in ("unscored", "truncated", "tokens", "padded_tokens", "batches")},
                 positions=features.positions, stopped=bool(features.extra.get("stopped")),
                 from_record=bool(features.extra.get("record")), record_pass_s=features.time_s,
                 reselect_s=round(reselect_s, 4))
    return Selection(method=method, ratio=ratio, n_pool=len(scores), n_selected=len(selected),
                     time_s=round(features.time_s + reselect_s, 3), scores=scores, selected=selected, extra=extra)
