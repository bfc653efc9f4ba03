"""Comparing head maps (p2d.explore) and its command."""

import json
import math

import pytest

from p2d.cli import main
from p2d.errors import UserError
from p2d.explore import compare_head_maps, rank_percentiles, spearman
from p2d.method.heads import HeadScores, select_top


def _map(scores, ratio=0.25, method="gradient"):
    return HeadScores(method=method, ratio=ratio, scores=scores, selected=select_top(scores, ratio), time_s=0.0,
                      model="m")


def test_rank_percentiles_ties_and_nan():
    assert rank_percentiles([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert rank_percentiles([1.0, 1.0, 5.0]) == [0.25, 0.25, 1.0]
    assert rank_percentiles([float("nan"), 0.0, 1.0])[0] == 0.0  # NaN ranks last, as in select_top


def test_spearman_is_scale_free():
    a = [0.1, 0.5, 0.2, 0.9]
    assert spearman(a, [10 * x + 3 for x in a]) == pytest.approx(1.0)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    assert spearman(a, [1.0] * 4) is None


def test_compare_head_maps():
    a = _map([[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0]])  # selects (0,0), (0,1)
    b = _map([[40.0, 0.0, 0.0, 30.0], [0.0, 0.0, 20.0, 10.0]], method="taylor")  # selects (0,0), (0,3)
    out = compare_head_maps(a, b)
    assert out["shared"] == [[0, 0]] and out["only_a"] == [[0, 1]] and out["only_b"] == [[0, 3]]
    assert out["jaccard"] == pytest.approx(1 / 3)
    assert -1 <= out["spearman"] <= 1
    assert out["rank_difference"][0][0] == 0 and out["rank_difference"][0][1] > 0 > out["rank_difference"][0][3]
    same = compare_head_maps(a, _map([[x * 7 for x in row] for row in a.scores]))
    assert same["jaccard"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    assert all(v == 0 for row in same["rank_difference"] for v in row)
    with pytest.raises(UserError, match="do not match"):
        compare_head_maps(a, _map([[1.0, 2.0]]))


def test_compare_heads_command(tmp_path, capsys):
    a = _map([[4.0, 3.0, 0.0, math.nan], [0.0, 0.0, 2.0, 1.0]])
    a.save(tmp_path / "run-a")
    _map([[4.0, 0.0, 3.0, 0.0], [0.0, 0.0, 2.0, 1.0]]).save(tmp_path / "run-b")
    assert main(["compare-heads", str(tmp_path / "run-a"), str(tmp_path / "run-b" / "heads.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shared"] == [[0, 0]] and "rank_difference" not in out
    assert main(["compare-heads", str(tmp_path / "run-a"), str(tmp_path / "missing"), "--map"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: heads file not found") and len(err.splitlines()) == 1
