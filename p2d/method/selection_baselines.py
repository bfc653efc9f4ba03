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

The answer readers (no model) read what tfidf/bm25 leave out, the answer, the part P2D's activation
score is averaged over; they are the first competitor a head selector has to beat:

- ``answer_shape``: every answer gets one shape class (`answer_shape`, the first that fits, in the
  order of ``SHAPES``): ``empty``; ``json`` (parses as a JSON object or array); ``number`` (one
  number: ``-12``, ``3,400``, ``0.85``, ``12%``); ``ordinal`` (``21st``); ``date`` (a month name with
  a day or year, ``2024-03-01``, ``3/1/2024``); ``list`` (two or more short comma/semicolon items, or
  bullet / numbered lines); ``code`` (several lines, one of them indented or ending in ``:``, ``{``
  or ``;``); ``lines`` (several other lines); ``word`` (one word); ``phrase`` (two to four words, no
  closing ``.!?``); ``sentence`` (one sentence); ``paragraph`` (more). A pool row's score is the share
  of probe answers with its shape, so rows of the probe's dominant shape rank first, then the next
  shapes, rows of a shape no probe answer has last. Ties within a shape: the answer length closest to
  the probe answers' median (``1 / (1 + |log (1 + words) - log (1 + median)|)``), scaled below one
  probe answer's share so it never reorders shapes; then pool position.
- ``answer_tfidf``: ``tfidf``'s vectors and cosine, on the answer text instead of the prompt.
- ``shape_tfidf``: ``answer_shape``'s shape share first, ties within a shape by ``tfidf`` of the
  prompt (scaled the same way), i.e. the shape filter, then prompt TF-IDF.

Rows without a prompt (plain-text data: the whole text is the answer, as training sees it) are read
the same way: their shape is the text's, answer_tfidf compares the text, and shape_tfidf's second key
falls back to the text when a row has no prompt. A probe whose answers are all empty is refused
(UserError); empty pool answers get the ``empty`` shape and rank with it. ``extra`` records the probe's
shape shares (``probe_shapes``) and, for the shape selectors, the shapes of the kept rows.

Only the prompt is read by tfidf/bm25 (the answer is what the model must produce; a selector that
matched answers would favour rows with the probe's answers: that is what the answer readers do, on
purpose). Not supported: languages without word boundaries in the token pattern (the TF-IDF
selectors then compare whole runs of characters); shape classes beyond the ones listed (an answer in
another format falls into word/phrase/sentence/paragraph by its length).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter

import torch

from ..data.encoding import collate, encode, iter_batches
from ..data.formats import Sample
from ..errors import UserError
from ..geometry import decoder_layers
from ..models import frozen
from ..progress import Ticker
from .gating import StopForward
from .scoring import SelectJob, top_samples

BM25_K1, BM25_B = 1.2, 0.75

_TOKEN = re.compile(r"\w+|[^\w\s]")


def answer_text(sample: Sample) -> str:
    """The answer (plain-text samples: the whole text)."""
    return str(sample.answer or "")


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


def tfidf_scores(pool: list[Sample], probe: list[Sample], text=prompt_text) -> list[float]:
    """Cosine of each pool row's TF-IDF vector of ``text(row)`` to the probe's centroid (see the module docstring)."""
    pool_docs = [tokens(text(s)) for s in pool]
    probe_docs = [tokens(text(s)) for s in probe]
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


# ------------------------------------------------------------------------------------------ answer readers

#: the shape classes of `answer_shape`, in the order they are tried
SHAPES = ("empty", "json", "number", "ordinal", "date", "list", "code", "lines", "word", "phrase", "sentence",
          "paragraph")
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
          r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?")
_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|[-+−]?\.\d+%?")
_ORDINAL = re.compile(r"\d+(?:st|nd|rd|th)")
_DATE = re.compile(rf"(?:{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?"
                   rf"{_MONTH}(?:,?\s+\d{{4}})?|{_MONTH}\s+\d{{4}}|\d{{4}}-\d{{1,2}}-\d{{1,2}}"
                   rf"|\d{{1,2}}[/.]\d{{1,2}}[/.]\d{{2,4}})", re.IGNORECASE)
_BULLET = re.compile(r"\s*(?:[-*•]|\d+[.)])\s+\S")
_WORD = re.compile(r"[^\W\d_](?:[\w'’-]*\w)?[.!?]?")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def answer_shape(text: str) -> str:
    """The shape class of an answer (one of `SHAPES`; see the module docstring)."""
    t = str(text or "").strip()
    if not t:
        return "empty"
    if t[0] in "{[":
        try:
            if isinstance(json.loads(t), (dict, list)):
                return "json"
        except ValueError:
            pass
    if _NUMBER.fullmatch(t):
        return "number"
    if _ORDINAL.fullmatch(t):
        return "ordinal"
    if _DATE.fullmatch(t.rstrip(".")):
        return "date"
    lines = [ln for ln in t.splitlines() if ln.strip()]
    if len(lines) >= 2 and all(_BULLET.match(ln) for ln in lines):
        return "list"
    items = [x.strip() for x in re.split(r"[,;]", t)]
    if len(lines) == 1 and len(items) >= 2 and all(x and len(x.split()) <= 3 and not _SENTENCE_END.search(x)
                                                   for x in items):
        return "list"
    if len(lines) >= 2:
        code = any(ln[:1] in " \t" or ln.rstrip().endswith((":", "{", ";")) for ln in t.splitlines() if ln.strip())
        return "code" if code else "lines"
    words = t.split()
    if len(words) == 1 and _WORD.fullmatch(t):
        return "word"
    if len(words) <= 4 and not t.endswith((".", "!", "?")):
        return "phrase"
    return "sentence" if len(_SENTENCE_END.findall(t.rstrip())) <= 1 else "paragraph"


def _probe_shapes(job: SelectJob) -> tuple[list[str], dict[str, float]]:
    """Every pool answer's shape and the probe answers' shape shares (UserError: no probe answer)."""
    probe = [answer_text(s) for s in job.probe]
    if not any(a.strip() for a in probe):
        raise UserError(f"the {job.method} selection reads the probe's answers, and every probe answer is empty: "
                        "give a probe file with answers (an output column), or pick another selection method")
    counts = Counter(answer_shape(a) for a in probe)
    shares = {k: c / len(probe) for k, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}
    job.extra["probe_shapes"] = {k: round(v, 4) for k, v in shares.items()}
    return [answer_shape(answer_text(s)) for s in job.pool], shares


def _by_shape(job: SelectJob, tie: list[float]) -> bool:
    """Scores = the probe's share of each row's shape, ties within a shape by ``tie`` (each in [0, 1]),
    scaled below one probe answer's share so a tie-break never moves a row past another shape."""
    shapes, shares = _probe_shapes(job)
    step = 1.0 / (len(job.probe) + 1)
    job.scores = [shares.get(sh, 0.0) + step * min(1.0, max(0.0, t)) for sh, t in zip(shapes, tie)]
    kept = top_samples(job.scores, job.ratio)
    job.extra["selected_shapes"] = dict(Counter(shapes[i] for i in kept).most_common())
    return _model_free(job)


def _length_closeness(pool: list[Sample], probe: list[Sample]) -> list[float]:
    median = statistics.median(len(answer_text(s).split()) for s in probe)
    return [1.0 / (1.0 + abs(math.log1p(len(answer_text(s).split())) - math.log1p(median))) for s in pool]


def prompt_or_text(sample: Sample) -> str:
    """The prompt; a row without one (plain text): its text."""
    return prompt_text(sample) or answer_text(sample)


def score_answer_shape(job: SelectJob) -> bool:
    """``answer_shape``: the probe's share of each row's answer shape, ties by answer length (no model)."""
    _need_probe(job)
    return _by_shape(job, _length_closeness(job.pool, job.probe))


def score_answer_tfidf(job: SelectJob) -> bool:
    """``answer_tfidf``: `tfidf_scores` of the answer texts (no model)."""
    _need_probe(job)
    _probe_shapes(job)  # the probe's answers must exist; their shapes go into extra
    job.scores = tfidf_scores(job.pool, job.probe, text=answer_text)
    return _model_free(job)


def score_shape_tfidf(job: SelectJob) -> bool:
    """``shape_tfidf``: the answer-shape filter, then TF-IDF of the prompt within a shape (no model)."""
    _need_probe(job)
    return _by_shape(job, tfidf_scores(job.pool, job.probe, text=prompt_or_text))


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
