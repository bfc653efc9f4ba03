"""bitsandbytes loading: frozen MLPs quantised, attention projections dense, heads still trainable."""

import importlib.util

import pytest
import torch

from p2d.data.loading import load_records
from p2d.errors import UserError
from p2d.models import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes missing")


@pytest.mark.parametrize("bits, cls", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_load_keeps_attention_dense(tiny_llama_dir, bits, cls):
    lm = load_model(tiny_llama_dir, device="cpu", quantize=bits)
    layer = lm.model.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == cls
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and type(lm.model.lm_head) is torch.nn.Linear
    assert lm.info()["quantized"] is True
    assert lm.geometry.n_kv_heads == 2
    assert lm.info()["params"] == load_model(tiny_llama_dir, device="cpu").info()["params"]  # 4-bit: real shapes


def test_head_training_on_8bit_model(tiny_llama_dir, tmp_path):
    from p2d.training import TrainConfig, train_heads

    lm = load_model(tiny_llama_dir, device="cpu", quantize="8bit")
    samples = load_records([{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(8)]).samples
    res = train_heads(lm, [[2, 1], [3, 0]], samples, TrainConfig(steps=2, batch_size=4, max_length=48), tmp_path)
    assert res.steps_done == 2 and res.final_loss is not None and (tmp_path / "adapter").is_dir()
    from p2d.adapter import merge_and_save

    with pytest.raises(UserError, match="without quantisation"):
        merge_and_save(lm, tmp_path / "adapter", tmp_path / "merged")


def test_bad_quantize_values(tiny_llama_dir):
    with pytest.raises(UserError, match="8bit or 4bit"):
        load_model(tiny_llama_dir, device="cpu", quantize="3bit")


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_full_finetuning_reference_of_a_quantized_model(tiny_llama_dir, bits):
    """The AER reference trains every floating-point weight; the integer (quantised) ones stay frozen
    and are counted, and the model is left as it was."""
    from p2d.cost import full_finetune_cost

    lm = load_model(tiny_llama_dir, device="cpu", quantize=bits)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    samples = load_records([{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(12)]).samples
    ref = full_finetune_cost(lm, samples, epochs=1, batch_size=4, max_length=48, timed_steps=2)
    floats = sum(p.numel() for p in lm.model.parameters() if p.is_floating_point())
    assert ref.time_s > 0 and ref.trainable_params == floats and ref.quantized_params > 0
    assert all(torch.equal(before[n], p.detach()) for n, p in lm.model.named_parameters())
    assert flags == {n: p.requires_grad for n, p in lm.model.named_parameters()}
