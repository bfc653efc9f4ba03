"""Encoding with the real SmolLM2 tokenizer (ChatML template, pad == eos) and batching."""

import copy

import pytest
import torch

from p2d.data import IGNORE_INDEX, Sample, collate, encode, encode_prompts, iter_batches, load_records, render
from p2d.errors import UserError


@pytest.fixture(scope="session")
def tok(request):
    """The shared `tokenizer` fixture from conftest when there is one, else load it here."""
    try:
        return request.getfixturevalue("tokenizer")
    except pytest.FixtureLookupError:
        from p2d.models import load_tokenizer

        return load_tokenizer("default")


@pytest.fixture(scope="session")
def plain_tok(tok):
    """The same tokenizer without a chat template."""
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def chat(user, answer, system=None, index=0):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return Sample(prompt=prompt, answer=answer, task=None, row={}, index=index)


def answer_part(item):
    return [i for i, lab in zip(item["input_ids"], item["labels"]) if lab != IGNORE_INDEX]


# --- render -------------------------------------------------------------------------------------


def test_render_chat_template(tok):
    p, f = render(chat("What is 2+2?", "4", system="Be brief."), tok)
    assert p.endswith("<|im_start|>assistant\n") and "Be brief." in p and "What is 2+2?" in p
    assert f.startswith(p) and f[len(p):] == "4<|im_end|>\n"


def test_render_without_template(plain_tok, tok):
    assert tok.chat_template  # the copy did not touch the shared tokenizer
    p, f = render(chat("What is 2+2?", "4", system="Be brief."), plain_tok)
    assert p == "Be brief.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n"
    assert f == p + "4" + plain_tok.eos_token


def test_render_text_sample(tok):
    s = Sample(prompt=[], answer="Plain text.", task=None, row={}, index=0, kind="text")
    assert render(s, tok) == ("", "Plain text." + tok.eos_token)


# --- encode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tok", "plain_tok"])
def test_labels_mask_exactly_the_prompt(request, which):
    t = request.getfixturevalue(which)
    samples = [chat("Translate 'cat' to French.", "chat", index=3),
               chat("Multi\nline prompt", "A longer answer, with punctuation!", system="S", index=7)]
    encoded = encode(samples, t, max_length=256)
    prompts = encode_prompts(samples, t, max_length=256)
    assert [e["index"] for e in encoded] == [3, 7] and encoded.dropped == [] and encoded.truncated == 0
    for s, e, p in zip(samples, encoded, prompts):
        n = len(p)
        assert e["input_ids"][:n] == p
        assert e["labels"][:n] == [IGNORE_INDEX] * n
        assert e["labels"][n:] == e["input_ids"][n:] and IGNORE_INDEX not in e["labels"][n:]
        prompt_text, full_text = render(s, t)
        assert t.decode(answer_part(e)) == full_text[len(prompt_text):]
        assert t.decode(answer_part(e)).startswith(s.answer)
        assert t.decode(e["input_ids"]) == full_text


def test_answer_ends_with_end_of_turn(tok):
    e = encode([chat("q", "a")], tok)[0]
    assert e["input_ids"][-2:] == tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert e["input_ids"][-2] == tok.eos_token_id


