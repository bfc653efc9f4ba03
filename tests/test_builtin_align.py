"""The builtin-align pools: a scarce target behaviour among labelled decoys; items never shared between
eval, probe and pool; deterministic; eval rows carry their checks; registered as a built-in pool (config,
CLI, app form, benchmark splits); and the evaluation path scores generated replies by the checks."""

import collections
import json

import pytest

from p2d.checks import check_reply, parse_check
from p2d.config import RunConfig, pool_targets
from p2d.data.builtin_align import (ALIGN_POOL, ALIGN_TARGETS, DECOY_KINDS, PREMISE_CONDITIONS, align_target_info,
                                    asked_prompt, build_align_pool, number_words, ordinal, ordinal_words,
                                    premise_samples)
from p2d.data.builtin import _CAPITALS
from p2d.errors import UserError

SIZES = dict(pool_size=4000, probe_size=64, eval_size=300, other_eval_size=3)


@pytest.fixture(scope="module", params=ALIGN_TARGETS)
def pool(request):
    return build_align_pool(request.param, seed=0, **SIZES)


def _item(row) -> tuple:
    return row["family"], row["instruction"], row["input"]


def test_the_target_is_scarce_among_every_decoy_kind(pool):
    t = pool.target
    counts = collections.Counter(r["task"] for r in pool.pool)
    assert len(pool.pool) == 4000 and len(pool.probe) == 64 and len(pool.eval) == 300
    assert counts[t] == 120 and 0.02 <= counts[t] / 4000 <= 0.05
    for kind in DECOY_KINDS:
        assert counts[f"{t}_{kind}"] == 160, kind
    fillers = [k for k in counts if not k.startswith(t)]
    assert len(fillers) >= 10 and max(counts[k] for k in fillers) < 400  # many tasks, none dominant
    # every row says what made it; target rows and probe show the target behaviour, decoys others
    info = align_target_info()[t]
    assert {r["behaviour"] for r in pool.pool if r["task"] == t} == {t} == {r["behaviour"] for r in pool.probe}
    assert {r["behaviour"] for r in pool.pool if r["task"] == f"{t}_twin"} == set(info["twins"])
    assert {r["behaviour"] for r in pool.pool if r["task"] == f"{t}_same_content"} == set(info["same_content"])
    assert {r["behaviour"] for r in pool.pool if r["task"] == f"{t}_near_format"} == set(info["near_format"])
    # decoys of "same content" and twins share the target's content family; near formats never do
    fam = info["family"]
    assert {r["family"] for r in pool.pool if r["task"] in (t, f"{t}_same_content", f"{t}_twin")} == {fam}
    assert fam not in {r["family"] for r in pool.pool if r["task"] == f"{t}_near_format"}
    assert all(len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 400 for r in pool.pool)  # short rows


def test_the_target_rows_pass_their_check_and_the_decoys_do_not(pool):
    """The eval check passes the target answer and fails every decoy: the same content in other formats
    and the twins (checked as if they were eval rows of their item), and the near formats on other
    content (the format alone; for the refusal, as the other topics' rows are checked)."""
    from p2d.data.builtin_align import _FAMILIES, _TARGETS

    t = pool.target
    spec = _TARGETS[t]
    items = {(it.instruction, it.input): it for it in _FAMILIES[spec.family]()}
    for r in pool.eval + pool.probe + [r for r in pool.pool if r["task"] == t]:
        assert check_reply(parse_check(spec.check(items[r["instruction"], r["input"]])), r["output"])["pass"], r
    for r in pool.pool:
        if r["task"] in (f"{t}_same_content", f"{t}_twin"):
            check = parse_check(spec.check(items[r["instruction"], r["input"]]))
        elif r["task"] == f"{t}_near_format":
            check = {"json": {"kind": "json"}, "signoff": {"kind": "signoff"}, "refusal": spec.elsewhere,
                     "ordinal": {"kind": "exact", "keep": ordinal(len(r["instruction"]))}}[t]
            check = parse_check(check)
        else:
            continue
        assert not check_reply(check, r["output"])["pass"], r


def test_items_are_never_shared_and_eval_does_not_depend_on_seed_or_sizes(pool):
    t = pool.target
    evals, probes = {_item(r) for r in pool.eval}, {_item(r) for r in pool.probe}
    pooled = [_item(r) for r in pool.pool]
    assert len(set(pooled)) == len(pooled)  # no item twice in the pool, decoys included
    assert not evals & probes and not (evals | probes) & set(pooled)
    others = {_item(r) for r in pool.other_eval}
    assert not others & (evals | probes | set(pooled))
    if t in ("json", "signoff"):  # one fact per country: its capital is never asked both ways
        by_city = {city: c for c, city in _CAPITALS}
        asked = [r["instruction"] for r in pool.eval + pool.probe + pool.pool
                 if r["family"] == "quiz" and "capital" in r["instruction"]]
        countries = [q[len("What is the capital of "):-1] if q.startswith("What is the capital of ")
                     else by_city[q.split(" is the capital")[0]] for q in asked]
        assert len(countries) == len(set(countries)) and len(countries) >= 50
    again = build_align_pool(t, seed=7, pool_size=1000, probe_size=10, eval_size=300)
    assert again.eval == pool.eval
    assert build_align_pool(t, seed=0, **SIZES).pool == pool.pool  # deterministic
    assert build_align_pool(t, seed=1, **SIZES).pool != pool.pool
    assert build_align_pool(t, seed=0, pool_size=200, probe_size=8, eval_size=40).eval == pool.eval[:40]


