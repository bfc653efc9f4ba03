"""Issue 9, finding 9: the app keeps its job registry on disk. After a server restart (here: the first
server SIGKILLed in the middle of a training) a returning client with its workspace key finds its
runs; a past run folder reopens (charts, results, downloads) and an interrupted one resumes from its
last checkpoint. The second server is a new `build_app` on the same runs folder; a browser test checks
that the key the page keeps (Gradio's BrowserState) still works after the restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from studio_helpers import form_kw as _kw, free_port as _free_port, wait_job as _wait

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys, time
from p2d.studio.server import build_app
app = build_app(demo=False, runs_root=sys.argv[1])
app.launch(prevent_thread_lock=True, server_port=int(sys.argv[2]), quiet=True)
print("READY", flush=True)
while True:
    time.sleep(1)
"""


def _start_server(root: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "READY" in line, f"server did not start: {line!r}"
    return proc


@pytest.mark.slow
def test_restart_finds_runs_reopens_and_resumes(tmp_path, tiny_llama_dir):
    from gradio_client import Client

    from p2d.studio.server import build_app

    root = tmp_path / "runs"
    port = _free_port()
    first = _start_server(root, port)
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        key = c.predict("", api_name="/attach")["key"]
        kw = _kw(tiny_llama_dir)
        c.predict(**kw, api_name="/train")  # run-001: a whole run
        assert _wait(c)["status"] == "done"
        long = _kw(tiny_llama_dir, pool_size=48, steps=60, checkpoint_every=5)  # new data: run-002
        c.predict(**long, api_name="/train")
        end = time.time() + 120
        while time.time() < end:
            summary = c.predict(0, api_name="/wait_job")
            if summary.get("log_lines", 0) >= 12:
                break
            time.sleep(0.2)
        assert summary["status"] == "running" and summary["log_lines"] >= 12, summary
        killed_at = summary["log_lines"]
    finally:
        first.send_signal(signal.SIGKILL)  # the server dies mid-training: no shutdown code runs
        first.wait(30)
    ws_dirs = [p for p in root.iterdir() if p.name.startswith("ws-")]
    assert len(ws_dirs) == 1 and key not in str(ws_dirs[0])
    # the steps logged when the server died (training went on between the poll above and the kill)
    killed_at = max(killed_at, len((ws_dirs[0] / "run-002" / "train_log.jsonl").read_text().splitlines()))

    app = build_app(demo=False, runs_root=root)  # the restarted server, same runs folder
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    try:
        stranger = Client(url, verbose=False)
        assert stranger.predict("", api_name="/attach")["runs"] == []  # no key, no runs
        back = Client(url, verbose=False)
        attached = back.predict(key, api_name="/attach")
        assert attached == {"key": key, "run": "run-002", "runs": ["run-001", "run-002"]}, attached
        status, table, pick = back.predict(api_name="/runs")
        rows = {r[0].lstrip("▶ "): r for r in table["data"]}
        assert "interrupted" not in rows["run-001"][5] and "Training: done" == rows["run-001"][5]
        assert rows["run-002"][5] == "Training: stopped" and "train" not in rows["run-002"][3]
        polled = back.predict({}, api_name="/train_status")
        assert "interrupted: the server restarted" in polled[1], polled[1]
        loss = json.loads(polled[3]["plot"])
        assert len(loss["data"][0]["y"]) >= killed_at  # the loss chart of what was trained before the kill

        # reopen the finished run: results, charts and downloads come back without loading the model
        assert "opened `run-001`" in back.predict("run-001", api_name="/open_run")[0]
        status, summary_md, table, chart, examples, adapter_dl, metrics_dl, peft_dl = back.predict(api_name="/results")
        assert "AER" in summary_md and examples["data"]
        adapter_zip = adapter_dl["value"] if isinstance(adapter_dl, dict) else adapter_dl
        assert adapter_zip and Path(adapter_zip).stat().st_size > 0
        heads = back.predict(**kw, api_name="/heads")  # the run's stages are done: nothing is recomputed
        assert "Head scoring done" in heads[0]
        assert app.studio.worker.model_info(app.studio.registry.by_key(key).run.config) is not None

        # resume the interrupted training: it continues from its last checkpoint to the end
        status, *_ = back.predict("run-002", api_name="/resume_run")
        assert "Resume done" in status, status
        run_dir = app.studio.registry.by_key(key).root / "run-002"
        manifest = json.loads((run_dir / "stages.json").read_text())["stages"]
        assert not manifest["train"]["partial"] and "eval_after" in manifest
        resumed_from = manifest["train"]["result"]["extra"]["resumed_from"]
        assert resumed_from and 5 <= resumed_from <= killed_at and resumed_from % 5 == 0, resumed_from
        log = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert log == list(range(1, 61))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps_done"] == 60 and metrics["eval_after"] is not None
        # nothing more to resume
        assert "nothing to resume in run-002" in back.predict("run-002", api_name="/resume_run")[0]
        # another session cannot open this session's runs by name
        assert "no run folder 'run-002' in this session" in stranger.predict("run-002", api_name="/open_run")[0]
    finally:
        app.close()
        app.studio.close()


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed")
def test_browser_returns_to_its_runs_after_a_restart(tmp_path, tiny_llama_dir):
    from playwright.sync_api import expect, sync_playwright

    from p2d.studio.server import build_app

    root, port = tmp_path / "runs", _free_port()
    app = build_app(demo=False, runs_root=root)
    app.launch(prevent_thread_lock=True, server_port=port, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            page.get_by_label("Local folder or .gguf file").check()
            for elem, value in (("model-name", tiny_llama_dir), ("pool-size", 40), ("probe-size", 8),
                                ("eval-size", 8)):
                box = page.locator(f"#{elem}").locator("input, textarea").first
                box.fill(str(value))
                box.press("Tab")
            page.locator("#load-btn").click()
            expect(page.locator("#md-status")).to_contain_text("Load done", timeout=90_000)
            stored = page.evaluate("window.localStorage.getItem('p2d-studio-workspace')")
            assert stored and app.studio.registry.all()[0].key not in stored  # kept encrypted

            app.close()  # the server goes away ...
            app.studio.close()
            for _ in range(50):
                try:
                    httpx.get(url, timeout=0.5)
                    time.sleep(0.1)
                except httpx.HTTPError:
                    break
            app = build_app(demo=False, runs_root=root)  # ... and a new one starts on the same folder
            app.launch(prevent_thread_lock=True, server_port=port, quiet=True)
            page.reload()
            expect(page.locator("#model-info")).to_contain_text("run-001", timeout=30_000)
            expect(page.locator("#data-table")).to_contain_text("pool")
            page.locator("#session-runs").get_by_text("Runs of this session").click()
            expect(page.locator("#runs-table")).to_contain_text("run-001")
        finally:
            browser.close()
            app.close()
            app.studio.close()
