"""Issue 11 in the app: /chat, /inspect_head, /compare_heads, /reuse_heads, /forgetting and /controls driven
through gradio_client on a real server (tiny Llama, built-in pool at tiny sizes), and the chart builders."""

from __future__ import annotations

import json

import pytest

from studio_helpers import close, form_kw as _kw, serve, wait_job as _wait


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = serve(tmp_path_factory.mktemp("explore-runs"))
    yield served
    close(served)


@pytest.fixture(scope="module")
def trained(served, tiny_llama_dir):
    """One session with a trained tiny run (run-001, target addition) and a second run's head map (run-002,
    target capitals); the current run is run-001 again."""
    from gradio_client import Client

    c = Client(served.url, verbose=False)
    c.predict("", api_name="/attach")
    c.predict(**_kw(tiny_llama_dir, lr=0.01, other_eval_size=3), api_name="/train")
    assert _wait(c)["status"] == "done"
    c.predict(**_kw(tiny_llama_dir, target="capitals"), api_name="/heads")
    assert _wait(c)["status"] == "done"
    c.predict("run-001", api_name="/open_run")
    return c


def _plot(value) -> dict:
    assert isinstance(value, dict) and value.get("type") == "plotly", value
    return json.loads(value["plot"])


def _texts(messages) -> list[str]:
    """A Chatbot value's message texts (Gradio sends content as a list of typed parts)."""
    return [m["content"] if isinstance(m["content"], str) else "".join(p.get("text", "") for p in m["content"])
            for m in messages]


@pytest.mark.slow
def test_chat_is_multi_turn_and_streamed(trained, served):
    job = trained.submit("", "What is 2 + 3?", 6, 0.0, 1.0, 0, api_name="/chat")
    status, base, tuned, _ = job.result()
    assert status.startswith("✓ answered") and job.outputs()[0][3] == ""  # the message box is emptied at once
    assert [m["role"] for m in base] == ["user", "assistant"] == [m["role"] for m in tuned]
    assert _texts(base)[0] == "What is 2 + 3?" == _texts(tuned)[0]
    assert len(job.outputs()) >= 2  # the submitted line, then replies as they grow
    # the next message continues this session's conversation: each side sees its own earlier answer
    status, base2, tuned2, _ = trained.predict("", "And 4 + 4?", 6, 0.0, 1.0, 0, api_name="/chat")
    assert status.startswith("✓ answered") and base2[:2] == base and tuned2[:2] == tuned and len(base2) == 4
    from p2d.chat import conversation, stream_reply

    ws = next(w for w in served.studio.registry.all() if w.run is not None and w.run.out.name == "run-001")
    lm = served.studio.worker.load_model(ws.run.config)
    first = list(stream_reply(lm, "What is 2 + 3?", max_new_tokens=6))[-1]
    assert _texts(base)[1] == first.strip()  # (the Chatbot trims whitespace)
    turn = {"user": "What is 2 + 3?", "base": first, "tuned": None}
    expected = list(stream_reply(lm, conversation("And 4 + 4?", [turn], "base"), max_new_tokens=6))[-1]
    assert _texts(base2)[3] == expected.strip()  # the chat template over the whole conversation, greedy
    # another client (another session) has a conversation of its own
    from gradio_client import Client

    other = Client(served.url, verbose=False)
    assert "nothing to work on" in other.predict("", "hi", 6, 0.0, 1.0, 0, api_name="/chat")[0]
    # Clear starts a new conversation: the first answer comes again (greedy), now by name
    assert trained.predict(api_name="/chat_clear") == ("", [], [])
    again = trained.predict("run-001", "What is 2 + 3?", 6, 0.0, 1.0, 0, api_name="/chat")
    assert list(again[1:3]) == [base, tuned]
    err = trained.predict("", "   ", 6, 0.0, 1.0, 0, api_name="/chat")
    assert "type a prompt" in err[0]
    nope = trained.predict("run-999", "hi", 6, 0.0, 1.0, 0, api_name="/chat")
    assert "no run folder" in str(nope)


@pytest.mark.slow
def test_inspect_head(trained, served):
    ws = next(w for w in served.studio.registry.all() if w.run is not None and w.run.out.name == "run-001")
    layer, head = ws.run.heads.selected[0]
    status, info, plot, result = trained.predict("", layer, head, 1, api_name="/inspect_head")
    assert status.startswith("✓"), status
    assert f"Layer {layer}, head {head}" in info and "rank 1 of 16" in info and "Gated off" in info
    fig = _plot(plot)
    assert fig["data"][0]["type"] == "heatmap" and len(fig["data"][0]["z"]) == result["pattern"]["n_tokens"]
    assert result["gate_off"]["heads"] == [[layer, head]] and result["row"] == 1
    bad = trained.predict("", 99, 0, 0, api_name="/inspect_head")
    assert "no head (99, 0)" in bad[0]


