"""Per-head gates and capture hooks on tiny Llama (GQA, split projections) and GPT-2 (fused)."""

import pytest
import torch

from p2d.method.gating import HeadGate, StopForward, answer_losses, answer_positions, heads_by_layer


def _batch(vocab: int, seed: int = 0, n: int = 3, t: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, t - 3:] = 0  # one right-padded row
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(lm, batch):
    with torch.no_grad():
        return lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def test_unit_gates_leave_logits_unchanged(lm):
    batch = _batch(lm.model.config.vocab_size)
    ref = _logits(lm, batch)
    g = lm.geometry
    with HeadGate(lm.model, g) as gate:
        for layer in range(g.n_layers):
            gate.set_gate(layer, torch.ones(g.n_q_heads))
        same = _logits(lm, batch)
        for layer in range(g.n_layers):  # per-sample shape too
            gate.set_gate(layer, torch.ones(3, g.n_q_heads))
        same2 = _logits(lm, batch)
    assert torch.allclose(ref, same, atol=1e-6) and torch.allclose(ref, same2, atol=1e-6)


def test_zero_gate_changes_logits_and_only_its_sample(lm):
    batch = _batch(lm.model.config.vocab_size)
    ref = _logits(lm, batch)
    g = lm.geometry
    with HeadGate(lm.model, g, layers=[1]) as gate:
        gate.set_gate(1, torch.tensor([1.0, 0.0, 1.0, 1.0]))
        off = _logits(lm, batch)
        per = torch.ones(3, g.n_q_heads)
        per[2, 1] = 0.0  # only sample 2 loses head 1
        gate.set_gate(1, per)
        off2 = _logits(lm, batch)
    assert not torch.allclose(ref, off, atol=1e-4)
    assert torch.allclose(ref[:2], off2[:2], atol=1e-6)
    assert not torch.allclose(ref[2], off2[2], atol=1e-4)
    assert torch.allclose(off[2], off2[2], atol=1e-5)
    after = _logits(lm, batch)  # hooks gone
    assert torch.allclose(ref, after, atol=1e-6)


def test_per_sample_gate_gradients_match_separate_backward(tiny_llama):
    lm = tiny_llama
    g = lm.geometry
    for p in lm.model.parameters():
        p.requires_grad_(False)
    batch = _batch(lm.model.config.vocab_size, seed=1)
    layers = [1, 3]
    with HeadGate(lm.model, g, layers=layers) as gate:
        gates = {layer: torch.ones(3, g.n_q_heads, requires_grad=True) for layer in layers}
        for layer in layers:
            gate.set_gate(layer, gates[layer])
        answer_losses(lm.model, batch).sum().backward()
        joint = {layer: gates[layer].grad.clone() for layer in layers}
        for i in range(3):
            length = int(batch["attention_mask"][i].sum())
            one = {k: v[i:i + 1, :length] for k, v in batch.items()}
            single = {layer: torch.ones(g.n_q_heads, requires_grad=True) for layer in layers}
            for layer in layers:
                gate.set_gate(layer, single[layer])
            answer_losses(lm.model, one).sum().backward()
            for layer in layers:
                assert torch.allclose(joint[layer][i], single[layer].grad, atol=1e-5, rtol=1e-4)
    assert any(joint[layer].abs().sum() > 0 for layer in layers)


