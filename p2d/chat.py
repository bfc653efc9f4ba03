"""Talk to a model: one prompt answered by the base model and by base + a trained adapter, streamed.

`stream_reply(lm, prompt, ...)` yields the reply so far after every new token (the model's chat
template applied, as in training; plain "User:/Assistant:" text for models without one).
`compare_replies(lm, adapter_dir, prompt, ...)` yields ``{"base": ..., "tuned": ...}``: first the base
model's reply grows, then the tuned one's (one model in memory: the adapter's hooks are attached for
the second reply and always detached afterwards, so the shared model is left as it was).

Sampling: greedy by default (``temperature`` 0, deterministic); ``temperature`` > 0 samples with
``top_p`` nucleus filtering from a generator seeded with ``seed`` (the same seed gives the same reply).
Generation stops at the tokenizer's end-of-turn/eos tokens or after ``max_new_tokens``.

Supported adapters: the head adapters this package trains (`p2d.adapter.load_adapter`: head deltas
and offsets). Not supported: PEFT/LoRA folders (load them with PEFT), batched prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .data.encoding import encode_prompts
from .data.formats import Sample
from .errors import UserError
from .evaluation import stop_token_ids

__all__ = ["stream_reply", "compare_replies", "check_sampling", "MAX_NEW_TOKENS"]

MAX_NEW_TOKENS = 512  # the most a caller may ask for


def check_sampling(prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0) -> None:
    """UserError for an empty prompt or sampling settings out of range."""
    if not 0 <= int(seed) < 2 ** 32:
        raise UserError(f"the sampling seed must be between 0 and {2 ** 32 - 1}, got {seed}")
    if not str(prompt or "").strip():
        raise UserError("type a prompt (or pick one from the eval set)")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS:
        raise UserError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if not 0.0 <= float(temperature) <= 5.0:
        raise UserError(f"temperature must be between 0 (greedy) and 5, got {temperature}")
    if not 0.0 < float(top_p) <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def _next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def _cache_argument(model) -> str:
    """The forward's name for the key/value cache (``cache`` in recent transformers, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def stream_reply(lm, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, max_length: int = 1024) -> Iterator[str]:
    """The reply of ``lm`` (as it is now: attached adapters count) to one user turn, growing a token at a time."""
    check_sampling(prompt, max_new_tokens, temperature, top_p, seed)
    tok, model = lm.tokenizer, lm.model
    sample = Sample(prompt=[{"role": "user", "content": str(prompt)}], answer="", task=None, row={}, index=0)
    ids = torch.tensor([encode_prompts([sample], tok, max_length=max_length)[0]], dtype=torch.long, device=lm.device)
    stops = set(stop_token_ids(tok))
    gen = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    was_training = model.training
    model.eval()
    out_ids: list[int] = []
    past = None
    cache_kw = _cache_argument(model)
    try:
        step_input = ids
        for _ in range(int(max_new_tokens)):
            out = model(input_ids=step_input, use_cache=True, **({cache_kw: past} if past is not None else {}))
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            nxt = _next_token(out.logits[0, -1], float(temperature), float(top_p), gen)
            if nxt in stops:
                break
            out_ids.append(nxt)
            yield tok.decode(out_ids, skip_special_tokens=True)
            step_input = torch.tensor([[nxt]], dtype=torch.long, device=lm.device)
    finally:
        model.train(was_training)
    if not out_ids:
        yield ""


def compare_replies(lm, adapter_dir: str | Path | None, prompt: str, **sampling) -> Iterator[dict]:
    """``{"base": reply, "tuned": reply}`` as both grow (base first); ``tuned`` is None without an adapter."""
    from .adapter import CONFIG_NAME, load_adapter

    check_sampling(prompt, sampling.get("max_new_tokens", 64), sampling.get("temperature", 0.0), sampling.get("top_p", 1.0))
    base = ""
    for base in stream_reply(lm, prompt, **sampling):
        yield {"base": base, "tuned": None}
    if adapter_dir is None:
        return
    if not (Path(adapter_dir) / CONFIG_NAME).is_file():
        raise UserError(f"no trained adapter in {adapter_dir}: train first, or pick a run that finished training")
    adapter = load_adapter(lm, adapter_dir)
    try:
        for tuned in stream_reply(lm, prompt, **sampling):
            yield {"base": base, "tuned": tuned}
    finally:
        adapter.detach()
