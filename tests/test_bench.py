"""`python -m p2d bench` on a tiny model: every part runs and is measured, the report adds up, reruns
resume, a report can be rebuilt from the units alone, and a changed setting redoes exactly what depends on it."""

import json

import pytest
import torch

from p2d.bench.config import BenchConfig
from p2d.bench.benchmark import code_version, run_bench
from p2d.errors import UserError


def _cfg(model, out, **kw):  # noqa: D103
    base = dict(model=model, device="cpu", splits=["builtin-hard:addition"], choice_splits=["builtin-hard:addition"],
                heads_splits=["builtin-hard:addition"], seeds=2, pool_size=48, probe_size=8, eval_size=6,
                other_eval_size=1, max_length=64, batch_size=4, head_method="gradient_logratio", head_ratio=0.25,
                data_ratio=0.125, epochs=1, lr_qkvo=["1e-3", "3e-3"], lr_qo=["1e-3"], lr_offset=["1e-2"],
                lr_lora=["1e-3"], lr_full=["1e-4"], random_head_draws=3, training_draws=2, curve_points=3,
                bootstrap=200, sweep_extend=1, head_candidates=["gradient"], selectors=["p2d", "tfidf", "random"],
                adapters=["qkvo", "offset"], classic=["lora-p2d"], out=str(out))
    base.update(kw)
    return BenchConfig(**base)


@pytest.mark.slow
def test_bench_runs_every_part_and_resumes(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench"
    cfg = _cfg(tiny_llama_dir, out)
    res = run_bench(cfg)
    assert res["complete"], res["skipped"]
    results = json.loads((out / "results.json").read_text())
    s = results["splits"]["builtin-hard:addition"]
    assert s["seeds"] == [0, 1] and s["pool_share"] == pytest.approx(6 / 48) and s["pool_twins"] == pytest.approx(6 / 48)
    assert set(s["selection"]) == {"p2d", "tfidf", "random"} and s["selection"]["tfidf"]["precision"]["n"] == 2
    assert s["null_precision"]["activation"]["n"] == 2 * 3  # three random draws per seed
    assert set(s["head_methods_precision"]) == {"gradient_logratio", "gradient"}
    sel = s["selectors"]
    assert set(sel) == {"p2d", "tfidf", "random"} and sel["p2d"]["rows"] == 6 and sel["p2d"]["steps"] == 2
    assert sel["tfidf"]["p2d_minus"]["n_seeds"] == 2 and sel["tfidf"]["p2d_minus"]["n_rows"] == 6
    assert s["best_head_free"]["selector"] in ("tfidf", "random")
    for adapter in ("qkvo", "offset"):
        h = s["heads"][adapter]
        assert h["p2d_vs_random"]["n_draws"] == 2 * 2 and "gradient" in h["candidates"]
    qkvo, offset = s["heads"]["qkvo"]["p2d"], s["heads"]["offset"]["p2d"]  # per seed, not seed 0's only
    assert qkvo["query_heads_changed"]["min"] > offset["query_heads_changed"]["max"]
    assert offset["trainable_params"]["max"] < qkvo["trainable_params"]["min"]
    assert len(qkvo["trainable_params"]["per_seed"]) == len(qkvo["query_heads_changed"]["per_seed"]) == 2
    # every unit records the code that made it, and the report says which commits its units came from
    code = code_version()
    entries = [e for p in (out / "units").rglob("*.json") if "settings" in (e := json.loads(p.read_text()))]
    assert len(entries) > 20 and all(e["code"] == code for e in entries)
    assert code["commit"] is None or set(results["units"]["code"]) == {code["commit"][:12] + "+dirty" * code["dirty"]}
    # the sweep extends its grid while the best value sits at an edge, and says whether it ended inside
    sw = s["sweeps"]["qkvo-p2d"]
    assert len(sw["points"]) >= 2 and sw["chosen"] in [p["lr"] for p in sw["points"]]
    assert set(s["classic"]) == {"lora-p2d"}
    a = s["aer"]
    assert a["curve"][0]["train_s"] == 0.0 and len(a["curve"]) == 1 + 3 and a["aer"] > 0
    r = results["rule"]  # the rule judged by training runs in the default parts, every candidate complete
    assert r["candidates"] == len(r["table"]) == 23 and r["aggregate"] == "worst informative split"
    # a tiny random model learns nothing measurable: no informative split, no winner, and it says why
    assert (r["winner"] is None and r["undecided"]) or r["winner"]["candidate"] in r["tied"]
    d = results["defaults"]
    assert d["splits"] == ["builtin-hard:addition"] and d["selection_winner"]["candidate"]
    assert {r["candidate"] for r in d["selection"]} >= {"tfidf", "gradient_logratio + activation", "gradient + alignment"}
    md = (out / "results.md").read_text()
    assert "builtin-hard:addition" in md and "P2D minus random" in md and "Defaults by the rule" in md
    # a rerun with the same settings reuses every unit
    units = sorted((out / "units").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in units}
    again = run_bench(cfg)
    assert again["time_s"] < res["time_s"]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in units)
    # the report alone, from the units: the same tables, nothing computed
    (out / "results.md").unlink()
    run_bench(_cfg(tiny_llama_dir, out, report_only=True))
    assert (out / "results.md").read_text().split("Total time")[0] == md.split("Total time")[0]
    # ... and with another thread count (the count changes a unit's seconds, not its result; a run would redo it)
    run_bench(_cfg(tiny_llama_dir, out, report_only=True, threads=1))
    rebuilt = (out / "results.md").read_text()
    assert rebuilt.split("Total time")[0].replace(", 1 torch threads", "") == \
        md.split("Total time")[0].replace(f", {torch.get_num_threads()} torch threads", "")
    assert "by torch threads: 0: " in rebuilt
    # another head method redoes what depends on P2D's heads, and only that
    seed0 = out / "units" / "builtin-hard-addition" / "seed0"
    run_bench(_cfg(tiny_llama_dir, out, head_method="gradient_layer", seeds=1, parts=["precision", "sweep", "selectors"]))
    # (P2D's heads are trained in every selector cell, so those are redone too; the derived head sets are read
    # from the same gradient_logratio pass whatever head_method is, so they stay)
    for unit in ("base", "select-tfidf", "select-random", "heads-gradient", "heads-gradient_logratio"):
        assert (seed0 / f"{unit}.json").stat().st_mtime_ns == stamps[seed0 / f"{unit}.json"], unit
    picked = {m: json.loads((seed0 / f"heads-{m}.json").read_text())["result"]["selected"]
              for m in ("gradient_layer", "gradient_logratio")}
    assert picked["gradient_layer"] != picked["gradient_logratio"]  # so the cells below train other heads
    for unit in ("cell-p2d-qkvo-p2d", "cell-p2d-qkvo-tfidf"):
        assert (seed0 / f"{unit}.json").stat().st_mtime_ns != stamps[seed0 / f"{unit}.json"], unit


