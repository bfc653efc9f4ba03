"""The builtin-hard pools: the target skill only in other wordings, lexical twins of the probe's
template, shares, disjoint items, correct answers; and a selector that only reads words is misled
(the property the pools exist for), while it finds the target on the plain pool."""

import collections
import datetime as dt
import re

import pytest

from p2d.config import RunConfig
from p2d.data.builtin import build_task_pool
from p2d.data.builtin_hard import HARD_POOL, HARD_TARGETS, TWIN_SUFFIX, build_hard_pool, hard_target_info
from p2d.data.loading import load_records
from p2d.errors import UserError
from p2d.method.selection import select_data
from p2d.method.selection_baselines import tfidf_scores


def _template(text: str) -> str:
    """The words of a prompt with its numbers and content words of the item masked (a template key)."""
    return re.sub(r"\d+", "#", text)


@pytest.fixture(scope="module", params=HARD_TARGETS)
def pool(request):
    return build_hard_pool(request.param, seed=0, pool_size=400, probe_size=32, eval_size=100, other_eval_size=2)


def test_shares_wordings_and_twins(pool):
    t = pool.target
    counts = collections.Counter(r["task"] for r in pool.pool)
    assert len(pool.pool) == 400 and counts[t] == 50 and counts[t + TWIN_SUFFIX] == 50
    assert len({r["task"] for r in pool.pool}) >= 6  # plus distractors of other tasks
    probe_wordings = {r["wording"] for r in pool.probe + pool.eval}
    target_wordings = {r["wording"] for r in pool.pool if r["task"] == t}
    assert probe_wordings == {"probe"} and "probe" not in target_wordings and len(target_wordings) >= 4
    # the pool never holds the probe's wording of the target skill
    probe_keys = {_template(r["instruction"]) for r in pool.probe}
    assert not any(_template(r["instruction"]) in probe_keys for r in pool.pool if r["task"] == t)
    # twins read like the probe (its template and text: closer in words than the target's other wordings)
    samples = load_records(pool.pool).samples
    sim = tfidf_scores(samples, load_records(pool.probe).samples)
    mean = lambda task: sum(v for v, x in zip(sim, samples) if x.task == task) / 50  # noqa: E731
    assert mean(t + TWIN_SUFFIX) > 1.3 * mean(t), (mean(t + TWIN_SUFFIX), mean(t))
    assert len({r["wording"] for r in pool.pool if r["task"] == t + TWIN_SUFFIX}) == 3


def test_items_never_shared_between_eval_probe_and_pool(pool):
    def item(r):
        return tuple(sorted(re.findall(r"[A-Za-z]+ \d+|\d+|[a-z]{3,}", r["instruction"] + " " + r["input"])))

    evals = {(r["instruction"], r["input"]) for r in pool.eval}
    probes = {(r["instruction"], r["input"]) for r in pool.probe}
    assert not evals & probes
    # the eval set does not depend on the seed or the other sizes
    t = pool.target
    again = build_hard_pool(t, seed=5, pool_size=200, probe_size=10, eval_size=100)
    assert [r["output"] for r in again.eval] == [r["output"] for r in pool.eval]
    assert build_hard_pool(t, seed=0, pool_size=400, probe_size=32, eval_size=100, other_eval_size=2).pool == pool.pool


def test_answers_are_right():
    add = build_hard_pool("addition", pool_size=200, probe_size=8, eval_size=20)
    for r in add.probe + [r for r in add.pool if r["task"] == "addition"]:
        nums = [int(x) for x in re.findall(r"\d+", r["instruction"] + " " + r["input"])]
        assert int(r["output"]) == sum(nums[:2])
    for r in [r for r in add.pool if r["task"] == "addition_twin"]:
        a, b = [int(x) for x in re.findall(r"\d+", r["instruction"])][:2]
        assert int(r["output"]) in (max(a, b), a, a - b)
    alpha = build_hard_pool("alphabetical", pool_size=200, probe_size=8, eval_size=20)
    for r in alpha.probe:
        words = r["instruction"].split(": ")[1].split("?")[0].split(", ")
        assert r["output"] == min(words)
    dates = build_hard_pool("dates", pool_size=200, probe_size=8, eval_size=20)
    for r in dates.probe:
        m = re.search(r"day (after|before) (\w+) (\d+)", r["instruction"])
        day = dt.datetime.strptime(f"{m.group(2)} {m.group(3)} 2023", "%B %d %Y").date()
        want = day + dt.timedelta(days=1 if m.group(1) == "after" else -1)
        assert r["output"] == f"{want:%B} {want.day}"
    past = build_hard_pool("past_tense", pool_size=200, probe_size=8, eval_size=20)
    for r in past.probe:
        before = r["instruction"].split(": ", 1)[1]
        assert r["output"] != before and len(r["output"].split()) == len(before.split())
    assert any(r["output"].endswith("went to bed early.") or " went " in r["output"] for r in
               build_hard_pool("past_tense", pool_size=200, probe_size=200, eval_size=20).probe)


def test_errors_and_config():
    with pytest.raises(UserError, match="unknown target"):
        build_hard_pool("capitals")
    with pytest.raises(UserError, match="eval_size"):
        build_hard_pool("dates", eval_size=10_000)
    cfg = RunConfig(pool="Builtin-Hard", target="past_tense").validate()
    assert cfg.pool == HARD_POOL and cfg.builtin_pool == HARD_POOL
    assert RunConfig(pool="builtin").pool is None and RunConfig().validate().builtin_pool == "builtin"
    with pytest.raises(UserError, match="not a task of the builtin-hard pool"):
        RunConfig(pool="builtin-hard", target="capitals").validate()
    with pytest.raises(UserError, match="not a task of the builtin pool"):
        RunConfig(target="past_tense").validate()
    info = hard_target_info()
    assert set(info) == set(HARD_TARGETS) and {v["answer_type"] for v in info.values()} == {
        "number", "one word", "short phrase", "sentence"}


def test_surface_words_mislead_here_and_not_on_the_plain_pool():
    """TF-IDF of the prompt finds the target on the plain pool (one template per task) and picks twins here."""
    for target in ("addition", "dates"):
        plain = build_task_pool(target, seed=0, pool_size=400, probe_size=32, eval_size=0)
        hard = build_hard_pool(target, seed=0, pool_size=400, probe_size=32, eval_size=100)
        for tp, want_target in ((plain, True), (hard, False)):
            pool, probe = load_records(tp.pool).samples, load_records(tp.probe).samples
            sel = select_data(None, None, pool, method="tfidf", ratio=0.1, probe=probe)
            tasks = [pool[i].task for i in sel.selected]
            share = sum(t == target for t in tasks) / len(tasks)
            if want_target:
                assert share >= 0.9, (target, share)
            else:
                assert share <= 0.2 and sum(t == target + TWIN_SUFFIX for t in tasks) / len(tasks) >= 0.5, tasks


def test_demo_data_writes_the_hard_pool(tmp_path, capsys):
    import json

    from p2d.cli import main

    assert main(["demo-data", "--pool", "builtin-hard", "--target", "alphabetical", "--pool-size", "80",
                 "--probe-size", "8", "--eval-size", "10", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pool_tasks"]["alphabetical"] == 10 and out["pool_tasks"]["alphabetical_twin"] == 10
    rows = [json.loads(x) for x in (tmp_path / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and all("wording" in r for r in rows)
    assert main(["demo-data", "--pool", "builtin-hard", "--target", "capitals", "--out", str(tmp_path)]) == 2
