"""Explore and teach, in the library and on the command line: chat (p2d.chat), open a head
(p2d.explore), forgetting (p2d.explore.forgetting, the runs' other-task evaluation) and the
controls (p2d.controls), on tiny real models and one tiny real run."""

import json

import pytest
import torch
import yaml

from p2d.chat import compare_replies, stream_reply
from p2d.cli import main
from p2d.data.formats import Sample
from p2d.errors import UserError
from p2d.evaluation import generate_answers, mean_answer_loss
from p2d.explore import forgetting
from p2d.explore import attention_pattern, gate_off_effect, head_rank
from p2d.method.heads import HeadScores, select_top


def _sample(q="What is 12 + 30?", a="42", task="addition"):
    return Sample(prompt=[{"role": "user", "content": q}], answer=a, task=task, row={}, index=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    """A whole tiny run on the built-in pool (5 held-out rows of every other task)."""
    out = tmp_path_factory.mktemp("teach") / "run"
    cfg = out.parent / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": tiny_llama_dir, "pool_size": 60, "probe_size": 8, "eval_size": 6,
                                   "steps": 3, "batch_size": 4, "max_length": 96, "max_new_tokens": 4,
                                   "head_ratio": 0.25, "data_ratio": 0.2, "lr": 0.01}))
    assert main(["run", "--config", str(cfg), "--out", str(out)]) == 0
    return out


def _hooks(lm) -> int:
    return sum(len(lm.geometry.output_projection(lm.model, layer)._forward_pre_hooks)
               for layer in range(lm.geometry.n_layers))


# -- chat ---------------------------------------------------------------------------------------
def test_greedy_reply_is_the_evaluation_answer(tiny_llama):
    """Token by token with a cache gives what batched generate gives (greedy)."""
    steps = list(stream_reply(tiny_llama, "What is 12 + 30?", max_new_tokens=6))
    assert 1 <= len(steps) <= 6 and all(steps[i + 1].startswith(steps[i]) for i in range(len(steps) - 1))
    expected = generate_answers(tiny_llama, [_sample()], max_new_tokens=6)[0]
    assert steps[-1].strip() == expected


def test_sampling_is_seeded_and_checked(tiny_llama):
    def reply(seed):
        return list(stream_reply(tiny_llama, "hello", max_new_tokens=8, temperature=1.5, seed=seed))[-1]

    assert reply(3) == reply(3)
    assert len({reply(s) for s in range(4)}) > 1  # sampling from a random model: seeds differ
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"max_new_tokens": 10_000}, {"seed": -1},
                {"seed": 2 ** 40}):
        with pytest.raises(UserError):
            list(stream_reply(tiny_llama, "hello", **bad))
    with pytest.raises(UserError, match="type a prompt"):
        list(stream_reply(tiny_llama, "  "))


@pytest.mark.slow
def test_compare_replies_leaves_the_model_as_it_was(tiny_run):
    from p2d.adapter import load_adapter
    from p2d.models import load_model

    lm = load_model(yaml.safe_load((tiny_run / "config.yaml").read_text())["model"], device="cpu")
    base_alone = list(stream_reply(lm, "What is 2 + 2?", max_new_tokens=5))[-1]
    steps = list(compare_replies(lm, tiny_run / "adapter", "What is 2 + 2?", max_new_tokens=5))
    assert steps[0]["tuned"] is None and steps[-1]["base"] == base_alone
    assert _hooks(lm) == 0  # adapter detached
    adapter = load_adapter(lm, tiny_run / "adapter")
    try:
        assert steps[-1]["tuned"] == list(stream_reply(lm, "What is 2 + 2?", max_new_tokens=5))[-1]
    finally:
        adapter.detach()
    with pytest.raises(UserError, match="no trained adapter"):
        list(compare_replies(lm, tiny_run / "data", "hi", max_new_tokens=2))
    assert _hooks(lm) == 0


