"""How much a browser showing P2D Studio slows the work down, and how busy its renderer is.

Runs the same small job on the embedded model twice: once driven through the API alone
(gradio_client, no page open) and once through the page (Playwright on Debian's chromium, clicking
the buttons). Reports the library's own stage times (heads.json, selection.json, seconds per training
step from train_log.jsonl) and the CPU the chromium renderer processes used while each stage ran
(% of one core, from psutil).

    python bench/studio_load.py                 # both modes, pool 200, 12 training steps
    python bench/studio_load.py --mode page --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("GRADIO_ANALYTICS_ENABLED", "False"),
             ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(k, v)
sys.path.insert(0, os.getcwd())  # the checkout being measured (run from its root)

import psutil  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]


def renderer_cpu_s() -> float:
    """CPU seconds used so far by the chromium renderer processes started from this process."""
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            if any(a.startswith("--type=renderer") for a in p.cmdline()):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


def newest(root: Path, name: str) -> Path:
    return max(root.rglob(name), key=lambda p: p.stat().st_mtime)


def stage_times(root: Path) -> dict:
    heads = json.loads(newest(root, "heads.json").read_text())["time_s"]
    select = json.loads(newest(root, "selection.json").read_text())["time_s"]
    log = [json.loads(line) for line in newest(root, "train_log.jsonl").read_text().splitlines()]
    per_step = (log[-1]["elapsed_s"] - log[0]["elapsed_s"]) / max(1, len(log) - 1)
    return {"heads_s": round(heads, 2), "select_s": round(select, 2), "train_s_per_step": round(per_step, 3),
            "steps": len(log)}


def via_api(url: str, a) -> None:
    from gradio_client import Client

    c = Client(url, verbose=False)
    kw = dict(model_source="embedded", pool_size=a.pool, probe_size=a.probe, eval_size=a.eval, steps=a.steps,
              batch_size=a.batch)
    for name in ("/load", "/heads", "/select"):
        c.predict(**kw, api_name=name)
    c.predict(**kw, api_name="/train")
    c.predict(900, api_name="/wait_job")


def via_page(url: str, a) -> dict:
    from playwright.sync_api import expect, sync_playwright

    cpu = {}

    def timed(name, click, done):
        c0, t0 = renderer_cpu_s(), time.perf_counter()
        click()
        done()
        cpu[name] = round(100 * (renderer_cpu_s() - c0) / (time.perf_counter() - t0), 1)

    def fill(elem_id, value):
        box = page.locator(f"#{elem_id}").locator("input, textarea").first
        box.fill(str(value))
        box.press("Tab")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(900_000)
        page.goto(url)
        for elem_id, value in (("pool-size", a.pool), ("probe-size", a.probe), ("eval-size", a.eval)):
            fill(elem_id, value)
        page.locator("#load-btn").click()
        expect(page.locator("#md-status")).to_contain_text("done")
        page.get_by_role("tab", name="2 · Heads").click()
        timed("heads", lambda: page.locator("#heads-btn").click(),
              lambda: expect(page.locator("#heads-status")).to_contain_text("done"))
        page.get_by_role("tab", name="3 · Data").click()
        timed("select", lambda: page.locator("#select-btn").click(),
              lambda: expect(page.locator("#data-status")).to_contain_text("done"))
        page.get_by_role("tab", name="4 · Train").click()
        fill("steps", a.steps)
        fill("batch-size", a.batch)
        timed("train_job", lambda: page.locator("#train-btn").click(),
              lambda: expect(page.locator("#train-progress")).to_contain_text("Training finished"))
        browser.close()
    return cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("api", "page", "both"), default="both")
    p.add_argument("--pool", type=int, default=200)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--eval", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    from p2d.studio.app import build_app

    out = {}
    for mode in (("api", "page") if a.mode == "both" else (a.mode,)):
        root = Path(tempfile.mkdtemp(prefix=f"studio-{mode}-"))
        app = build_app(demo=False, runs_root=root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _, url, _ = app.launch(prevent_thread_lock=True, server_port=port, quiet=True)
        try:
            cpu = via_api(url, a) if mode == "api" else via_page(url, a)
            out[mode] = {**stage_times(root), **({"renderer_cpu_pct": cpu} if cpu else {})}
        finally:
            app.close()
            app.studio.runner.close()
        print(mode, json.dumps(out[mode]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
