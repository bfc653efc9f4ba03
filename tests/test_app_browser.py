"""Browser test of the app: Playwright (sync API) on Debian's chromium.

Opens the page, walks the tabs on a tiny model and the built-in pool, starts a short run, and checks
that the heatmap (a Plotly div), the preview table and the loss chart render, that a page reload
re-attaches to the run, and saves a screenshot of each tab. The screenshot folder is printed
(``test-artifacts/screenshots/`` at the repository root; override with P2D_SCREENSHOTS).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from studio_helpers import free_port as _free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SHOTS = Path(os.environ.get("P2D_SCREENSHOTS") or Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from p2d.studio.server import build_app

    app = build_app(demo=False, runs_root=tmp_path_factory.mktemp("browser-runs"))
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=_free_port(), quiet=True)
    yield url
    app.close()
    app.studio.worker.close()


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def _plotly(page, elem_id: str, timeout: float = 30_000):
    loc = page.locator(f"#{elem_id} .js-plotly-plot")
    loc.first.wait_for(state="visible", timeout=timeout)
    return loc.first


def _luminance(rgb) -> float:
    r, g, b = rgb[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _background(png: bytes) -> float:
    """Luminance of the most common colour of a screenshot (a chart's background)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    count, colour = max(img.getcolors(img.width * img.height))
    return _luminance(colour)


def _css_rgb(text: str) -> tuple:
    return tuple(float(x) for x in text[text.index("(") + 1:text.index(")")].split(",")[:3])


@pytest.mark.slow
def test_walk_tabs_train_and_reload(app_url, tiny_llama_dir, capsys, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\n[test_app_browser] screenshots: {SHOTS}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(app_url)
            expect(page.get_by_text("P2D Studio", exact=False).first).to_be_visible()

            # 1 - model & data: the tiny model, the built-in pool at tiny sizes
            page.get_by_label("Local folder or .gguf file").check()
            _fill(page, "model-name", tiny_llama_dir)
            _fill(page, "pool-size", 40)
            _fill(page, "probe-size", 8)
            _fill(page, "eval-size", 8)
            page.locator("#load-btn").click()
            expect(page.locator("#md-status")).to_contain_text("Load done", timeout=90_000)
            expect(page.locator("#data-table")).to_contain_text("pool")
            _plotly(page, "pool-mix")
            page.screenshot(path=str(SHOTS / "1-model-data.png"), full_page=True)

            # 2 - heads: heatmap with the selected heads marked
            page.get_by_role("tab", name="2 · Heads").click()
            page.locator("#heads-btn").click()
            expect(page.locator("#heads-status")).to_contain_text("done", timeout=90_000)
            heat = _plotly(page, "heads-heatmap")
            expect(heat.locator(".heatmaplayer, .hm image, image").first).to_be_attached()
            expect(page.locator("#heads-heatmap")).to_contain_text("selected heads")
            expect(heat.locator(".scatterlayer .point")).to_have_count(2)  # 10% of 16 heads, marked
            expect(page.locator("#heads-table")).to_contain_text("layer")
            page.screenshot(path=str(SHOTS / "2-heads.png"), full_page=True)

            # 3 - data: histogram, task mix, preview table, search
            page.get_by_role("tab", name="3 · Data").click()
            page.locator("#select-btn").click()
            expect(page.locator("#data-status")).to_contain_text("done", timeout=90_000)
            _plotly(page, "score-hist")
            _plotly(page, "task-mix")
            expect(page.locator("#preview-table")).to_contain_text("Answer with")
            page.screenshot(path=str(SHOTS / "3-data.png"), full_page=True)

            # 4 - train a few steps: live loss chart and AER chart
            page.get_by_role("tab", name="4 · Train").click()
            _fill(page, "steps", 3)
            _fill(page, "batch-size", 4)
            page.locator("#train-btn").click()
            expect(page.locator("#train-progress")).to_contain_text("Training finished", timeout=120_000)
            loss = _plotly(page, "loss-chart")
            expect(loss).to_contain_text("Training loss")
            _plotly(page, "aer-chart")
            expect(page.locator("#aer-chart")).to_contain_text("AER")
            page.screenshot(path=str(SHOTS / "4-train.png"), full_page=True)

            # reload: the page re-attaches to this browser's workspace and redraws the run
            page.reload()
            page.get_by_role("tab", name="4 · Train").click()
            expect(page.locator("#train-progress")).to_contain_text("Training finished", timeout=30_000)
            expect(_plotly(page, "loss-chart")).to_contain_text("Training loss")
            page.screenshot(path=str(SHOTS / "4-train-after-reload.png"), full_page=True)

            # 5 - results
            page.get_by_role("tab", name="5 · Results & export").click()
            expect(page.locator("#eval-table")).to_contain_text("exact match")
            expect(page.locator("#results-summary")).to_contain_text("AER")
            expect(page.locator("#examples-table")).to_contain_text("Answer with")
            page.screenshot(path=str(SHOTS / "5-results.png"), full_page=True)

            # 5 - forgetting bars, and the controls in one click
            _plotly(page, "forgetting-chart")
            expect(page.locator("#forgetting-md")).to_contain_text("Other tasks")
            page.locator("#controls-btn").click()
            expect(page.locator("#controls-status")).to_contain_text("Controls done", timeout=300_000)
            expect(page.locator("#controls-table")).to_contain_text("random heads / P2D data")
            _plotly(page, "controls-chart")
            page.screenshot(path=str(SHOTS / "5-results-controls.png"), full_page=True)

            # 6 - explore: chat, open a head from the grid, compare a map with itself
            page.get_by_role("tab", name="6 · Explore").click()
            _fill(page, "chat-prompt", "What is 12 + 30?")
            page.locator("#chat-btn").click()
            expect(page.locator("#chat-status")).to_contain_text("answered", timeout=60_000)
            expect(page.locator("#chat-base")).to_contain_text("What is 12 + 30?")  # the conversation, both sides
            expect(page.locator("#chat-tuned")).to_contain_text("What is 12 + 30?")
            page.locator("#head-grid").get_by_role("gridcell").nth(3 * 5 + 2).click()  # row 3 (layer 3), column h1
            expect(page.locator("#head-layer input")).to_have_value("3")
            expect(page.locator("#head-head input")).to_have_value("1")
            page.locator("#head-btn").click()
            expect(page.locator("#head-md")).to_contain_text("Layer 3, head 1", timeout=60_000)
            expect(page.locator("#head-md")).to_contain_text("Gated off")
            _plotly(page, "head-pattern")
            _fill(page, "map-b", "run-001")
            page.locator("#compare-btn").click()
            expect(page.locator("#compare-md")).to_contain_text("Jaccard 1.00", timeout=30_000)
            _plotly(page, "map-diff")
            page.screenshot(path=str(SHOTS / "6-explore.png"), full_page=True)


            # a longer run: live progress (elapsed/remaining) and a loss chart that grows, then Stop keeps
            # the adapter
            page.get_by_role("tab", name="4 · Train").click()
            _fill(page, "steps", 400)
            page.locator("#train-btn").click()
            expect(page.locator("#train-progress")).to_contain_text("remaining", timeout=60_000)
            steps_drawn = "(document.querySelector('#loss-chart .js-plotly-plot')?.data?.[0]?.x || []).length"
            page.wait_for_function(f"{steps_drawn} > 0", timeout=30_000)
            seen = page.evaluate(steps_drawn)
            page.wait_for_function(f"{steps_drawn} > {seen}", timeout=30_000)
            page.screenshot(path=str(SHOTS / "4-train-live.png"), full_page=True)
            page.locator("#stop-btn").click()
            expect(page.locator("#train-progress")).to_contain_text("Training stopped (adapter kept)", timeout=60_000)
            expect(page.locator("#train-status")).to_contain_text("stopped")

            # "Evaluate now" evaluates the heads of the stopped training, and says so
            page.get_by_role("tab", name="5 · Results & export").click()
            page.locator("#results-eval").click()
            expect(page.locator("#results-status")).to_contain_text("Evaluation done", timeout=90_000)
            expect(page.locator("#results-summary")).to_contain_text("for a stopped training")
            page.screenshot(path=str(SHOTS / "5-results-stopped.png"), full_page=True)

            # settings: YAML and the equivalent command
            page.locator("#settings-accordion").get_by_text("Settings file & equivalent command").click()
            page.locator("#show-command").click()
            expect(page.locator("#command")).to_contain_text("python -m p2d run", timeout=15_000)
            page.screenshot(path=str(SHOTS / "7-settings.png"), full_page=False)

            # a saved settings file fills the form
            from p2d.config import RunConfig

            settings = RunConfig(target="dates", pool_size=33, lr=0.004).save(tmp_path / "settings.yaml")
            with page.expect_file_chooser() as chooser:
                page.locator("#load-config").click()
            chooser.value.set_files(str(settings))
            expect(page.locator("#settings-status")).to_contain_text("settings applied", timeout=15_000)
            expect(page.locator("#pool-size input")).to_have_value("33")

            # dark mode (?__theme=dark): the charts are transparent on the dark blocks, their text and the notes
            # take the theme's colours
            page.get_by_role("tab", name="4 · Train").click()
            light = _background(_plotly(page, "loss-chart").screenshot())
            page.goto(app_url + "?__theme=dark")
            page.get_by_role("tab", name="4 · Train").click()
            expect(_plotly(page, "loss-chart")).to_contain_text("Training loss", timeout=30_000)
            chart = page.locator("#loss-chart").screenshot(path=str(SHOTS / "dark-loss-chart.png"))
            page.screenshot(path=str(SHOTS / "dark-4-train.png"), full_page=True)
            assert light > 230 and _background(chart) < 80, (light, _background(chart))
            title = page.evaluate("getComputedStyle(document.querySelector('#loss-chart .gtitle')).fill")
            assert _luminance(_css_rgb(title)) > 150, title
            note = page.evaluate("getComputedStyle(document.querySelector('.p2d-lesson')).color")
            assert _luminance(_css_rgb(note)) > 120, note
            page.get_by_role("tab", name="2 · Heads").click()
            _plotly(page, "heads-heatmap")
            page.screenshot(path=str(SHOTS / "dark-2-heads.png"), full_page=True)
        finally:
            browser.close()
    assert (SHOTS / "4-train.png").stat().st_size > 10_000


@pytest.mark.slow
def test_dark_mode_charts_and_notes(app_url):
    """?__theme=dark: a chart's background is the dark page's (transparent figures), not white; its text and the
    notes under the charts take the theme's light text colour. The light page for comparison."""
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            seen = {}
            for theme in ("light", "dark"):
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(app_url + ("?__theme=dark" if theme == "dark" else ""))
                page.get_by_role("tab", name="2 · Heads").click()
                chart = _plotly(page, "heads-heatmap")  # the empty figure a fresh session shows, with its note
                png = chart.screenshot(path=str(SHOTS / f"{theme}-empty-chart.png"))
                page.screenshot(path=str(SHOTS / f"{theme}-2-heads-empty.png"), full_page=True)
                text = page.evaluate("getComputedStyle(document.querySelector('#heads-heatmap .annotation-text')).fill")
                note = page.evaluate("getComputedStyle(document.querySelector('.p2d-lesson')).color")
                seen[theme] = (_background(png), _luminance(_css_rgb(text)), _luminance(_css_rgb(note)))
                page.close()
        finally:
            browser.close()
    assert seen["light"][0] > 230 and seen["dark"][0] < 80, seen  # the chart follows the page
    assert seen["dark"][1] > 150 and seen["dark"][2] > 120, seen  # light text on the dark page
    assert seen["light"][1] < 150, seen  # dark text on the light page
