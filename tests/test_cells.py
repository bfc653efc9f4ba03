"""The comparison cell (p2d.cells), the validity rule (p2d.manifest), the strict forced evaluation, the
benchmark's statistics and the equal-accuracy reading of a learning curve, on tiny real models."""

import json
import random

import pytest
import torch

from p2d.adapter import ADAPTERS, adapter_name, parse_adapter
from p2d.cells import CELLS, Cell, cell_aer, cell_cost, evaluate_cell, random_heads, random_rows, train_cell
from p2d.config import RunConfig
from p2d.cost import time_to_reach
from p2d.data.formats import Sample
from p2d.data.loading import load_records
from p2d.evaluation import forced_eval, generate_answers
from p2d.manifest import EntryFiles, Manifest, content_digest, is_valid, make_entry
from p2d.training import TrainConfig


def _say(words):
    return [Sample(prompt=[{"role": "user", "content": f"Say {w}."}], answer=w, task="say", row={}, index=i)
            for i, w in enumerate(words)]


@pytest.mark.slow
def test_forced_strict_match_is_greedy_generation(tiny_llama, tmp_path):
    """After training the tiny model to answer "yes"/"no", the strict forced match of a row is True exactly
    when greedy generation reproduces the gold answer's tokens and stops."""
    lm = tiny_llama
    data = _say(["yes", "no"] * 4)
    with train_cell(Cell("full", "all"), lm, data, TrainConfig(steps=60, lr=1e-2, batch_size=8, max_length=32),
                    tmp_path) as (trained, res):
        rows = _say(["yes", "no", "maybe", "yes no"])
        fe = forced_eval(trained, rows, batch_size=3, max_length=32)
        gen = generate_answers(trained, rows, max_new_tokens=6, max_length=32)
    assert fe.strict[:2] == [True, True] and fe.strict[2:] == [False, False], (fe.strict, gen)
    assert [g == r.answer for g, r in zip(gen, rows)] == fe.strict
    assert fe.accuracy == 0.5 and fe.loss[0] < fe.loss[2]
    d = fe.to_dict()
    assert d["strict"] == [1, 1, 0, 0] and len(d["row_loss"]) == 4


def test_cells_train_what_they_say(tiny_llama, tmp_path):
    lm = tiny_llama
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    data = _say(["yes", "no"] * 4)
    tc = TrainConfig(steps=3, lr=1e-3, batch_size=4, max_length=32)
    heads = [[1, 0], [3, 2]]
    params = {}
    for adapter in ADAPTERS:
        with train_cell(Cell("heads", "p2d", "p2d", adapter), lm, data, tc, tmp_path / adapter, heads=heads) as (m, r):
            assert m is lm and r.steps == 3
            params[adapter] = (r.trainable_params, r.query_heads_changed)
    d = lm.geometry.head_dim
    assert params["offset"] == (2 * 2 * d, 2) and params["qo"][1] == 2
    assert params["qkvo"][1] == 2 * lm.geometry.group_size and params["qkvo"][0] > params["qo"][0]
    with train_cell(CELLS["lora-p2d"], lm, data, tc, tmp_path / "lora") as (m, r):
        assert m is not lm and r.trainable_params < 50_000
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # the base is untouched
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in lm.model.modules())
    assert Cell("heads", "p2d", "p2d").train_config(tc) == tc  # no adapter: the training settings decide
    assert Cell("heads", "p2d", "p2d", "qo").train_config(tc).projections == ("q", "o")
    with pytest.raises(ValueError):
        Cell("heads", "p2d", adapter="lora")
    # one vocabulary: an adapter's name is its kind and projections (the settings' and adapter_config.json's)
    assert all(adapter_name(*parse_adapter(name)) == name for name in ADAPTERS)
    assert parse_adapter("heads") == ("heads", ("q", "k", "v", "o")) and adapter_name("heads", ["v", "q"]) == "qv"
    assert Cell("heads", "p2d", "p2d", "vq").train_config(tc).projections == ("q", "v")
    assert RunConfig(projections="q,o").adapter_name == "qo" and RunConfig(adapter="offset").adapter_name == "offset"
    assert cell_cost(10.0, 2.0, 3.0) == 15.0
    assert cell_aer(15.0, 30.0) == 0.5 and cell_aer(15.0, None) is None and cell_aer(15.0, 0.0) is None


def test_controls_and_the_benchmark_draw_alike(tiny_llama):
    """One draw rule: a run's random-data and random-heads controls at seed s are the benchmark's random
    rows and its head set ``random0`` at seed s (`random_rows`, `random_heads`)."""
    rows = random_rows(100, 10, 3)
    assert rows == sorted(rows) and len(set(rows)) == 10 and rows == random_rows(100, 10, 3) != random_rows(100, 10, 4)
    assert random_rows(5, 10, 0) == [0, 1, 2, 3, 4]  # never more than the pool
    first, again, second = (random_heads(tiny_llama, 0.25, 3), random_heads(tiny_llama, 0.25, 3, draw=0),
                            random_heads(tiny_llama, 0.25, 3, draw=1))
    assert first.selected == again.selected and len(first.selected) == 4 and first.method == "random"
    assert (first.extra["seed"], second.extra["seed"]) == (30_001, 30_002)