def test_hooks_removed_after_exception(tiny_llama):
    lm = tiny_llama
    batch = _batch(lm.model.config.vocab_size)
    ref = _logits(lm, batch)
    o = lm.geometry.output_projection(lm.model, 0)
    with pytest.raises(RuntimeError):
        with HeadGate(lm.model, lm.geometry) as gate:
            gate.set_gate(0, torch.zeros(lm.geometry.n_q_heads))
            assert len(o._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert not gate.active
    assert len(o._forward_pre_hooks) == 0
    assert torch.allclose(ref, _logits(lm, batch), atol=1e-6)


def test_capture_norms_and_stop_after(lm):
    g = lm.geometry
    batch = _batch(lm.model.config.vocab_size)
    body = lm.model.base_model
    mask = answer_positions(batch["labels"])
    with torch.no_grad(), HeadGate(lm.model, g, layers=[0, 1], stop_after=1) as gate:
        gate.capture(mask)
        out = gate.run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert out is None  # stopped after layer 1
        assert set(gate.norms) == {0, 1}
        assert gate.norms[1].shape == (3, g.n_q_heads)
        assert torch.all(gate.norms[1] > 0)
        # direct check of layer 0: mean L2 norm per head over masked positions
        seen = {}
        h = g.output_projection(lm.model, 0).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        try:
            gate.run(body, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            h.remove()
    x = seen["x"].reshape(3, -1, g.n_q_heads, g.head_dim).norm(dim=-1)
    m = mask.float().unsqueeze(-1)
    expect = (x * m).sum(1) / m.sum(1)
    assert torch.allclose(gate.norms[0], expect, atol=1e-5)


def test_answer_losses_match_model_loss(lm):
    batch = _batch(lm.model.config.vocab_size)
    with torch.no_grad():
        per = answer_losses(lm.model, batch)
        for i in range(3):
            length = int(batch["attention_mask"][i].sum())
            ref = lm.model(input_ids=batch["input_ids"][i:i + 1, :length],
                           labels=batch["labels"][i:i + 1, :length]).loss
            assert torch.allclose(per[i], ref, atol=1e-5)


def test_bad_gate_shape_and_helpers(tiny_llama):
    with HeadGate(tiny_llama.model, tiny_llama.geometry, layers=[0]) as gate:
        with pytest.raises(ValueError):
            gate.set_gate(0, torch.ones(3))
        with pytest.raises(ValueError):
            gate.set_gate(2, torch.ones(4))  # not hooked
    assert heads_by_layer([[2, 1], [0, 3], [2, 0]]) == {0: [3], 2: [0, 1]}
    assert issubclass(StopForward, Exception)


# ------------------------------------------------------------------------- content positions


def _encoded_batch(tokenizer, rows, max_length=256):
    from p2d.data.encoding import collate, encode
    from p2d.data.loading import load_records

    samples = load_records(rows).samples
    return samples, collate(encode(samples, tokenizer, max_length), tokenizer.pad_token_id)


def test_content_positions_drop_exactly_the_chatml_tail(tokenizer):
    """ChatML renders an answer as ``answer<|im_end|>\\n``: "all" counts the positions predicting
    <|im_end|> and the newline, "content" keeps exactly the positions predicting the answer text
    (including newlines *inside* it)."""
    from p2d.method.gating import content_positions, special_token_ids

    answers = ["5", "Paris", "def f(x):\n    return x + 1\n\nprint(f(2))", "I am fine, thank you."]
    rows = [{"instruction": f"Question {i}?", "output": a} for i, a in enumerate(answers)]
    _, batch = _encoded_batch(tokenizer, rows)
    labels, ids = batch["labels"], batch["input_ids"]
    special = special_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in special and tokenizer.eos_token_id in special
    allpos = answer_positions(labels)
    content = content_positions(labels, special)
    assert not (content & ~allpos).any()  # a subset of the answer positions
    for row, answer in enumerate(answers):
        kept = content[row].nonzero().flatten()
        targets = ids[row, kept + 1].tolist()
        assert tokenizer.decode(targets) == answer  # exactly the answer text
        dropped = (allpos[row] & ~content[row]).nonzero().flatten()
        assert tokenizer.convert_ids_to_tokens(ids[row, dropped + 1].tolist()) == ["<|im_end|>", "Ċ"]
        assert kept.max() < dropped.min()  # the dropped ones are the tail


def test_content_positions_plain_layout_and_fallback(tokenizer):
    """Without a chat template the answer ends with eos, which is dropped; an answer with no content
    token keeps all its positions (fallback) unless fallback=False."""
    import copy

    from p2d.method.gating import content_positions, position_mask, special_token_ids

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    _, batch = _encoded_batch(plain, [{"instruction": "Say hi.", "output": "hi there"}])
    content = content_positions(batch["labels"], special_token_ids(plain))
    kept = content[0].nonzero().flatten()
    assert plain.decode(batch["input_ids"][0, kept + 1].tolist()) == "hi there"
    assert int(answer_positions(batch["labels"]).sum()) == len(kept) + 1  # + eos
    labels = torch.tensor([[-100, -100, 2, 198], [-100, 700, 800, 2]])  # row 0: only <|im_end|> + "\n"
    special = special_token_ids(tokenizer)
    m = content_positions(labels, special)
    assert m[0].tolist() == answer_positions(labels)[0].tolist()  # fallback: all answer positions
    assert m[1].tolist() == [True, True, False, False]
    assert content_positions(labels, special, fallback=False)[0].sum() == 0
    assert torch.equal(position_mask(labels, "all"), answer_positions(labels))
    with pytest.raises(ValueError):
        position_mask(labels, "content")
    with pytest.raises(ValueError):
        position_mask(labels, "nope")


def test_answer_losses_at_given_positions(tiny_llama, tokenizer):
    from p2d.method.gating import content_positions, special_token_ids

    lm = tiny_llama
    rows = [{"instruction": "Name a city.", "output": "Paris"}, {"instruction": "Count.", "output": "one two three"}]
    _, batch = _encoded_batch(tokenizer, rows)
    mask = content_positions(batch["labels"], special_token_ids(tokenizer))
    with torch.no_grad():
        got = answer_losses(lm.model, batch, positions=mask)
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i in range(2):
        pos = mask[i].nonzero().flatten()
        ref = torch.nn.functional.cross_entropy(logits[i, pos], batch["input_ids"][i, pos + 1])
        assert torch.allclose(got[i], ref, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(answer_losses(lm.model, batch), got)