def test_text_samples_learn_everything(tok):
    data = load_records([{"text": "The quick brown fox."}])
    e = encode(data.samples, tok)[0]
    assert IGNORE_INDEX not in e["labels"] and e["labels"] == e["input_ids"]
    assert e["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(e["input_ids"]) == "The quick brown fox." + tok.eos_token


def test_truncation_keeps_prompt_start(tok):
    s = chat("Short question?", " ".join(["word"] * 300))
    n_prompt = len(encode_prompts([s], tok)[0])
    e = encode([s], tok, max_length=64)
    assert e.truncated == 1
    item = e[0]
    assert len(item["input_ids"]) == 64
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert len(answer_part(item)) == 64 - n_prompt
    assert tok.decode(answer_part(item)).startswith("word word")


@pytest.mark.parametrize("max_length", [1, 8, 40])
def test_truncation_long_prompt_keeps_answer_tokens(tok, max_length):
    s = chat("Tell me: " + " ".join(f"w{i}" for i in range(200)), "The answer is 42.")
    item = encode([s], tok, max_length=max_length)[0]
    assert len(item["input_ids"]) == max_length
    answer = answer_part(item)
    assert len(answer) >= 1
    assert item["labels"][: max_length - len(answer)] == [IGNORE_INDEX] * (max_length - len(answer))
    full = encode([s], tok, max_length=10_000)[0]
    assert answer == answer_part(full)[: len(answer)]  # the start of the answer is kept
    # the prompt was cut from the left: what remains is the end of the prompt
    kept_prompt = item["input_ids"][: max_length - len(answer)]
    full_prompt = [i for i, lab in zip(full["input_ids"], full["labels"]) if lab == IGNORE_INDEX]
    assert kept_prompt == full_prompt[len(full_prompt) - len(kept_prompt):]


def test_encode_prompts_left_truncation(tok):
    s = chat("Tell me: " + " ".join(f"w{i}" for i in range(200)), "x")
    full = encode_prompts([s], tok)[0]
    short = encode_prompts([s], tok, max_length=16)[0]
    assert short == full[-16:]
    assert tok.decode(short).endswith("<|im_start|>assistant\n")


class CharTokenizer:
    """Minimal tokenizer (one id per character) with no eos, to reach the drop path."""

    chat_template = None
    eos_token = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_samples_without_answer_tokens_are_dropped():
    samples = [chat("q", "a", index=0), Sample(prompt=[], answer="", task=None, row={}, index=5, kind="text")]
    encoded = encode(samples, CharTokenizer(), max_length=100)
    assert len(encoded) == 1 and encoded.dropped == [5]
    assert isinstance(encoded, list)


def test_bad_max_length(tok):
    with pytest.raises(UserError):
        encode([chat("q", "a")], tok, max_length=0)
    assert encode([], tok) == []


# --- collate ------------------------------------------------------------------------------------


def test_collate_pad_equals_eos(tok):
    pad = tok.pad_token_id
    assert pad == tok.eos_token_id  # the case this test is about
    short = encode([chat("q", "a")], tok)[0]
    long = encode([chat("a much longer question with many more words in it", "a longer answer")], tok)[0]
    assert pad in short["input_ids"]  # the sequence really contains eos
    batch = collate([short, long], pad_id=pad)
    n, m = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == (2, m) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (m - n)
    assert batch["attention_mask"][1].tolist() == [1] * m
    assert batch["labels"][0].tolist() == short["labels"] + [IGNORE_INDEX] * (m - n)
    assert batch["input_ids"][0, :n].tolist() == short["input_ids"]
    assert (batch["input_ids"][0, n:] == pad).all()
    # the real eos ending the answer is attended to and learned
    eos_pos = n - 2  # the answer ends with "<|im_end|>\n"
    assert short["input_ids"][eos_pos] == pad
    assert batch["attention_mask"][0, eos_pos] == 1 and batch["labels"][0, eos_pos] == pad


def test_collate_left_padding_and_plain_lists(tok):
    a, b = [5, 6, 7], [tok.eos_token_id]
    batch = collate([a, b], pad_id=tok.eos_token_id, padding_side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    items = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3], "labels": [3]}]
    batch = collate(items, pad_id=0, padding_side="left")
    assert batch["labels"].tolist() == [[-100, 2], [-100, 3]]


# --- iter_batches -------------------------------------------------------------------------------


def items(n):
    return [{"input_ids": list(range(1 + (i * 7) % 11)), "labels": [], "index": i} for i in range(n)]


def test_iter_batches_plain():
    data = items(10)
    batches = list(iter_batches(data, 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [it["index"] for b in batches for it in b] == list(range(10))


def test_iter_batches_shuffle_is_seeded():
    data = items(30)
    before = copy.deepcopy(data)
    order = lambda **kw: [it["index"] for b in iter_batches(data, 4, **kw) for it in b]  # noqa: E731
    assert order(shuffle=True, seed=1) == order(shuffle=True, seed=1)
    assert order(shuffle=True, seed=1) != order(shuffle=True, seed=2)
    assert sorted(order(shuffle=True, seed=1)) == list(range(30))
    assert data == before


def test_iter_batches_sort_by_length():
    data = items(40)

    def padding(batches):
        return sum(max(len(i["input_ids"]) for i in b) * len(b) - sum(len(i["input_ids"]) for i in b)
                   for b in batches)

    sorted_batches = list(iter_batches(data, 8, sort_by_length=True))
    assert padding(sorted_batches) < padding(list(iter_batches(data, 8)))
    shuffled = list(iter_batches(data, 8, shuffle=True, sort_by_length=True, seed=3))
    assert padding(shuffled) == padding(sorted_batches)
    assert sorted(i["index"] for b in shuffled for i in b) == list(range(40))
    with pytest.raises(UserError):
        list(iter_batches(data, 0))