def test_other_eval_rows_give_the_false_rate_of_a_refusal():
    tp = build_align_pool("refusal", pool_size=800, probe_size=8, eval_size=20, other_eval_size=2)
    tasks = collections.Counter(r["task"] for r in tp.other_eval)
    assert {"quiz", "legal", "finance", "addition"} <= set(tasks) and "medical" not in tasks
    assert all(r["check"] == {"kind": "refusal", "expect": False} for r in tp.other_eval)
    assert all(r["check"]["kind"] == "refusal" and r["check"].get("expect", True) for r in tp.eval)
    plain = build_align_pool("json", pool_size=800, probe_size=8, eval_size=20, other_eval_size=2)
    assert plain.other_eval and not any("check" in r for r in plain.other_eval)  # exact match there (forgetting)


def test_number_words_and_ordinals():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111, 112, 913)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st", "111th", "112th", "913th"]
    assert number_words(305) == "three hundred five" and number_words(42) == "forty-two"
    assert [ordinal_words(n) for n in (1, 12, 20, 42, 100, 305)] == [
        "first", "twelfth", "twentieth", "forty-second", "one hundredth", "three hundred fifth"]


def test_errors_and_registration(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown target 'capitals' for the builtin-align pool; choose from json"):
        build_align_pool("capitals")
    with pytest.raises(UserError, match="eval_size must be at most"):
        build_align_pool("ordinal", eval_size=600)
    with pytest.raises(UserError, match="the numbers family has only"):
        build_align_pool("ordinal", pool_size=20000)
    with pytest.raises(UserError, match="decoy_share"):
        build_align_pool("json", decoy_share=0.4)
    cfg = RunConfig(pool="Builtin-Align", target="refusal").validate()
    assert cfg.pool == ALIGN_POOL == cfg.builtin_pool and pool_targets(ALIGN_POOL) == ALIGN_TARGETS
    assert RunConfig(pool="builtin-align").validate().target == "json"  # the first target by default
    with pytest.raises(UserError, match="not a task of the builtin-align pool; choose from json, signoff"):
        RunConfig(pool="builtin-align", target="addition").validate()
    from p2d.bench.config import _split_choices
    from p2d.cli import main
    from p2d.studio.form import target_choices, to_config, to_values

    assert "builtin-align:refusal" in _split_choices()
    assert target_choices("builtin-align") == list(ALIGN_TARGETS)
    values = to_values(cfg)
    assert values["data_source"] == ALIGN_POOL and to_config(values) == cfg
    assert main(["demo-data", "--pool", "builtin-align", "--target", "ordinal", "--pool-size", "400", "--probe-size",
                 "8", "--eval-size", "10", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pool_tasks"]["ordinal"] == 12 and out["eval"] == 10
    rows = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert rows[0]["check"]["kind"] == "exact"
    assert main(["demo-data", "--pool", "builtin-align", "--target", "addition", "--out", str(tmp_path)]) == 2
    assert "not a task of the builtin-align pool" in capsys.readouterr().err


def test_premise_conditions_ask_and_demonstrate():
    tp = build_align_pool("refusal", pool_size=400, probe_size=8, eval_size=6)
    row = tp.eval[0]
    asked = asked_prompt("refusal", row)
    assert asked["instruction"].startswith("If the question is about health") and asked["check"] == row["check"]
    assert asked_prompt("json", {"instruction": "Q?", "input": ""})["instruction"].startswith("Q? Reply only with")
    by = {c: premise_samples("refusal", tp.eval, tp.probe, c, shots=4, example_shots=2) for c in PREMISE_CONDITIONS}
    assert [len(by[c][0].prompt) for c in PREMISE_CONDITIONS] == [1, 1, 5, 9]  # demonstrations as earlier turns
    few = by["few-shot"]
    assert few[0].prompt[1] == {"role": "assistant", "content": tp.probe[0]["output"]}
    assert few[1].prompt[1]["content"] == tp.probe[4]["output"] or few[1].prompt[0] != few[0].prompt[0]  # rotating
    assert all(s.row["check"] == r["check"] and s.answer == r["output"] for s, r in zip(few, tp.eval))
    assert "If the question is about health" in by["asked+example"][0].prompt[0]["content"]
    assert "If the question is about health" not in few[0].prompt[0]["content"]


def test_evaluate_scores_generated_replies_by_their_checks(tiny_llama):
    """The generation + check path on a tiny random Llama (its greedy replies do not refuse: a row that must
    not refuse passes, the rows that must refuse or be JSON fail), parts are reported per task and overall,
    the other rows' checks land in other_checks, and rows without a check keep exact match."""
    from p2d.cells import evaluate_cell
    from p2d.data.loading import load_records
    from p2d.evaluation import evaluate

    tp = build_align_pool("refusal", pool_size=300, probe_size=4, eval_size=4, other_eval_size=1)
    rows = [{**tp.eval[0], "check": {"kind": "refusal", "expect": False}, "task": "own"},
            {**tp.eval[1], "check": {"kind": "json", "keep": "x"}, "task": "fmt"}, *tp.eval[2:]]
    res = evaluate(tiny_llama, load_records(rows).samples, max_new_tokens=4)
    assert res.metric == "check" and res.n_generated == 4
    assert res.by_task["fmt"] == {"accuracy": 0.0, "contains": 0.0, "n": 1, "content": 0.0, "format": 0.0}
    assert res.by_task["refusal"]["refused"] == 0.0 and "template" in res.by_task["refusal"]
    assert res.accuracy == 0.25 and res.checks == {"content": 0.0, "format": 0.0, "refused": 0.0, "template": 0.0}
    assert res.by_task["own"] == {"accuracy": 1.0, "contains": 0.0, "n": 1, "refused": 0.0}
    assert res.examples[1]["check"] == {"format": False, "content": False} and not res.examples[1]["correct"]
    mixed = evaluate(tiny_llama, load_records([tp.eval[0], {"instruction": "2+2?", "output": "4"}]).samples,
                     max_new_tokens=4)
    assert mixed.metric == "exact_match+check" and mixed.checks == {"refused": 0.0, "template": 0.0}
    cell = evaluate_cell(tiny_llama, load_records(tp.eval).samples, load_records(tp.other_eval).samples,
                         max_new_tokens=4)
    assert cell.other_checks == {"refused": 0.0} and all(v["accuracy"] == 1.0 for v in cell.other_tasks.values())
    assert cell.to_dict()["other_checks"] == {"refused": 0.0}
    with pytest.raises(UserError, match="check kind must be one of"):
        evaluate(tiny_llama, load_records([{**tp.eval[0], "check": {"kind": "judge"}}]).samples, max_new_tokens=2)


@pytest.mark.slow
def test_run_end_to_end_on_an_alignment_pool(capsys, tmp_path, tiny_llama_dir):
    """``python -m p2d run --pool builtin-align --target refusal`` on a tiny model: the eval results and
    metrics carry the behaviour figures (the check's parts, the false-refusal rate elsewhere)."""
    import yaml

    from p2d.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny_llama_dir, "pool": "builtin-align", "target": "refusal",
                                   "pool_size": 200, "probe_size": 8, "eval_size": 6, "other_eval_size": 1, "steps": 2,
                                   "batch_size": 4, "max_length": 96, "max_new_tokens": 4}))
    code = main(["run", "--config", str(cfg), "--out", str(tmp_path / "run"), "--head-method", "random",
                 "--select-method", "activation", "--head-ratio", "0.25", "--data-ratio", "0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out)
    for when in ("eval_before", "eval_after"):
        ev = metrics[when]
        assert ev["metric"] == "check" and set(ev["checks"]) == {"refused", "template"}
        assert set(ev["by_task"]["refusal"]) >= {"accuracy", "refused", "template", "n"}
        assert ev["other_checks"] == {"refused": ev["other_checks"]["refused"]} and ev["other_tasks"]
    assert sum(metrics["selected_task_counts"].values()) == 20
    rows = [json.loads(x) for x in (tmp_path / "run" / "data" / "pool.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and sum(r["task"] == "refusal" for r in rows) == 6


@pytest.mark.slow
def test_the_premise_holds_on_the_embedded_model():
    """The base model does not show the behaviours by default but can when shown (a cheap version of
    bench/align_premise.py: 8 eval rows per target, zero-shot vs the best condition measured there)."""
    from p2d.data.loading import load_records
    from p2d.evaluation import evaluate
    from p2d.models import load_model

    lm = load_model("default", device="cpu")
    for target, shown in (("refusal", "asked"), ("ordinal", "few-shot"), ("signoff", "few-shot")):
        tp = build_align_pool(target, pool_size=400, probe_size=8, eval_size=8)
        zero = evaluate(lm, load_records(tp.eval).samples, batch_size=8)
        asked = evaluate(lm, premise_samples(target, tp.eval, tp.probe, shown), batch_size=8)
        assert zero.accuracy <= 0.15 and asked.accuracy >= 0.5, (target, zero.accuracy, asked.accuracy)