def test_evaluate_cell_forced_and_generated(tiny_llama):
    rows = load_records([{"question": f"What is {i}+1?", "answer": str(i + 1), "task": "add"} for i in range(4)]).samples
    other = load_records([{"question": "Hi?", "answer": "hello", "task": "chat"}]).samples
    gen = evaluate_cell(tiny_llama, rows, other, batch_size=2, max_new_tokens=3)
    forced = evaluate_cell(tiny_llama, rows, other, batch_size=2, forced=True)
    assert gen.metric == "exact_match" and forced.metric == "strict" and set(forced.other_tasks) == {"chat"}
    assert forced.accuracy == 0.0 and len(forced.per_row["strict"]) == 4
    assert forced.loss == pytest.approx(sum(forced.per_row["loss"]) / 4, rel=1e-4)


def test_manifest_validity(tmp_path):
    e = make_entry({"a": (1, 2)}, {"heads": "d1"}, content_digest([1]))
    assert is_valid(e, {"a": [1, 2]}, {"heads": "d1"})  # tuples and lists compare as JSON
    assert not is_valid(e, {"a": [1, 3]}, {"heads": "d1"})
    assert not is_valid(e, {"a": [1, 2]}, {"heads": "d2"}) and not is_valid(e, {"a": [1, 2]}, {"heads": None})
    assert not is_valid({**e, "partial": True}, {"a": [1, 2]}, {"heads": "d1"}) and not is_valid(None, {}, {})
    m = Manifest(tmp_path / "stages.json")
    m.put("heads", e)
    assert Manifest.read(tmp_path / "stages.json").get("heads") == json.loads(json.dumps(e))
    assert m.drop("heads") and not m.drop("heads")
    files = EntryFiles(tmp_path / "units")
    files.put(("x", "seed0", "base"), {"s": 1}, {}, {"accuracy": 0.5})
    assert files.valid(("x", "seed0", "base"), {"s": 1}, {})["result"] == {"accuracy": 0.5}
    assert files.valid(("x", "seed0", "base"), {"s": 2}, {}) is None


def test_time_to_reach_starts_at_the_base_model():
    curve = [{"train_s": 10, "accuracy": 0.4}, {"train_s": 20, "accuracy": 0.5}, {"train_s": 30, "accuracy": 0.6}]
    assert time_to_reach(curve, 0.2, base_accuracy=0.0) == pytest.approx(5)  # between (0 s, 0%) and (10 s, 40%)
    assert time_to_reach(curve, 0.55, 0.0) == pytest.approx(25)
    assert time_to_reach(curve, 0.1, base_accuracy=0.1) == 0.0 and time_to_reach(curve, 0.9, 0.0) is None
    assert time_to_reach([{"train_s": 5, "accuracy": 0.5}, {"train_s": 9, "accuracy": 0.3}], 0.4, 0.3) == pytest.approx(2.5)


def test_bootstrap_intervals_and_null_ranks():
    from p2d.bench.stats import null_comparison, paired_difference, proportion_mde

    rng = random.Random(1)
    a = {s: [int(rng.random() < 0.7) for _ in range(300)] for s in range(3)}
    b = {s: [int(rng.random() < 0.4) for _ in range(300)] for s in range(3)}
    d = paired_difference(a, b, draws=500)
    lo, hi = d["ci95"]
    assert lo < d["estimate"] < hi and lo > 0.15 and hi < 0.45 and d["n_seeds"] == 3 and d["n_rows"] == 300
    assert 0.03 < d["mde"] < 0.12 and abs(d["mde"] - proportion_mde(300, 3)) < 0.05
    same = paired_difference(a, a, draws=200)
    assert same["estimate"] == 0 and same["ci95"] == [0.0, 0.0]
    draws = {s: [[int(rng.random() < 0.4) for _ in range(300)] for _ in range(10)] for s in range(3)}
    n = null_comparison(a, draws, draws=300)
    assert n["ci95"][0] > 0.15 and n["share_of_draws_at_or_above"] == 0 and n["n_draws"] == 30
    worse = null_comparison(b, {s: [a[s]] * 3 for s in a}, draws=200)
    assert worse["share_of_draws_at_or_above"] == 1 and worse["ci95"][1] < 0
    assert paired_difference({0: None}, {0: [1]}) is None


def test_peak_memory_sees_allocations_that_reuse_freed_heap():
    """A block that allocates a known size reads at least that size, also after earlier tensors were freed into
    the C heap (the no-gradient passes read 0-1 MB before PeakMemory released the free heap pages at entry)."""
    import time

    from p2d.cells import PeakMemory

    t = torch.ones(7_500_000)  # a 30 MB block freed: glibc's mmap threshold rises, so 8 MB tensors go to its heap
    del t
    chunks = [torch.ones(2_000_000) for _ in range(50)]  # 400 MB of 8 MB tensors
    keep = torch.ones(10)  # noqa: F841 - a live chunk above them, so the heap cannot shrink on free
    del chunks
    size_mb = 25 * 2_000_000 * 4 / 2 ** 20  # 191 MB
    with PeakMemory(torch.device("cpu")) as mem:
        live = [torch.ones(2_000_000) for _ in range(25)]
        time.sleep(0.1)  # the sampler reads every 20 ms
        del live
    assert mem.peak_mb >= 0.95 * size_mb
