"""How much a browser showing P2D Studio slows the work down, and how busy chromium is meanwhile.

One app, two sessions on the embedded model: one driven through the API alone (gradio_client), one
through the page (Playwright on Debian's chromium, clicking the buttons). Each stage runs first for
the API session, then for the page session, so both see about the same machine load. Reports the
library's own stage times (heads.json, selection.json, seconds per training step from
train_log.jsonl) and the CPU the chromium renderer processes (and all chromium processes) used while
the page's stage ran, in % of one core (psutil).

    python bench/studio_load.py                 # pool 120, probe 16, 10 training steps
    python bench/studio_load.py --steps 20 --repeat 2
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
DONE = {"heads": ("#heads-status", "done"), "select": ("#data-status", "done"),
        "train": ("#train-progress", "Training finished")}
BUTTON = {"heads": ("2 · Heads", "#heads-btn"), "select": ("3 · Data", "#select-btn"),
          "train": ("4 · Train", "#train-btn")}


def chromium_cpu_s() -> tuple[float, float]:
    """CPU seconds used so far by (the renderer processes, all processes) of the chromium started here."""
    renderer = total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
            if not cmd or "chrom" not in cmd[0]:
                continue
            t = p.cpu_times()
            total += t.user + t.system
            if any(a.startswith("--type=renderer") for a in cmd):
                renderer += t.user + t.system
        except psutil.Error:
            pass
    return renderer, total


def stage_time(root: Path, stage: str) -> float:
    """The library's time of the newest result of ``stage`` under ``root`` (seconds per step for train)."""
    name = {"heads": "heads.json", "select": "selection.json", "train": "train_log.jsonl"}[stage]
    path = max(root.rglob(name), key=lambda p: p.stat().st_mtime)
    if stage != "train":
        return round(json.loads(path.read_text())["time_s"], 2)
    log = [json.loads(line) for line in path.read_text().splitlines()]
    return round((log[-1]["elapsed_s"] - log[0]["elapsed_s"]) / max(1, len(log) - 1), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=120)
    p.add_argument("--probe", type=int, default=16)
    p.add_argument("--eval", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args()
    from gradio_client import Client
    from playwright.sync_api import expect, sync_playwright

    from p2d.studio.server import build_app

    root = Path(tempfile.mkdtemp(prefix="studio-load-"))
    app = build_app(demo=False, runs_root=root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=port, quiet=True)
    kw = dict(model_source="embedded", pool_size=a.pool, probe_size=a.probe, eval_size=a.eval, steps=a.steps,
              batch_size=a.batch)
    api = Client(url, verbose=False)
    out: dict = {"api": {}, "page": {}, "chromium_cpu_pct": {}}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(900_000)
            expect.set_options(timeout=900_000)
            page.goto(url)
            for elem_id, value in (("pool-size", a.pool), ("probe-size", a.probe), ("eval-size", a.eval)):
                box = page.locator(f"#{elem_id}").locator("input").first
                box.fill(str(value))
                box.press("Tab")
            api.predict(**kw, api_name="/load")
            page.locator("#load-btn").click()
            expect(page.locator("#md-status")).to_contain_text("done")
            for stage in ("heads", "select", "train"):
                if stage == "train":
                    api.predict(**kw, api_name="/train")
                    api.predict(900, api_name="/wait_job")
                else:
                    api.predict(**kw, api_name=f"/{stage}")
                out["api"][stage] = stage_time(root, stage)
                tab, button = BUTTON[stage]
                page.get_by_role("tab", name=tab).click()
                if stage == "train":
                    for elem_id, value in (("steps", a.steps), ("batch-size", a.batch)):
                        box = page.locator(f"#{elem_id}").locator("input").first
                        box.fill(str(value))
                        box.press("Tab")
                (r0, c0), t0 = chromium_cpu_s(), time.perf_counter()
                page.locator(button).click()
                expect(page.locator(DONE[stage][0])).to_contain_text(DONE[stage][1])
                (r1, c1), wall = chromium_cpu_s(), time.perf_counter() - t0
                out["page"][stage] = stage_time(root, stage)
                out["chromium_cpu_pct"][stage] = {"renderer": round(100 * (r1 - r0) / wall, 1),
                                                  "all": round(100 * (c1 - c0) / wall, 1)}
                print(stage, json.dumps({k: out[k][stage] for k in out}), flush=True)
            browser.close()
    finally:
        app.close()
        app.studio.worker.close()
    out["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
