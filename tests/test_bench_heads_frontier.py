"""The benchmark's heads test (one learning-rate grid for every head set, matched random heads) and its
frontier (equal-accuracy AER on full fine-tuning's dense curve), on tiny random Llama configs."""

import json

import pytest

from p2d.bench.benchmark import run_bench
from p2d.bench.config import BenchConfig
from p2d.bench.frontier import cheapest_reaching, dense_steps, equal_accuracy_aer
from p2d.bench.heads_test import shared_grid
from p2d.cells import matched_heads, random_heads


def _layers_and_groups(geo, heads):
    layers, groups = {}, {}
    for layer, h in heads:
        layers[layer] = layers.get(layer, 0) + 1
        groups.setdefault(layer, set()).add(geo.kv_head(h))
    return layers, {k: len(v) for k, v in groups.items()}


def test_shared_grid_spans_every_winner_with_three_points():
    assert shared_grid(["3e-4", "1e-3", "3e-3"], [3e-4, 1e-3]) == [3e-4, 1e-3, 3e-3]
    g = shared_grid(["1e-3"], [1e-4, 1e-2])  # winners outside the sweep grid are in the test's grid
    assert g == [1e-4, 1e-3, 1e-2]
    g = shared_grid(["1e-3"], [], points=3)  # widened x3.16 both ways
    assert len(g) == 3 and g[0] < 1e-3 < g[-1] and g[-1] / g[0] == pytest.approx(10, rel=1e-3)
    g = shared_grid(["3e-3"], [1e-3], points=4)
    assert len(g) == 4 and min(g) <= 1e-3 and max(g) >= 3e-3


def test_matched_heads_match_layers_and_kv_groups(tiny_llama):
    geo = tiny_llama.geometry  # 4 layers, 4 query heads, 2 kv groups of 2
    refs = [random_heads(tiny_llama, 0.5, seed=s).selected for s in range(4)]
    refs.append([[0, 0], [0, 1], [3, 2]])  # two heads in one kv group of layer 0, one head of layer 3
    for ref in refs:
        want = _layers_and_groups(geo, ref)
        draws = [matched_heads(tiny_llama, ref, seed=1, draw=d) for d in range(6)]
        for hs in draws:
            assert _layers_and_groups(geo, hs.selected) == want and len(hs.selected) == len(ref)
            assert len({tuple(x) for x in hs.selected}) == len(ref)
        assert len({tuple(sorted(map(tuple, hs.selected))) for hs in draws}) > 1  # draws differ
        again = matched_heads(tiny_llama, ref, seed=1, draw=2)
        assert again.selected == draws[2].selected  # seeded
    # every kv group touched once in layer 0: the draw keeps one head per group, never two in one
    one_per_group = [[0, 0], [0, 2]]
    for d in range(5):
        sel = matched_heads(tiny_llama, one_per_group, seed=0, draw=d).selected
        assert sorted(geo.kv_head(h) for _, h in sel) == [0, 1]


def test_equal_accuracy_aer_interpolates_the_curve():
    curve = [{"train_s": 0.0, "accuracy": 0.1}, {"train_s": 10.0, "accuracy": 0.3}, {"train_s": 20.0, "accuracy": 0.5}]
    r = equal_accuracy_aer(3.0, curve, 0.4, 0.1)
    assert r["reached"] and r["time_to_reach"] == pytest.approx(15.0) and r["aer"] == pytest.approx(0.2)
    r = equal_accuracy_aer(3.0, curve, 0.3, 0.1)
    assert r["time_to_reach"] == pytest.approx(10.0) and r["aer"] == pytest.approx(0.3)
    assert equal_accuracy_aer(3.0, curve, 0.6, 0.1) == {"time_to_reach": None, "aer": None, "reached": False}
    base = equal_accuracy_aer(3.0, curve, 0.05, 0.1)  # the base model is already there: no finite AER
    assert base["reached"] and base["time_to_reach"] == 0.0 and base["aer"] is None
    cpu = [{"cpu_s": 2 * p["train_s"], "accuracy": p["accuracy"]} for p in curve]
    assert equal_accuracy_aer(3.0, cpu, 0.4, 0.1, key="cpu_s")["aer"] == pytest.approx(0.1)


