"""Looking into runs and heads: how two head maps compare, what one head does, what tuning changed elsewhere.

`compare_head_maps(a, b)` takes two `p2d.method.heads.HeadScores` of the same head geometry (two targets,
two methods or two seeds: any two ``heads.json``) and returns the overlap of their selected sets
(Jaccard index, shared and own heads), the Spearman rank correlation of all head scores, and a
rank-difference map (per head, its score percentile in ``a`` minus that in ``b``: scales of
different methods do not matter). NaN scores rank last, as in `p2d.method.heads.select_top`.
Supported: maps of the same n_layers x n_q_heads; anything else is a `UserError`. Reusing a map for
another task is the heads stage's ``--heads`` option of ``select`` and ``train``.

Opening one head:

- `attention_pattern(lm, sample, layer, head)`: the head's attention weights on one sample (prompt and
  answer, chat template applied), token x token, with the tokens as labels. The forward runs once with
  the eager attention implementation (the only one that returns weights), switched back afterwards.
  Long samples show their last ``max_tokens`` tokens (the end holds the answer); the weights are those
  of the whole sequence, so a row need not sum to 1 over the shown columns.
- `gate_off_effect(lm, samples, heads)`: the mean answer loss on ``samples`` with the given heads'
  outputs multiplied by 0 (`p2d.method.gating.HeadGate`), minus the loss with every head on. One head, or
  the whole selected set. Positive = the answers need these heads.
- `inspect_head(lm, heads, layer, head, sample, probe)`: both, plus the head's score and rank under the
  map's method, as one dict (what the app's "Open a head" view and ``python -m p2d inspect-head`` show).

Cheap: one forward with weights, and two forwards over the probe rows for each gate-off figure (no
training, nothing written). Quantised models work; a model whose attention has no eager path (some
remote-code models) gives a `UserError`.

`forgetting(before, after)` lines up per-task accuracy before and after training: the eval set's own
tasks (when its rows carry a task label) and the held-out rows of the pool's other tasks
(``EvalResult.other_tasks``, the built-in pool's ``other_eval_size``): what tuning changed elsewhere.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .data.encoding import encode, encode_prompts
from .data.formats import Sample
from .errors import UserError
from .evaluation import mean_answer_loss
from .method.gating import HeadGate, heads_by_layer
from .method.heads import HeadScores, head_ranks

__all__ = ["compare_head_maps", "rank_percentiles", "spearman", "forgetting", "check_head", "attention_pattern",
           "gate_off_effect", "inspect_head", "head_rank", "MAX_TOKENS"]

MAX_TOKENS = 128  # the most tokens an attention pattern shows (a readable square)


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


def rank_percentiles(values: list[float]) -> list[float]:
    """Each value's rank as a share in [0, 1] (1 = highest; ties share their average rank; NaN lowest)."""
    n = len(values)
    if n <= 1:
        return [1.0] * n
    order = sorted(range(n), key=lambda i: (not math.isnan(values[i]), values[i] if not math.isnan(values[i]) else 0))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and _same(values[order[j + 1]], values[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return [r / (n - 1) for r in ranks]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson over average ranks); None when either side is constant."""
    ra, rb = rank_percentiles(a), rank_percentiles(b)
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def _describe(hs: HeadScores, name: str) -> dict:
    return {"name": name, "method": hs.method, "ratio": hs.ratio, "model": hs.model, "n_selected": len(hs.selected)}


def compare_head_maps(a: HeadScores, b: HeadScores, name_a: str = "a", name_b: str = "b") -> dict:
    """Overlap, rank correlation and rank-difference map of two head maps (see the module docstring)."""
    if (a.n_layers, a.n_q_heads) != (b.n_layers, b.n_q_heads):
        raise UserError(f"the head maps do not match: {name_a} has {a.n_layers} layers x {a.n_q_heads} heads, "
                        f"{name_b} {b.n_layers} x {b.n_q_heads}; compare maps of the same model")
    flat_a = [float(x) for row in a.scores for x in row]
    flat_b = [float(x) for row in b.scores for x in row]
    sel_a = {tuple(h) for h in a.selected}
    sel_b = {tuple(h) for h in b.selected}
    union = sel_a | sel_b
    pa, pb = rank_percentiles(flat_a), rank_percentiles(flat_b)
    n_q = a.n_q_heads
    diff = [[round(pa[layer * n_q + h] - pb[layer * n_q + h], 6) for h in range(n_q)] for layer in range(a.n_layers)]
    rho = spearman(flat_a, flat_b)
    return {
        "a": _describe(a, name_a), "b": _describe(b, name_b),
        "jaccard": len(sel_a & sel_b) / len(union) if union else None,
        "shared": sorted([list(h) for h in sel_a & sel_b]),
        "only_a": sorted([list(h) for h in sel_a - sel_b]),
        "only_b": sorted([list(h) for h in sel_b - sel_a]),
        "spearman": None if rho is None else round(rho, 6),
        "rank_difference": diff,
    }


# ---------------------------------------------------------------------------------- opening a head

def check_head(n_layers: int, n_q_heads: int, layer, head) -> tuple[int, int]:
    """``(layer, head)`` as ints, or a UserError naming the valid ranges."""
    try:
        layer, head = int(layer), int(head)
    except (TypeError, ValueError):
        raise UserError(f"layer and head must be whole numbers, got {layer!r}, {head!r}") from None
    if not 0 <= layer < n_layers or not 0 <= head < n_q_heads:
        raise UserError(f"no head ({layer}, {head}): this model has layers 0..{n_layers - 1} and query heads "
                        f"0..{n_q_heads - 1}")
    return layer, head


def _check_head(lm, layer, head) -> tuple[int, int]:
    return check_head(lm.geometry.n_layers, lm.geometry.n_q_heads, layer, head)


@contextlib.contextmanager
def _eager_attention(model):
    """The model with eager attention (weights returned) for the block; the previous one afterwards."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except Exception as exc:  # noqa: BLE001 - models without a switchable attention
        raise UserError(f"this model's attention ({before}) cannot return its weights: load it with "
                        "attn_implementation='eager' to open heads") from exc
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def attention_pattern(lm, sample: Sample, layer: int, head: int, max_tokens: int = MAX_TOKENS,
                      max_length: int = 512) -> dict:
    """``{"tokens": [...], "weights": [[...]], "answer_start": i, "offset": k, "layer", "head"}``: row i
    is where shown token i attends; ``offset`` tokens were cut from the front; ``answer_start`` is the
    first shown position whose token belongs to the answer (None for a prompt-only sample)."""
    layer, head = _check_head(lm, layer, head)
    enc = encode([sample], lm.tokenizer, max_length=max_length)
    if enc:
        ids, labels = enc[0]["input_ids"], enc[0]["labels"]
    else:  # no answer tokens (e.g. a prompt typed in the app): the prompt alone
        ids = encode_prompts([sample], lm.tokenizer, max_length=max_length)[0]
        labels = [-100] * len(ids)
    if not ids:
        raise UserError("the sample has no tokens to show")
    model = lm.model
    n_kv_group = lm.geometry.n_q_heads // max(1, lm.geometry.n_kv_heads)
    with _eager_attention(model):
        out = model(input_ids=torch.tensor([ids], device=lm.device), output_attentions=True, use_cache=False)
    attn = getattr(out, "attentions", None)
    if not attn or attn[layer] is None:
        raise UserError("this model returned no attention weights: load it with attn_implementation='eager'")
    weights = attn[layer][0, head].float().cpu()  # [T, T]
    offset = max(0, len(ids) - int(max_tokens))
    weights = weights[offset:, offset:]
    tokens = [lm.tokenizer.decode([t]) for t in ids[offset:]]
    answer = next((i for i, lab in enumerate(labels) if lab != -100), None)
    return {"layer": layer, "head": head, "kv_head": head // n_kv_group, "tokens": tokens,
            "weights": [[round(float(x), 5) for x in row] for row in weights], "offset": offset,
            "answer_start": None if answer is None else max(0, answer - offset), "n_tokens": len(ids)}


@torch.no_grad()
def gate_off_effect(lm, samples: list[Sample], heads, batch_size: int = 8, max_length: int = 256) -> dict:
    """Mean answer loss on ``samples`` with ``heads`` ([(layer, head), ...]) gated off, against all on."""
    heads = [tuple(int(x) for x in h) for h in heads]
    if not heads:
        raise UserError("no heads to gate off")
    for layer, head in heads:
        _check_head(lm, layer, head)
    if not samples:
        raise UserError("no samples to measure the loss on (the probe set is empty)")
    base = mean_answer_loss(lm, samples, batch_size=batch_size, max_length=max_length)
    by_layer = heads_by_layer(heads)
    with HeadGate(lm.model, lm.geometry, layers=list(by_layer)) as gate:
        for layer, hs in by_layer.items():
            g = torch.ones(lm.geometry.n_q_heads, device=lm.device, dtype=lm.dtype)
            g[hs] = 0.0
            gate.set_gate(layer, g)
        gated = mean_answer_loss(lm, samples, batch_size=batch_size, max_length=max_length)
    if base is None or gated is None:
        raise UserError("no sample has answer tokens within the max length: raise max length")
    return {"heads": [list(h) for h in heads], "loss": base, "loss_gated": gated, "change": gated - base,
            "n": len(samples)}


def head_rank(heads: HeadScores, layer: int, head: int) -> dict:
    """The head's score under the map's method, its rank (`p2d.method.heads.head_ranks`: 1 = best, None for a
    non-finite score) and whether it is in the selected set."""
    score = float(heads.scores[layer][head])
    return {"score": score if math.isfinite(score) else None, "rank": head_ranks(heads.scores)[layer][head],
            "of": heads.n_layers * heads.n_q_heads, "method": heads.method,
            "selected": [layer, head] in [list(h) for h in heads.selected]}


def inspect_head(lm, heads: HeadScores | None, layer: int, head: int, sample: Sample,
                 probe: list[Sample], max_probe: int = 32, max_length: int = 256,
                 max_tokens: int = MAX_TOKENS) -> dict:
    """The head's attention pattern on ``sample``, its score and rank in ``heads``, and the probe answer
    loss change when it is gated off (and when the whole selected set is), on up to ``max_probe`` rows."""
    layer, head = _check_head(lm, layer, head)
    if heads is not None and (heads.n_layers, heads.n_q_heads) != (lm.geometry.n_layers, lm.geometry.n_q_heads):
        raise UserError("the head map is of another model: open heads with the model the map was scored on")
    probe = list(probe)[:max_probe]
    out = {"pattern": attention_pattern(lm, sample, layer, head, max_tokens=max_tokens),
           "rank": head_rank(heads, layer, head) if heads is not None else None,
           "gate_off": gate_off_effect(lm, probe, [(layer, head)], max_length=max_length)}
    if heads is not None and heads.selected:
        out["gate_off_selected"] = gate_off_effect(lm, probe, heads.selected, max_length=max_length)
    return out


# ---------------------------------------------------------------------------------- forgetting
def _by_task(result) -> tuple[dict, dict]:
    d = result if isinstance(result, dict) else result.to_dict()
    return d.get("by_task") or {}, d.get("other_tasks") or {}


def forgetting(before, after) -> list[dict]:
    """Rows ``{"task", "set", "before", "after", "change", "n"}`` (accuracy as a share; ``set`` is "eval"
    or "other tasks"), eval tasks first; ``before``/``after`` are `EvalResult`s or their dicts (None:
    not evaluated). A task only in one of them has None on the other side."""
    rows = []
    b_eval, b_other = _by_task(before) if before is not None else ({}, {})
    a_eval, a_other = _by_task(after) if after is not None else ({}, {})
    for label, b, a in (("eval", b_eval, a_eval), ("other tasks", b_other, a_other)):
        for task in sorted(set(b) | set(a)):
            x, y = (b.get(task) or {}).get("accuracy"), (a.get(task) or {}).get("accuracy")
            rows.append({"task": task, "set": label, "before": x, "after": y,
                         "change": None if x is None or y is None else y - x,
                         "n": (a.get(task) or b.get(task) or {}).get("n")})
    return rows
