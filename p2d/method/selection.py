"""Stage 2: score every pool sample with the selected heads H and keep the top ``ratio``.

The default method, ``activation`` (``DEFAULT_SELECT_METHOD``; formulas and sources also in
docs/METHOD.md): for a sample x, a head h of H in layer l, ``n_h(x)`` the L2 norm of the head's output
averaged over the sample's answer positions and ``m_l(x)`` the mean of that norm over all heads of
layer l at the same positions, ::

    score(x) = mean over h in H of  n_h(x) / m_l(x)

how strongly the selected heads respond to the sample relative to their layers. One no-grad forward
that stops right after the last layer of H (no logits). The top ``ratio`` of the pool by score is kept
(`p2d.method.scoring.top_samples`: best first, ties by position).

Variants (`p2d.method.selection_variants`): ``ablation`` (the answer loss with H gated off minus with it on),
``alignment`` (cosine between a sample's gate gradient on H and the probe set's mean),
``activation_length_z`` (activation z-scored among samples of similar answer length) and
``prefilter_alignment`` (activation keeps a larger share, alignment ranks it). ``random`` is a seeded
control (``random.Random(seed)``, no model pass); ``tfidf``, ``bm25`` and ``hidden``
(`p2d.method.selection_baselines`) select without heads, the cheap alternatives head-guided selection has to
beat, and so do the answer readers ``answer_shape``, ``answer_tfidf`` and ``shape_tfidf`` (same module: the
answer's shape class and words, no model).

Answer positions (``positions``, one of ``POSITIONS``; `p2d.method.gating`): ``"all"`` (default) takes every
position that predicts an answer token, which with a chat template includes the end-of-turn marker
and the template's trailing newline; ``"content"`` drops those (positions predicting the first
special token of the answer and everything after it). It applies to activation (where the norms are
averaged), ablation and alignment (where the loss is taken), and to the first pass of
prefilter_alignment. Every loss is the sample's *mean* cross-entropy over the chosen positions.

Cost control: samples are encoded once, sorted by length into batches of at most ``batch_size``
(little padding; memory bounded by ``batch_size x max_length`` tokens), only the layers of H are
hooked, logits are computed only at answer positions, and activation stops the forward after the
last layer it needs. Every parameter is frozen during scoring and restored after.

Samples that end up without answer tokens (see `p2d.data.encoding.encode`) get score NaN, are never
selected and are counted in ``extra["unscored"]``. ``should_stop()`` returning True ends scoring
early; the selection is then made among the samples scored so far and ``extra["stopped"]`` is True. One
process asks it between batches and also between layers inside a batch (`p2d.method.gating.stop_inside`;
the interrupted batch stays unscored), so a stop does not wait for the rest of a long batch.

``scores.jsonl`` / ``selection.json`` write NaN as null.
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

from ..data.encoding import encode, iter_batches
from ..data.formats import Sample
from ..distributed import Processes
from ..errors import UserError
from ..files import write_json, write_jsonl
from ..geometry import normalize_heads
from ..models import frozen
from ..progress import Ticker
from .gating import POSITIONS, HeadGate, StopInside, heads_by_layer, stop_inside
from .heads import HeadScores
from .scoring import EncodedBatches, SelectJob, check_positions, check_ratio, top_samples
from .selection_baselines import (score_answer_shape, score_answer_tfidf, score_bm25, score_hidden, score_shape_tfidf,
                                  score_tfidf)
from .selection_variants import (PREFILTER_FACTOR, score_ablation, score_alignment, score_length_z,
                                 score_prefilter_alignment)

#: answer positions used by default (see `p2d.method.gating.POSITIONS`): all answer positions beat content-only ones
#: with gradient, gradient_layer and gradient_logratio heads in the same study (bench/choose_defaults.py)
DEFAULT_POSITIONS = "all"
#: Chosen with the head method (see `p2d.method.heads.DEFAULT_HEAD_METHOD`, bench/choose_defaults.py): activation at
#: all answer positions gave the highest mean precision over the seven built-in targets; the length z-score
#: lowered it on every target (answer length is itself task information on the built-in pool); alignment
#: (measured on a 300-row pool, docs/BENCHMARKS.md) was at or below activation at ~3x its cost, and finds
#: the target with random heads too (its signal is gradient similarity, not the heads).
DEFAULT_SELECT_METHOD = "activation"

__all__ = ["SELECT_METHODS", "SELECT_METHOD_HELP", "SelectMethod", "DEFAULT_SELECT_METHOD", "POSITIONS",
           "DEFAULT_POSITIONS", "PREFILTER_FACTOR", "Selection", "select_data", "head_list", "SELECTED_FILE",
           "SCORES_FILE", "SELECTION_FILE"]

SELECTED_FILE = "selected.jsonl"    # the kept pool rows (with their score as p2d_score), best first
SCORES_FILE = "scores.jsonl"        # every pool row's score, in pool order
SELECTION_FILE = "selection.json"   # method, counts, kept positions, extra


@dataclass(frozen=True)
class SelectMethod:
    """One selection method of the registry `SELECT_METHODS`.

    ``score(job: p2d.method.scoring.SelectJob) -> stopped`` writes every pool row's score into
    ``job.scores``; ``help`` is its line in UIs and CLI help. ``uses_heads``: False for a head-free
    selector (it ignores the heads and ``positions``, and gets no encoded batches); ``model_pass``: False
    for a head-guided method that never runs the model; ``needs_probe``: a head-guided method that
    reads the probe set (its batches are encoded for it, and a missing probe set is refused)."""

    help: str
    score: Callable
    uses_heads: bool = True
    model_pass: bool = True
    needs_probe: bool = False


def select_data(lm, heads, pool: list[Sample], method: str = DEFAULT_SELECT_METHOD, ratio: float = 0.1,
                probe: list[Sample] | None = None, batch_size: int = 8, max_length: int = 256, seed: int = 0,
                progress=None, should_stop=None, positions: str = DEFAULT_POSITIONS,
                prefilter_factor: float = PREFILTER_FACTOR, hidden_layer: int | None = None) -> Selection:
    """Score every sample of ``pool`` with the method ``method`` of `SELECT_METHODS` and heads ``heads``
    (HeadScores or [[layer, head], ...]) and keep the top ``ratio`` (at least one). See the module
    docstring for the methods, ``positions`` (one of ``POSITIONS``) and ``prefilter_factor``
    (prefilter_alignment only). The head-free methods (`p2d.method.selection_baselines`: tfidf, bm25,
    hidden) ignore ``heads`` (None is fine) and ``positions``; ``hidden_layer`` is hidden's layer (None:
    the middle one)."""
    spec = SELECT_METHODS.get(method)
    if spec is None:
        raise UserError(f"unknown selection method {method!r}: use one of {', '.join(SELECT_METHODS)}")
    ratio = check_ratio(ratio, "data ratio")
    positions = check_positions(positions)
    pool = list(pool or [])
    if not pool:
        raise UserError("the pool is empty: give at least one sample to select from")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    if method == "prefilter_alignment" and not (isinstance(prefilter_factor, (int, float)) and prefilter_factor >= 1
                                                and math.isfinite(prefilter_factor)):
        raise UserError(f"the prefilter factor must be a number >= 1 (got {prefilter_factor!r})")
    n = len(pool)
    job = SelectJob(method, lm, pool, probe, ratio, seed, batch_size, max_length, positions, hidden_layer,
                    float(prefilter_factor), progress, should_stop, scores=[float("nan")] * n)
    if not spec.uses_heads:
        start = time.perf_counter()
        stopped = spec.score(job)
    else:
        hl = head_list(heads, lm.geometry)
        job.by_layer = heads_by_layer(hl)
        if spec.needs_probe and not probe:
            raise UserError(f"the {method} score needs a probe set (a few target-task samples): give a probe file "
                            "(probe), or pick another selection method")
        start = time.perf_counter()
        job.extra = {"heads": hl, "n_heads": len(hl), "layers": sorted(job.by_layer)}
        if isinstance(heads, HeadScores):
            job.extra["head_method"] = heads.method
        if not spec.model_pass:
            stopped = spec.score(job)
        else:
            stopped = _model_pass(job, spec)
    job.extra["stopped"] = stopped
    selected = top_samples(job.scores, ratio)
    return Selection(method=method, ratio=ratio, n_pool=n, n_selected=len(selected),
                     time_s=round(time.perf_counter() - start, 3), scores=job.scores, selected=selected,
                     extra=job.extra)


def _model_pass(job: SelectJob, spec: SelectMethod) -> bool:
    """A head-guided method over the encoded pool, this process's share of it (several processes: the
    scores merged afterwards), every weight frozen; True when stopped."""
    lm, procs = job.lm, Processes.current()
    job.procs = procs
    job.should_stop = procs.agreed(job.should_stop)
    job.enc = EncodedBatches(lm, job.pool, job.batch_size, job.max_length, job.positions)
    job.extra.update(job.enc.info(), positions=job.positions)
    job.groups, own = procs.padded(job.enc.groups)  # a sharded model: padded with copies, never merged
    job.owned = [it["index"] for g in job.groups[:own] for it in g]
    if spec.needs_probe:
        penc = encode(list(job.probe), lm.tokenizer, job.max_length)
        if not penc:
            raise UserError("no probe sample has answer tokens within the max length; raise max_length")
        job.probe_groups = list(iter_batches(penc, job.batch_size, sort_by_length=True))
    job.bar = Ticker(job.progress, len(job.groups) + len(job.probe_groups))
    with frozen(lm.model), stop_inside(lm.model, job.should_stop if procs.world == 1 else None):
        try:
            stopped = spec.score(job)
        except StopInside:  # part-way through a batch: the batches before it are scored
            stopped = True
    job.scores = procs.merge(job.scores, job.owned)
    stopped = any(procs.gather(stopped))
    job.extra.update(procs.summary(len(job.owned)))
    return stopped


def activation_scores(job: SelectJob, lengths: list[int] | None = None) -> bool:
    """The default score of the batches ``job.groups`` into ``job.scores`` (and each sample's number of
    answer positions into ``lengths``); True when stopped."""
    lm, by_layer, enc, scores, bar, should_stop = job.lm, job.by_layer, job.enc, job.scores, job.bar, job.should_stop
    geo = lm.geometry
    model = lm.model
    body = getattr(model, "base_model", None) or model
    last = max(by_layer)
    with torch.no_grad(), HeadGate(model, geo, layers=list(by_layer), stop_after=last) as gate:
        for items in job.groups:
            if should_stop is not None and should_stop():
                return True
            batch = enc.tensors(items)
            mask = enc.mask(batch)
            gate.capture(mask)
            gate.run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            rel = []
            for layer, heads in by_layer.items():
                norms = gate.norms[layer].double()  # [B, n_q]; double, as the head record's score is
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


def random_scores(job: SelectJob) -> bool:
    """The control: ``random.Random(seed)`` scores, no model pass."""
    rng = random.Random(job.seed)
    job.scores = [rng.random() for _ in range(len(job.pool))]
    job.extra["seed"] = job.seed
    if job.progress is not None:
        job.progress(1, 1, "random scores")
    return False


# ------------------------------------------------------------------------------------------ the registry

#: every selection method (a new one: its function, in this file, selection_variants.py or
#: selection_baselines.py, and one line here); the order is the order UIs list them in
SELECT_METHODS: dict[str, SelectMethod] = {
    "ablation": SelectMethod("ablation: answer loss with the selected heads gated off minus with them on",
                             score_ablation),
    "alignment": SelectMethod("alignment: cosine between a sample's head-gate gradient and the probe set's mean",
                              score_alignment, needs_probe=True),
    "activation": SelectMethod("activation: output norm of the selected heads on the answer tokens (one forward)",
                               activation_scores),
    "random": SelectMethod("random: a seeded control", random_scores, model_pass=False),
    "activation_length_z": SelectMethod("activation_length_z: activation z-scored among samples of similar answer "
                                        "length", functools.partial(score_length_z, first_pass=activation_scores)),
    "prefilter_alignment": SelectMethod("prefilter_alignment: activation keeps the top 3x share, alignment ranks "
                                        "those", functools.partial(score_prefilter_alignment,
                                                                   first_pass=activation_scores), needs_probe=True),
    "tfidf": SelectMethod("tfidf: no heads, no model: TF-IDF of the prompt's words and symbols, cosine to the "
                          "probe's centroid", score_tfidf, uses_heads=False),
    "bm25": SelectMethod("bm25: no heads, no model: BM25 of the prompt against the probe's terms", score_bm25,
                         uses_heads=False),
    "hidden": SelectMethod("hidden: no heads: the model's mean hidden state of one layer, cosine to the probe's "
                           "centroid", score_hidden, uses_heads=False),
    "answer_shape": SelectMethod("answer_shape: no heads, no model: rows whose answer has the probe answers' shape "
                                 "(number, word, date, JSON, list, sentence...) first", score_answer_shape,
                                 uses_heads=False),
    "answer_tfidf": SelectMethod("answer_tfidf: no heads, no model: TF-IDF of the answer, cosine to the probe "
                                 "answers' centroid", score_answer_tfidf, uses_heads=False),
    "shape_tfidf": SelectMethod("shape_tfidf: no heads, no model: the answer-shape filter, then prompt TF-IDF",
                                score_shape_tfidf, uses_heads=False),
}
#: one line per selection method, for UIs and CLI help
SELECT_METHOD_HELP = {name: m.help for name, m in SELECT_METHODS.items()}


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
