"""Open a head: what one attention head looks at, and what the answers lose without it.

- `attention_pattern(lm, sample, layer, head)`: the head's attention weights on one sample (prompt and
  answer, chat template applied), token x token, with the tokens as labels. The forward runs once with
  the eager attention implementation (the only one that returns weights), switched back afterwards.
  Long samples show their last ``max_tokens`` tokens (the end holds the answer); the weights are those
  of the whole sequence, so a row need not sum to 1 over the shown columns.
- `gate_off_effect(lm, samples, heads)`: the mean answer loss on ``samples`` with the given heads'
  outputs multiplied by 0 (`p2d.gating.HeadGate`), minus the loss with every head on. One head, or
  the whole selected set. Positive = the answers need these heads.
- `inspect_head(lm, heads, layer, head, sample, probe)`: both, plus the head's score and rank under the
  map's method, as one dict (what the app's "Open a head" view and ``python -m p2d inspect-head`` show).

Cheap: one forward with weights, and two forwards over the probe rows for each gate-off figure (no
training, nothing written). Quantised models work; a model whose attention has no eager path (some
remote-code models) gives a `UserError`.
"""

from __future__ import annotations

import contextlib
import math

import torch

from .data.encoding import encode, encode_prompts
from .data.formats import Sample
from .errors import UserError
from .evaluation import mean_answer_loss
from .gating import HeadGate, heads_by_layer
from .heads import HeadScores, head_ranks

__all__ = ["check_head", "attention_pattern", "gate_off_effect", "inspect_head", "head_rank", "MAX_TOKENS"]

MAX_TOKENS = 128  # the most tokens an attention pattern shows (a readable square)


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
    """The head's score under the map's method, its rank (`p2d.heads.head_ranks`: 1 = best, None for a
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