@pytest.mark.slow
def test_compare_and_reuse_heads(trained, served):
    status, info, heat_a, heat_b, diff, out = trained.predict("run-001", "run-002", api_name="/compare_heads")
    assert status == "" and "Jaccard" in info and "Spearman" in info
    assert 0 <= out["jaccard"] <= 1 and len(out["rank_difference"]) == 4
    assert _plot(diff)["data"][0]["type"] == "heatmap" and _plot(heat_a)["data"][0]["type"] == "heatmap"
    assert "pick two runs" in trained.predict("run-001", None, api_name="/compare_heads")[0]
    # the capitals map reused for the addition run: heads become external, selection is redone later
    trained.predict("run-002", api_name="/reuse_heads")
    assert _wait(trained)["status"] == "done"
    ws = next(w for w in served.studio.registry.all() if w.run is not None and w.run.out.name == "run-001")
    other = json.loads((ws.root / "run-002" / "heads.json").read_text())
    assert ws.run.heads.selected == other["selected"] and not ws.run.is_done("select")
    assert "own head map" in trained.predict("run-001", api_name="/reuse_heads")[0]


@pytest.mark.slow
def test_forgetting_and_controls(trained, tiny_llama_dir):
    trained.predict("run-001", api_name="/open_run")
    trained.predict(**_kw(tiny_llama_dir, lr=0.01, other_eval_size=3), api_name="/train")  # heads back to addition
    assert _wait(trained)["status"] == "done"
    plot, md, rows = trained.predict(api_name="/forgetting")
    others = [r for r in rows if r["set"] == "other tasks"]
    from p2d.data.builtin import available_tasks

    assert len(others) == len(available_tasks()) - 1 and all(r["n"] == 3 for r in others) and "mean change" in md
    assert len(_plot(plot)["data"]) == 2  # before and after bars
    out = trained.predict(api_name="/controls")  # follows the job to its end
    names = ["status", "summary", "table", "chart", "examples", "adapter_dl", "metrics_dl", "peft_dl", "forgetting",
             "forgetting_md", "controls_chart", "controls_md", "controls_table"]
    res = dict(zip(names, out))
    assert res["status"].startswith("✓ Controls done"), res["status"]
    cells = [r[0] for r in res["controls_table"]["data"]]
    assert cells[0] == "P2D" and len(cells) == 6 and "One draw each" in res["controls_md"]
    assert len(trained.predict(api_name="/results")) == 8  # the endpoint scripts know keeps its outputs
    assert [len(r) for r in res["controls_table"]["data"]] == [7] * 6
    assert any("TF-IDF" in c for c in cells) and any("answer-shape" in c for c in cells)


def test_explore_charts():
    from p2d.studio import charts

    pattern = {"layer": 1, "head": 2, "kv_head": 1, "tokens": ["a", "b", "c"], "offset": 0, "n_tokens": 3,
               "answer_start": 2, "weights": [[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]}
    fig = charts.attention_heatmap(pattern)
    assert fig.data[0].type == "heatmap" and list(fig.data[0].x) == ["0:'a'", "1:'b'", "2:'c'"]
    assert charts.attention_heatmap(None).layout.annotations
    bars = charts.forgetting_chart([{"task": "code", "set": "other tasks", "before": 0.5, "after": 0.25},
                                    {"task": "addition", "set": "eval", "before": 0.0, "after": None}])
    assert [t.name for t in bars.data] == ["before", "after"] and list(bars.data[0].y) == [50.0, 0.0]
    assert list(bars.data[0].x) == ["code", "addition (eval)"]
    ctl = charts.controls_chart({"accuracy": 0.4, "aer": 0.2},
                                {"lora-p2d": {"label": "LoRA", "accuracy": 0.5, "aer": 0.3}})
    assert list(ctl.data[0].x) == ["P2D", "LoRA"] and list(ctl.data[0].customdata) == ["0.200", "0.300"]
    assert charts.difference_heatmap([[0.5, -0.5]], "a", "b").data[0].zmid == 0


@pytest.mark.slow
def test_quick_tour_starts_the_preset(served):
    """/quick_tour puts the preset in the form and starts the whole pipeline as one job (stopped here: the
    measured tour is in the README)."""
    from gradio_client import Client

    from p2d.config import PRESETS

    c = Client(served.url, verbose=False)
    key = c.predict("", api_name="/attach")["key"]
    out = c.predict(api_name="/quick_tour")
    assert any("Quick tour" in str(x) for x in out) and PRESETS["quick-tour"]["pool_size"] in out
    c.predict(api_name="/stop")
    summary = _wait(c)
    assert summary["label"] == "Quick tour" and summary["status"] in ("stopped", "done")
    ws = served.studio.registry.by_key(key)
    assert ws.run.config.pool_size == PRESETS["quick-tour"]["pool_size"] and ws.run.config.model == "default"