def test_the_whole_conversation_is_templated(tiny_llama):
    """Multi-turn: each side sees its own earlier answers; the chat template covers the whole conversation;
    a conversation over max_length loses its oldest turns first."""
    from p2d.chat import _prompt_ids, conversation

    history = [{"user": "What is 2 + 2?", "base": "four", "tuned": "4"}, {"user": "And 3 + 3?", "base": "six",
                                                                         "tuned": None}]
    base = conversation("And 5 + 5?", history, "base")
    assert [m["content"] for m in base] == ["What is 2 + 2?", "four", "And 3 + 3?", "six", "And 5 + 5?"]
    assert [m["content"] for m in conversation("And 5 + 5?", history, "tuned")] == ["What is 2 + 2?", "4", "And 5 + 5?"]
    tok = tiny_llama.tokenizer
    ids = _prompt_ids(tok, base, 1024)
    assert tok.decode(ids) == tok.apply_chat_template(base, tokenize=False, add_generation_prompt=True)
    short = tok.decode(_prompt_ids(tok, base, len(ids) - 5))
    assert "And 5 + 5?" in short and "six" in short and "What is 2 + 2?" not in short  # the oldest turn went
    greedy = list(stream_reply(tiny_llama, base, max_new_tokens=6))[-1]
    sample = Sample(prompt=base, answer="", task=None, row={}, index=0)
    assert greedy.strip() == generate_answers(tiny_llama, [sample], max_new_tokens=6)[0]
    with pytest.raises(UserError, match="ends with a user turn"):
        list(stream_reply(tiny_llama, base[:-1]))


def test_hooks_detached_when_the_reader_stops_or_generation_fails(tiny_run):
    """Closing the stream part-way ends the generation thread; a failure inside generate reaches the caller;
    either way the adapter's hooks are gone."""
    import threading

    from p2d.models import load_model

    def hooks(lm) -> int:  # forward hooks anywhere (head deltas hook q/k/v/o outputs)
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    lm = load_model(yaml.safe_load((tiny_run / "config.yaml").read_text())["model"], device="cpu")
    stream = compare_replies(lm, tiny_run / "adapter", "Count to one hundred.", max_new_tokens=200, temperature=1.0)
    for step in stream:
        if step["tuned"]:
            break
    assert hooks(lm) > 0  # the tuned reply is being generated
    stream.close()
    assert hooks(lm) == 0 and not [t for t in threading.enumerate() if t.name == "p2d-chat-generate"]

    def fail_when_tuned(module, args):
        if hooks(lm) > 1:  # this hook and the adapter's
            raise RuntimeError("injected failure")

    handle = lm.model.model.layers[0].register_forward_pre_hook(fail_when_tuned)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            list(compare_replies(lm, tiny_run / "adapter", "hi", max_new_tokens=4))
    finally:
        handle.remove()
    assert hooks(lm) == 0 and lm.model.training is False


# -- open a head ---------------------------------------------------------------------------------
def test_attention_pattern(tiny_llama):
    p = attention_pattern(tiny_llama, _sample(), 2, 3)
    w = torch.tensor(p["weights"])
    assert w.shape == (p["n_tokens"], p["n_tokens"]) and p["offset"] == 0 and len(p["tokens"]) == p["n_tokens"]
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-3)  # rows are distributions
    assert float(w.triu(1).abs().max()) == 0.0  # causal
    assert p["kv_head"] == 1  # 4 query heads over 2 kv heads
    assert "".join(p["tokens"][p["answer_start"]:]).startswith("42")
    assert tiny_llama.model.config._attn_implementation == "sdpa"  # switched back
    cut = attention_pattern(tiny_llama, _sample(), 2, 3, max_tokens=10)
    assert len(cut["tokens"]) == 10 and cut["offset"] == p["n_tokens"] - 10
    assert cut["weights"][-1] == p["weights"][-1][-10:]
    with pytest.raises(UserError, match="no head"):
        attention_pattern(tiny_llama, _sample(), 4, 0)


def test_gate_off_equals_zeroing_the_head(tiny_llama):
    """Gating a head off = zeroing its columns of the output projection."""
    samples = [_sample(f"What is {i} + 1?", str(i + 1)) for i in range(6)]
    out = gate_off_effect(tiny_llama, samples, [(1, 2), (3, 0)])
    assert out["change"] == pytest.approx(out["loss_gated"] - out["loss"])
    d = tiny_llama.geometry.head_dim
    with torch.no_grad():
        for layer, head in ((1, 2), (3, 0)):
            tiny_llama.geometry.output_projection(tiny_llama.model, layer).weight[:, head * d:(head + 1) * d] = 0
    assert mean_answer_loss(tiny_llama, samples) == pytest.approx(out["loss_gated"], rel=1e-5)
    assert out["loss_gated"] != pytest.approx(out["loss"], rel=1e-6)


def test_head_rank():
    scores = [[0.1, 0.9], [float("nan"), 0.5]]
    hs = HeadScores("gradient", 0.5, scores, select_top(scores, 0.5), 0.0, "m")
    assert head_rank(hs, 0, 1) == {"score": 0.9, "rank": 1, "of": 4, "method": "gradient", "selected": True}
    assert head_rank(hs, 1, 0)["rank"] is None and head_rank(hs, 1, 0)["score"] is None  # NaN: no rank


