"""The command line: JSON on stdout, one-line errors with exit code 2, and a whole tiny `run`."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from p2d.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_every_command_has_help():
    for cmd in ("info", "data", "demo-data", "eval", "heads", "select", "train", "merge", "run", "studio", "chat",
                "inspect-head", "controls", "forgetting"):
        proc = subprocess.run([sys.executable, "-m", "p2d", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage:" in proc.stdout, cmd


@pytest.mark.slow
def test_user_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for argv, says in ((["data", str(tmp_path / "missing.jsonl")], f"file not found: {tmp_path / 'missing.jsonl'}"),
                       (["data", str(bad)], "columns found: foo, bar"),
                       (["info", "--model", str(tmp_path / "nope.gguf")], f"not found: {tmp_path / 'nope.gguf'}")):
        proc = subprocess.run([sys.executable, "-m", "p2d", *argv], capture_output=True, text=True, env=env)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(lines) == 1, proc.stderr
        assert says in lines[0], (argv, lines[0])  # names what is wrong


def test_unknown_shape_names_columns(capsys, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    code, _, err = _run(capsys, "data", str(bad))
    assert code == 2 and "foo" in err and "instruction" in err


def test_info_tiny_model(capsys, tiny_llama_dir):
    code, out, _ = _run(capsys, "info", "--model", tiny_llama_dir)
    info = json.loads(out)
    assert code == 0
    assert {k: info[k] for k in ("layers", "q_heads", "kv_heads", "head_dim")} == \
        {"layers": 4, "q_heads": 4, "kv_heads": 2, "head_dim": 16}
    assert info["architecture"] == "LlamaForCausalLM" and info["params"] > 0


def test_data_and_demo_data(capsys, tmp_path):
    code, out, _ = _run(capsys, "demo-data", "--out", str(tmp_path), "--pool-size", "200", "--seed", "3")
    assert code == 0
    for name in ("pool", "probe", "eval"):
        assert (tmp_path / f"{name}.jsonl").is_file()
    code, out, _ = _run(capsys, "data", str(tmp_path / "pool.jsonl"))
    summary = json.loads(out)
    assert code == 0 and summary["rows"] == 200 and summary["skipped"] == 0
    assert summary["format"] == "alpaca" and len(summary["tasks"]) >= 5
    assert {"rows", "skipped", "format", "columns", "tasks"} <= set(summary)


def test_eval_command(capsys, tmp_path, tiny_llama_dir):
    f = tmp_path / "eval.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"{i}+{i}?", "answer": str(2 * i)}) for i in range(6)) + "\n")
    code, out, _ = _run(capsys, "eval", "--model", tiny_llama_dir, "--eval", str(f), "--eval-limit", "4",
                        "--max-new-tokens", "3")
    res = json.loads(out)
    assert code == 0 and res["n"] == 4 and res["accuracy"] == 0.0 and res["loss"] > 0


@pytest.mark.slow
def test_run_tiny_end_to_end(capsys, tmp_path, tiny_llama_dir):
    out_dir = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny_llama_dir, "pool_size": 60, "probe_size": 8, "eval_size": 6,
                                   "steps": 3, "batch_size": 4, "max_length": 96, "max_new_tokens": 4}))
    code, out, err = _run(capsys, "run", "--config", str(cfg), "--out", str(out_dir), "--head-method", "random",
                          "--select-method", "activation", "--head-ratio", "0.25", "--data-ratio", "0.2")
    assert code == 0, err
    assert "head_method: random" in err and "python -m p2d run" in err  # prints the config it used
    metrics = json.loads(out)
    for name in ("config.yaml", "heads.json", "selected.jsonl", "scores.jsonl", "selection.json",
                 "train_log.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "eval_before.json", "eval_after.json", "full_ft.json", "metrics.json", "data/pool.jsonl"):
        assert (out_dir / name).is_file(), name
    on_disk = json.loads((out_dir / "metrics.json").read_text())
    for key in ("aer", "aer_mode", "speedup", "time_heads_s", "time_select_s", "time_train_s", "time_full_s",
                "eval_before", "eval_after", "trainable_params", "total_params", "selected_heads", "n_selected"):
        assert key in on_disk and key in metrics, key
    assert on_disk["aer_mode"] == "estimated" and on_disk["aer"] > 0
    assert on_disk["stages_done"] == ["load", "heads", "select", "eval_before", "reference", "train", "eval_after"]
    assert on_disk["stages_partial"] == [] and on_disk["reference_epochs"] == 3.0
    assert on_disk["n_selected"] == 12 and len(on_disk["selected_heads"]) == 4
    assert on_disk["trainable_params"] < on_disk["total_params"]
    assert {"accuracy", "loss", "n"} <= set(on_disk["eval_after"])
    heads = json.loads((out_dir / "heads.json").read_text())
    assert len(heads["scores"]) == 4 and len(heads["scores"][0]) == 4
    assert len((out_dir / "train_log.jsonl").read_text().splitlines()) == 3
    assert len((out_dir / "selected.jsonl").read_text().splitlines()) == 12
    saved = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert saved["head_method"] == "random" and saved["steps"] == 3


def test_select_and_train_keep_the_given_heads(capsys, tmp_path, tiny_llama_dir):
    """select/train --heads use exactly the given map, in a fresh folder and with a pool file but no probe."""
    import dataclasses

    from p2d.method.heads import HeadScores, select_top

    common = ["--model", tiny_llama_dir, "--device", "cpu", "--batch-size", "4", "--max-length", "64",
              "--head-ratio", "0.25"]
    tiny = ["--pool-size", "24", "--probe-size", "8", "--eval-size", "8"]
    code, out, err = _run(capsys, "heads", *common, *tiny, "--out", str(tmp_path / "scored"))
    assert code == 0, err
    scored = HeadScores.load(tmp_path / "scored" / "heads.json")
    assert scored.method == "gradient_logratio"
    worst = [[-x for x in row] for row in scored.scores]  # the heads scoring ranks last
    given = dataclasses.replace(scored, method="random", scores=worst, selected=select_top(worst, 0.25))
    assert sorted(given.selected) != sorted(scored.selected)
    path = given.save(tmp_path / "given")

    def check(folder):
        heads = json.loads((folder / "heads.json").read_text())
        assert heads["method"] == "random" and heads["selected"] == given.selected
        assert json.loads((folder / "stages.json").read_text())["stages"]["heads"]["external"] == {"source": str(path)}

    common += ["--select-method", "activation"]
    code, out, err = _run(capsys, "select", *common, *tiny, "--heads", str(path), "--out", str(tmp_path / "sel"))
    assert code == 0, err
    check(tmp_path / "sel")
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["extra"]["heads"] == sorted(given.selected)
    assert json.loads(out)["from_record"] is False
    code, out, err = _run(capsys, "select", *common, *tiny, "--heads", str(tmp_path / "scored" / "heads.json"),
                          "--out", str(tmp_path / "sel"))
    assert code == 0 and json.loads(out)["from_record"] is True  # other heads: from the folder's head record

    assert _run(capsys, "demo-data", "--out", str(tmp_path / "files"), "--pool-size", "24")[0] == 0
    pool = ["--pool", str(tmp_path / "files" / "pool.jsonl")]
    code, _, err = _run(capsys, "select", *common, *pool, "--out", str(tmp_path / "noprobe"))
    assert code == 2 and "needs a probe file" in err  # no heads given: they would need scoring
    code, out, err = _run(capsys, "select", *common, *pool, "--heads", str(path), "--out", str(tmp_path / "noprobe"))
    assert code == 0, err
    check(tmp_path / "noprobe")

    code, out, err = _run(capsys, "train", *common, *tiny, "--heads", str(path), "--steps", "2",
                          "--out", str(tmp_path / "sel"))
    assert code == 0, err
    check(tmp_path / "sel")
    assert json.loads((tmp_path / "sel" / "adapter" / "adapter_config.json").read_text())["heads"] == sorted(given.selected)


def test_train_on_a_file_is_recorded_and_tracked(capsys, tmp_path, tiny_llama_dir):
    """train --data goes through the run: its manifest records the training, the trackers get its scalars,
    and --resume without a checkpoint says so."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _run(capsys, "demo-data", "--out", str(tmp_path / "files"), "--pool-size", "24")[0] == 0
    file, out_dir = tmp_path / "files" / "pool.jsonl", tmp_path / "run"
    argv = ["train", "--model", tiny_llama_dir, "--device", "cpu", "--batch-size", "4", "--max-length", "64",
            "--head-method", "random", "--head-ratio", "0.25", "--pool-size", "24", "--probe-size", "8",
            "--eval-size", "4", "--data", str(file), "--steps", "3", "--report-to", "tensorboard", "--out", str(out_dir)]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["extra"]["n_samples"] == 24 and "no checkpoint" not in err
    stages = json.loads((out_dir / "stages.json").read_text())["stages"]
    assert stages["train"]["external"] == {"source": str(file)} and set(stages["train"]["inputs"]) == {"heads"}
    assert "select" not in stages and not stages["train"]["partial"]
    acc = EventAccumulator(str(out_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3] and "time/train_s" in acc.Tags()["scalars"]
    code, out, err = _run(capsys, *argv, "--resume")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "step 0" in line]
    assert notes == [f"no checkpoint in {out_dir / 'checkpoint'} to resume from: training starts at step 0"]
    assert json.loads(out)["extra"]["resumed_from"] is None


def test_out_of_memory_is_one_line_exit_2(capsys, monkeypatch):
    import p2d.cli as cli

    def boom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(cli, "cmd_info", boom)
    code, _, err = _run(capsys, "info")
    assert code == 2 and err.startswith("error: out of memory") and len(err.strip().splitlines()) == 1


def test_is_out_of_memory_kinds():
    from p2d.errors import is_out_of_memory

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