def test_bench_config_quick_and_errors():
    q = BenchConfig(quick=True)
    assert q.seeds == 1 and q.splits == ["builtin-hard:addition", "builtin-align:json"] and q.pool_size <= 160
    assert q.heads_splits == ["builtin-hard:addition"] and len(q.lr_qkvo) == 1
    assert q.trained_selectors == ["p2d", "tfidf", "random", "shape_tfidf"] and "answer_shape" in q.selectors
    assert q.training_draws <= q.random_head_draws and q.choice_splits == []
    rc = BenchConfig().run_config("builtin-hard:dates", 3)
    assert rc.pool == "builtin-hard" and rc.target == "dates" and rc.seed == 3 and rc.pool_size == 400
    with pytest.raises(UserError, match="splits"):
        BenchConfig(splits=["nope:x"])
    with pytest.raises(UserError, match="lr_qkvo"):
        BenchConfig(lr_qkvo=["fast"])
    with pytest.raises(UserError, match="probe and eval"):
        BenchConfig(pool="p.jsonl")


@pytest.mark.slow
def test_component_figures(tiny_llama, tmp_path):
    from p2d.bench.components import component_figures, components_markdown
    from p2d.bench.split import Split
    from p2d.manifest import EntryFiles

    cfg = _cfg(tiny_llama.spec, tmp_path)
    split = Split(cfg, "builtin-hard:addition", 0, EntryFiles(tmp_path), lm=tiny_llama)
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    c = component_figures(tiny_llama, split, cfg, [[1, 0], [3, 2]])
    assert c["plain_forward_pool_s"] > 0 and set(c["selection"]) >= {"activation", "alignment", "random", "tfidf"}
    steps = c["steps_same_batch"]
    assert steps["heads"]["trainable_params"] < steps["full"]["trainable_params"]
    assert [r["share"] for r in c["head_share"]] == [0.05, 0.1, 0.3, 1.0] and [r["tokens"] for r in c["length"]] == [64]
    assert c["profile_head_step"] and "| heads |" in components_markdown(c)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.model.state_dict().items())


@pytest.mark.slow
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


