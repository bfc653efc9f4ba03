"""Turn samples into token ids with loss labels, and batch them.

Rendering: with a chat template (``tokenizer.chat_template``) the prompt is rendered with
``add_generation_prompt=True`` and the full text with the answer as a final assistant turn, so the
answer ends with the template's end-of-turn marker.  Without a template a plain
``### Instruction:`` / ``### Response:`` layout is used and ``eos_token`` is appended.  Plain-text
samples (``kind="text"``) have an empty prompt; the text plus ``eos_token`` is learned.

Labels are -100 on prompt tokens and equal to the input ids on answer tokens.  The prompt and the
answer are tokenised separately (prompt ids are then exactly what `encode_prompts` gives for
generation).  Special tokens such as BOS are added by the tokenizer only when no chat template is
used or for plain text (templates render their own).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Iterator

from p2d.data.formats import Sample
from p2d.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are built: p2d.data reads and encodes without it
    import torch

IGNORE_INDEX = -100


class Encoded(list):
    """The list returned by `encode`, plus what was lost on the way.

    dropped: ``Sample.index`` of samples that ended with no answer token (they are not in the list);
    truncated: how many kept samples were cut to ``max_length``.
    """

    def __init__(self, items=(), dropped=None, truncated: int = 0):
        super().__init__(items)
        self.dropped: list[int] = list(dropped or [])
        self.truncated = truncated


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain_prompt(turns: list[dict]) -> str:
    parts = []
    for turn in turns:
        role, content = turn["role"], turn["content"]
        if role == "system":
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"### Instruction:\n{content}\n\n")
        else:
            parts.append(f"### Response:\n{content}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def render(sample: Sample, tokenizer) -> tuple[str, str]:
    """(prompt_text, full_text) for a sample; ``full_text`` starts with ``prompt_text``."""
    eos = tokenizer.eos_token or ""
    if sample.kind == "text":
        return "", sample.answer + eos
    if _has_template(tokenizer):
        prompt_text = tokenizer.apply_chat_template(
            sample.prompt, tokenize=False, add_generation_prompt=True
        )
        full_text = tokenizer.apply_chat_template(
            sample.prompt + [{"role": "assistant", "content": sample.answer}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            # Templates that rewrite earlier turns once an answer follows: keep the prompt as the
            # model will see it at generation time and append the answer ourselves.
            full_text = prompt_text + sample.answer + eos
        return prompt_text, full_text
    prompt_text = _plain_prompt(sample.prompt)
    return prompt_text, prompt_text + sample.answer + eos


def _tokenize_parts(samples, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids and answer ids per sample, tokenised in batches."""
    templated = _has_template(tokenizer)
    prompts, answers, specials = [], [], []
    for s in samples:
        p, f = render(s, tokenizer)
        prompts.append(p)
        answers.append(f[len(p):])
        specials.append((not templated) or s.kind == "text")
    prompt_ids: list[list[int] | None] = [None] * len(samples)
    for flag in (True, False):
        idx = [i for i, sp in enumerate(specials) if sp == flag]
        if idx:
            out = tokenizer([prompts[i] for i in idx], add_special_tokens=flag)["input_ids"]
            for i, ids in zip(idx, out):
                prompt_ids[i] = list(ids)
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
    return prompt_ids, [list(a) for a in answer_ids]


def encode(samples: list[Sample], tokenizer, max_length: int = 256) -> Encoded:
    """Token ids and labels per sample: ``{"input_ids", "labels", "index"}``.

    Sequences longer than ``max_length`` keep the start of the prompt and lose the end of the
    answer.  If the prompt alone fills ``max_length``, the prompt is cut from the left so that
    ``min(len(answer), max(1, max_length // 4))`` answer tokens remain.  Samples left with no answer
    token are dropped; their indices are in the returned list's ``dropped`` attribute.
    """
    if max_length < 1:
        raise UserError(f"max length must be at least 1 token (got {max_length})")
    samples = list(samples)
    if not samples:
        return Encoded()
    prompt_ids, answer_ids = _tokenize_parts(samples, tokenizer)
    items, dropped, truncated = [], [], 0
    for s, p, a in zip(samples, prompt_ids, answer_ids):
        if not a:
            dropped.append(s.index)
            continue
        if len(p) + len(a) > max_length:
            truncated += 1
            if len(p) < max_length:
                a = a[: max_length - len(p)]
            else:
                keep = min(len(a), max(1, max_length // 4))
                a = a[:keep]
                p = p[len(p) - (max_length - keep):] if max_length > keep else []
        items.append({
            "input_ids": p + a,
            "labels": [IGNORE_INDEX] * len(p) + a,
            "index": s.index,
        })
    return Encoded(items, dropped, truncated)


def encode_prompts(samples: list[Sample], tokenizer, max_length: int = 256) -> list[list[int]]:
    """Prompt ids (with the generation prompt) per sample, for generation and evaluation.

    Prompts longer than ``max_length`` are cut from the left (the end, next to the answer, is kept).
    Plain-text samples have an empty prompt (``[]``, or ``[bos]`` for tokenizers that add one);
    callers should not generate from them.
    """
    if max_length < 1:
        raise UserError(f"max length must be at least 1 token (got {max_length})")
    samples = list(samples)
    if not samples:
        return []
    prompt_ids, _ = _tokenize_parts(samples, tokenizer)
    return [p[-max_length:] for p in prompt_ids]


def collate(batch: list, pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch into tensors ``input_ids``, ``attention_mask`` and (when items have labels)
    ``labels``.

    Items are dicts from `encode` (or dicts with only ``input_ids``, or plain id lists such as
    `encode_prompts` gives).  Padding positions have attention_mask 0 and label -100; they are
    known by position, never by comparing ids with ``pad_id`` (which may equal eos).
    """
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if not batch:
        raise ValueError("cannot collate an empty batch")
    items = [b if isinstance(b, dict) else {"input_ids": b} for b in batch]
    with_labels = all("labels" in it for it in items)
    width = max(len(it["input_ids"]) for it in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        ids = it["input_ids"]
        k = len(ids)
        sl = slice(0, k) if padding_side == "right" else slice(width - k, width)
        input_ids[row, sl] = torch.as_tensor(ids, dtype=torch.long)
        attention[row, sl] = 1
        if with_labels:
            labels[row, sl] = torch.as_tensor(it["labels"], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention}
    if with_labels:
        out["labels"] = labels
    return out


def filler_batch(pad_id: int | None) -> dict[str, torch.Tensor]:
    """A one-token batch with no answer token: what a process without rows of its own computes (and
    drops) so that the processes of a sharded (FSDP) model run the same forwards."""
    import torch

    token = pad_id if pad_id is not None else 0
    return {"input_ids": torch.tensor([[token]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
            "labels": torch.full((1, 1), IGNORE_INDEX)}


def iter_batches(encoded: list, batch_size: int, shuffle: bool = False, seed: int = 0,
                 sort_by_length: bool = False) -> Iterator[list]:
    """Yield lists of items, each at most ``batch_size`` long; every item exactly once.

    shuffle: random order from ``seed`` (reproducible).  sort_by_length: group items of similar
    length to cut padding (with shuffle, the order of the batches is shuffled instead).
    The input is not modified.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    rng = random.Random(seed)
    order = list(range(len(encoded)))
    if shuffle:
        rng.shuffle(order)

    def length(i):
        item = encoded[i]
        return len(item["input_ids"] if isinstance(item, dict) else item)

    if sort_by_length:
        order.sort(key=length)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and sort_by_length:
        rng.shuffle(batches)
    for b in batches:
        yield [encoded[i] for i in b]
