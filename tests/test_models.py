import json

import pytest
import torch

from p2d.errors import UserError
from p2d.geometry import HeadGeometry
from p2d.models import cache_dir, load_model, resolve_spec


def test_tiny_llama_geometry(tiny_llama):
    g = tiny_llama.geometry
    assert (g.architecture, g.layout) == ("LlamaForCausalLM", "split")
    assert (g.n_layers, g.n_q_heads, g.n_kv_heads, g.head_dim) == (4, 4, 2, 16)
    assert [g.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    p = g.projections(tiny_llama.model, 2)
    assert p["q"] is tiny_llama.model.model.layers[2].self_attn.q_proj
    assert p["k"].weight.shape == (2 * 16, 64)
    assert HeadGeometry.from_dict(json.loads(json.dumps(g.to_dict()))) == g


def test_tiny_gpt2_geometry(tiny_gpt2):
    g = tiny_gpt2.geometry
    assert (g.layout, g.n_layers, g.n_q_heads, g.n_kv_heads, g.head_dim) == ("fused", 3, 4, 4, 16)
    assert g.projections(tiny_gpt2.model, 0)["qkv"] is tiny_gpt2.model.transformer.h[0].attn.c_attn
    assert g.kv_head(3) == 3


def test_unsupported_architecture_names_it(tokenizer, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    model = GPTNeoXForCausalLM(cfg)
    with pytest.raises(UserError, match="GPTNeoXForCausalLM"):
        HeadGeometry.from_model(model)


def test_check_head_and_kv_range(tiny_llama):
    g = tiny_llama.geometry
    with pytest.raises(UserError, match="does not exist"):
        g.check_head(4, 0)
    with pytest.raises(IndexError):
        g.kv_head(4)


def test_auto_device_and_dtype_on_cpu(tiny_llama):
    assert tiny_llama.device.type == "cpu" and tiny_llama.dtype == torch.float32
    assert not tiny_llama.model.training


def test_bad_specs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="without config.json"):
        resolve_spec(str(tmp_path))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(UserError, match="not a .gguf"):
        resolve_spec(str(tmp_path / "weights.txt"))
    with pytest.raises(UserError, match="hub"):
        load_model("no-such-org/no-such-model-p2d")  # HF_HUB_OFFLINE=1 in tests


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("P2D_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("P2D_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "p2d"


def test_embedded_default_model(embedded):
    info = embedded.info()
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["q_heads"], info["kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert 130e6 < info["params"] < 140e6
    assert embedded.tokenizer.pad_token_id == embedded.tokenizer.eos_token_id
