"""`p2d.pipeline.Run`: one step sequence, stage invalidation, honest run folders, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from p2d.config import STAGES, RunConfig
from p2d.errors import UserError
from p2d.method.selection import select_data
from p2d.pipeline import MANIFEST_FILE, Run, downstream, upstream_closure

TINY = dict(pool_size=40, probe_size=8, eval_size=4, batch_size=4, max_length=64, head_ratio=0.25, data_ratio=0.2,
            steps=2, max_new_tokens=3, device="cpu", head_method="random", select_method="random")


def _run(tiny_llama, tmp_path, **kw):
    cfg = RunConfig(**{**TINY, "model": tiny_llama.spec, "out": str(tmp_path / "run"), **kw})
    return Run(cfg, lm=tiny_llama)


def test_stage_graph():
    assert downstream("heads") == ["heads", "select", "train", "eval_after"]
    assert downstream("eval_before") == ["eval_before"]
    assert upstream_closure(["train"]) == ["load", "heads", "select", "train"]
    assert upstream_closure(["eval_after"]) == ["load", "heads", "select", "train", "eval_after"]


@pytest.mark.slow
def test_run_executes_only_what_is_needed(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path)
    run.run(["select"])
    assert run.stages_done == ["load", "heads", "select"]
    manifest = json.loads((run.out / MANIFEST_FILE).read_text())["stages"]
    assert set(manifest) == {"load", "heads", "select"} and not any(e["partial"] for e in manifest.values())
    heads_time = run.heads.time_s
    run.run(STAGES)
    assert run.stages_done == list(STAGES)
    assert run.heads.time_s == heads_time  # not rerun
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert metrics["stages_done"] == list(STAGES) and metrics["aer"] > 0


def test_planned_steps_count_the_global_batch_of_a_launched_training(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path, steps=None, epochs=1.0, data_ratio=0.5)  # 20 rows, batch 4
    assert run.planned_steps() is None  # nothing selected yet
    run.run(["select"])
    assert run.planned_steps() == 5
    run.launch_processes = 2  # the app's launcher: 2 processes x batch 4
    assert run.planned_steps() == 3


@pytest.mark.slow
def test_reconfigure_drops_exactly_what_changed(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path)
    run.run(STAGES)
    reference = run.full
    # P2D's own training length never moves the reference
    assert run.reconfigure(run.config.replace(steps=3)) == ["train", "eval_after"]
    assert run.full is reference and run.is_done("reference")
    run.run(STAGES)
    assert run.reconfigure(run.config.replace(reference_epochs=1.0)) == ["reference"]
    assert run.reconfigure(run.config.replace(eval_limit=2)) == ["eval_before", "eval_after"]
    # a new head share re-cuts the scores: no rescoring, later stages dropped only if the heads change
    scores = run.heads.scores
    dropped = run.reconfigure(run.config.replace(head_ratio=0.5))
    assert run.heads.scores == scores and len(run.heads.selected) == 8 and run.is_done("heads")
    assert dropped == ["select", "train"]
    run.run(["select"])
    assert run.reconfigure(run.config.replace(head_ratio=0.49)) == []  # same 8 heads: selection kept
    dropped = run.reconfigure(run.config.replace(head_method="gradient"))
    assert dropped == ["heads", "select"]
    assert not (run.out / "heads.json").exists()


def test_stopped_stage_is_partial_and_never_reused(tiny_llama, tmp_path):
    calls = {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 3

    run = _run(tiny_llama, tmp_path, head_method="gradient")
    run.bind(should_stop=stop_soon)
    run.run(STAGES)
    assert "heads" in run.stages_partial and not run.is_done("heads")
    assert run.heads.extra["stopped"] is True
    assert json.loads((run.out / "metrics.json").read_text())["stages_partial"] == ["heads"]
    again = Run.open(run.out, lm=tiny_llama)
    assert again.stages_done == ["load"] and again.stages_partial == ["heads"]
    again.run(["heads"])
    assert again.is_done("heads") and not again.heads.extra["stopped"]


def test_select_stage_reselects_from_the_head_record(tiny_llama, tmp_path, monkeypatch):
    """The first activation selection records every head; other heads (a larger head share, a given head map), the
    length-z variant and a reopened run select from that record without a model pass; a new max length
    records again."""
    import p2d.pipeline as pipeline
    from p2d.method.features import RECORD_FILE

    passes = []
    real = pipeline.head_norms
    monkeypatch.setattr(pipeline, "head_norms", lambda *a, **k: passes.append(1) or real(*a, **k))
    run = _run(tiny_llama, tmp_path, select_method="activation")
    run.run(["select"])
    assert len(passes) == 1 and (run.out / RECORD_FILE).is_file()
    first = run.selection
    assert not first.extra["from_record"] and first.time_s >= first.extra["record_pass_s"]
    run.reconfigure(run.config.replace(head_ratio=0.5, select_method="activation_length_z"))
    run.run(["select"])
    assert len(passes) == 1 and run.heads.selected != first.extra["heads"]
    again = Run.open(run.out, config=run.config.replace(select_method="activation"), lm=tiny_llama)
    again.use_heads(_reversed(run.heads), "given.json")
    again.run(["select"])
    assert len(passes) == 1 and again.selection.extra["from_record"]
    model = select_data(tiny_llama, again.heads, again.data.pool.samples, "activation", ratio=0.2, batch_size=4,
                        max_length=64)
    assert again.selection.scores == pytest.approx(model.scores, rel=2e-3, abs=2e-3)
    assert len(set(again.selection.selected) & set(model.selected)) >= len(model.selected) - 1  # fp16 near-ties
    again.reconfigure(again.config.replace(max_length=48))
    again.run(["select"])
    assert len(passes) == 2


def test_highest_head_layer_cuts_the_record_short(tiny_llama, tmp_path):
    """With a highest head layer the heads come from layers up to it and the head record stops there."""
    run = _run(tiny_llama, tmp_path, select_method="activation", min_head_layer=1, max_head_layer=2)
    run.run(["select"])
    assert run.heads.window == [1, 2] and all(1 <= layer <= 2 for layer, _ in run.heads.selected)
    entry = json.loads((run.out / MANIFEST_FILE).read_text())["stages"]["head_record"]
    assert entry["shape"][1:] == [3, 4] and entry["settings"]["n_layers"] == 3
    model = select_data(tiny_llama, run.heads, run.data.pool.samples, "activation", ratio=0.2, batch_size=4,
                        max_length=64)
    assert run.selection.scores == pytest.approx(model.scores, abs=1e-5)


@pytest.mark.slow
def test_open_reads_results_and_checks_settings(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path)
    run.run(STAGES)
    back = Run.open(run.out)
    assert back.lm is None  # reading a folder loads no model
    assert back.stages_done == list(STAGES)
    assert back.heads.selected == run.heads.selected and back.selection.selected == run.selection.selected
    assert back.train_result.steps_done == 2 and back.eval_after.n == run.eval_after.n
    other = Run.open(run.out, config=run.config.replace(lr=5e-4))
    assert other.stages_done == ["load", "heads", "select", "eval_before", "reference"]


def test_edited_data_file_invalidates(tiny_llama, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    run = _run(tiny_llama, tmp_path, pool=str(pool), probe=str(pool), eval=None)
    run.run(["heads"])
    assert run.is_done("heads")
    time.sleep(1.1)
    pool.write_text(pool.read_text() + json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert not run.is_done("load") and not run.is_done("heads")


def _reversed(heads):
    """``heads`` with its scores negated: the map selects the heads scoring would rank last."""
    import dataclasses

    from p2d.method.heads import select_top

    scores = [[-x for x in row] for row in heads.scores]
    return dataclasses.replace(heads, method="random", scores=scores, selected=select_top(scores, heads.ratio))


def test_given_heads_are_kept_whatever_the_folder_holds(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path, head_method="gradient", select_method="activation")
    run.run(["select"])  # a folder with its own scored heads and selection
    given = _reversed(run.heads)
    assert sorted(given.selected) != sorted(run.heads.selected)
    # a fresh folder: use_heads before anything is loaded, then select
    fresh = _run(tiny_llama, tmp_path / "fresh", head_method="gradient", select_method="activation")
    fresh.use_heads(given, source="given.json")
    fresh.run(["select"])
    assert fresh.heads.selected == given.selected and fresh.heads.method == "random"
    assert fresh.selection.extra["heads"] == sorted(given.selected) and fresh.selection.extra["head_method"] == "random"
    entry = json.loads((fresh.out / MANIFEST_FILE).read_text())["stages"]["heads"]
    assert entry["external"] == {"source": "given.json"}
    assert Run.open(fresh.out, lm=tiny_llama).stages_done == ["load", "heads", "select"]  # kept on reopening
    # the scored folder, under settings that invalidate its load stage: the given heads win again
    other = Run.open(run.out, config=run.config.replace(seed=1), lm=tiny_llama)
    other.use_heads(given, source="given.json")
    other.run(["train"])
    assert other.heads.selected == given.selected and other.selection.extra["heads"] == sorted(given.selected)
    adapter = json.loads((other.out / "adapter" / "adapter_config.json").read_text())
    assert adapter["heads"] == sorted(given.selected)


def test_given_heads_need_no_probe_file(tiny_llama, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    scored = _run(tiny_llama, tmp_path / "scored", head_method="gradient", pool=str(pool), probe=str(pool), eval=None)
    scored.run(["heads"])
    run = _run(tiny_llama, tmp_path, pool=str(pool), probe=None, eval=None, select_method="activation")
    with pytest.raises(UserError, match="needs a probe file"):
        run.run(["heads"])
    assert run.lm is tiny_llama and not run.out.exists()  # refused before loading anything
    run.use_heads(_reversed(scored.heads), source="given.json")
    run.run(["select"])
    assert run.selection.extra["heads"] == sorted(_reversed(scored.heads).selected) and run.data.probe.samples == []


def test_training_on_given_samples_is_the_runs_train_stage(tiny_llama, tmp_path):
    run = _run(tiny_llama, tmp_path)
    run.run(["heads"])
    given = list(run.data.probe.samples)
    res = run.train_on(given, source="mine.jsonl")
    assert res.extra["n_samples"] == len(given) and run.is_done("train") and not run.is_done("select")
    entry = json.loads((run.out / MANIFEST_FILE).read_text())["stages"]["train"]
    assert entry["external"] == {"source": "mine.jsonl"} and set(entry["inputs"]) == {"heads"}
    back = Run.open(run.out, lm=tiny_llama)
    assert back.is_done("train") and back.train_result.extra["n_samples"] == len(given)
    back.run(["eval_after"])  # evaluates the adapter trained on the given samples
    assert back.is_done("eval_after") and back.train_result.extra["n_samples"] == len(given)
    assert back.reconfigure(back.config.replace(lr=5e-4)) == ["train", "eval_after"]  # its settings still count


def _tiny_run_argv(model_dir, out, steps):
    return [sys.executable, "-m", "p2d", "run", "--model", model_dir, "--out", str(out), "--device", "cpu",
            "--pool-size", "60", "--probe-size", "8", "--eval-size", "0", "--batch-size", "2", "--max-length", "48",
            "--head-method", "random", "--select-method", "random", "--head-ratio", "0.25", "--data-ratio", "0.5",
            "--steps", str(steps), "--checkpoint-every", "3", "--lr", "0.01"]


@pytest.mark.slow
def test_sigkill_during_training_then_resume_gives_the_same_adapter(tiny_llama_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    steps = 40
    full = tmp_path / "uninterrupted"
    subprocess.run(_tiny_run_argv(tiny_llama_dir, full, steps), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_tiny_run_argv(tiny_llama_dir, killed, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = killed / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; raise the steps"
    assert (killed / "checkpoint" / "checkpoint.json").is_file() and not (killed / "adapter").exists()
    done = subprocess.run(_tiny_run_argv(tiny_llama_dir, killed, steps) + ["--resume"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["stages_partial"] == [] and metrics["steps_done"] == steps
    resumed_from = json.loads((killed / "adapter" / "adapter_config.json").read_text())["training"]["resumed_from"]
    assert resumed_from is not None and 3 <= resumed_from < steps
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    lines = [json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert lines == list(range(1, steps + 1))
    assert not (killed / "checkpoint").exists()


def test_inference_precision_runs_the_record_and_evaluation_on_a_reduced_copy(tiny_llama, tmp_path, monkeypatch):
    """bf16: the head record's pass and the evaluation run a bfloat16 copy (heads and training stay float32); the
    record's manifest key names the precision, so going back to the model's dtype records again."""
    import p2d.pipeline as pipeline

    seen = {}
    real_norms, real_eval = pipeline.head_norms, pipeline.evaluate_cell
    monkeypatch.setattr(pipeline, "head_norms", lambda lm, *a, **k: seen.setdefault("record", []).append(
        next(lm.model.parameters()).dtype) or real_norms(lm, *a, **k))
    monkeypatch.setattr(pipeline, "evaluate_cell", lambda lm, *a, **k: seen.setdefault("eval", []).append(
        next(lm.model.parameters()).dtype) or real_eval(lm, *a, **k))
    run = _run(tiny_llama, tmp_path, select_method="activation", inference_precision="bf16")
    run.run(["select", "train", "eval_after"])
    assert seen == {"record": [torch.bfloat16], "eval": [torch.bfloat16]}
    assert next(run.lm.model.parameters()).dtype == torch.float32  # the loaded model is untouched
    assert not any(m._forward_hooks for m in run.inference_lm().model.modules())  # the adapter was detached
    entry = json.loads((run.out / MANIFEST_FILE).read_text())["stages"]["head_record"]
    assert entry["settings"]["precision"] == "bf16"
    dropped = run.reconfigure(run.config.replace(inference_precision="same"))
    assert "select" in dropped and "heads" not in dropped
    run.run(["select"])
    assert seen["record"] == [torch.bfloat16, torch.float32]
    from p2d.controls import run_controls

    with pytest.raises(UserError, match="controls evaluate in the model's dtype"):
        run_controls(_run(tiny_llama, tmp_path / "b", inference_precision="bf16"))


def test_int8_inference_copy_keeps_the_attention_projections(tiny_llama):
    """int8: the MLP and LM-head linears become dynamic int8, the attention projections stay float (head gates and
    adapters hook them), the record pass runs on it; int8 on a GPU is a one-line UserError."""
    import copy

    from p2d.method.features import head_norms
    from p2d.models import inference_copy

    q = inference_copy(tiny_llama, "int8")
    layer = q.model.model.layers[0]
    assert type(layer.self_attn.q_proj) is torch.nn.Linear and type(layer.self_attn.o_proj) is torch.nn.Linear
    assert type(layer.mlp.down_proj) is not torch.nn.Linear and type(q.model.lm_head) is not torch.nn.Linear
    assert type(tiny_llama.model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # the original is untouched
    from p2d.data.builtin import build_task_pool
    from p2d.data.loading import load_records

    pool = load_records(build_task_pool(seed=0, pool_size=8, probe_size=1, eval_size=0).pool).samples
    feats = head_norms(q, pool, 4, 64)["all"]
    ref = head_norms(tiny_llama, pool, 4, 64)["all"]
    assert torch.isfinite(feats.norms).all() and feats.norms.shape == ref.norms.shape
    assert inference_copy(tiny_llama, "same") is tiny_llama
    on_gpu = copy.copy(tiny_llama)
    on_gpu.device = torch.device("cuda")
    with pytest.raises(UserError, match="CPU only"):
        inference_copy(on_gpu, "int8")


def test_heads_precision_is_in_the_heads_key_and_rescores(tiny_llama, tmp_path):
    """heads_precision bf16 scores the heads on a bfloat16 copy (recorded in heads.json; the loaded model stays
    float32); changing it back drops the heads stage and what follows, and the next run rescores in float32."""
    run = _run(tiny_llama, tmp_path, head_method="gradient_logratio", heads_precision="bf16")
    run.run(["heads"])
    assert json.loads((run.out / "heads.json").read_text())["extra"]["precision"] == "bf16"
    assert next(run.lm.model.parameters()).dtype == torch.float32
    assert run.manifest["heads"]["settings"]["heads_precision"] == "bf16"
    dropped = run.reconfigure(run.config.replace(heads_precision="same"))
    assert dropped[0] == "heads" and not run.is_done("heads")
    run.run(["heads"])
    assert run.heads.extra["precision"] == "same" and run.manifest["heads"]["settings"]["heads_precision"] == "same"
    with pytest.raises(UserError, match="gate-gradient methods only"):
        _run(tiny_llama, tmp_path / "b", head_method="shift", heads_precision="bf16").run(["heads"])
