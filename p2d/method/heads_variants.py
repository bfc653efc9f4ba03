"""The head-scoring variants `p2d.method.heads.score_heads` offers besides its default (``gradient_logratio``, the
other contrasts of its importance maps and ``random`` live in `p2d.method.heads`); formulas and sources also in
docs/METHOD.md. Each scores a `p2d.method.scoring.HeadJob` and is one line of `p2d.method.heads.HEAD_METHODS`.

- ``shift`` (paper-style proxy, as ALPS): a short proxy fine-tune (``proxy_steps`` AdamW steps,
  ``proxy_lr`` (default 1e-4), no weight decay, dropout off) of *all* attention projections on the
  probe set, with everything else frozen; then each query head is scored by the Wasserstein-1
  distance between softmax(flattened head weights) before and after. The model's weights are restored
  bit-identically afterwards (only the attention projections are copied). Caveat: Adam divides each
  step by the running gradient RMS, so after a few steps every coordinate with a consistent gradient
  sign has moved by about ``steps * lr`` whatever its gradient size: the movement measures sign
  consistency more than importance.

  A query head's weight vector is, in this order: its ``q_proj`` rows ``[d, hidden]``, its kv head's
  ``k_proj`` rows and ``v_proj`` rows (GQA: kv head ``h // (n_q / n_kv)``), and its ``o_proj``
  columns transposed to ``[d, hidden]``; each block flattened row-major. For GPT-2 the same blocks
  are cut from the fused ``c_attn`` columns (q, k, v thirds) and ``c_proj`` rows.

  W1 formulation: the one in ALPS's released code ("wasserstein_normalized": scipy's
  ``wasserstein_distance(x, x, p, q)`` with ``x = linspace(0, 1, N)``), i.e. the two softmax vectors
  are distributions over the *same index support* placed evenly on [0, 1] in the flattening order
  above, and ``W1 = sum_i |CDF_p(i) - CDF_q(i)| / (N - 1)``. Computed in float64 (the CDF of ~10^5
  values near 1/N would drown the signal in float32 rounding). ``extra["update_norm"]`` also holds
  the cheaper relative update norm ``||W_after - W_before|| / ||W_before||`` per head.

- ``shift_sgd``: the same proxy run and W1 score with plain SGD (no momentum, ``proxy_lr`` default
  1e-2), so each weight moves by ``lr`` times its accumulated gradient: the movement reflects how
  large the gradients are, not only their sign consistency.

- ``taylor`` (first-order Taylor importance, Molchanov et al. 2017/2019): no weight update;
  importance = mean over probe batches of ``sum |g * w|`` over the head's weight slices (the same q,
  k, v, o slices as ``shift``; with GQA a kv head's k/v terms count for each of its query heads),
  ``g`` the gradient of the batch's mean answer loss. Contrasted with a pool sample exactly like
  ``gradient`` (default ``difference``; ``contrast`` may name another of ``HEAD_CONTRASTS``).

- ``lofit`` (head selection step of LoFiT, Yin, Ye & Durrett, NeurIPS 2024): one learnable
  multiplicative scale per head output (initialised at 1, through the `p2d.method.gating.HeadGate` hooks),
  all weights frozen, trained for ``proxy_steps`` Adam steps (``proxy_lr`` default 1e-2) on the probe
  set with the loss ``mean answer loss + l1 * sum |scale - 1|`` (``l1`` default ``LOFIT_L1`` = 1e-3,
  LoFiT's value); score = ``|scale - 1|``. Differences from LoFiT: LoFiT learns a ``head_dim`` vector
  per head (score = its L2 norm), initialised N(0, 1e-3), for several epochs at lr 1e-3; here it is
  one scalar per head and a few steps. Adam's sign-equalisation (see ``shift``) applies here too; the
  L1 term makes heads whose gradient stays below ``l1`` hover around 1. No pool contrast.

Not supported: shift / shift_sgd with a model held in bf16/fp16 move weights by less than their
resolution for small ``proxy_lr`` (most updates round away): use fp32 for them, or ``gradient``.
"""

from __future__ import annotations

import math
import random

import torch

from ..errors import UserError
from ..geometry import HeadGeometry
from .gating import HeadGate
from .scoring import HeadJob, batch_losses, loss_batches

__all__ = ["score_shift", "score_lofit", "taylor_importance", "head_slice_sums", "attention_snapshot",
           "head_weight_vector", "weight_shift_scores", "w1_index"]


# ------------------------------------------------------------------------- shift, shift_sgd


def _attention_params(model: torch.nn.Module, geometry: HeadGeometry) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for layer in range(geometry.n_layers):
        for name, module in geometry.projections(model, layer).items():
            for pname, p in module.named_parameters(recurse=False):
                out.append((f"{layer}.{name}.{pname}", p))
    return out


def attention_snapshot(model: torch.nn.Module, geometry: HeadGeometry) -> dict[int, dict[str, torch.Tensor]]:
    """Copies of every layer's attention projection weights: {layer: {"q","k","v","o"} or {"qkv","o"}}."""
    with torch.no_grad():
        return {layer: {name: m.weight.detach().clone() for name, m in geometry.projections(model, layer).items()}
                for layer in range(geometry.n_layers)}


