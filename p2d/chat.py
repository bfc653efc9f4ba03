"""Talk to a model: a conversation answered by the base model and by base + a trained adapter, streamed.

`stream_reply(lm, conversation, ...)` yields the reply so far as it grows: transformers' own
``model.generate`` runs in a thread and hands the text over through a ``TextIteratorStreamer`` (words
arrive as they are decoded). ``conversation`` is one user turn (a string) or the whole conversation so
far as chat messages ending with a user turn; the model's chat template is applied to all of it, as in
training (plain "### Instruction:/### Response:" text for models without one). When the conversation is
longer than ``max_length`` tokens the oldest turns are left out (the system message and the last user
turn are kept), then the start is cut.

`compare_replies(lm, adapter_dir, prompt, history, ...)` yields ``{"base": ..., "tuned": ...}``: first
the base model's reply grows, then the tuned one's. Each has its own side of the conversation
(``history``: earlier turns ``{"user", "base", "tuned"}``; the base model sees its own earlier answers,
the tuned model its own). One model is in memory: the adapter's hooks are attached for the second reply
and always detached afterwards, also when the caller stops reading early or generation fails.

Sampling: greedy by default (``temperature`` 0, deterministic); ``temperature`` > 0 samples with
``top_p`` nucleus filtering (no top-k), seeded with ``seed``: the same seed gives the same reply when
nothing else draws random numbers at the same time (the app runs one job at a time). Generation stops at
the tokenizer's end-of-turn/eos tokens or after ``max_new_tokens`` (at most `MAX_NEW_TOKENS`).

Supported adapters: the head adapters this package trains (`p2d.adapter.load_adapter`: head deltas
and offsets). Not supported: PEFT/LoRA folders (load them with PEFT), batched prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .data.encoding import encode_prompts
from .data.formats import Sample
from .errors import UserError
from .evaluation import stop_token_ids

__all__ = ["stream_reply", "compare_replies", "check_sampling", "conversation", "MAX_NEW_TOKENS", "MAX_TURNS"]

MAX_NEW_TOKENS = 512  # the most a caller may ask for
MAX_TURNS = 50  # earlier turns a conversation may carry (older ones are dropped by callers that keep history)


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


def conversation(prompt: str, history: Sequence[dict] = (), side: str = "base") -> list[dict]:
    """Chat messages: the earlier turns of ``history`` as ``side`` ("base" or "tuned") answered them, then
    ``prompt`` as the new user turn. A turn without an answer on that side is left out."""
    messages: list[dict] = []
    for turn in history:
        answer = turn.get(side)
        if turn.get("user") and answer is not None:
            messages += [{"role": "user", "content": str(turn["user"])}, {"role": "assistant", "content": str(answer)}]
    return messages + [{"role": "user", "content": str(prompt)}]


def _messages(conv: str | Sequence[dict]) -> list[dict]:
    if isinstance(conv, str):
        return [{"role": "user", "content": conv}]
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in conv]
    if not messages or messages[-1]["role"] != "user":
        raise UserError("a conversation to answer ends with a user turn")
    return messages


def _prompt_ids(tok, messages: list[dict], max_length: int) -> list[int]:
    """The templated conversation's ids; the oldest turns are dropped while it is over ``max_length``."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]

    def ids(msgs):
        return encode_prompts([Sample(prompt=msgs, answer="", task=None, row={}, index=0)], tok,
                              max_length=10 ** 9)[0]

    out = ids(system + turns)
    while len(out) > max_length and len(turns) > 1:
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
        out = ids(system + turns)
    return out[-max_length:]


class _Stop:
    """A stopping criterion that ends generation when the reader has gone away."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_reply(lm, conv: str | Sequence[dict], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, max_length: int = 1024) -> Iterator[str]:
    """The reply of ``lm`` (as it is now: attached adapters count) to ``conv``, growing as it is generated."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    messages = _messages(conv)
    check_sampling(messages[-1]["content"], max_new_tokens, temperature, top_p, seed)
    tok, model = lm.tokenizer, lm.model
    ids = torch.tensor([_prompt_ids(tok, messages, max_length)], dtype=torch.long, device=lm.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    stop = _Stop()
    sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0} \
        if temperature > 0 else {"do_sample": False}
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            devices = [lm.device.index or 0] if lm.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(seed))
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                               max_new_tokens=int(max_new_tokens), num_beams=1, eos_token_id=stop_token_ids(tok),
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                               stopping_criteria=StoppingCriteriaList([stop]), **sampling)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader below
            failure.append(exc)
        finally:
            streamer.end()  # the reader stops waiting, whatever happened

    was_training = model.training
    model.eval()
    thread = threading.Thread(target=generate, name="p2d-chat-generate")
    thread.start()
    text = ""
    try:
        for piece in streamer:
            if piece:
                text += piece
                yield text
    finally:
        stop.event.set()  # a reader that stopped early ends generation at the next token
        thread.join()
        model.train(was_training)
    if failure:
        raise failure[0]
    if not text:
        yield ""


def compare_replies(lm, adapter_dir: str | Path | None, prompt: str, history: Sequence[dict] = (),
                    **sampling) -> Iterator[dict]:
    """``{"base": reply, "tuned": reply}`` as both grow (base first); ``tuned`` is None without an adapter.
    ``history``: the earlier turns of this conversation (see the module docstring)."""
    from .adapter import CONFIG_NAME, load_adapter

    check_sampling(prompt, sampling.get("max_new_tokens", 64), sampling.get("temperature", 0.0),
                   sampling.get("top_p", 1.0), sampling.get("seed", 0))
    history = list(history)[-MAX_TURNS:]
    base = ""
    for base in stream_reply(lm, conversation(prompt, history, "base"), **sampling):
        yield {"base": base, "tuned": None}
    if adapter_dir is None:
        return
    if not (Path(adapter_dir) / CONFIG_NAME).is_file():
        raise UserError(f"no trained adapter in {adapter_dir}: train first, or pick a run that finished training")
    adapter = load_adapter(lm, adapter_dir)
    try:
        for tuned in stream_reply(lm, conversation(prompt, history, "tuned"), **sampling):
            yield {"base": base, "tuned": tuned}
    finally:
        adapter.detach()
