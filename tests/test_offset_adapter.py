"""OffsetAdapter (LoFiT's learned head-output offsets): hooks, save/load by kind, training through
TrainConfig(adapter="offset"), and what it refuses (merging)."""

import json

import pytest
import torch

from p2d.adapter import CONFIG_NAME, HeadAdapter, OffsetAdapter, load_adapter, make_adapter, merge_and_save
from p2d.data.formats import Sample
from p2d.errors import UserError
from p2d.training import TrainConfig, train_heads

HEADS = {"tiny_llama": [[1, 0], [1, 2], [3, 3]], "tiny_gpt2": [[0, 1], [2, 0], [2, 3]]}


def _ids(n=2, length=12, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, length), generator=g)


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_offset_adds_a_bias_after_o_proj(name, request):
    """Zero offsets change nothing; an offset b on head h equals adding W_o[:, h-slice] @ b to the
    output projection's result, and only there."""
    lm = request.getfixturevalue(name)
    g, d = lm.geometry, lm.geometry.head_dim
    ids = _ids()
    base = _logits(lm.model, ids)
    adapter = OffsetAdapter(g, HEADS[name])
    assert adapter.num_params() == 2 * len(HEADS[name]) * d and adapter.kind == "offset"
    adapter.attach(lm.model)
    assert torch.allclose(_logits(lm.model, ids), base, atol=1e-6)
    layer, head = HEADS[name][1]
    b = torch.randn(d, generator=torch.Generator().manual_seed(1)) * 0.5
    with torch.no_grad():
        adapter.offset(layer)[adapter._layers[layer].index(head)] = b
    with_offset = _logits(lm.model, ids)
    adapter.detach()
    assert torch.allclose(_logits(lm.model, ids), base, atol=1e-6)  # detached: back to the base model
    o = g.output_projection(lm.model, layer)
    w = o.weight[:, head * d:(head + 1) * d] if g.layout == "split" else o.weight[head * d:(head + 1) * d].T
    bias = (w @ b).detach()
    h = o.register_forward_hook(lambda m, a, out: out + bias)
    try:
        manual = _logits(lm.model, ids)
    finally:
        h.remove()
    assert torch.allclose(with_offset, manual, atol=1e-5)
    assert not torch.allclose(with_offset, base, atol=1e-4)
    # a scale a on the same head: (1 + a) * h, which the hook shows as a scaled slice of o_proj's input
    adapter.attach(lm.model)
    a = torch.full((d,), -1.0)  # scale 0: the head is switched off, and its offset alone remains
    with torch.no_grad():
        adapter.scale(layer)[adapter._layers[layer].index(head)] = a
    seen = {}
    h = o.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        _logits(lm.model, ids)
    finally:
        h.remove()
        adapter.detach()
    assert torch.allclose(seen["x"][..., head * d:(head + 1) * d], b.expand_as(seen["x"][..., :d]), atol=1e-6)


def test_save_load_by_kind_and_refuse_merge(tiny_llama, tiny_llama_dir, tmp_path):
    lm = tiny_llama
    adapter = make_adapter("offset", lm.geometry, HEADS["tiny_llama"])
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    adapter.save(tmp_path / "ad", base_model=tiny_llama_dir)
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["kind"] == "offset" and cfg["heads"] == HEADS["tiny_llama"] and cfg["num_params"] == 96
    back = HeadAdapter.load(tmp_path / "ad")  # dispatches on kind
    assert isinstance(back, OffsetAdapter)
    for l in adapter.layers:
        assert torch.equal(back.offset(l), adapter.offset(l)) and torch.equal(back.scale(l), adapter.scale(l))
    # an adapter saved before the scale existed (offsets only) loads with a zero scale
    from safetensors.torch import load_file, save_file

    old = {k: v for k, v in load_file(str(tmp_path / "ad" / "adapter_model.safetensors")).items() if "scale" not in k}
    save_file(old, str(tmp_path / "ad" / "adapter_model.safetensors"))
    back = HeadAdapter.load(tmp_path / "ad")
    assert all(torch.equal(back.scale(l), torch.zeros_like(back.scale(l))) for l in back.layers)
    adapter.save(tmp_path / "ad", base_model=tiny_llama_dir)
    ids = _ids()
    adapter.attach(lm.model)
    ref = _logits(lm.model, ids)
    adapter.detach()
    attached = load_adapter(lm, tmp_path / "ad")
    assert isinstance(attached, OffsetAdapter) and torch.allclose(_logits(lm.model, ids), ref, atol=1e-6)
    attached.detach()
    with pytest.raises(UserError, match="merged"):
        merge_and_save(lm, tmp_path / "ad", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    heads_cfg = HeadAdapter(lm.geometry, [[0, 0]])
    heads_cfg.save(tmp_path / "h", base_model="x")
    assert json.loads((tmp_path / "h" / CONFIG_NAME).read_text())["kind"] == "heads"
    with pytest.raises(UserError, match="offset"):
        OffsetAdapter.load(tmp_path / "h")
    with pytest.raises(UserError, match="adapter kind"):
        make_adapter("lora", lm.geometry, [[0, 0]])


def test_train_offsets(tiny_llama, tmp_path):
    lm = tiny_llama
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    samples = [Sample(prompt=[{"role": "user", "content": f"Say {w}."}], answer=w, task="say", row={}, index=i)
               for i, w in enumerate(["yes", "no", "yes", "no", "yes", "no", "yes", "no"])]
    res = train_heads(lm, [[3, 0], [3, 1]], samples, TrainConfig(steps=15, lr=5e-2, batch_size=4, adapter="offset"),
                      tmp_path)
    losses = [json.loads(x)["loss"] for x in open(res.log_path)]
    assert losses[-1] < losses[0]
    assert res.trainable_params == 2 * 2 * lm.geometry.head_dim  # scale and offset of two heads
    cfg = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert cfg["kind"] == "offset" and cfg["training"]["config"]["adapter"] == "offset"
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in lm.model.modules())
    with pytest.raises(UserError, match="adapter kind"):
        TrainConfig(adapter="lora").check()