def head_weight_vector(geometry: HeadGeometry, weights: dict[str, torch.Tensor], head: int) -> torch.Tensor:
    """Flattened weights of one query head (see the module docstring for the order), float64."""
    d = geometry.head_dim
    qs = slice(head * d, (head + 1) * d)
    g = geometry.kv_head(head)
    ks = slice(g * d, (g + 1) * d)
    if geometry.layout == "split":
        parts = [weights["q"][qs], weights["k"][ks], weights["v"][ks], weights["o"][:, qs].T]
    else:
        hd = geometry.n_q_heads * d
        w = weights["qkv"]  # Conv1D [in, 3 * H * d]
        parts = [w[:, qs].T, w[:, hd + ks.start:hd + ks.stop].T, w[:, 2 * hd + ks.start:2 * hd + ks.stop].T,
                 weights["o"][qs]]  # c_proj Conv1D [H * d, out]
    return torch.cat([p.reshape(-1).to(torch.float64) for p in parts])


def w1_index(p: torch.Tensor, q: torch.Tensor) -> float:
    """W1 between two distributions on the same N support points evenly spaced on [0, 1]."""
    n = p.numel()
    if n < 2:
        return 0.0
    cdf = torch.cumsum(p.to(torch.float64) - q.to(torch.float64), dim=0)
    return float(cdf[:-1].abs().sum() / (n - 1))


def batch_cycle(batches: list, rng: random.Random):
    """The batches in a new shuffled order on every pass, without end (the proxy fine-tunes' data order)."""
    if not batches:
        raise ValueError("no batches to cycle through")
    while True:
        queue = list(range(len(batches)))
        rng.shuffle(queue)
        while queue:
            yield batches[queue.pop()]


def weight_shift_scores(geometry: HeadGeometry, before: dict, after: dict) -> tuple[list[list[float]], list[list[float]]]:
    """(W1 scores, relative update norms), each n_layers x n_q_heads, from two `attention_snapshot`s
    (or any {layer: weights} mapping with the same keys)."""
    w1, rel = [], []
    for layer in range(geometry.n_layers):
        row_w1, row_rel = [], []
        for head in range(geometry.n_q_heads):
            a = head_weight_vector(geometry, before[layer], head)
            b = head_weight_vector(geometry, after[layer], head)
            row_w1.append(w1_index(torch.softmax(a, 0), torch.softmax(b, 0)))
            row_rel.append(float((b - a).norm() / a.norm().clamp_min(1e-30)))
        w1.append(row_w1)
        rel.append(row_rel)
    return w1, rel