# -- forgetting ---------------------------------------------------------------------------------
def test_forgetting_rows():
    before = {"by_task": {"addition": {"accuracy": 0.0, "n": 4}}, "other_tasks": {"capitals": {"accuracy": 0.6, "n": 5}}}
    after = {"by_task": {"addition": {"accuracy": 0.5, "n": 4}},
             "other_tasks": {"capitals": {"accuracy": 0.4, "n": 5}, "code": {"accuracy": 1.0, "n": 5}}}
    rows = forgetting(before, after)
    assert [(r["task"], r["set"]) for r in rows] == [("addition", "eval"), ("capitals", "other tasks"),
                                                     ("code", "other tasks")]
    assert rows[0]["change"] == 0.5 and rows[1]["change"] == pytest.approx(-0.2) and rows[2]["change"] is None
    assert forgetting(None, after)[0]["before"] is None


@pytest.mark.slow
def test_run_evaluates_the_other_tasks(tiny_run):
    from p2d.data.builtin import TASKS

    other = [json.loads(line) for line in (tiny_run / "data" / "other_eval.jsonl").read_text().splitlines()]
    pool_pairs = {(r["instruction"], r["input"]) for r in map(json.loads, (tiny_run / "data" / "pool.jsonl").open())}
    assert other and not pool_pairs & {(r["instruction"], r["input"]) for r in other}  # held out of the pool
    for when in ("before", "after"):
        ev = json.loads((tiny_run / f"eval_{when}.json").read_text())
        assert set(ev["other_tasks"]) == {r["task"] for r in other} and "addition" not in ev["other_tasks"]
        assert set(ev["other_tasks"]) <= set(TASKS)
        assert all(v["n"] <= 5 for v in ev["other_tasks"].values())


# -- the commands ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_teaching_commands(tiny_run, capsys):
    assert main(["chat", "--run", str(tiny_run), "--prompt", "What is 3 + 4?", "--max-new-tokens", "4"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert set(reply) == {"base", "tuned"} and isinstance(reply["tuned"], str)

    heads = json.loads((tiny_run / "heads.json").read_text())
    layer, head = heads["selected"][0]
    assert main(["inspect-head", "--run", str(tiny_run), "--layer", str(layer), "--head", str(head),
                 "--sample", "1", "--probe-rows", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rank"]["rank"] == 1 and out["rank"]["selected"] and "weights" not in out["pattern"]
    assert out["gate_off"]["heads"] == [[layer, head]] and out["gate_off"]["n"] == 4
    assert out["gate_off_selected"]["heads"] == heads["selected"]

    assert main(["forgetting", "--run", str(tiny_run)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["set"] for r in rows} == {"eval", "other tasks"} and len(rows) >= 3

    assert main(["inspect-head", "--run", str(tiny_run), "--layer", "9", "--head", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no head (9, 0)") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_controls(tiny_run, capsys):
    from p2d.controls import CONTROLS_FILE, read_controls
    from p2d.pipeline import Run

    assert main(["controls", "--run", str(tiny_run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["controls"]) == {"randomheads-p2d", "heads-random", "heads-tfidf", "heads-shape_tfidf",
                                    "lora-p2d"} and out["complete"]
    p2d = out["p2d"]
    for name, c in out["controls"].items():
        assert c["rows"] == p2d["rows"] == 12 and c["steps"] == p2d["steps"] == 3, name  # same budget
        assert c["aer"] > 0 and c["accuracy"] is not None and c["other_tasks"]
    assert out["controls"]["randomheads-p2d"]["trainable_params"] == p2d["trainable_params"]
    assert out["controls"]["lora-p2d"]["lr"] == 3e-3 and out["controls"]["heads-random"]["lr"] == 0.01
    # the head-free control picks its rows by the words of the prompt, and its selection counts in its cost
    tfidf = out["controls"]["heads-tfidf"]
    assert tfidf["data"] == "tfidf" and tfidf["cost_s"] > tfidf["train_s"]
    shape = out["controls"]["heads-shape_tfidf"]  # and the answer reader by the answers' shape
    assert shape["data"] == "shape_tfidf" and shape["cost_s"] > shape["train_s"]
    # random heads on P2D's data cost the same inputs as P2D; P2D's heads on random data skip the selection
    run = Run.open(tiny_run)
    assert read_controls(run) is not None
    run.reset_from("train")
    assert read_controls(run) is None  # stale once training is redone
    assert (tiny_run / CONTROLS_FILE).is_file()
    assert main(["controls", "--run", str(tiny_run)]) == 2
    assert "run train, eval_after first" in capsys.readouterr().err
