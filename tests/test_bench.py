"""`python -m p2d bench` on a tiny model: every cell runs and is measured, the report adds up, reruns resume."""

import json

import pytest
import torch

from p2d.bench.cells import auroc, curve_steps, time_to_reach
from p2d.bench.config import CELLS, BenchConfig
from p2d.bench.runner import run_bench
from p2d.errors import UserError


def _cfg(model, out, **kw):  # noqa: D103
    base = dict(model=model, device="cpu", targets=["addition"], seeds=2, pool_size=40, probe_size=8, eval_size=4,
                other_eval_size=2, max_length=64, batch_size=4, head_method="random", select_method="activation",
                head_ratio=0.25, data_ratio=0.2, epochs=1, lr_heads=["1e-3"], lr_lora=["1e-3"], lr_full=["1e-4"],
                random_head_draws=2, curve_points=2, target_rows=["0", "1"], out=str(out),
                parts=["cells", "target_rows"])
    base.update(kw)
    return BenchConfig(**base)


def test_bench_runs_every_cell_and_resumes(tiny_llama_dir, tmp_path):
    cfg = _cfg(tiny_llama_dir, tmp_path / "bench")
    res = run_bench(cfg)
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    t = results["targets"]["addition"]
    assert [r["seed"] for r in t["seeds"]] == [0, 1]
    for row in t["seeds"]:
        assert set(row["cells"]) == set(CELLS)
        cells = row["cells"]
        assert cells["full-pool"]["aer"] == pytest.approx(1.0)  # the measured reference
        assert cells["full-pool"]["rows"] == 40 and cells["p2d"]["rows"] == 8 and cells["full-random"]["rows"] == 8
        # equal epochs: 10x the data, 10x... here 5x the steps
        assert cells["full-pool"]["steps"] == 10 and cells["p2d"]["steps"] == 2
        assert cells["p2d"]["cost_s"] == pytest.approx(cells["p2d"]["train_s"] + row["heads_s"] + row["select_s"])
        assert cells["lora-p2d"]["cost_s"] == pytest.approx(cells["lora-p2d"]["train_s"] + row["heads_s"]
                                                            + row["select_s"])  # P2D's data is not free
        assert cells["lora-p2d"]["rows"] == cells["full-p2d"]["rows"] == 8
        assert max(cells["p2d"]["trainable_params"], cells["lora-pool"]["trainable_params"]) < \
            cells["full-pool"]["trainable_params"]
        assert all(c["forgetting"] is not None for c in cells.values())
        assert len(row["random_head_draws"]) == 2 and row["p2d_selection"]["precision"] is not None
        assert len(row["reference_curve"]) == 2
    assert [p["target_rows"] for p in t["seeds"][0]["target_rows"]] == [0, 4]  # 10% of 40 rows are target rows
    assert t["summary"]["cells"]["p2d"]["accuracy"]["n"] == 2
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "P2D heads / P2D data" in md and "AER" in md
    assert (tmp_path / "bench" / "aer_vs_accuracy.html").stat().st_size > 10_000
    # a rerun with the same settings reuses every unit
    units = sorted((tmp_path / "bench" / "units").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in units}
    again = run_bench(cfg)
    assert again["time_s"] < res["time_s"]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in units)
    # another head method reruns what depends on the heads, and only that
    seed0 = tmp_path / "bench" / "units" / "addition" / "seed0"
    run_bench(_cfg(tiny_llama_dir, tmp_path / "bench", head_method="gradient", seeds=1))
    for unit in ("cell-full-pool", "cell-lora-random", "cell-full-random", "base", "heads_random"):
        assert (seed0 / f"{unit}.json").stat().st_mtime_ns == stamps[seed0 / f"{unit}.json"], unit
    for unit in ("cell-p2d", "heads_p2d", "select_p2d", "cell-heads-random"):
        assert (seed0 / f"{unit}.json").stat().st_mtime_ns != stamps[seed0 / f"{unit}.json"], unit
    redone = json.loads((tmp_path / "bench" / "results.json").read_text())["targets"]["addition"]["seeds"]
    assert len(redone) == 1 and set(redone[0]["cells"]) == set(CELLS)


def test_bench_config_quick_and_errors():
    q = BenchConfig(quick=True)
    assert q.seeds == 1 and len(q.targets) == 1 and q.pool_size <= 160 and len(q.lr_heads) == 1
    with pytest.raises(UserError, match="cells"):
        BenchConfig(cells=["nope"])
    with pytest.raises(UserError, match="lr_heads"):
        BenchConfig(lr_heads=["fast"])


def test_learning_curve_helpers():
    assert curve_steps(10, 4) == {3, 5, 8, 10} and curve_steps(3, 5) == {1, 2, 3}
    curve = [{"train_s": 10, "accuracy": 0.1}, {"train_s": 20, "accuracy": 0.5}, {"train_s": 30, "accuracy": 0.6}]
    assert time_to_reach(curve, 0.3) == pytest.approx(15)
    assert time_to_reach(curve, 0.05) == 10 and time_to_reach(curve, 0.9) is None
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5


def test_component_figures(tiny_llama, tmp_path):
    from p2d.bench.cells import build_split
    from p2d.bench.components import component_figures, components_markdown

    cfg = _cfg(tiny_llama.spec, tmp_path)
    split = build_split(cfg, "addition", 0)
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    c = component_figures(tiny_llama, split, cfg, [[1, 0], [3, 2]])
    assert c["plain_forward_pool_s"] > 0 and set(c["selection"]) >= {"activation", "alignment", "random"}
    steps = c["steps_same_batch"]
    assert steps["heads"]["trainable_params"] < steps["full"]["trainable_params"]
    assert [r["share"] for r in c["head_share"]] == [0.05, 0.1, 0.3, 1.0] and [r["tokens"] for r in c["length"]] == [64]
    assert c["profile_head_step"] and "| heads |" in components_markdown(c)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.model.state_dict().items())


def test_gpu_check_dry_runs_on_the_cpu(tmp_path, capsys):
    """bench/gpu_check.py (what a session lent a GPU runs) on a tiny model of the same family: every
    stage is timed, the run's figures and the table come out (peak memory only on CUDA)."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("gpu_check", root / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check
    spec.loader.exec_module(gpu_check)
    cases = "1b,1b-4bit" if importlib.util.find_spec("bitsandbytes") else "1b"
    gpu_check.main(["--device", "cpu", "--size", "tiny", "--cases", cases, "--pool-size", "40", "--steps", "2",
                    "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "gpu_check.json")])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["case"] for r in report["results"]] == cases.split(",")
    for r in report["results"]:
        assert set(r["stages"]) == {"model", "load", "heads", "select", "eval_before", "reference", "train",
                                    "eval_after"}
        assert r["steps"] == 2 and r["aer"] > 0 and r["time_full_s"] > 0 and r["stages"]["train"]["peak_gib"] is None
    assert "| case |" in capsys.readouterr().out
