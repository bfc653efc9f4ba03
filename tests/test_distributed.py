"""Several processes (issue 12, first part): `accelerate launch --multi_gpu --num_processes 2` on this CPU
(gloo) scores heads and pool with each process taking half of the batches, and gives the one-process
result: the same selected heads and rows, scores equal (gradient sums within float64 rounding, pool
scores bit for bit); one process writes the files, which record how many processes ran and how many
rows each scored; training is data parallel and equals one process with the global batch. Commands
that do not run distributed yet say so. With the shipped FSDP config the decoder layers are sharded
across the processes and every stage gives what two whole copies give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from studio_helpers import free_port

ARGS = ["--pool-size", "60", "--probe-size", "10", "--eval-size", "4", "--batch-size", "4", "--max-length", "96",
        "--head-ratio", "0.25", "--data-ratio", "0.2"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


def _launch(*argv, processes: int = 2):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "p2d", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def _launch_with(config: str, *argv):
    """``accelerate launch --config_file configs/accelerate/<config>`` (the shipped files, 2 processes)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--main_process_port", str(free_port()), "-m", "p2d", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)


def _one(*argv):
    return subprocess.run([sys.executable, "-m", "p2d", *argv], capture_output=True, text=True, env=_env(), timeout=600)


@pytest.mark.slow
def test_two_processes_select_what_one_selects(tmp_path, tiny_llama_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    a = _one("select", "--model", tiny_llama_dir, *ARGS, "--out", str(one))
    assert a.returncode == 0, a.stderr[-2000:]
    b = _launch("select", "--model", tiny_llama_dir, *ARGS, "--out", str(two))
    assert b.returncode == 0, b.stderr[-3000:]
    assert b.stdout.count('"n_selected"') == 1  # the result printed once

    ha, hb = (json.loads((d / "heads.json").read_text()) for d in (one, two))
    assert ha["selected"] == hb["selected"]
    flat = [(x, y) for ra, rb in zip(ha["scores"], hb["scores"]) for x, y in zip(ra, rb)]
    assert all(abs(x - y) <= 1e-9 * max(1.0, abs(x)) for x, y in flat)
    assert ha["extra"]["processes"] == 1 and hb["extra"]["processes"] == 2
    assert len(hb["extra"]["rows_per_process"]) == 2 and sum(hb["extra"]["rows_per_process"]) == \
        sum(ha["extra"]["rows_per_process"])

    sa, sb = (json.loads((d / "selection.json").read_text()) for d in (one, two))
    assert sa["selected"] == sb["selected"]
    assert (one / "scores.jsonl").read_text() == (two / "scores.jsonl").read_text()  # bit for bit
    rows = sb["extra"]["rows_per_process"]
    assert sb["extra"]["processes"] == 2 and all(r > 0 for r in rows) and sum(rows) == 60
    assert not list(two.rglob("*.tmp"))  # one writer, nothing half-written


@pytest.mark.slow
def test_two_processes_run_the_whole_pipeline(tmp_path, tiny_llama_dir):
    """`run` in two processes: every stage split across them, the AER reference timed the same way
    (data parallel over the global batch), the evaluations gathered; one process writes."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["run", "--model", tiny_llama_dir, *ARGS, "--steps", "3", "--max-new-tokens", "4"]
    a = _one(*common, "--batch-size", "8", "--out", str(one))
    assert a.returncode == 0, a.stderr[-2000:]
    b = _launch(*common, "--batch-size", "4", "--out", str(two))
    assert b.returncode == 0, [ln for ln in b.stderr.splitlines() if "rror" in ln][:5]
    assert b.stdout.count('"stages_done"') == 1
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert mb["processes"] == 2 and mb["full_ft"]["processes"] == 2 and mb["stages_partial"] == []
    assert mb["stages_done"] == ma["stages_done"] and mb["full_ft"]["steps"] == ma["full_ft"]["steps"]
    assert mb["aer"] > 0
    for when in ("eval_before", "eval_after"):  # every row evaluated once, losses as one process has them
        assert mb[when]["n"] == ma[when]["n"] and mb[when]["n_generated"] == ma[when]["n_generated"]
    assert abs(mb["eval_before"]["loss"] - ma["eval_before"]["loss"]) <= 1e-4 * ma["eval_before"]["loss"]
    assert ma["eval_before"]["other_tasks"].keys() == mb["eval_before"]["other_tasks"].keys()


@pytest.mark.slow
def test_commands_not_distributed_yet_say_so(tmp_path, tiny_llama_dir):
    proc = _launch("merge", "--model", tiny_llama_dir, "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m"))
    assert proc.returncode != 0
    assert "`merge` runs in one process so far" in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_global_batch(tmp_path, tiny_llama_dir):
    """2 processes x batch 4 = 1 process x batch 8: the same losses, the same adapter within float
    rounding of differently padded batches (measured here: at most 7e-6 on deltas of about 0.025)."""
    from safetensors.torch import load_file

    base = tmp_path / "base"
    assert _one("select", "--model", tiny_llama_dir, *ARGS, "--out", str(base)).returncode == 0
    common = ["train", "--model", tiny_llama_dir, "--data", str(base / "selected.jsonl"), "--heads",
              str(base / "heads.json"), "--steps", "4", "--lr", "0.01", "--max-length", "96"]
    a = _one(*common, "--batch-size", "8", "--out", str(tmp_path / "one"))
    assert a.returncode == 0, a.stderr[-2000:]
    b = _launch(*common, "--batch-size", "4", "--out", str(tmp_path / "two"))
    assert b.returncode == 0, b.stderr[-3000:]
    wa, wb = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert float((wa[key] - wb[key]).abs().max()) <= 5e-5, key
    la, lb = ((tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("one", "two"))
    assert len(la) == len(lb) == 4  # one process wrote the log
    for x, y in zip(map(json.loads, la), map(json.loads, lb)):
        assert x["tokens"] == y["tokens"] and abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"])
    cfg = json.loads((tmp_path / "two" / "adapter" / "adapter_config.json").read_text())
    assert cfg["training"]["processes"] == 2 and cfg["training"]["global_batch_size"] == 8


@pytest.mark.slow
def test_the_app_trains_with_two_processes(tmp_path, tiny_llama_dir):
    """/train with processes=2 runs the training as accelerate launch and follows the run folder: the
    log and adapter come from the two processes, the evaluation after it from the app."""
    from gradio_client import Client

    from studio_helpers import close, form_kw, serve, wait_job

    served = serve(tmp_path / "runs")
    app = served.app
    try:
        c = Client(served.url, verbose=False)
        c.predict("", api_name="/attach")
        c.predict(**form_kw(tiny_llama_dir, steps=3), processes=2, api_name="/train")
        summary = wait_job(c, 600)
        assert summary["status"] == "done" and summary["processes"] == 2, summary
        run = next(w.run for w in app.studio.registry.all() if w.run is not None)
        cfg = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
        assert cfg["training"]["processes"] == 2 and cfg["training"]["steps_done"] == 3
        assert len((run.out / "train_log.jsonl").read_text().splitlines()) == 3
        assert run.is_done("eval_after") and run.eval_after is not None

        # Stop: both processes stop after the same step and the adapter is kept
        log = run.out / "train_log.jsonl"
        log.unlink()  # the first training's log; wait for the new one's lines below
        c.predict(**form_kw(tiny_llama_dir, steps=5000), processes=2, api_name="/train")
        deadline = time.time() + 300
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
            time.sleep(0.5)
        c.predict(api_name="/stop")
        summary = wait_job(c, 300)
        assert summary["status"] in ("stopped", "done"), summary
        cfg = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
        steps = cfg["training"]["steps_done"]
        assert cfg["training"]["stopped"] and 2 <= steps < 5000
        assert len(log.read_text().splitlines()) == steps
    finally:
        close(served)


@pytest.mark.slow
def test_a_sharded_model_gives_what_whole_copies_give(tmp_path, tiny_llama_dir):
    """`run` with the shipped FSDP config (decoder layers sharded over 2 processes) against the shipped
    plain config (2 whole copies): the same heads, rows, training steps, adapter and evaluations. The
    sizes leave the processes uneven shares everywhere (15 pool batches, 3 probe batches, 5 eval rows,
    a last training batch of 1 row), so the sharded processes run fillers to stay in step."""
    from safetensors.torch import load_file

    common = ["run", "--model", tiny_llama_dir, "--pool-size", "60", "--probe-size", "10", "--eval-size", "5",
              "--other-eval-size", "0", "--batch-size", "4", "--max-length", "96", "--head-ratio", "0.25",
              "--data-ratio", "0.15", "--steps", "3", "--max-new-tokens", "4"]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    a = _launch_with("multi_process.yaml", *common, "--out", str(whole))
    assert a.returncode == 0, a.stderr[-3000:]
    b = _launch_with("fsdp.yaml", *common, "--out", str(sharded))
    assert b.returncode == 0, [ln for ln in b.stderr.splitlines() if "rror" in ln][:5]

    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (whole, sharded))
    assert not ma["sharded"] and mb["sharded"] and mb["processes"] == 2
    held = mb["params_per_process"]  # each process holds half of every layer, the embeddings whole
    assert len(held) == 2 and all(n < mb["total_params"] for n in held)
    ha, hb = (json.loads((d / "heads.json").read_text()) for d in (whole, sharded))
    assert hb["extra"]["sharded"] and ha["selected"] == hb["selected"]
    flat = [(x, y) for ra, rb in zip(ha["scores"], hb["scores"]) for x, y in zip(ra, rb)]
    assert all(abs(x - y) <= 1e-9 * max(1.0, abs(x)) for x, y in flat)
    assert hb["extra"]["rows_per_process"] == ha["extra"]["rows_per_process"]  # the fillers not counted
    assert (whole / "scores.jsonl").read_text() == (sharded / "scores.jsonl").read_text()
    sa, sb = (json.loads((d / "selection.json").read_text()) for d in (whole, sharded))
    assert sa["selected"] == sb["selected"] and len(sb["selected"]) == 9 and sum(sb["extra"]["rows_per_process"]) == 60

    la, lb = ((d / "train_log.jsonl").read_text().splitlines() for d in (whole, sharded))
    assert len(la) == len(lb) == 3
    for x, y in zip(map(json.loads, la), map(json.loads, lb)):
        assert x["tokens"] == y["tokens"] and abs(x["loss"] - y["loss"]) <= 1e-6 * abs(x["loss"])
    wa, wb = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, sharded))
    assert wa.keys() == wb.keys() and all(float((wa[k] - wb[k]).abs().max()) <= 1e-6 for k in wa)
    for when in ("eval_before", "eval_after"):
        ea, eb = ma[when], mb[when]
        assert (eb["n"], eb["n_generated"], eb["accuracy"]) == (ea["n"], ea["n_generated"], ea["accuracy"]) == \
            (ea["n"], 5, ea["accuracy"])
        assert abs(ea["loss"] - eb["loss"]) <= 1e-6 * ea["loss"]
    assert mb["full_ft"]["processes"] == 2 and mb["full_ft"]["steps"] == ma["full_ft"]["steps"] and mb["aer"] > 0


@pytest.mark.slow
def test_a_sharded_model_refuses_what_needs_whole_weights(tmp_path, tiny_llama_dir):
    proc = _launch_with("fsdp.yaml", "heads", "--model", tiny_llama_dir, "--pool-size", "60", "--probe-size", "10",
                        "--head-method", "taylor", "--out", str(tmp_path / "t"))
    assert proc.returncode != 0  # each process exits 2 with the line; torchrun reports 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors and "the taylor head score needs each process to hold the whole model" in errors[0]
    assert not (tmp_path / "t" / "heads.json").exists()


def test_padded_shares_keep_a_sharded_model_in_step():
    from p2d.distributed import Processes

    items = list(range(7))
    assert Processes(world=3, rank=2, sharded=True).padded(items) == ([2, 5, 0], 2)  # one copy of items[0]
    assert Processes(world=3, rank=0, sharded=True).padded(items) == ([0, 3, 6], 3)
    assert Processes(world=3, rank=2).padded(items) == ([2, 5], 2)  # whole copies: no padding
    assert Processes(world=4, rank=3, sharded=True).padded([9]) == ([9], 0)  # no rows of its own: a filler
    assert Processes(world=2, rank=1, sharded=True).padded([]) == ([], 0)
    assert Processes().lockstep(5) == 5 and Processes().agreed(None) is None


def test_fsdp_settings_come_from_the_launcher(monkeypatch):
    import torch

    from p2d.cli import _check_processes
    from p2d.distributed import _fsdp_options, fsdp_requested
    from p2d.errors import UserError

    cpu = torch.device("cpu")
    for key in ("ACCELERATE_USE_FSDP", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(key, raising=False)
    assert not fsdp_requested() and _fsdp_options(cpu) == {"reshard_after_forward": True}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert fsdp_requested()
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")  # CPU offload only means something on a GPU
    assert _fsdp_options(cpu) == {"reshard_after_forward": False}
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "shard_grad_op")  # FSDP1's name for the same
    assert _fsdp_options(cpu)["reshard_after_forward"] is False
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "NO_SHARD")  # FSDP1 without sharding: plain data parallel
    assert not fsdp_requested()

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="DeepSpeed is not supported"):
        _check_processes("run")
