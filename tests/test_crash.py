"""Crash safety of a run folder: SIGKILL in every stage, then --resume; out of memory in every stage; a
full disk; nothing half-written is ever taken as done."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from p2d.config import STAGES

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _argv(model_dir, out, *extra):
    return [sys.executable, "-m", "p2d", "run", "--model", model_dir, "--out", str(out), "--device", "cpu",
            "--pool-size", "40", "--probe-size", "8", "--eval-size", "6", "--batch-size", "2", "--max-length", "48",
            "--head-method", "gradient", "--select-method", "activation", "--head-ratio", "0.25",
            "--data-ratio", "0.2", "--steps", "6", "--checkpoint-every", "2", "--max-new-tokens", "3",
            "--report-to", "none", *extra]


def _manifest(out):
    return json.loads((out / "stages.json").read_text())["stages"]


@pytest.mark.slow
def test_sigkill_in_every_stage_then_resume(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    done_before = []
    for i, stage in enumerate(s for s in STAGES if s != "load"):
        extra = ["--resume"] if i else []
        proc = subprocess.run(_argv(tiny_llama_dir, out, *extra), env={**ENV, "P2D_FAULT": f"kill:{stage}"},
                              capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, (stage, proc.stderr[-2000:])
        manifest = _manifest(out)
        finished = [s for s in STAGES if s in manifest and not manifest[s]["partial"]]
        assert stage not in manifest, stage  # a killed stage is never recorded, not even as partial
        assert finished == done_before + (["load"] if not done_before else []) or finished[-1] != stage
        done_before = finished + [stage]
        assert not list(out.glob(".*.tmp")) and not list(out.glob("adapter/.*.tmp"))
    proc = subprocess.run(_argv(tiny_llama_dir, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout)
    assert metrics["stages_done"] == list(STAGES) and metrics["stages_partial"] == []
    assert metrics["steps_done"] == 6
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, 7))


@pytest.mark.slow
def test_full_disk_leaves_no_half_written_adapter(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"

    def small_files():  # any file over 40 KB fails to grow, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    proc = subprocess.run(_argv(tiny_llama_dir, out, "--checkpoint-every", "0"), env=ENV, capture_output=True,
                          text=True, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr and "free some disk space" in errors[0]
    assert not (out / "adapter").exists() and not list(out.glob(".adapter*"))
    assert "train" not in _manifest(out)
    proc = subprocess.run(_argv(tiny_llama_dir, out, "--checkpoint-every", "0", "--resume"), env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["stages_done"] == list(STAGES)


@pytest.mark.slow
def test_out_of_memory_in_every_stage_is_one_line_then_resume(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    for i, stage in enumerate(s for s in STAGES if s != "load"):
        extra = ["--resume"] if i else []
        proc = subprocess.run(_argv(tiny_llama_dir, out, *extra), env={**ENV, "P2D_FAULT": f"oom:{stage}"},
                              capture_output=True, text=True)
        assert proc.returncode == 2, (stage, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, (stage, proc.stderr[-2000:])
        assert errors[0].startswith("error: out of memory") and "batch size" in errors[0], errors[0]
        manifest = _manifest(out)
        assert stage not in manifest or manifest[stage]["partial"], stage  # never recorded as complete
        assert not list(out.glob(".*.tmp")) and not list(out.glob("adapter/.*.tmp"))
    proc = subprocess.run(_argv(tiny_llama_dir, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["stages_done"] == list(STAGES)
