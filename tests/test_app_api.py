"""The Gradio app driven through its API with gradio_client, plus its pure parts (charts, settings).

The app is started for real (`build_app().launch(prevent_thread_lock=True)`) on the tiny Llama of
conftest.py and the built-in pool at tiny sizes; a second app runs in demo mode.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from p2d.config import RunConfig
from studio_helpers import form_kw as _kw, free_port as _free_port


def _launch(tmp_path_factory, demo: bool):
    from p2d.studio.server import build_app

    app = build_app(demo=demo, runs_root=tmp_path_factory.mktemp("demo-runs" if demo else "runs"))
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    return app, url


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app, url = _launch(tmp_path_factory, demo=False)
    yield SimpleNamespace(app=app, url=url, studio=app.studio)
    app.close()
    app.studio.worker.close()


@pytest.fixture(scope="module")
def served_demo(tmp_path_factory):
    app, url = _launch(tmp_path_factory, demo=True)
    yield SimpleNamespace(app=app, url=url, studio=app.studio)
    app.close()
    app.studio.worker.close()


@pytest.fixture()
def client(served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


def _plot(value) -> dict:
    """A gr.Plot output as gradio_client returns it -> the Plotly figure dict."""
    assert isinstance(value, dict) and value.get("type") == "plotly", value
    return json.loads(value["plot"])


# ------------------------------------------------------------------------------------ chart builders


def test_heatmap_marks_selected_heads_and_hover():
    from p2d.studio import charts

    scores = [[0.1, 0.9, 0.3], [0.5, float("nan"), 0.7]]
    fig = charts.heads_heatmap(scores, [[0, 1], [1, 2]])
    heat, marks = fig.data
    assert heat.type == "heatmap" and list(map(list, heat.z)) == [[0.1, 0.9, 0.3], [0.5, None, 0.7]]
    for word in ("layer", "head", "score", "rank"):
        assert word in heat.hovertemplate
    assert marks.name == "selected heads" and list(marks.x) == [1, 2] and list(marks.y) == [0, 1]
    assert charts.head_ranks(scores) == [[5, 1, 4], [3, None, 2]]
    assert heat.customdata[0][1][0] == 1  # rank shown on hover
    bars = charts.heads_per_layer([[0, 1], [1, 2], [1, 0]], n_layers=2)
    assert list(bars.data[0].y) == [1, 2]
    empty = charts.heads_heatmap([], [])
    assert not empty.data and empty.layout.annotations


def test_data_train_and_result_charts():
    from p2d.studio import charts

    hist = charts.score_histogram([0.1, 0.5, None, 0.9, 0.7], selected=[3, 4])
    names = [t.name for t in hist.data]
    assert names[0].startswith("pool (4)") and names[1].startswith("selected (2)") and names[2].startswith("cut-off")
    mix = charts.task_mix({"pool": {"a": 8, "b": 2}, "selected": {"a": 2}, "random pick": None})
    assert [t.name for t in mix.data] == ["pool (n=10)", "selected (n=2)"]
    assert list(mix.data[0].y) == [80.0, 20.0] and list(mix.data[1].y) == [100.0, 0.0]
    log = [{"step": i, "loss": 2.0 / i} for i in range(1, 6)]
    loss = charts.loss_chart(log, planned_steps=10)
    with_val = charts.loss_chart(log + [{"step": 6, "loss": 1.0, "val_loss": 1.2}], planned_steps=10)
    assert [tr.name for tr in with_val.data][-1] == "validation" and "validation" not in [tr.name for tr in loss.data]
    assert [t.name for t in loss.data] == ["loss", "smoothed"]
    assert list(loss.data[0].y) == [r["loss"] for r in log] and len(loss.data[1].y) == 5
    assert charts.smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    aer = charts.aer_chart(2.0, 3.0, 5.0, 100.0, t_train_left=10.0)
    assert "AER 0.100" in aer.layout.title.text and "projected 0.200" in aer.layout.title.text
    assert {t.name for t in aer.data} >= {"head scoring", "data selection", "head training", "training left (projected)"}
    assert charts.aer_value(1, 1, 1, None) is None
    ev = charts.eval_chart({"accuracy": 0.1, "contains": 0.5}, {"accuracy": 0.6, "contains": 0.9})
    assert [t.name for t in ev.data] == ["before", "after"] and list(ev.data[1].y) == [60.0, 90.0]


def test_progress_html_and_log_tail(tmp_path):
    from p2d.studio.views import progress_html
    from p2d.studio.workspace import LogTail

    html = progress_html(0.42, "Training: step 42 of 100", "elapsed 0:42 · remaining ~0:58")
    assert "width:42.0%" in html and "remaining ~0:58" in html
    p = tmp_path / "train_log.jsonl"
    p.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # half-written line
    tail = LogTail(p)
    assert [r["step"] for r in tail.read()] == [1, 2]
    with open(p, "a") as f:  # the line is finished, another one follows: only the new bytes are parsed
        f.write('ss": 1.2}\n{"step": 4, "loss": 1.1}\n')
    assert [r["step"] for r in tail.read()] == [1, 2, 3, 4]
    p.unlink()
    p.write_text('{"step": 1, "loss": 9.0}\n')  # a new training: a new log
    assert [r["loss"] for r in tail.read()] == [9.0]


# ------------------------------------------------------------------------------------ settings form


def test_form_config_round_trip(tmp_path):
    from p2d.studio.form import FIELD_NAMES, FORM_ONLY, to_config, to_values

    cfg = RunConfig(model="HuggingFaceTB/SmolLM2-360M-Instruct", target="dates", pool_size=123, probe_size=17,
                    eval_size=9, seed=3, quantize="4bit", head_method="shift", head_ratio=0.2, select_method="ablation",
                    data_ratio=0.3, steps=None, epochs=2.0, lr=5e-4, batch_size=2, projections=["q", "o"],
                    eval_limit=5, max_new_tokens=12, grad_accum=2, warmup_ratio=0.1, weight_decay=0.01,
                    max_grad_norm=0.5, reference_epochs=2.0, max_steps=30, checkpoint_every=7,
                    out=str(tmp_path / "r")).validate()
    values = to_values(cfg)
    assert set(values) == set(FIELD_NAMES) and len(FORM_ONLY) == 6  # every other input is a RunConfig field
    assert values["model_source"] == "hub" and values["steps"] == 0 and values["epochs"] == "2"
    assert to_config(values) == cfg
    # empty epochs means "the reference epochs"; 0 steps means "from epochs"
    assert to_values(RunConfig())["epochs"] == ""
    plain = to_config({**to_values(RunConfig()), "epochs": "", "steps": 0})
    assert plain.epochs is None and plain.steps is None and plain.train_epochs == plain.reference_epochs
    # files + column mapping
    cfg2 = RunConfig(model=str(tmp_path), pool=str(tmp_path / "p.jsonl"), probe=str(tmp_path / "q.csv"),
                     columns={"prompt": "question", "answer": "reply"}).validate()
    v2 = to_values(cfg2)
    assert v2["model_source"] == "local" and v2["data_source"] == "files"
    assert v2["columns"] == "prompt=question, answer=reply"
    assert to_config(v2) == cfg2
    # the built-in pools where words mislead: their own source and targets
    from p2d.studio.form import target_choices

    cfg3 = RunConfig(pool="builtin-hard", target="past_tense").validate()
    v3 = to_values(cfg3)
    assert v3["data_source"] == "builtin-hard" and to_config(v3) == cfg3
    assert target_choices("builtin-hard") == ["addition", "alphabetical", "dates", "past_tense"]
    assert "capitals" in target_choices("builtin") and "past_tense" not in target_choices("builtin")


def test_form_errors_name_the_setting():
    from p2d.errors import UserError
    from p2d.studio.form import to_config, to_values

    base = to_values(RunConfig())
    for change, words in (({"head_ratio": 1.5}, "Share of heads (head_ratio) must be at most 1"),
                          ({"lr": -1}, "Learning rate (lr) must be above 0"),
                          ({"steps": 2.5}, "Steps (steps) must be a whole number"),
                          ({"model_source": "hub", "model_name": ""}, "Model (model)"),
                          ({"data_source": "files", "pool_path": ""}, "Pool file (pool)"),
                          ({"data_source": "files", "pool_path": "p.jsonl", "probe_path": ""}, "needs a probe file"),
                          ({"data_source": "builtin-hard", "target": "capitals"}, "not a task of the builtin-hard pool")):
        with pytest.raises(UserError, match=re.escape(words)):
            to_config({**base, **change})
        try:
            to_config({**base, **change})
        except UserError as exc:
            assert " --" not in str(exc), exc  # settings are named by label and field, never by flag


def _command_config(command: str) -> RunConfig:
    """The RunConfig the CLI builds from an equivalent command."""
    import shlex

    from p2d.cli import COMMAND_GROUPS, _group_fields, build_parser, config_from_args

    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "p2d", "run"], argv
    args = build_parser().parse_args(argv[3:])
    return config_from_args(args, _group_fields(COMMAND_GROUPS["run"]))


def test_equivalent_command_reproduces_the_config(tmp_path):
    from p2d.studio.form import to_values
    from p2d.studio.limits import DEMO, LOCAL
    from p2d.studio.services import Studio

    pool, probe = tmp_path / "pool.csv", tmp_path / "probe.jsonl"
    pool.write_text("question,answer\n1+1,2\n")
    probe.write_text('{"prompt": "1+2", "response": "3"}\n')
    base = to_values(RunConfig())
    forms = [
        base,  # the built-in pool, all defaults
        {**base, "target": "dates", "pool_size": 300, "seed": 4, "head_ratio": 0.2, "data_ratio": 0.05},
        {**base, "data_source": "files", "pool_path": str(pool), "probe_path": str(probe), "eval_path": str(pool),
         "columns": "prompt=question, answer=answer", "model_source": "hub", "model_name": "org/some-model"},
        {**base, "epochs": "1.5", "steps": 0, "max_steps": 9, "lr": 3e-4, "batch_size": 3, "grad_accum": 2,
         "warmup_ratio": 0.2, "weight_decay": 0.1, "max_grad_norm": 0.0, "projections": ["k", "v"],
         "checkpoint_every": 0, "eval_limit": 7, "max_new_tokens": 5, "reference_epochs": 1.0, "full_ft": "measure",
         "head_method": "shift", "select_method": "ablation", "max_length": 128, "dtype": "fp32", "device": "cpu",
         "quantize": "8bit", "out": str(tmp_path / "typed-run")},
        {**base, "steps": 25, "epochs": "", "eval_limit": 0, "max_new_tokens": 0},
    ]
    for limits in (LOCAL, DEMO):
        st = Studio(limits, tmp_path / f"runs-{limits.demo}")
        try:
            ws = st.workspace(SimpleNamespace(session_hash="s"))
            for values in forms:
                if limits.demo and values.get("data_source") == "files":
                    continue  # the demo takes uploaded files only (test_upload_files_and_load_them)
                cfg, _ = st.run_config(values, ws)
                assert _command_config(cfg.to_command()) == cfg, values
                assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
                if limits.demo:
                    assert cfg.max_steps <= DEMO.max_steps and cfg.full_ft == "estimate"
        finally:
            st.worker.close()


def test_demo_caps_and_paths(tmp_path):
    from p2d.errors import UserError
    from p2d.studio.limits import DEMO, LOCAL, check_paths, current_limits

    cfg = RunConfig(pool_size=100_000, probe_size=500, eval_size=500, steps=10_000, batch_size=64, max_length=4096,
                    full_ft="measure").validate()
    capped, notes = DEMO.apply(cfg)
    assert (capped.pool_size, capped.probe_size, capped.eval_size) == (DEMO.max_pool, DEMO.max_probe, DEMO.max_eval)
    assert (capped.batch_size, capped.max_length) == (DEMO.max_batch, DEMO.max_length)
    assert capped.max_steps == DEMO.max_steps and capped.steps == 10_000  # the library stops at max_steps
    assert capped.full_ft == "estimate" and len(notes) == 7
    assert any("Pool size (pool_size) capped at 400" in n for n in notes)
    assert DEMO.apply(RunConfig(max_steps=5))[0].max_steps == 5
    reduced, notes = DEMO.apply(RunConfig(inference_precision="int8"))  # a model copy per run: off in the demo
    assert reduced.inference_precision == "same" and any("off in the public demo" in n for n in notes)
    reduced, notes = DEMO.apply(RunConfig(heads_precision="bf16"))  # a model copy while heads are scored: off too
    assert reduced.heads_precision == "same" and any("Head-scoring precision" in n for n in notes)
    assert LOCAL.apply(cfg) == (cfg, [])
    with pytest.raises(UserError, match="local model paths are disabled"):
        check_paths(RunConfig(model=str(tmp_path)), DEMO, tmp_path / "uploads")
    with pytest.raises(UserError, match="typed paths are disabled"):
        check_paths(RunConfig(pool="/etc/passwd", probe="/etc/passwd"), DEMO, tmp_path / "uploads")
    (tmp_path / "uploads").mkdir()
    check_paths(RunConfig(pool=str(tmp_path / "uploads" / "p.jsonl"), probe=str(tmp_path / "uploads" / "q.jsonl")),
                DEMO, tmp_path / "uploads")
    check_paths(RunConfig(model=str(tmp_path)), LOCAL, None)
    assert current_limits(True).demo and not current_limits(False).demo


def test_workspace_reattach(tmp_path):
    from p2d.studio.limits import LOCAL
    from p2d.studio.services import Studio

    st = Studio(LOCAL, tmp_path)
    try:
        assert st.workspace(SimpleNamespace(session_hash="tab-1")).blank  # light requests never create one
        first = st.attach(SimpleNamespace(session_hash="tab-1"), None)  # the page load does
        assert not first.blank and st.workspace(SimpleNamespace(session_hash="tab-1")) is first
        assert len(first.key) >= 32 and first.key not in str(first.root)  # the key is not the folder name
        # a reload gets a new session hash; the key the browser stored brings the workspace back
        assert st.attach(SimpleNamespace(session_hash="tab-1-reloaded"), first.key) is first
        assert st.workspace(SimpleNamespace(session_hash="tab-1-reloaded")) is first
        # the folder name (shown in the page) is no key
        other = st.attach(SimpleNamespace(session_hash="tab-2"), first.id)
        assert other is not first and other.root != first.root
    finally:
        st.close()


@pytest.mark.slow
def test_studio_config_file_fills_the_form(tmp_path):
    from p2d.cli import build_parser
    from p2d.config import options_from
    from p2d.studio.server import build_app
    from p2d.studio.options import StudioOptions

    path = RunConfig(target="dates", pool_size=77, lr=0.005, steps=6, projections=["q"]).save(tmp_path / "c.yaml")
    args = build_parser().parse_args(["studio", "--config", str(path), "--port", "7999"])
    assert args.config == str(path)
    app = build_app(runs_root=tmp_path / "runs", config=path)
    try:
        values = app.studio.initial
        assert (values["target"], values["pool_size"], values["lr"], values["steps"]) == ("dates", 77, 0.005, 6)
        assert values["projections"] == ["q"]
        defaults = {c["props"].get("elem_id"): c["props"].get("value") for c in app.config["components"]}
        assert defaults["pool-size"] == 77 and defaults["steps"] == 6
    finally:
        app.studio.worker.close()
    assert options_from(StudioOptions, None, {"config": str(path)}).config == str(path)


# ------------------------------------------------------------------------------------ the live app


@pytest.mark.slow
def test_full_run_through_the_api(served, client, tiny_llama_dir, tmp_path):
    kw = _kw(tiny_llama_dir)
    status, info, table, mix = client.predict(**kw, api_name="/load")
    assert "Load done" in status, status
    assert "4 layers" in info and "16 heads" in info
    sets = {row[0]: row for row in table["data"]}
    assert sets["pool"][3] == 40 and sets["probe"][3] == 8 and sets["eval"][3] == 8
    assert sets["pool"][2] == "alpaca" and "addition" in sets["pool"][6]
    assert _plot(mix)["data"]

    status, info, heatmap, per_layer, heads = client.predict(**kw, api_name="/heads")
    assert "done" in status, status
    fig = _plot(heatmap)
    heat, marks = fig["data"][0], fig["data"][1]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 4 and len(heat["z"][0]) == 4
    assert marks["name"] == "selected heads" and len(marks["x"]) == 4  # 25% of 16 heads
    assert len(heads["data"]) == 4 and heads["headers"] == ["rank", "layer", "head", "score"]
    assert sum(_plot(per_layer)["data"][0]["y"]) == 4

    status, info, hist, mix, preview, page_label, page, download = client.predict(**kw, api_name="/select")
    assert "done" in status, status
    assert "8 of 40 pool samples" in info
    assert len(preview["data"]) == 8 and preview["headers"] == ["rank", "score", "task", "prompt", "answer"]
    assert "Page 1 of 1" in page_label
    names = [t["name"] for t in _plot(mix)["data"]]
    assert names[0].startswith("pool") and names[1].startswith("selected") and names[2].startswith("random pick")
    assert _plot(hist)["data"][0]["type"] == "histogram"
    selected_file = download["value"] if isinstance(download, dict) else download
    rows = [json.loads(line) for line in Path(selected_file).read_text().splitlines()]
    assert len(rows) == 8 and all("p2d_score" in r for r in rows)

    # search + paging over the selected samples
    task = preview["data"][0][2]
    df, label, page = client.predict(task, 1, api_name="/preview")
    assert df["data"] and all(task in (r[2] + r[3] + r[4]) for r in df["data"])

    # train: returns at once, then poll like the page's timer does
    status, *_ = client.predict(**kw, api_name="/train")
    assert "Training" in status
    summary = client.predict(300, api_name="/wait_job")
    assert summary["status"] == "done", summary
    assert summary["log_lines"] == 3 and summary["metrics"] is True
    polled = client.predict({}, api_name="/train_status")
    banner, train_status, bar, loss = polled[:4]
    assert "Training done" in train_status and "Training finished: step 3 of 3" in bar
    loss_fig = _plot(loss)
    assert [t["name"] for t in loss_fig["data"]] == ["loss", "smoothed"] and len(loss_fig["data"][0]["y"]) == 3
    assert "AER" in _plot(polled[4])["layout"]["title"]["text"]

    run_dir = Path(summary["run_dir"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("aer", "eval_before", "eval_after", "time_heads_s", "time_select_s", "time_train_s", "time_full_s"):
        assert metrics.get(key) is not None, key
    assert metrics["steps_done"] == 3 and metrics["n_selected"] == 8
    assert (run_dir / "eval_before.json").exists() and (run_dir / "adapter").is_dir()

    status, summary_md, table, chart, examples, adapter_dl, metrics_dl, peft_dl = client.predict(api_name="/results")
    assert peft_dl is None or not (peft_dl.get("value") if isinstance(peft_dl, dict) else peft_dl)  # not exported yet
    assert "AER" in summary_md
    rows = {r[0]: r for r in table["data"]}
    assert set(rows) >= {"exact match", "answer loss"} and rows["eval rows"][1] == "8"
    assert examples["headers"] == ["prompt", "gold", "before", "after"] and examples["data"]
    zip_path = adapter_dl["value"] if isinstance(adapter_dl, dict) else adapter_dl
    import zipfile

    assert any(n.startswith("adapter/") for n in zipfile.ZipFile(zip_path).namelist())
    m_path = metrics_dl["value"] if isinstance(metrics_dl, dict) else metrics_dl
    assert json.loads(Path(m_path).read_text())["aer"] == pytest.approx(metrics["aer"])

    # the adapter in PEFT format: a job, then a zip PEFT reads (adapter_config.json + safetensors)
    status, peft_dl = client.predict(api_name="/export_peft")
    assert "PEFT adapter ready" in status, status
    peft_zip = peft_dl["value"] if isinstance(peft_dl, dict) else peft_dl
    names = zipfile.ZipFile(peft_zip).namelist()
    assert any(n.endswith("/adapter_config.json") for n in names), names
    assert any(n.endswith("/adapter_model.safetensors") for n in names), names
    peft_config = json.loads(zipfile.ZipFile(peft_zip).read(next(n for n in names if n.endswith("adapter_config.json"))))
    assert peft_config["peft_type"] == "LORA" and peft_config["base_model_name_or_path"] == tiny_llama_dir
    assert client.predict(api_name="/results")[-1]  # now offered with the results

    merged = tmp_path / "merged"
    assert "merged model saved" in client.predict(str(merged), api_name="/merge")
    assert (merged / "config.json").exists()

    # the YAML and command reflect the form and the run folder
    yaml_text, command = client.predict(**kw, api_name="/show_command")
    cfg = RunConfig.from_yaml(yaml_text)
    assert cfg.model == tiny_llama_dir and cfg.pool_size == 40 and cfg.steps == 3 and cfg.out == str(run_dir)
    assert command.startswith("python -m p2d run") and "--pool-size 40" in command
    assert _command_config(command) == cfg == RunConfig.load(run_dir / "config.yaml")  # what the run ran

    # a new share of heads re-cuts the scores (no rescoring) and drops what was built on the old heads
    status, info, *_ = client.predict(**{**kw, "head_ratio": 0.5}, api_name="/heads")
    assert "done" in status and "8 of 16 heads" in info
    summary = client.predict(10, api_name="/wait_job")
    assert summary["run_dir"] == str(run_dir) and "train" not in summary["stages_done"]
    assert {"load", "eval_before", "reference"} <= set(summary["stages_done"])


@pytest.mark.slow
def test_settings_save_and_load_round_trip(client, tiny_llama_dir):
    from p2d.studio.form import FIELD_NAMES

    kw = _kw(tiny_llama_dir, target="dates", seed=7, head_method="random", select_method="activation", lr=0.002,
             projections=["q", "v"], eval_limit=4, full_ft="measure")
    file_out, yaml_text, command, status = client.predict(**kw, api_name="/save_config")
    path = file_out["value"] if isinstance(file_out, dict) else file_out
    saved = Path(path).read_text()
    assert saved.strip() == yaml_text.strip() and "Saved" in status
    cfg = RunConfig.from_yaml(saved)
    assert (cfg.target, cfg.seed, cfg.head_method, cfg.select_method, cfg.lr) == ("dates", 7, "random", "activation", 0.002)
    assert cfg.projections == ["q", "v"] and cfg.eval_limit == 4 and cfg.full_ft == "measure"

    values = client.predict(saved, api_name="/apply_config")
    form = dict(zip(FIELD_NAMES, values[:len(FIELD_NAMES)]))
    assert "settings applied" in values[-1]
    for key, want in kw.items():
        assert form[key] == want, (key, form[key], want)

    bad = client.predict("pool_size: [oops\n", api_name="/apply_config")
    assert "not valid YAML" in bad[-1]
    unknown = client.predict("no_such_setting: 1\n", api_name="/apply_config")
    assert "unknown setting" in unknown[-1]


@pytest.mark.slow
def test_user_error_is_a_message(client, tmp_path):
    status, *_ = client.predict(**_kw(str(tmp_path / "no-such-model")), api_name="/load")
    assert "failed" in status and "model not found" in status
    assert "Traceback" not in status
    status, *_ = client.predict(**_kw(str(tmp_path), data_source="files", pool_path=""), api_name="/heads")
    assert "upload a pool file" in status
    # a training job that fails at once: the first poll still reports it
    client.predict(**_kw(str(tmp_path / "no-such-model")), api_name="/train")
    assert client.predict(60, api_name="/wait_job")["status"] == "failed"
    polled = client.predict({}, api_name="/train_status")
    assert "Training failed" in polled[1] and "model not found" in polled[1]


@pytest.mark.slow
def test_stop_keeps_adapter_and_other_sessions_queue(served, tiny_llama_dir):
    from gradio_client import Client

    a = Client(served.url, verbose=False)
    b = Client(served.url, verbose=False)
    kw = _kw(tiny_llama_dir, steps=400, data_ratio=0.5)
    a.predict(**kw, api_name="/train")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training has logged a step
        if "Training: step" in a.predict({}, api_name="/train_status")[2]:
            break
        time.sleep(0.2)
    # another session's job waits in the queue, with its position shown
    status, *_ = b.predict(**_kw(tiny_llama_dir), api_name="/train")
    assert "queued, 1 job ahead of yours" in status, status
    assert "Stop requested" in b.predict(api_name="/stop")[0]  # cancels b's queued job
    assert "Stop requested" in a.predict(api_name="/stop")[0]
    summary = a.predict(120, api_name="/wait_job")
    assert summary["status"] == "stopped", summary
    assert 1 <= summary["log_lines"] < 400
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] is True and metrics["steps_done"] == summary["log_lines"]
    assert b.predict(30, api_name="/wait_job")["status"] == "stopped"
    bar = a.predict({}, api_name="/train_status")[2]
    assert "Training stopped (adapter kept)" in bar
    # "Evaluate now" evaluates what was trained before the stop, and says so
    status, summary_md, table, *_ = a.predict(api_name="/evaluate")
    assert "Evaluation done" in status, status
    assert "for a stopped training" in summary_md
    assert (run_dir / "eval_after.json").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["eval_after"] is not None and {"train", "eval_after"} <= set(metrics["stages_partial"])


@pytest.mark.slow
def test_stopped_stage_is_partial_then_rerun(client, tiny_llama_dir, monkeypatch):
    from p2d.studio.worker import Job

    kw = _kw(tiny_llama_dir, head_method="gradient")
    original = Job.progress

    def stop_at_once(self, done, total, desc):
        original(self, done, total, desc)
        if self.kind == "heads":
            self.stop_event.set()

    monkeypatch.setattr(Job, "progress", stop_at_once)
    status, info, heatmap, *_ = client.predict(**kw, api_name="/heads")
    assert "Head scoring stopped" in status and "failed" not in status, status
    assert "Partial" in info and _plot(heatmap)["data"][0]["type"] == "heatmap"  # shown, marked partial
    assert client.predict(10, api_name="/wait_job")["stages_partial"] == ["heads"]
    monkeypatch.setattr(Job, "progress", original)
    status, info, *_ = client.predict(**kw, api_name="/heads")  # the next press scores again
    assert "Head scoring done" in status and "Partial" not in info
    assert client.predict(10, api_name="/wait_job")["stages_partial"] == []


@pytest.mark.slow
def test_demo_mode_caps_and_refuses_local_paths(served_demo, tiny_llama_dir, tmp_path):
    from gradio_client import Client

    c = Client(served_demo.url, verbose=False)
    for source in ("local", "hub"):  # the demo's page offers no "local folder"; sent anyway, either is refused
        status, *_ = c.predict(**_kw(tiny_llama_dir, model_source=source), api_name="/load")
        assert "local model paths are disabled in the public demo" in status
    status, *_ = c.predict(**_kw(tiny_llama_dir, model_source="ftp"), api_name="/load")  # no form offers it
    assert "model_source: 'ftp' is not one of embedded, hub, local" in status and "\n" not in status
    yaml_text, command = c.predict(model_source="embedded", pool_size=100_000, steps=500, api_name="/show_command")
    cfg = RunConfig.from_yaml(yaml_text)  # the caps are part of the config a job runs, and of its command
    assert cfg.pool_size == 400 and cfg.max_steps == 40 and "--max-steps 40" in command
    from p2d.studio.form import FIELD_NAMES

    values = c.predict("pool_size: 100000\nsteps: 10000\nfull_ft: measure\n", api_name="/apply_config")
    form = dict(zip(FIELD_NAMES, values))
    assert (form["pool_size"], form["max_steps"], form["full_ft"]) == (400, 40, "estimate")
    assert "Pool size (pool_size) capped at 400" in values[-1]
    merge = c.predict(str(tmp_path / "m"), api_name="/merge")
    assert "disabled in the public demo" in merge
    api = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {f"/{n}" for n in ("load", "heads", "select", "preview", "train", "train_status", "stop", "wait_job",
                              "results", "evaluate", "merge", "upload_pool", "upload_probe", "upload_eval",
                              "show_command", "save_config", "apply_config")} <= set(api)
    for name in ("/load", "/heads", "/select", "/train", "/show_command", "/save_config"):
        params = [p["parameter_name"] for p in api[name]["parameters"]]
        extra = ["processes"] if name == "/train" else []  # /train: several training processes (local mode)
        assert params == list(FIELD_NAMES) + extra, name  # the settings, by keyword, all optional
        assert all(p["parameter_has_default"] for p in api[name]["parameters"]), name
    assert [p["parameter_name"] for p in api["/preview"]["parameters"]] == ["search", "page"]
    assert [p["parameter_name"] for p in api["/upload_pool"]["parameters"]] == ["file", "columns"]
    config = served_demo.app.config
    kinds = {comp.get("type") for comp in config["components"]}
    assert "duplicatebutton" in kinds or any(comp.get("props", {}).get("elem_id") == "duplicate-btn"
                                             for comp in config["components"])


@pytest.mark.slow
def test_upload_files_and_load_them(client, tiny_llama_dir, tmp_path):
    from gradio_client import handle_file

    pool = tmp_path / "pool.csv"
    lines = ["question,answer,category"]
    lines += [f"What is {i} + {i}?,{2 * i},{'math' if i % 2 else 'other'}" for i in range(30)]
    lines.append("too,many,fields,here")
    pool.write_text("\n".join(lines) + "\n")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "response": str(i + 1)}) + "\n"
                             for i in range(6)) + "{not json\n")
    path, source, msg = client.predict(handle_file(str(pool)), "", api_name="/upload_pool")
    assert source == "files" and Path(path).name.endswith("pool.csv")
    assert "format **question_answer**" in msg and "30 rows" in msg and "1 skipped (1 wrong number of fields)" in msg
    assert "math 15" in msg
    ppath, _, pmsg = client.predict(handle_file(str(probe)), "", api_name="/upload_probe")
    assert "prompt_response" in pmsg and "1 malformed JSON line" in pmsg
    # a wrong column mapping is reported, not raised
    _, _, bad = client.predict(handle_file(str(pool)), "prompt=nope, answer=answer", api_name="/upload_pool")
    assert "mapped column 'nope'" in bad

    status, info, table, mix = client.predict(**_kw(tiny_llama_dir, data_source="files", pool_path=path,
                                                    probe_path=ppath, eval_path=""), api_name="/load")
    assert "Load done" in status, status
    sets = {row[0]: row for row in table["data"]}
    assert set(sets) == {"pool", "probe"}
    assert sets["pool"][2] == "question_answer" and sets["pool"][3] == 30 and sets["pool"][4] == 1
    assert "wrong number of fields" in sets["pool"][5]
    assert [t["name"] for t in _plot(mix)["data"]] == ["pool (n=30)"]
