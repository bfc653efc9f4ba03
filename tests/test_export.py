"""PEFT-format export: PeftModel loads it and computes what base + the P2D adapter computes."""

import json

import pytest
import torch

from p2d.adapter import HeadAdapter, load_adapter, merge_and_save
from p2d.errors import UserError
from p2d.export import export_peft
from p2d.models import load_model

peft = pytest.importorskip("peft")


def _random_adapter(lm, heads, folder, projections=("q", "k", "v", "o")):
    ad = HeadAdapter(lm.geometry, heads, projections)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ad.save(folder, base_model=lm.spec)


@pytest.mark.parametrize("model_fixture, heads, projections", [
    ("tiny_llama_dir", [[1, 0], [1, 3], [3, 2]], ("q", "k", "v", "o")),  # GQA: heads 0 and 3 read kv heads 0 and 1
    ("tiny_llama_dir", [[0, 1], [2, 1]], ("q", "o")),
    ("tiny_gpt2_dir", [[0, 1], [2, 3]], ("q", "k", "v", "o")),  # fused c_attn (Conv1D)
])
def test_peft_model_equals_base_plus_adapter(request, tmp_path, model_fixture, heads, projections):
    model_dir = request.getfixturevalue(model_fixture)
    lm = load_model(model_dir, device="cpu")
    adapter_dir = _random_adapter(lm, heads, tmp_path / "adapter", projections)
    out = export_peft(lm, adapter_dir, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"]
    x = torch.randint(0, 2000, (2, 11))
    attached = load_adapter(lm, adapter_dir)
    with torch.no_grad():
        expected = lm.model(x).logits
    attached.detach()
    base = load_model(model_dir, device="cpu").model
    pm = peft.PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        got = pm(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # merge_and_unload equals P2D's own merge
    merged = pm.merge_and_unload()
    own = load_model(str(merge_and_save(lm, adapter_dir, tmp_path / "merged")), device="cpu").model
    for (n1, a), (n2, b) in zip(sorted(merged.state_dict().items()), sorted(own.state_dict().items())):
        assert n1 == n2
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_export_refuses_wrong_model_and_non_empty_folder(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    lm = load_model(tiny_llama_dir, device="cpu")
    adapter_dir = _random_adapter(lm, [[1, 0]], tmp_path / "adapter")
    with pytest.raises(UserError, match="does not fit"):
        export_peft(load_model(tiny_gpt2_dir, device="cpu"), adapter_dir, tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_peft(lm, adapter_dir, tmp_path / "full")


@pytest.mark.slow
def test_export_on_the_embedded_model(embedded, tmp_path):
    adapter_dir = _random_adapter(embedded, [[3, 1], [17, 4], [17, 5]], tmp_path / "adapter")
    out = export_peft(embedded, adapter_dir, tmp_path / "peft")
    x = torch.randint(0, 2000, (1, 9))
    attached = load_adapter(embedded, adapter_dir)
    try:
        with torch.no_grad():
            expected = embedded.model(x).logits
    finally:
        attached.detach()
    base = load_model("default", device="cpu").model
    pm = peft.PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        got = pm(x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    info = json.loads((out / "p2d_export.json").read_text())
    assert info["max_rank"] == 2 * 64  # two heads of layer 17 (q/o), head_dim 64


def test_export_command(tiny_llama_dir, tmp_path, capsys):
    from p2d.cli import main

    lm = load_model(tiny_llama_dir, device="cpu")
    adapter_dir = _random_adapter(lm, [[2, 1]], tmp_path / "adapter")
    code = main(["export", "--adapter", str(adapter_dir), "--out", str(tmp_path / "peft"), "--base-model-name",
                 "org/tiny"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["files"] == ["adapter_config.json", "adapter_model.safetensors", "p2d_export.json"]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    assert main(["export", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
