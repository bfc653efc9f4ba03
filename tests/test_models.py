import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from p2d.errors import UserError
from p2d.geometry import HeadGeometry
from p2d.models import (EMBEDDED_NAME, cache_dir, clean_stale_conversions, convert_once, embedded_model_dir,
                        load_model, resolve_spec)


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


@pytest.mark.slow
def test_embedded_default_model(embedded):
    info = embedded.info()
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["q_heads"], info["kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert 130e6 < info["params"] < 140e6
    assert embedded.tokenizer.pad_token_id == embedded.tokenizer.eos_token_id


# --- the one-time conversion into the cache: lock and cleanup, with a cheap stand-in conversion ----------


def _fake_convert(log: Path, started=None, release=None):
    """A real conversion stand-in: writes the files a converted model has, logging start and end."""

    def convert(tmp: Path):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\n")
        (tmp / "config.json").write_text("{}")
        if started is not None:
            started.set()
        if release is not None:
            assert release.wait(30)
        (tmp / "model.safetensors").write_bytes(b"weights")
        with open(log, "a") as f:
            f.write(f"end {os.getpid()}\n")

    return convert


def _convert_in_child(target, log, stderr_path, started=None, release=None):
    sys.stderr = open(stderr_path, "w", buffering=1)
    folder = convert_once(Path(target), _fake_convert(Path(log), started, release))
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".convert-*"))


def test_convert_once_converts_once(tmp_path):
    target, log = tmp_path / "models" / "M", tmp_path / "log"
    assert convert_once(target, _fake_convert(log)) == target
    assert (target / "model.safetensors").is_file() and _temps(target.parent) == []
    convert_once(target, _fake_convert(log))
    assert log.read_text().count("start") == 1


def test_failed_conversion_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "M"

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_once(target, broken)
    assert not target.exists() and _temps(target.parent) == []
    (target).mkdir()  # an unfinished folder from elsewhere is replaced
    (target / "partial").write_text("x")
    convert_once(target, _fake_convert(tmp_path / "log"))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_convert_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    target, log, err2 = tmp_path / "models" / "M", tmp_path / "log", tmp_path / "err2"
    started, release = ctx.Event(), ctx.Event()
    first = ctx.Process(target=_convert_in_child, args=(target, log, tmp_path / "err1", started, release))
    second = ctx.Process(target=_convert_in_child, args=(target, log, err2))
    first.start()
    try:
        assert started.wait(30)  # the first one is converting (and holds the lock)
        second.start()
        deadline = time.monotonic() + 10
        while "waiting" not in _text(err2):
            assert time.monotonic() < deadline, "the second process did not wait"
            time.sleep(0.05)
        assert second.is_alive()
        release.set()
        first.join(30)
        second.join(30)
    finally:
        for proc in (first, second):
            if proc.pid is not None and proc.is_alive():
                proc.kill()
    assert first.exitcode == 0 and second.exitcode == 0
    assert _text(log) == f"start {first.pid}\nend {first.pid}\n"  # converted once, by the first
    assert f"another process (pid {first.pid}) is converting M; waiting" in _text(err2)
    assert "converted by the other process" in _text(err2)
    assert (target / "model.safetensors").is_file() and _temps(target.parent) == []


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killed_conversion_is_cleaned_up(tmp_path):
    ctx = multiprocessing.get_context("fork")
    target, log = tmp_path / "models" / "M", tmp_path / "log"
    started, never = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_convert_in_child, args=(target, log, tmp_path / "err", started, never))
    proc.start()
    try:
        assert started.wait(30)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    left = _temps(target.parent)
    assert len(left) == 1 and left[0].startswith(f".convert-M-{proc.pid}-")  # what a kill leaves behind
    legacy_old, legacy_new = target.parent / ".convert-abcd1234", target.parent / ".convert-efgh5678"
    legacy_old.mkdir()
    legacy_new.mkdir()  # may belong to a running conversion of a version without the lock
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    convert_once(target, _fake_convert(log))  # the dead holder's lock is free at once
    assert (target / "model.safetensors").is_file()
    assert _temps(target.parent) == [".convert-efgh5678"]


def test_stale_temps_cleaned_when_already_converted(tmp_path):
    target = tmp_path / "models" / "M"
    convert_once(target, _fake_convert(tmp_path / "log"))
    stale = target.parent / ".convert-M-999999-0123abcd"
    stale.mkdir()
    clean_stale_conversions(target)
    assert not stale.exists()


def test_embedded_model_dir_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("P2D_CACHE", str(tmp_path))
    folder = tmp_path / "models" / EMBEDDED_NAME
    assert embedded_model_dir(convert=False) is None  # not converted yet, and told not to
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    stale = folder.parent / f".convert-{EMBEDDED_NAME}-999999-0123abcd"
    stale.mkdir()
    assert embedded_model_dir() == folder and not stale.exists()
