"""Stage 1: score every (layer, query head) for how task-specific it is, and keep the top ones.

The default method, ``gradient_logratio`` (``DEFAULT_HEAD_METHOD``; formulas and sources also in
docs/METHOD.md). A gate ``g_h = 1`` sits on each head's output (its slice of the o_proj input,
`p2d.method.gating.HeadGate`); a head's importance on a set of samples is the mean over the samples of
``|dL_i/dg_h|``, L_i the sample's mean answer-token loss (per-sample gates: one backward per batch gives
every sample's own gradient; no weight moves). Importance is measured on the probe set P and on a
seeded sample D of the pool (``max(len(probe), 64)`` rows, or the whole pool if smaller); with the
global shares ``s_P = imp_P / sum(imp_P)`` and ``s_D = imp_D / sum(imp_D)`` over all heads, ::

    score_h = log(s_P,h + eps) - log(s_D,h + eps),    eps = LOGRATIO_EPS / (n_layers * n_q)

(a thousandth of the mean share): the log of how much more the target task needs the head than the
pool does, independent of the head's magnitude. `select_top` keeps the top ``ratio`` of all heads.

The same importance maps with other contrasts (``HEAD_CONTRASTS``, `contrast_scores`):

- ``gradient`` (Michel et al. 2019; contrast ``difference``): ``s_P - s_D``, a difference of global
  shares; heads every task needs (high on both) do not dominate, but the difference scales with a
  head's overall magnitude, so a layer of large-importance heads that are only slightly enriched can
  outrank small heads that are strongly enriched. Without a pool (or ``contrast=False``) it scores
  the normalised probe importance ``s_P``;
- ``gradient_layer`` (contrast ``layer``): the same difference with shares taken *within each layer*
  (each layer's importances divided by that layer's sum), so magnitude differences between layers
  cancel.

- ``importance`` (no contrast): the probe's shares ``s_P`` alone (no pool pass); heads every task needs
  rank high.

``gradient_layer`` / ``gradient_logratio`` need a pool (UserError without one). ``extra`` keeps both
raw importance maps (``probe_importance``, ``pool_importance``), so `recontrast` computes any other
contrast, and `from_maps` any other method of the same maps, without rerunning the model.

Variants (`p2d.method.heads_variants`): ``shift`` and ``shift_sgd`` (a short proxy fine-tune, then how far each
head's weights moved), ``taylor`` (``|gradient x weight|`` over each head's weights, contrasted with the
pool like ``gradient``) and ``lofit`` (a learned scale per head output). ``random`` is a seeded control
(uniform scores from ``torch.Generator().manual_seed(seed)``).

Every method is one entry of the registry `HEAD_METHODS` (a `HeadMethod`: its function of a
`p2d.method.scoring.HeadJob`, its help line and what it needs); a new method is its function plus one
line there.

Answer positions: every loss above is the per-sample mean cross-entropy over the answer positions
chosen by ``positions`` (`p2d.method.gating.POSITIONS`): ``"all"`` (default) or ``"content"`` (without the
end-of-turn marker and what the chat template adds after it).

During scoring every model parameter is frozen (only the proxy runs unfreeze the attention
projections, and ``taylor`` asks autograd for their gradients without storing ``.grad``) and the
model is in eval mode; previous ``requires_grad`` flags and training mode are restored afterwards,
also on errors. ``progress(done, total, desc)`` is called as work proceeds; ``should_stop()``
returning True ends the run early with the scores measured so far and ``extra["stopped"] = True``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..data.formats import Sample
from ..distributed import Processes
from ..errors import UserError
from ..files import write_json
from ..geometry import HeadGeometry
from ..models import HEADS_PRECISIONS, frozen, inference_copy
from ..progress import Ticker
from .gating import HeadGate
from .heads_variants import score_lofit, score_shift, taylor_importance
from .scoring import HeadJob, batch_losses, batch_token_counts, check_positions, check_ratio, loss_batches, top_count

#: how importance methods contrast the probe map with the pool map (see `contrast_scores`)
HEAD_CONTRASTS = ("difference", "layer", "logratio")
#: ``logratio`` contrast: eps = LOGRATIO_EPS / (n_layers * n_q), added to both global shares
LOGRATIO_EPS = 1e-3
#: ``lofit``: weight of the L1 penalty on (scale - 1), LoFiT's value
LOFIT_L1 = 1e-3
#: Chosen by the rule in bench/choose_defaults.py (highest mean target precision of the selected 10%) on
#: choice seed 100 over all seven built-in targets (`bash bench/select_study.sh 100`; embedded SmolLM2-135M,
#: pool 400, 10% heads): with activation selection at all answer positions, gradient_logratio 0.88 mean
#: (worst target 0.70), gradient_layer 0.85, gradient 0.82, random heads 0.13. On held-out seed 0 the three
#: contrasts tied (0.74-0.76, random heads 0.12); docs/BENCHMARKS.md has both tables.
DEFAULT_HEAD_METHOD = "gradient_logratio"
HEADS_FILE = "heads.json"


__all__ = ["HEAD_METHODS", "HEAD_METHOD_HELP", "HeadMethod", "HEAD_CONTRASTS", "LOGRATIO_EPS", "LOFIT_L1",
           "DEFAULT_HEAD_METHOD", "HEADS_FILE", "HeadScores", "select_top", "layer_window", "head_ranks", "score_heads",
           "contrast_scores", "recontrast", "from_maps", "gate_importance"]


@dataclass(frozen=True)
class HeadMethod:
    """One head-scoring method of the registry `HEAD_METHODS`.

    ``score(job: p2d.method.scoring.HeadJob) -> (scores, extra, stopped)`` does the work; ``help`` is its
    line in UIs and CLI help. ``maps``: the importance maps it keeps in ``extra`` (``"gate"`` or
    ``"taylor"``), so that `recontrast` / `from_maps` read other contrasts off them; ``contrast``: the
    contrast it applies to its maps (None: none); ``any_contrast``: ``score_heads(contrast=...)`` may pick
    another one; ``needs_pool``: refused without a pool; ``proxy_lr``: it trains a proxy (the default
    learning rate); ``shardable``: it runs on a model sharded over processes; ``uses_model``: False for
    the control that never runs the model (no probe needed, nothing frozen)."""

    help: str
    score: Callable
    maps: str | None = None
    contrast: str | None = None
    any_contrast: bool = False
    needs_pool: bool = False
    proxy_lr: float | None = None
    shardable: bool = True
    uses_model: bool = True


def score_heads(lm, probe: list[Sample], method: str = DEFAULT_HEAD_METHOD, ratio: float = 0.1,
                pool: list[Sample] | None = None, seed: int = 0, batch_size: int = 8, max_length: int = 256,
                proxy_steps: int = 20, proxy_lr: float | None = None, contrast: bool | str = True,
                l1: float = LOFIT_L1, progress=None, should_stop=None, positions: str = "all",
                min_layer: int | None = None, max_layer: int | None = None, precision: str = "same") -> HeadScores:
    """Score every query head of ``lm`` (a `p2d.models.LoadedModel`) with the method ``method`` of
    `HEAD_METHODS` and keep the top ``ratio``.

    See the module docstring for the methods. ``pool`` is used by the contrasted methods
    (``gradient*``, ``taylor``). ``proxy_steps`` / ``proxy_lr`` are the steps and learning rate of
    ``shift``, ``shift_sgd`` and ``lofit`` (``proxy_lr=None``: the method's ``proxy_lr``). ``contrast``:
    True (the method's own), False (none), or one of ``HEAD_CONTRASTS`` (methods with ``any_contrast``).
    ``l1``: lofit's L1 weight. ``positions`` (one of `p2d.method.gating.POSITIONS`): the answer positions
    every loss is taken at ("content" drops end-of-turn / template positions). ``min_layer`` /
    ``max_layer``: the layer window heads are selected from (`layer_window`; every head is still scored,
    the window is kept in ``extra["layer_window"]`` and re-cuts with a new ratio keep it). ``precision``
    (`p2d.config.RunConfig.heads_precision`, one of `p2d.models.HEADS_PRECISIONS`, checked there): ``bf16``
    runs the forward and backward on a bfloat16 copy of the model (`p2d.models.inference_copy`, made here and
    dropped after; the loss, the gate gradients and their sums stay float32); the gate-gradient methods only
    (``maps="gate"``: the proxy fine-tunes and ``taylor`` move or read weights, UserError), not a
    bitsandbytes-quantised or sharded model (UserError); recorded in ``extra["precision"]``.
    """
    spec = HEAD_METHODS.get(method)
    if spec is None:
        raise UserError(f"unknown head method {method!r}: use one of {', '.join(HEAD_METHODS)}")
    positions = check_positions(positions)
    ratio = check_ratio(ratio, "head ratio")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    geo: HeadGeometry = lm.geometry
    window = layer_window(min_layer, max_layer, geo.n_layers)
    if precision not in HEADS_PRECISIONS:
        raise UserError(f"unknown head-scoring precision (heads_precision) {precision!r}: use "
                        f"{', '.join(HEADS_PRECISIONS)}")
    if precision != "same" and spec.uses_model and spec.maps != "gate":
        gate_methods = ", ".join(m for m, h in HEAD_METHODS.items() if h.maps == "gate")
        raise UserError(f"head-scoring precision (heads_precision) {precision} runs the gate-gradient methods only "
                        f"({gate_methods}), not {method}: set it to same")
    start = time.perf_counter()
    job = HeadJob(method, lm, probe, pool, seed, batch_size, max_length, positions, proxy_steps, proxy_lr, contrast,
                  l1, progress, should_stop)
    if not spec.uses_model:
        scores, extra, stopped = spec.score(job)
    else:
        job.probe = _check_samples(probe, "probe")
        if spec.proxy_lr is not None:
            job.proxy_lr = spec.proxy_lr if proxy_lr is None else float(proxy_lr)
            if proxy_steps < 1:
                raise UserError(f"proxy steps must be at least 1 (got {proxy_steps})")
            if not (job.proxy_lr > 0 and math.isfinite(job.proxy_lr)):
                raise UserError(f"proxy learning rate must be a positive number (got {proxy_lr})")
        procs = Processes.current()
        if not spec.shardable:
            procs.check_sharding(f"the {method} head score", f"use head method {DEFAULT_HEAD_METHOD} (the default)")
        job.should_stop = procs.agreed(should_stop)
        job.tick = Ticker(progress, proxy_steps if spec.proxy_lr is not None else 0)
        job.lm = inference_copy(lm, precision, setting="heads_precision")  # lm itself for same; a copy goes with job
        with frozen(job.lm.model):
            scores, extra, stopped = spec.score(job)
        extra["probe_size"] = len(job.probe)
        extra["positions"] = positions
        extra["precision"] = precision
    extra["stopped"] = stopped
    extra["geometry"] = geo.to_dict()
    if window is not None:
        extra["layer_window"] = window
    return HeadScores(method=method, ratio=ratio, scores=scores, selected=select_top(scores, ratio, window),
                      time_s=round(time.perf_counter() - start, 3), model=str(lm.spec), extra=extra)


# -------------------------------------------------------------- gate importance and contrasts (the default)


def importance_scores(job: HeadJob):
    """gradient / gradient_layer / gradient_logratio / importance / taylor: probe map, pool map, contrast."""
    method, spec, contrast, pool = job.method, HEAD_METHODS[job.method], job.contrast, job.pool
    default = spec.contrast
    if isinstance(contrast, str):
        if contrast not in HEAD_CONTRASTS:
            raise UserError(f"unknown contrast {contrast!r}: use one of {', '.join(HEAD_CONTRASTS)}")
        if not spec.any_contrast and contrast != default:
            own = f"the {default!r} contrast" if default else "no contrast"
            raise UserError(f"{method} always uses {own} (got contrast={contrast!r}); "
                            f"use method 'gradient' or 'taylor' with contrast={contrast!r}")
        kind: str | None = contrast
    else:
        kind = default if contrast else None
    if spec.needs_pool and (kind is None or not pool):
        raise UserError(f"{method} contrasts the probe with the pool: give a pool file (pool) or use the built-in pool")
    lm, probe, tick, should_stop = job.lm, job.probe, job.tick, job.should_stop
    probe_batches = loss_batches(lm, probe, job.batch_size, job.max_length, positions=job.positions)
    if not probe_batches:
        raise UserError("no probe sample has answer tokens within the max length; raise max_length")
    pool_sample = _pool_sample(pool, probe, job.seed) if kind is not None and pool else []
    pool_batches = loss_batches(lm, pool_sample, job.batch_size, job.max_length, positions=job.positions) \
        if pool_sample else []
    procs = Processes.current()  # several processes: each sums its share of the batches, then the sums add up
    (probe_batches, probe_own), (pool_batches, pool_own) = procs.padded(probe_batches), procs.padded(pool_batches)
    tick.total = probe_own + pool_own  # the progress of this process's own batches
    extra: dict = {}
    if spec.maps == "taylor":
        probe_imp, n_probe_b, n_probe, stopped = taylor_importance(lm, probe_batches, tick, should_stop)
        probe_mean = probe_imp / max(n_probe_b, 1)
        pool_imp, n_pool_b, n_pool = None, 0, 0
        if pool_batches and not stopped:
            pool_imp, n_pool_b, n_pool, stopped = taylor_importance(lm, pool_batches, tick, should_stop)
        if procs.world > 1:
            probe_imp, (n_probe_b, n_probe), pool_imp, (n_pool_b, n_pool), stopped = _add_up(
                procs, probe_imp, (n_probe_b, n_probe), pool_imp, (n_pool_b, n_pool), pool_batches, stopped)
            probe_mean = probe_imp / max(n_probe_b, 1)
        pool_mean = pool_imp / n_pool_b if pool_imp is not None and n_pool_b > 0 else None
        extra["importance"] = "mean over batches of sum |g * w| over the head's q/k/v/o slices"
    else:
        probe_imp, n_probe, stopped = gate_importance(lm, probe_batches, tick, should_stop, own=probe_own)
        pool_imp, n_pool = None, 0
        if pool_batches and not stopped:
            pool_imp, n_pool, stopped = gate_importance(lm, pool_batches, tick, should_stop, own=pool_own)
        if procs.world > 1:
            probe_imp, (n_probe,), pool_imp, (n_pool,), stopped = _add_up(
                procs, probe_imp, (n_probe,), pool_imp, (n_pool,), pool_batches, stopped)
        probe_mean = probe_imp / max(n_probe, 1)
        pool_mean = pool_imp / n_pool if pool_imp is not None and n_pool > 0 else None
        extra["importance"] = "mean over samples of |dL_i/dgate|"
    extra.update(procs.summary(sum(len(b["index"]) for b in probe_batches[:probe_own] + pool_batches[:pool_own])))
    extra.update(batch_token_counts(probe_batches[:probe_own] + pool_batches[:pool_own]))  # this process's batches
    if pool_mean is not None and kind is not None:
        scores = contrast_scores(probe_mean, pool_mean, kind)
        mode = _CONTRAST_TEXT[kind]
    else:  # no pool, contrast off, or stopped before the pool map: the normalised probe map
        scores = probe_mean / probe_mean.sum().clamp_min(1e-30)
        mode = (_NO_CONTRAST if default is None else "none (no pool given)" if contrast and not pool else "none")
        kind = None
    extra.update({"contrast": mode, "contrast_kind": kind, "probe_samples": n_probe, "pool_samples": n_pool,
                  "probe_importance": probe_mean.tolist(),
                  "pool_importance": pool_mean.tolist() if pool_mean is not None else None})
    if kind == "logratio":
        extra["logratio_eps"] = LOGRATIO_EPS / probe_mean.numel()
    return scores.tolist(), extra, stopped


def gate_importance(lm, batches, tick=None, should_stop=None, layers=None, own=None) -> tuple[torch.Tensor, int, bool]:
    """Sum over samples of |dL_i/dgate| per head ([n_layers, n_q], float64), samples seen, stopped.
    ``own``: only the first ``own`` batches count (the rest pad a sharded model's lockstep)."""
    model, geo = lm.model, lm.geometry
    layers = list(range(geo.n_layers)) if layers is None else list(layers)
    total = torch.zeros(geo.n_layers, geo.n_q_heads, dtype=torch.float64)
    seen = 0
    own = len(batches) if own is None else own
    with torch.enable_grad(), HeadGate(model, geo, layers=layers) as gate:
        for i, batch in enumerate(batches):
            if should_stop is not None and should_stop():
                return total, seen, True
            n = batch["input_ids"].shape[0]
            gates = {layer: torch.ones(n, geo.n_q_heads, device=lm.device, dtype=torch.float32, requires_grad=True)
                     for layer in layers}
            for layer, g in gates.items():
                gate.set_gate(layer, g)
            loss = batch_losses(model, batch).sum()
            grads = torch.autograd.grad(loss, [gates[layer] for layer in layers], allow_unused=True)
            gate.clear_gates()
            if i >= own:
                continue
            for layer, gr in zip(layers, grads):
                if gr is not None:
                    total[layer] += gr.detach().abs().sum(0).double().cpu()
            seen += n
            if tick is not None:
                tick(f"gate gradients: {seen} samples")
    return total, seen, False


def contrast_scores(probe_mean, pool_mean, kind: str = "difference") -> torch.Tensor:
    """Contrast two importance maps ([n_layers, n_q], any non-negative scale) into scores (float64).

    ``difference``: global share of probe minus global share of pool; ``layer``: the same with shares
    taken within each layer; ``logratio``: log(share_probe + eps) - log(share_pool + eps) with global
    shares and ``eps = LOGRATIO_EPS / (n_layers * n_q)``.
    """
    if kind not in HEAD_CONTRASTS:
        raise UserError(f"unknown contrast {kind!r}: use one of {', '.join(HEAD_CONTRASTS)}")
    a = torch.as_tensor(probe_mean, dtype=torch.float64)
    b = torch.as_tensor(pool_mean, dtype=torch.float64)
    if kind == "layer":
        return a / a.sum(dim=1, keepdim=True).clamp_min(1e-300) - b / b.sum(dim=1, keepdim=True).clamp_min(1e-300)
    sa, sb = a / a.sum().clamp_min(1e-300), b / b.sum().clamp_min(1e-300)
    if kind == "difference":
        return sa - sb
    eps = LOGRATIO_EPS / a.numel()
    return torch.log(sa + eps) - torch.log(sb + eps)


def recontrast(hs: "HeadScores", kind: str, ratio: float | None = None) -> "HeadScores":
    """The same importance run (``gradient*`` or ``taylor``) re-scored with another contrast, from the
    maps kept in ``hs.extra`` (no model pass). UserError if ``hs`` has no pool importance."""
    probe, pool = hs.extra.get("probe_importance"), hs.extra.get("pool_importance")
    if probe is None or pool is None:
        raise UserError(f"{hs.method} scores carry no probe/pool importance maps: rerun it with a pool")
    scores = contrast_scores(probe, pool, kind).tolist()
    ratio = hs.ratio if ratio is None else check_ratio(ratio, "head ratio")
    extra = dict(hs.extra, contrast=_CONTRAST_TEXT[kind], contrast_kind=kind)
    return dataclasses.replace(hs, ratio=ratio, scores=scores, selected=select_top(scores, ratio, hs.window),
                               extra=extra)


_CONTRAST_TEXT = {"difference": "difference of normalised importances (probe - pool)",
                  "layer": "difference of per-layer normalised importances (probe - pool)",
                  "logratio": "log-ratio of normalised importances (probe / pool)"}


_NO_CONTRAST = "none (gate importance on the probe)"


def from_maps(hs: "HeadScores", method: str) -> "HeadScores":
    """The heads ``method`` picks, read off the importance maps of ``hs`` (a run of a method with the same
    ``maps``: ``gradient_logratio``'s pass gives ``gradient``, ``gradient_layer`` and ``importance`` too),
    without a model pass. UserError when ``hs`` holds no such maps."""
    spec, own = HEAD_METHODS.get(method), HEAD_METHODS.get(hs.method)
    if spec is None or spec.maps is None or own is None or own.maps != spec.maps:
        raise UserError(f"the heads of {method!r} cannot be read off a {hs.method} run: they need its importance maps")
    if spec.contrast is None:
        probe = torch.tensor(hs.extra["probe_importance"], dtype=torch.float64)
        scores = (probe / probe.sum()).tolist()
        out = dataclasses.replace(hs, scores=scores, selected=select_top(scores, hs.ratio, hs.window),
                                  extra=dict(hs.extra, contrast=_NO_CONTRAST))
    else:
        out = recontrast(hs, spec.contrast)
    return dataclasses.replace(out, method=method)


def random_scores(job: HeadJob):
    """The control: uniform scores from ``torch.Generator().manual_seed(seed)``, no model pass."""
    geo = job.lm.geometry
    gen = torch.Generator().manual_seed(int(job.seed))
    scores = torch.rand(geo.n_layers, geo.n_q_heads, generator=gen, dtype=torch.float64).tolist()
    if job.progress is not None:
        job.progress(1, 1, "random head scores")
    return scores, {"seed": job.seed}, False


def _pool_sample(pool, probe, seed) -> list[Sample]:
    n = min(len(pool), max(len(probe), 64))
    return [pool[i] for i in sorted(random.Random(seed).sample(range(len(pool)), n))]


def _add_up(procs, probe_imp, probe_counts, pool_imp, pool_counts, pool_batches, stopped):
    """Several processes: the importance sums and counts of every process added up (each process takes
    part in every sum, with or without batches of its own); stopped if any stopped."""
    probe_imp, probe_counts = procs.total(probe_imp), tuple(procs.total(c) for c in probe_counts)
    if procs.total(len(pool_batches)):
        pool_imp = procs.total(pool_imp if pool_imp is not None else torch.zeros_like(probe_imp))
        pool_counts = tuple(procs.total(c) for c in pool_counts)
    return probe_imp, probe_counts, pool_imp, pool_counts, any(procs.gather(stopped))


def _check_samples(samples, what: str) -> list[Sample]:
    samples = list(samples or [])
    if not samples:
        raise UserError(f"the {what} set is empty: give at least one sample")
    return samples


# ------------------------------------------------------------------------------------------ the registry

#: every head method (a new one: its function, in this file or heads_variants.py, and one line here); the
#: order is the order UIs list them in
HEAD_METHODS: dict[str, HeadMethod] = {
    "shift": HeadMethod("shift: a short AdamW proxy fine-tune of all attention weights on the probe set; how far "
                        "each head moved", functools.partial(score_shift, optimizer="adamw"), proxy_lr=1e-4,
                        shardable=False),
    "gradient": HeadMethod("gradient: |dL/dgate| of a gate on each head, probe share minus pool share (no weight "
                           "update)", importance_scores, maps="gate", contrast="difference", any_contrast=True),
    "random": HeadMethod("random: a seeded control (falsification test)", random_scores, uses_model=False),
    "gradient_layer": HeadMethod("gradient_layer: |dL/dgate|, probe vs pool shares taken within each layer (needs "
                                 "a pool)", importance_scores, maps="gate", contrast="layer", needs_pool=True),
    "gradient_logratio": HeadMethod("gradient_logratio: |dL/dgate|, log of the probe/pool share ratio (needs a "
                                    "pool)", importance_scores, maps="gate", contrast="logratio", needs_pool=True),
    "taylor": HeadMethod("taylor: sum of |gradient x weight| over each head's weights, probe share minus pool share",
                         importance_scores, maps="taylor", contrast="difference", any_contrast=True, shardable=False),
    "shift_sgd": HeadMethod("shift_sgd: the shift proxy fine-tune with plain SGD (movement follows gradient size)",
                            functools.partial(score_shift, optimizer="sgd"), proxy_lr=1e-2, shardable=False),
    "lofit": HeadMethod("lofit: a learned scale per head output (LoFiT), trained a few steps on the probe set; "
                        "|scale - 1|", score_lofit, proxy_lr=1e-2),
    "importance": HeadMethod("importance: |dL/dgate| on the probe alone, no contrast with the pool (heads every "
                             "task needs rank high)", importance_scores, maps="gate"),
}
#: one line per head method, for UIs and CLI help
HEAD_METHOD_HELP = {name: m.help for name, m in HEAD_METHODS.items()}


# ------------------------------------------------------------------------------------------ result


@dataclass
class HeadScores:
    """Per-head scores (n_layers x n_q_heads) and the selected heads, best first."""

    method: str
    ratio: float
    scores: list[list[float]]
    selected: list[list[int]]
    time_s: float
    model: str
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.scores)

    @property
    def n_q_heads(self) -> int:
        return len(self.scores[0]) if self.scores else 0

    @property
    def window(self) -> list[int] | None:
        """The [lowest, highest] layer window the heads were selected from (None: every layer)."""
        return self.extra.get("layer_window")

    def to_dict(self) -> dict:
        return {"method": self.method, "ratio": self.ratio, "scores": self.scores, "selected": self.selected,
                "time_s": self.time_s, "model": self.model, "extra": self.extra}

    def with_ratio(self, ratio: float) -> "HeadScores":
        """The same scores with a different share of heads selected (no rescoring)."""
        return dataclasses.replace(self, ratio=ratio, selected=select_top(self.scores, ratio, self.window))

    def with_window(self, window: list[int] | None) -> "HeadScores":
        """The same scores with the heads re-picked inside the layer ``window`` ([lowest, highest],
        `layer_window`; None: every layer), as many as the ratio gives (no rescoring)."""
        extra = {k: v for k, v in self.extra.items() if k != "layer_window"}
        if window is not None:
            extra["layer_window"] = list(window)
        return dataclasses.replace(self, selected=select_top(self.scores, self.ratio, window), extra=extra)

    def save(self, out_dir) -> Path:
        """Write ``out_dir/heads.json``; returns its path."""
        return write_json(Path(out_dir) / HEADS_FILE, self.to_dict())

    @classmethod
    def load(cls, path) -> "HeadScores":
        """Read a heads.json (``path`` is the file or its folder); UserError if missing or invalid."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / HEADS_FILE
        if not p.is_file():
            raise UserError(f"heads file not found: {p} (run the heads stage first, or point to its heads.json)")
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{p} is not a valid heads.json ({exc}); rerun the heads stage") from exc
        missing = [k for k in ("method", "ratio", "scores", "selected") if not isinstance(d, dict) or k not in d]
        if missing:
            raise UserError(f"{p} is not a valid heads.json: missing {', '.join(missing)}; rerun the heads stage")
        scores, selected = d["scores"], d["selected"]
        ok = (isinstance(scores, list) and scores and all(isinstance(r, list) and r for r in scores)
              and len({len(r) for r in scores}) == 1
              and all(x is None or isinstance(x, (int, float)) for r in scores for x in r)
              and isinstance(selected, list)
              and all(isinstance(s, list) and len(s) == 2 and all(isinstance(i, int) for i in s) for s in selected))
        if not ok:
            raise UserError(f"{p} is not a valid heads.json: 'scores' must be a layers x heads table of numbers and "
                            "'selected' a list of [layer, head] pairs; rerun the heads stage")
        n_l, n_h = len(scores), len(scores[0])
        bad = [s for s in selected if not (0 <= s[0] < n_l and 0 <= s[1] < n_h)]
        if bad:
            raise UserError(f"{p}: selected head {bad[0]} is outside the {n_l} x {n_h} score table")
        scores = [[float("nan") if x is None else float(x) for x in r] for r in scores]
        return cls(method=str(d["method"]), ratio=float(d["ratio"]), scores=scores, selected=selected,
                   time_s=float(d.get("time_s") or 0.0), model=str(d.get("model") or ""), extra=dict(d.get("extra") or {}))


# ------------------------------------------------------------------------------------------ top-k


def select_top(scores, ratio: float, window=None) -> list[list[int]]:
    """The top ``ratio`` of all query heads as [[layer, head], ...], best first (at least one).

    Ties are broken by (layer, head) ascending; NaN scores rank last. ``window`` ([lowest, highest] layer,
    inclusive; None: every layer): only heads of those layers are picked, as many as ``ratio`` of all
    heads gives (at most the window's heads).
    """
    ratio = check_ratio(ratio)
    flat = _ranked(scores)
    if not flat:
        return []
    n = top_count(len(flat), ratio)
    if window is not None:
        lo, hi = window
        flat = [t for t in flat if lo <= t[1] <= hi]
    return [[layer, head] for _, layer, head in flat[:n]]


def layer_window(lowest: int | None, highest: int | None, n_layers: int) -> list[int] | None:
    """[lowest, highest] (inclusive) checked against a model of ``n_layers`` layers; None when neither is set
    (every layer). UserError for a window outside the model or an empty one."""
    if lowest is None and highest is None:
        return None
    lo = 0 if lowest is None else int(lowest)
    hi = n_layers - 1 if highest is None else int(highest)
    if not 0 <= lo <= hi < n_layers:
        raise UserError(f"the head layer window {lowest}..{highest} is not within the model's layers 0..{n_layers - 1} "
                        "(lowest head layer <= highest head layer)")
    return [lo, hi]


def _ranked(scores) -> list[tuple[float, int, int]]:
    """(score, layer, head) best first: ties by (layer, head) ascending, NaN last."""
    rows = scores.tolist() if isinstance(scores, torch.Tensor) else scores
    flat = [(float(s), layer, head) for layer, row in enumerate(rows) for head, s in enumerate(row)]
    flat.sort(key=lambda t: (math.isnan(t[0]), 0.0 if math.isnan(t[0]) else -t[0], t[1], t[2]))
    return flat


def head_ranks(scores) -> list[list[int | None]]:
    """Rank of every head in the order `select_top` picks them (1 = best); NaN and inf scores get None."""
    rows = scores.tolist() if isinstance(scores, torch.Tensor) else scores
    ranks: list[list[int | None]] = [[None] * len(row) for row in rows]
    for r, (s, layer, head) in enumerate(_ranked(rows), start=1):
        if math.isfinite(s):
            ranks[layer][head] = r
    return ranks