@pytest.mark.slow
def test_select_quality_script_runs_on_the_library(tiny_llama_dir, tmp_path):
    """bench/select_quality.py (the selection study the defaults' comments cite) on a tiny model: every head
    set x score pair, with the random draws of `p2d.cells.random_heads`, in the JSON bench/choose_defaults.py reads."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("select_quality", root / "bench" / "select_quality.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["select_quality"] = script
    spec.loader.exec_module(script)
    res = script.main(["--model", tiny_llama_dir, "--pool-size", "40", "--probe-size", "8", "--max-length", "64",
                       "--batch-size", "8", "--random-draws", "2", "--alignment-positions", "all",
                       "--json", str(tmp_path / "addition.json")])
    summary = {(r["heads"], r["head_positions"], r["select"], r["positions"]): r for r in res["summary"]}
    assert summary[("random", "-", "activation", "all")]["n"] == 2
    assert ("gradient_logratio", "content", "activation_length_z", "content") in summary
    assert ("gradient", "all", "prefilter_alignment", "all") in summary
    assert ("gradient", "content", "alignment", "content") not in summary  # no gate gradients at content positions
    assert all(0 <= r["precision"] <= 1 for r in res["rows"]) and json.loads((tmp_path / "addition.json").read_text())["total_s"]


def test_code_version_of_a_checkout_and_of_a_copy(tmp_path):
    """The commit and dirty flag of the checkout that runs; None for both outside a git checkout."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import p2d

    here = Path(p2d.__file__).resolve().parent
    head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True)
    code = code_version()
    if head.returncode == 0:
        assert code["commit"] == head.stdout.strip() and isinstance(code["dirty"], bool)
    shutil.copytree(here, tmp_path / "p2d", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import p2d.bench.benchmark as b; print(b.code_version())"],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'commit': None, 'dirty': None}"


def _outcome(strict_by_split, cpu, adapter="qkvo", heads="p2d", rows="p2d", seeds=(100, 101)):
    return {sp: {s: {"strict": list(v), "cpu_s": cpu, "adapter": adapter, "heads": heads, "rows": rows}
                 for s in seeds} for sp, v in strict_by_split.items()}


def test_rule_judged_by_training_takes_the_worst_split_and_the_cheapest_of_the_tied():
    from p2d.bench.choose import judge_outcomes

    n = 40
    rows = lambda k: [1.0] * k + [0.0] * (n - k)  # noqa: E731  k of n held-out rows right
    outcomes = {
        "A": _outcome({"s1": rows(40), "s2": rows(0)}, cpu=1.0),            # perfect on one split, nothing on the other
        "B": _outcome({"s1": rows(32), "s2": rows(31)}, cpu=50.0),          # the best worst split
        "C": _outcome({"s1": rows(30), "s2": rows(29)}, cpu=5.0, rows="shape_tfidf"),  # overlaps B, cheaper
        "D": _outcome({"s1": rows(12), "s2": rows(10)}, cpu=0.5),           # cheapest, clearly worse
        "E": {**_outcome({"s1": rows(40)}, cpu=0.1), "s2": {100: {"strict": rows(40), "cpu_s": 0.1, "adapter": "qo",
                                                                   "heads": "p2d", "rows": "tfidf"}}},  # one seed short
    }
    d = judge_outcomes(outcomes, draws=500, aggregate="worst split")
    by = {r["candidate"]: r for r in d["table"]}
    assert set(by) == {"A", "B", "C", "D"}  # E is measured on fewer seeds: not ranked
    assert by["A"]["score"] == 0.0 and by["A"]["worst_split"] == "s2"
    assert by["B"]["score"] == pytest.approx(31 / 40) and d["best"] == "B"
    assert set(d["tied"]) == {"B", "C"} and d["winner"]["candidate"] == "C"
    assert by["C"]["ci95"][0] < by["C"]["score"] < by["C"]["ci95"][1]
    assert judge_outcomes({}) is None


def test_the_second_rule_drops_a_split_where_nothing_beats_the_untrained_model():
    """One split at the floor for everyone ties every candidate under the first rule (worst split); the
    second (worst informative split) judges by the splits where some candidate beats the untrained model."""
    from p2d.bench.choose import judge_outcomes

    n = 40
    rows = lambda k: [1.0] * k + [0.0] * (n - k)  # noqa: E731
    outcomes = {
        "A": _outcome({"floor": rows(0), "s2": rows(30)}, cpu=50.0),
        "B": _outcome({"floor": rows(1), "s2": rows(5)}, cpu=1.0),
    }
    floors = {"floor": {100: rows(0), 101: rows(0)}, "s2": {100: rows(0), 101: rows(0)}}
    first = judge_outcomes(outcomes, draws=500, aggregate="worst split", floors=floors)
    assert set(first["tied"]) == {"A", "B"} and first["winner"]["candidate"] == "B"  # a cost rule
    second = judge_outcomes(outcomes, draws=500, floors=floors)
    assert second["aggregate"] == "worst informative split" and second["informative"] == ["s2"]
    assert second["winner"]["candidate"] == "A" and second["tied"] == ["A"]
    assert second["floors"] == {"floor": 0.0, "s2": 0.0}
    # the untrained model already as good as every candidate: no informative split, no winner
    none = judge_outcomes(outcomes, draws=500, floors={sp: {100: rows(30), 101: rows(30)} for sp in floors})
    assert none["winner"] is None and none["informative"] == [] and "no split is informative" in none["undecided"]
    missing = judge_outcomes(outcomes, draws=500, floors={"s2": floors["s2"]})
    assert missing["winner"] is None and "floor" in missing["undecided"]
    from p2d.bench.choose import rule_markdown

    assert "**No winner**" in rule_markdown({**none, "candidates": 2})
    assert "Informative splits" in rule_markdown({**second, "candidates": 2})


def test_rule_candidates_are_frozen_and_its_seeds_never_report():
    from p2d.bench.choose import RULE_CANDIDATES, RULE_ROWS
    from p2d.bench.config import DEFAULT_PARTS

    assert {"answer_shape", "shape_tfidf", "tfidf", "random", "p2d"} == set(RULE_ROWS)
    assert len(RULE_CANDIDATES) == len(set(RULE_CANDIDATES)) == 5 * 3 + 2 * 2 + 2 * 2 and "rule" in DEFAULT_PARTS
    assert {h for h, _, _ in RULE_CANDIDATES} == {"p2d", "lofit", "p2d@upper", "p2d@lower"}
    assert BenchConfig().rule_seeds == 2
    with pytest.raises(UserError, match="overlap the reporting seeds"):
        BenchConfig(choice_seed=1)


def test_windowed_head_names():
    from p2d.bench.choose import head_method_of, parse_windowed

    assert parse_windowed("gradient_logratio@upper", 30) == ("gradient_logratio", [15, 29])
    assert parse_windowed("lofit@lower", 30) == ("lofit", [0, 14])
    assert parse_windowed("importance@3-7", 30) == ("importance", [3, 7])
    for bad in ("p2d@middle", "p2d@7", "p2d@5-40"):
        with pytest.raises(UserError):
            parse_windowed(bad, 30)
    cfg = BenchConfig()
    assert head_method_of("p2d@upper", cfg) == f"{cfg.head_method}@upper" and head_method_of("lofit", cfg) == "lofit"


@pytest.mark.slow
def test_rule_cells_are_judged_on_held_out_probe_rows(tiny_llama_dir, tmp_path):
    """The rule trains its candidates at two choice seeds through the benchmark's cells, scores them on the
    other seed's probe rows (never eval rows), and the report says what it chose."""
    from p2d.bench.benchmark import Bench
    from p2d.bench.choose import held_out_rows, judged_rule, rule_cells

    out = tmp_path / "bench"
    cfg = _cfg(tiny_llama_dir, out, parts=["sweep"], seeds=1, lr_qkvo=["1e-3"])
    bench = Bench(cfg)
    from p2d.models import load_model

    bench.lm = load_model(tiny_llama_dir, device="cpu")
    split = "builtin-hard:addition"
    candidates = [("p2d", "p2d", "qkvo"), ("p2d", "shape_tfidf", "qkvo"), ("lofit", "random", "offset"),
                  ("p2d@upper", "p2d", "qkvo")]
    rule_cells(bench, split, {"qkvo-p2d": 1e-3, "offset-p2d": 1e-2}, candidates=candidates)
    a, b = bench.split_at(split, 100), bench.split_at(split, 101)
    judge = held_out_rows(a, b)
    key = lambda s: (tuple(t["content"] for t in s.prompt), s.answer)  # noqa: E731
    assert judge and not {key(s) for s in judge} & {key(s) for s in a.pool + a.probe}
    unit = bench.units.get(("builtin-hard-addition", "seed100", "cell-p2d-qkvo-shape_tfidf-judged"))
    assert unit["result"]["n"] == len(judge) != len(a.eval) and unit["settings"]["judged_on"]
    assert unit["result"]["other_tasks"] == {} and unit["code"] == code_version()
    # the window candidate: P2D's heads re-picked in the upper half, trained on their own selection
    n = bench.lm.geometry.n_layers
    win = bench.units.get(("builtin-hard-addition", "seed100", "heads-gradient_logratio@upper"))["result"]
    assert win["layer_window"] == [n // 2, n - 1] and all(layer >= n // 2 for layer, _ in win["selected"])
    assert bench.units.get(("builtin-hard-addition", "seed101", "select-p2d@upper"))["result"]["cpu_s"] > 0
    assert bench.units.get(("builtin-hard-addition", "seed100", "cell-p2d@upper-qkvo-p2d-judged"))
    base = bench.units.get(("builtin-hard-addition", "seed100", "base-judged"))["result"]
    assert base["n"] == len(judge)  # the untrained model on the same held-out rows: the split's floor
    d = judged_rule(bench, candidates)
    assert d["splits"] == [split] and len(d["table"]) == 4
    assert d["aggregate"] == "worst informative split" and split in d["floors"]
    assert d["winner"] is None or d["winner"]["candidate"] in d["tied"]
    assert d["seeds"] == {split: [100, 101]}
