"""HeadAdapter: GQA slice mapping, hooks, save/load, merge, merged export."""

import json

import pytest
import torch

from p2d.adapter import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    HeadAdapter,
    load_adapter,
    merge_and_save,
    normalize_heads,
)
from p2d.errors import UserError
from p2d.models import load_model

HEADS = {"tiny_llama": [[1, 0], [1, 2], [3, 3]], "tiny_gpt2": [[0, 1], [2, 0], [2, 3]]}


def _ids(n=2, length=12, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n, length), generator=g)


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


def _randomize(adapter, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_round_trip_attach_save_load_detach_merge(name, request, tmp_path):
    lm = request.getfixturevalue(name)
    model_dir = request.getfixturevalue(f"{name}_dir")
    ids = _ids()
    base = _logits(lm.model, ids)
    keys_before = set(lm.model.state_dict())

    adapter = HeadAdapter(lm.geometry, HEADS[name])
    adapter.attach(lm.model)
    assert torch.equal(_logits(lm.model, ids), base)  # zero deltas: no change
    _randomize(adapter)
    with_adapter = _logits(lm.model, ids)
    assert not torch.allclose(with_adapter, base, atol=1e-4)
    assert set(lm.model.state_dict()) == keys_before  # adapter is not registered inside the model

    adapter_dir = adapter.save(tmp_path / "adapter", base_model=model_dir, training={"lr": 0.1})
    cfg = json.loads((adapter_dir / CONFIG_NAME).read_text())
    assert cfg["heads"] == sorted(HEADS[name]) and cfg["base_model"] == model_dir
    assert cfg["projections"] == ["q", "k", "v", "o"] and cfg["training"] == {"lr": 0.1}
    assert cfg["geometry"] == lm.geometry.to_dict() and cfg["p2d_version"] and cfg["format_version"] == 1

    fresh = load_model(model_dir, device="cpu")
    loaded = load_adapter(fresh, adapter_dir)
    assert torch.equal(_logits(fresh.model, ids), with_adapter)
    loaded.detach()
    assert torch.equal(_logits(fresh.model, ids), base)

    adapter.detach()
    assert torch.equal(_logits(lm.model, ids), base)

    merged = load_model(model_dir, device="cpu")
    HeadAdapter.load(adapter_dir).merge_into(merged.model)
    merged_logits = _logits(merged.model, ids)
    assert torch.allclose(merged_logits, with_adapter, atol=1e-5)

    merged.model.save_pretrained(tmp_path / "merged-manual")
    merged.tokenizer.save_pretrained(tmp_path / "merged-manual")
    reloaded = load_model(str(tmp_path / "merged-manual"), device="cpu")
    assert torch.equal(_logits(reloaded.model, ids), merged_logits)

    # merge_and_save: full model + tokenizer, lm.model left exactly as it was
    out = merge_and_save(lm, adapter_dir, tmp_path / "export")
    assert torch.equal(_logits(lm.model, ids), base)
    assert (out / "config.json").is_file() and (out / "p2d_adapter_config.json").is_file()
    exported = load_model(str(out), device="cpu")
    assert torch.allclose(_logits(exported.model, ids), with_adapter, atol=1e-5)
    assert exported.tokenizer("hello")["input_ids"] == lm.tokenizer("hello")["input_ids"]
    with pytest.raises(UserError, match="not empty"):
        merge_and_save(lm, adapter_dir, out)


def test_gqa_kv_rows_cover_the_kv_heads_of_selected_q_heads(tiny_llama):
    g = tiny_llama.geometry
    assert [g.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    a = HeadAdapter(g, [[1, 0], [1, 2]])
    assert a.kv_heads(1) == [0, 1]
    assert a.target_indices(1, "k") == list(range(32)) == a.target_indices(1, "v")
    assert a.target_indices(1, "q") == list(range(0, 16)) + list(range(32, 48))
    assert a.target_indices(1, "o") == a.target_indices(1, "q")
    assert a.delta(1, "k").shape == (32, 64) and a.delta(1, "q").shape == (32, 64)
    assert a.delta(1, "o").shape == (64, 32)

    b = HeadAdapter(g, [[1, 0], [1, 1]])  # both read kv head 0: trained once
    assert b.kv_heads(1) == [0]
    assert b.target_indices(1, "k") == list(range(16))
    assert b.delta(1, "v").shape == (16, 64)
    assert b.num_params() == 32 * 64 + 16 * 64 * 2 + 64 * 32


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_merge_touches_exactly_the_slices(name, request):
    lm = request.getfixturevalue(name)
    g = lm.geometry
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    heads = [[1, 0], [1, 1]] if name == "tiny_llama" else [[1, 0], [1, 3]]
    a = HeadAdapter(g, heads)
    _randomize(a)
    a.merge_into(lm.model)
    d = g.head_dim
    mods = g.projections(lm.model, 1)
    changed_names = set()
    for proj in ("q", "k", "v", "o"):
        idx = set(a.target_indices(1, proj))
        if g.layout == "split":
            w, w0 = mods[proj].weight, None
            wname = [n for n, p in lm.model.named_parameters() if p is w][0]
            w0 = before[wname]
            dim = 1 if proj == "o" else 0
            n = w.shape[dim]
            offset = 0
        else:
            key = "o" if proj == "o" else "qkv"
            w = mods[key].weight
            wname = [n for n, p in lm.model.named_parameters() if p is w][0]
            w0 = before[wname]
            dim = 0 if proj == "o" else 1
            offset = {"q": 0, "k": 1, "v": 2, "o": 0}[proj] * g.n_q_heads * d
            n = g.n_q_heads * d
        changed_names.add(wname)
        for i in range(n):
            row = w.select(dim, offset + i)
            row0 = w0.select(dim, offset + i)
            if i in idx:
                assert (row != row0).all(), (proj, i)
            else:
                assert torch.equal(row, row0), (proj, i)
    for k, v in lm.model.state_dict().items():
        if k not in changed_names:
            assert torch.equal(v, before[k]), k


def test_projection_subset_and_hook_bookkeeping(tiny_llama, tiny_gpt2):
    a = HeadAdapter(tiny_llama.geometry, [[2, 1]], projections=("q", "o"))
    assert sorted(dict(a.named_parameters())) == ["deltas.2_o", "deltas.2_q"]
    a.attach(tiny_llama.model)
    a.attach(tiny_llama.model)  # same model: no-op
    assert len(a._handles) == 2
    other = HeadAdapter(tiny_llama.geometry, [[0, 0]])
    with pytest.raises(RuntimeError, match="another HeadAdapter"):
        other.attach(tiny_llama.model)
    with pytest.raises(RuntimeError, match="already attached"):
        a.attach(tiny_gpt2.model)
    a.detach()
    assert all(not m._forward_hooks for m in tiny_llama.model.modules())
    other.attach(tiny_llama.model)  # fine once the first one is gone
    other.detach()
    with pytest.raises(UserError, match="projection"):
        HeadAdapter(tiny_llama.geometry, [[2, 1]], projections=("q", "x"))
    with pytest.raises(UserError, match="does not exist"):
        HeadAdapter(tiny_llama.geometry, [[4, 0]])
    with pytest.raises(UserError, match="no heads"):
        HeadAdapter(tiny_llama.geometry, [])


def test_normalize_heads_accepts_headscores_like():
    class Scores:
        selected = [(2, 1), [0, 3], [2, 1]]

    assert normalize_heads(Scores()) == [[0, 3], [2, 1]]


def test_geometry_mismatch_and_corrupt_files_are_user_errors(tiny_llama, tiny_gpt2, tmp_path):
    a = HeadAdapter(tiny_llama.geometry, [[1, 0]])
    d = a.save(tmp_path / "a", base_model="tiny-llama")
    with pytest.raises(UserError, match="trained on 'tiny-llama'"):
        load_adapter(tiny_gpt2, d)
    with pytest.raises(UserError, match="not found"):
        HeadAdapter.load(tmp_path / "missing")
    with pytest.raises(UserError, match=CONFIG_NAME):
        HeadAdapter.load(tmp_path)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / CONFIG_NAME).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        HeadAdapter.load(bad)

    trunc = tmp_path / "trunc"
    a.save(trunc, base_model="tiny-llama")
    data = (trunc / WEIGHTS_NAME).read_bytes()
    (trunc / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        HeadAdapter.load(trunc)
    (trunc / WEIGHTS_NAME).unlink()
    with pytest.raises(UserError, match=WEIGHTS_NAME):
        HeadAdapter.load(trunc)


def test_folders_written_before_the_typed_config_still_load(tiny_llama, tmp_path):
    """An adapter_config.json as P2D wrote it before kinds existed (no ``kind``) and an offset folder as the
    offset adapter's own writer made it both load, and saving again writes the same keys."""
    from safetensors.torch import save_file

    from p2d import __version__
    from p2d.adapter import AdapterConfig, OffsetAdapter

    g = tiny_llama.geometry
    old = tmp_path / "old"
    old.mkdir()
    d = g.head_dim
    save_file({f"layers.1.{p}": torch.full((d, g.hidden_size) if p != "o" else (g.hidden_size, d), 0.5)
               for p in ("q", "k", "v", "o")}, str(old / WEIGHTS_NAME))
    legacy = {"format": "p2d-head-adapter", "format_version": 1, "p2d_version": "0.1.0", "base_model": "tiny",
              "geometry": g.to_dict(), "heads": [[1, 0]], "projections": ["q", "k", "v", "o"], "dtype": "float32",
              "num_params": 4 * d * g.hidden_size, "layers": {"1": {"q_heads": [0], "kv_heads": [0]}},
              "training": {"lr": 0.1}}
    (old / CONFIG_NAME).write_text(json.dumps(legacy))
    a = HeadAdapter.load(old)
    assert type(a) is HeadAdapter and a.config.kind == "heads" and a.config.training == {"lr": 0.1}
    assert torch.equal(a.delta(1, "o"), torch.full((g.hidden_size, d), 0.5))
    again = a.save(tmp_path / "again", base_model="tiny", training={"lr": 0.1})
    assert json.loads((again / CONFIG_NAME).read_text()) == {**legacy, "kind": "heads", "p2d_version": __version__}

    off = tmp_path / "off"
    off.mkdir()
    save_file({"layers.2.offset": torch.ones(2, d)}, str(off / WEIGHTS_NAME))
    (off / CONFIG_NAME).write_text(json.dumps({**legacy, "kind": "offset", "heads": [[2, 1], [2, 3]], "projections": [],
                                               "num_params": 2 * d, "layers": {"2": {"q_heads": [1, 3]}}}))
    o = HeadAdapter.load(off)
    assert isinstance(o, OffsetAdapter) and isinstance(o.config, AdapterConfig) and o.config.projections == []
    assert torch.equal(o.offset(2), torch.ones(2, d)) and o.heads == [[2, 1], [2, 3]]
