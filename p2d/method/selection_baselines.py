"""Selectors that use no heads: the cheap alternatives P2D's head-guided selection has to beat.

Each scores every pool sample by its similarity to the probe set (the target examples); higher =
more wanted. They are selection methods like any other (``select_method``; each ``score_*`` function of a
`p2d.method.scoring.SelectJob` is one line of `p2d.method.selection.SELECT_METHODS`, marked
``uses_heads=False``), and the benchmark's baselines. A selector that reads the rows' answers rather than
their prompts belongs here too, as its own function and registry line.

- ``tfidf`` (no model): TF-IDF vectors of the prompt text (every turn before the answer, lower-cased,
  tokens = runs of letters/digits and single other non-space symbols, so ``+`` and ``?`` count);
  sublinear term frequency ``1 + log tf``, ``idf = log((1 + N) / (1 + df)) + 1`` over pool and probe,
  L2-normalised; score = cosine to the mean of the probe's vectors.
- ``bm25`` (no model): Okapi BM25 (``k1 = 1.2``, ``b = 0.75``) of each pool prompt against the probe
  set as one weighted query: ``sum_t q_t * idf_t * tf(t, d) (k1 + 1) / (tf(t, d) + k1 (1 - b + b |d| /
  avgdl))``, ``q_t`` = the share of probe prompts containing term t, ``idf_t = log(1 + (N - df + 0.5) /
  (df + 0.5))`` over the pool.
- ``hidden`` (the model, no heads): the mean hidden state of one decoder layer over every token of
  the rendered sample (prompt and answer, as training sees it), cosine to the mean of the probe's;
  one no-grad forward per batch that stops after that layer. Layer = ``hidden_layer`` (default
  `default_hidden_layer`: the middle layer). Under several processes every process scores the whole
  pool (same result, no speed-up).

Only the prompt is read by tfidf/bm25 (the answer is what the model must produce; a selector that
matched answers would favour rows with the probe's answers). Not supported: languages without
word boundaries in the token pattern (tfidf/bm25 then compare whole runs of characters).
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from ..data.encoding import collate, encode, iter_batches
from ..data.formats import Sample
from ..errors import UserError
from ..geometry import decoder_layers
from ..models import frozen
from ..progress import Ticker
from .gating import StopForward
from .scoring import SelectJob

BM25_K1, BM25_B = 1.2, 0.75

_TOKEN = re.compile(r"\w+|[^\w\s]")


def prompt_text(sample: Sample) -> str:
    """Every turn before the answer (system and user turns), joined; plain-text samples: ""."""
    return "\n".join(str(t.get("content", "")) for t in sample.prompt)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def default_hidden_layer(n_layers: int) -> int:
    """The middle decoder layer (0-based)."""
    return n_layers // 2


def _tfidf_vectors(docs: list[list[str]], idf: dict[str, float]) -> list[dict[str, float]]:
    out = []
    for doc in docs:
        tf = Counter(doc)
        vec = {t: (1.0 + math.log(c)) * idf[t] for t, c in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        out.append({t: v / norm for t, v in vec.items()})
    return out


def tfidf_scores(pool: list[Sample], probe: list[Sample]) -> list[float]:
    pool_docs = [tokens(prompt_text(s)) for s in pool]
    probe_docs = [tokens(prompt_text(s)) for s in probe]
    docs = pool_docs + probe_docs
    df = Counter(t for d in docs for t in set(d))
    n = len(docs)
    idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
    centroid: Counter = Counter()
    for vec in _tfidf_vectors(probe_docs, idf):
        centroid.update(vec)
    norm = math.sqrt(sum(v * v for v in centroid.values())) or 1.0
    return [sum(v * centroid.get(t, 0.0) for t, v in vec.items()) / norm for vec in _tfidf_vectors(pool_docs, idf)]


def bm25_scores(pool: list[Sample], probe: list[Sample]) -> list[float]:
    pool_docs = [tokens(prompt_text(s)) for s in pool]
    n = len(pool_docs)
    avgdl = sum(map(len, pool_docs)) / max(1, n) or 1.0
    df = Counter(t for d in pool_docs for t in set(d))
    probe_sets = [set(tokens(prompt_text(s))) for s in probe]
    query = Counter(t for s in probe_sets for t in s)
    weights = {t: c / max(1, len(probe_sets)) for t, c in query.items()}
    idf = {t: math.log(1.0 + (n - df.get(t, 0) + 0.5) / (df.get(t, 0) + 0.5)) for t in weights}
    scores = []
    for doc in pool_docs:
        tf = Counter(doc)
        norm = BM25_K1 * (1 - BM25_B + BM25_B * len(doc) / avgdl)
        scores.append(sum(w * idf[t] * tf[t] * (BM25_K1 + 1) / (tf[t] + norm) for t, w in weights.items() if t in tf))
    return scores


def mean_hidden_states(lm, samples: list[Sample], layer: int, batch_size: int = 8, max_length: int = 256,
                       bar: Ticker | None = None, should_stop=None) -> tuple[torch.Tensor, list[bool], bool]:
    """[N, hidden] mean output of decoder layer ``layer`` over each sample's tokens (rows without answer
    tokens after truncation stay zero and are flagged False); and whether a stop request ended it."""
    layers = decoder_layers(lm.model)
    if not 0 <= layer < len(layers):
        raise UserError(f"hidden layer must be between 0 and {len(layers) - 1}, got {layer}")
    indexed = [Sample(s.prompt, s.answer, s.task, s.row, i, s.kind) for i, s in enumerate(samples)]
    items = encode(indexed, lm.tokenizer, max_length)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(samples), lm.geometry.hidden_size)
    ok = [False] * len(samples)
    captured: dict = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise StopForward()

    body = getattr(lm.model, "base_model", None) or lm.model
    handle = layers[layer].register_forward_hook(hook)
    stopped = False
    try:
        with torch.no_grad(), frozen(lm.model):
            for group in iter_batches(items, batch_size, sort_by_length=True):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                batch = collate(group, pad)
                mask = batch["attention_mask"].to(lm.device)
                try:
                    body(input_ids=batch["input_ids"].to(lm.device), attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                h = captured.pop("h").float()
                m = mask.unsqueeze(-1).to(h.dtype)
                mean = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
                for it, v in zip(group, mean.cpu()):
                    out[it["index"]] = v
                    ok[it["index"]] = True
                if bar is not None:
                    bar.step(f"hidden states: {bar.done + 1}/{bar.total} batches")
    finally:
        handle.remove()
    return out, ok, stopped


def hidden_scores(lm, pool: list[Sample], probe: list[Sample], layer: int | None = None, batch_size: int = 8,
                  max_length: int = 256, progress=None, should_stop=None) -> tuple[list[float], dict, bool]:
    """Cosine of each pool sample's mean hidden state to the probe's mean (NaN for rows without answer
    tokens); extra facts; whether it was stopped."""
    layer = default_hidden_layer(lm.geometry.n_layers) if layer is None else int(layer)
    n_batches = -(-len(pool) // batch_size) + -(-len(probe) // batch_size)
    bar = Ticker(progress, n_batches)
    probe_h, probe_ok, stopped = mean_hidden_states(lm, probe, layer, batch_size, max_length, bar, should_stop)
    if not any(probe_ok):
        raise UserError("no probe sample has answer tokens within the max length; raise max_length")
    centroid = probe_h[torch.tensor(probe_ok)].mean(dim=0)
    scores = [float("nan")] * len(pool)
    if not stopped:
        pool_h, pool_ok, stopped = mean_hidden_states(lm, pool, layer, batch_size, max_length, bar, should_stop)
        cos = torch.nn.functional.cosine_similarity(pool_h, centroid.unsqueeze(0), dim=1)
        scores = [float(c) if k else float("nan") for c, k in zip(cos.tolist(), pool_ok)]
    return scores, {"hidden_layer": layer}, stopped


def _need_probe(job: SelectJob) -> None:
    if not job.probe:
        raise UserError(f"the {job.method} selection compares the pool with the probe set: give a probe file (probe)")


def score_tfidf(job: SelectJob) -> bool:
    """``tfidf``: `tfidf_scores` of the pool against the probe (no model)."""
    _need_probe(job)
    job.scores = tfidf_scores(job.pool, job.probe)
    return _model_free(job)


def score_bm25(job: SelectJob) -> bool:
    """``bm25``: `bm25_scores` of the pool against the probe (no model)."""
    _need_probe(job)
    job.scores = bm25_scores(job.pool, job.probe)
    return _model_free(job)


def _model_free(job: SelectJob) -> bool:
    job.extra["uses_model"] = False
    if job.progress is not None:
        job.progress(1, 1, f"{job.method} scores")
    return False


def score_hidden(job: SelectJob) -> bool:
    """``hidden``: `hidden_scores` of the pool against the probe at layer ``job.hidden_layer``."""
    _need_probe(job)
    job.scores, extra, stopped = hidden_scores(job.lm, job.pool, job.probe, job.hidden_layer, job.batch_size,
                                               job.max_length, job.progress, job.should_stop)
    job.extra.update(extra)
    return stopped