def score_shift(job: HeadJob, optimizer: str = "adamw"):
    """``shift`` (``optimizer="adamw"``) and ``shift_sgd`` (``"sgd"``): (scores, extra, stopped)."""
    lm, probe, seed, tick, should_stop = job.lm, job.probe, job.seed, job.tick, job.should_stop
    proxy_steps, proxy_lr = job.proxy_steps, job.proxy_lr
    model, geo = lm.model, lm.geometry
    params = _attention_params(model, geo)
    saved = {name: p.detach().clone() for name, p in params}  # the only copy: attention weights (+ biases)
    before = {layer: {name: saved[f"{layer}.{name}.weight"] for name in geo.projections(model, layer)}
              for layer in range(geo.n_layers)}
    batches = loss_batches(lm, probe, job.batch_size, job.max_length, positions=job.positions)
    if not batches:
        raise UserError("no probe sample has answer tokens within the max length; raise max_length")
    order = batch_cycle(batches, random.Random(seed))
    steps_done, losses, stopped = 0, [], False
    try:
        for _, p in params:
            p.requires_grad_(True)
        if optimizer == "sgd":
            opt = torch.optim.SGD([p for _, p in params], lr=proxy_lr, momentum=0.0, weight_decay=0.0)
        else:
            opt = torch.optim.AdamW([p for _, p in params], lr=proxy_lr, weight_decay=0.0)
        for step in range(proxy_steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = next(order)
            with torch.enable_grad():
                loss = batch_losses(model, batch).mean()
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            steps_done += 1
            tick(f"proxy step {steps_done}/{proxy_steps}, loss {losses[-1]:.3f}")
        del opt
        with torch.no_grad():
            after = {layer: {name: m.weight.detach() for name, m in geo.projections(model, layer).items()}
                     for layer in range(geo.n_layers)}
            scores, rel = weight_shift_scores(geo, before, after)
    finally:
        with torch.no_grad():
            for name, p in params:
                p.grad = None
                p.copy_(saved[name])
                p.requires_grad_(False)
    extra = {"proxy_steps": steps_done, "proxy_steps_requested": proxy_steps, "proxy_lr": proxy_lr,
             "proxy_loss_first": losses[0] if losses else None, "proxy_loss_last": losses[-1] if losses else None,
             "optimizer": "SGD(momentum=0)" if optimizer == "sgd" else "AdamW(weight_decay=0)",
             "distance": "W1, index support on [0,1] (ALPS)", "update_norm": rel}
    return scores, extra, stopped


# ------------------------------------------------------------------------------------ taylor


def head_slice_sums(geometry: HeadGeometry, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per query head, the sum of a per-weight tensor (shaped like one layer's projection weights,
    keys as `HeadGeometry.projections`) over that head's q, k, v, o slices: ``[n_q]`` float64.

    GQA: the k/v rows of kv head g count for every query head that reads g.
    """
    g, d, n_q = geometry, geometry.head_dim, geometry.n_q_heads
    kv = torch.tensor([g.kv_head(h) for h in range(n_q)])
    if g.layout == "split":
        q = tensors["q"].double().reshape(n_q, -1).sum(1)
        k = tensors["k"].double().reshape(g.n_kv_heads, -1).sum(1)
        v = tensors["v"].double().reshape(g.n_kv_heads, -1).sum(1)
        o = tensors["o"].double().reshape(tensors["o"].shape[0], n_q, d).sum((0, 2))
    else:  # GPT-2 Conv1D: c_attn [in, 3 * H * d], c_proj [H * d, out]
        w = tensors["qkv"].double()
        hd = n_q * d
        q = w[:, :hd].reshape(w.shape[0], n_q, d).sum((0, 2))
        k = w[:, hd:2 * hd].reshape(w.shape[0], n_q, d).sum((0, 2))
        v = w[:, 2 * hd:].reshape(w.shape[0], n_q, d).sum((0, 2))
        o = tensors["o"].double().reshape(n_q, -1).sum(1)
    return (q + k[kv.to(k.device)] + v[kv.to(v.device)] + o).cpu()


def taylor_importance(lm, batches, tick=None, should_stop=None) -> tuple[torch.Tensor, int, int, bool]:
    """Sum over batches of ``sum |g * w|`` per head's weight slices ([n_layers, n_q], float64), batches
    and samples seen, stopped. ``g`` = gradient of the batch's mean answer loss; the weights keep
    ``requires_grad=False`` outside this call and ``.grad`` is never written."""
    model, geo = lm.model, lm.geometry
    mods = [geo.projections(model, layer) for layer in range(geo.n_layers)]
    weights = [[m.weight for m in layer_mods.values()] for layer_mods in mods]
    flat = [w for ws in weights for w in ws]
    flags = [w.requires_grad for w in flat]
    total = torch.zeros(geo.n_layers, geo.n_q_heads, dtype=torch.float64)
    n_batches = seen = 0
    try:
        for w in flat:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                if should_stop is not None and should_stop():
                    return total, n_batches, seen, True
                loss = batch_losses(model, batch).mean()
                grads = torch.autograd.grad(loss, flat)
                it = iter(grads)
                with torch.no_grad():
                    for layer, layer_mods in enumerate(mods):
                        prod = {name: (next(it) * m.weight).abs() for name, m in layer_mods.items()}
                        total[layer] += head_slice_sums(geo, prod)
                n_batches += 1
                seen += batch["input_ids"].shape[0]
                if tick is not None:
                    tick(f"taylor |g*w|: {seen} samples")
    finally:
        for w, flag in zip(flat, flags):
            w.requires_grad_(flag)
    return total, n_batches, seen, False


# ------------------------------------------------------------------------------------- lofit


def score_lofit(job: HeadJob):
    """LoFiT-style head scaling: scales [n_layers, n_q] at 1, Adam on answer loss + l1 * |scale - 1|;
    (scores, extra, stopped)."""
    lm, steps, lr, l1, tick, should_stop = job.lm, job.proxy_steps, job.proxy_lr, job.l1, job.tick, job.should_stop
    if not (l1 >= 0 and math.isfinite(l1)):
        raise UserError(f"the L1 weight must be a non-negative number (got {l1})")
    l1 = float(l1)
    model, geo = lm.model, lm.geometry
    batches = loss_batches(lm, job.probe, job.batch_size, job.max_length, positions=job.positions)
    if not batches:
        raise UserError("no probe sample has answer tokens within the max length; raise max_length")
    scales = torch.ones(geo.n_layers, geo.n_q_heads, dtype=torch.float32, device=lm.device, requires_grad=True)
    opt = torch.optim.Adam([scales], lr=lr)
    order = batch_cycle(batches, random.Random(job.seed))
    losses: list[float] = []
    stopped = False
    with torch.enable_grad(), HeadGate(model, geo) as gate:
        for _ in range(steps):
            if should_stop is not None and should_stop():
                stopped = True
                break
            batch = next(order)
            for layer in range(geo.n_layers):
                gate.set_gate(layer, scales[layer])
            loss = batch_losses(model, batch).mean()
            total = loss + l1 * (scales - 1.0).abs().sum()
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            gate.clear_gates()
            losses.append(float(loss.detach()))
            tick(f"lofit step {len(losses)}/{steps}, loss {losses[-1]:.3f}")
    final = scales.detach().double().cpu()
    scores = (final - 1.0).abs()
    extra = {"steps": len(losses), "steps_requested": steps, "lr": lr, "l1": l1, "optimizer": "Adam",
             "init": 1.0, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
             "scales": final.tolist()}
    return scores.tolist(), extra, stopped