def test_cheapest_reaching_and_none_reaches():
    points = [{"selector": "a", "accuracy": 0.5, "cost_s": 10.0}, {"selector": "b", "accuracy": 0.7, "cost_s": 30.0},
              {"selector": "c", "accuracy": 0.8, "cost_s": 20.0}]
    assert cheapest_reaching(points, 0.7)["selector"] == "c"
    assert cheapest_reaching(points, 0.45)["selector"] == "a"
    assert cheapest_reaching(points, 0.9) is None
    assert cheapest_reaching(points, None) is None


def test_dense_steps_cover_the_first_epoch_and_the_end():
    steps = dense_steps(30, 3.0, 2, 3)  # 10 steps per epoch
    assert [s for s in steps if s <= 10] == [2, 4, 6, 8, 10] and steps[-1] == 30 and 20 in steps
    assert dense_steps(30, 3.0, 0, 1)[:3] == [1, 2, 3]  # about ten points over the first epoch


@pytest.mark.slow
def test_heads_test_and_frontier_run_on_a_tiny_model(tiny_llama_dir, tmp_path):
    out = tmp_path / "bench"
    cfg = BenchConfig(model=tiny_llama_dir, device="cpu", splits=["builtin-hard:addition"], choice_splits=["builtin:dates"],
                      heads_splits=["builtin-hard:addition"], seeds=1, pool_size=32, probe_size=6, eval_size=4,
                      other_eval_size=1, max_length=48, batch_size=4, head_method="gradient_logratio",
                      head_ratio=0.25, data_ratio=0.125, epochs=2, lr_qkvo=["1e-3"], lr_qo=["1e-3"],
                      lr_offset=["1e-2"], lr_lora=["1e-3"], lr_full=["1e-4"], random_head_draws=1, test_draws=1,
                      matched_draws=2, curve_points=2, frontier_every=1, bootstrap=100, head_candidates=["gradient"],
                      selectors=["p2d", "random"], trained_selectors=["p2d", "random"], adapters=["qkvo"],
                      parts=["heads_test", "frontier"], out=str(out))
    res = run_bench(cfg)
    assert res["complete"], res["skipped"]
    s = json.loads((out / "results.json").read_text())["splits"]["builtin-hard:addition"]
    h = s["heads_test"]["adapters"]["qkvo"]
    assert len(h["rates"]) == 3 and h["rates"][1] == pytest.approx(1e-3)
    assert set(h["kinds"]) == {"p2d", "gradient", "random", "matched"} and h["kinds"]["matched"]["n_sets"] == 2
    for kind, v in h["kinds"].items():  # every kind trained at every rate of the one grid, best rate off probe rows
        assert [p["lr"] for p in v["at"]] == h["rates"] and all(p["accuracy"] is not None for p in v["at"]), kind
        assert v["best_lr"] in h["rates"] and v["chosen_on"] == "choice seed"
    vs = h["vs_null"]
    assert vs["p2d"]["random"]["strict"]["n_draws"] == 1 and vs["p2d"]["matched"]["strict"]["n_draws"] == 2
    assert set(vs) == {"p2d", "gradient"} and vs["gradient"]["matched"]["row_loss"] is not None
    units = out / "units" / "builtin-hard-addition"
    for seed in ("seed0", "seed100"):
        names = {p.stem for p in (units / seed).glob("cell-*@lr*.json")}
        assert len(names) == 5 * 3, names  # p2d, gradient, random0, matched0, matched1 at three rates
    null = s["heads_test"]["null"]
    assert null["matched_all_match"] is True and null["by_kind"]["random"]["activation"]["n"] == 1
    f = s["frontier"]
    assert {(p["selector"], p["adapter"]) for p in f["points"]} == {(a, b) for a in ("p2d", "random")
                                                                    for b in ("qkvo", "lora", "full")}
    curve = f["curves"]["0"] if "0" in f["curves"] else f["curves"][0]
    assert curve[0]["train_s"] == 0.0 and [p["train_s"] for p in curve] == sorted(p["train_s"] for p in curve)
    assert len(curve) >= 1 + 4  # base, every step of the first epoch (4 rows a step: >= 4 steps), the end
    assert all(p["with_curve"] == 1 for p in f["points"])
    md = (out / "results.md").read_text()
    assert "Heads test" in md and "Frontier" in md and (out / "frontier-builtin-hard-addition.svg").exists()
    assert ("Cheapest configuration" in md) != ("No configuration reaches" in md)
    svg = (out / "frontier-builtin-hard-addition.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") == len(f["points"])
