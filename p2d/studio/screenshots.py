"""Screenshots of every tab from a real run on the embedded model, for the README and the Space card.

    python -m p2d.studio.screenshots --out assets

Starts the app, walks the tabs in headless chromium (Playwright; Debian's /usr/bin/chromium unless
``--chromium`` says otherwise) at small sizes (pool 200, probe 32, eval 16, 6 training steps), and
writes ``1-model-data.png`` ... ``6-explore.png`` plus ``thumbnail.png`` (1200x630, the head
heatmap). Images are downscaled and palette-reduced to stay well under 300 KB each. Takes a few
minutes on a CPU.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

from .launcher import free_port
from .server import build_app

# Pillow and Playwright (dev tools, not app requirements) are imported where used
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-dev-shm-usage"]
MAX_BYTES = 300_000


def save_png(data: bytes, path: Path, width: int | None = 1100, size: tuple[int, int] | None = None) -> int:
    """Write a screenshot downscaled to ``width`` (or cropped and fitted to ``size``) with a 256-colour
    palette; returns the file size."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None:
        tw, th = size
        scale = max(tw / img.width, th / img.height)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
        left, top = (img.width - tw) // 2, (img.height - th) // 2
        img = img.crop((left, top, left + tw, top + th))
    elif width and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    for colors in (256, 128, 64):
        out = io.BytesIO()
        img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
        if out.tell() <= MAX_BYTES:
            break
    path.write_bytes(out.getvalue())
    return out.tell()


def capture(url: str, out: Path, a) -> None:
    from playwright.sync_api import expect, sync_playwright

    def fill(elem_id, value):
        box = page.locator(f"#{elem_id}").locator("input, textarea").first
        box.fill(str(value))
        box.press("Tab")

    def shot(name: str, **kw) -> None:
        page.wait_for_timeout(800)  # let the plots finish drawing
        size = save_png(page.screenshot(full_page=True), out / name, **kw)
        print(f"{out / name}: {size // 1000} KB", flush=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(a.timeout * 1000)
            expect.set_options(timeout=a.timeout * 1000)
            page.goto(url)
            for elem_id, value in (("pool-size", a.pool), ("probe-size", a.probe), ("eval-size", a.eval)):
                fill(elem_id, value)
            page.locator("#load-btn").click()
            expect(page.locator("#md-status")).to_contain_text("Load done")
            shot("1-model-data.png")
            page.get_by_role("tab", name="2 · Heads").click()
            page.locator("#heads-btn").click()
            expect(page.locator("#heads-status")).to_contain_text("done")
            shot("2-heads.png")
            page.wait_for_timeout(300)
            save_png(page.locator("#heads-heatmap").screenshot(), out / "thumbnail.png", size=(1200, 630))
            page.get_by_role("tab", name="3 · Data").click()
            page.locator("#select-btn").click()
            expect(page.locator("#data-status")).to_contain_text("done")
            shot("3-data.png")
            page.get_by_role("tab", name="4 · Train").click()
            fill("steps", a.steps)
            page.locator("#train-btn").click()
            expect(page.locator("#train-progress")).to_contain_text("Training finished")
            shot("4-train.png")
            page.get_by_role("tab", name="5 · Results & export").click()
            expect(page.locator("#results-summary")).to_contain_text("AER")
            shot("5-results.png")
            page.get_by_role("tab", name="6 · Explore").click()
            fill("chat-prompt", "What is 27 + 15?")
            page.locator("#chat-btn").click()
            expect(page.locator("#chat-status")).to_contain_text("answered")
            fill("head-layer", a.layer)
            fill("head-head", a.head)
            page.locator("#head-btn").click()
            expect(page.locator("#head-md")).to_contain_text("Gated off")
            shot("6-explore.png")
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m p2d.studio.screenshots", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assets", help="folder for the PNGs (default: assets)")
    p.add_argument("--pool", type=int, default=200)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--eval", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layer", type=int, default=0, help="the head opened on the Explore tab (layer)")
    p.add_argument("--head", type=int, default=0, help="the head opened on the Explore tab (query head)")
    p.add_argument("--chromium", default=CHROMIUM, help=f"browser executable (default: {CHROMIUM})")
    p.add_argument("--timeout", type=int, default=1200, help="seconds to wait for a stage (default: 1200)")
    a = p.parse_args(argv)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("GRADIO_ANALYTICS_ENABLED", "False"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    app = build_app(demo=False, runs_root=tempfile.mkdtemp(prefix="p2d-screenshots-"))
    _, url, _ = app.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True)
    try:
        capture(url, out, a)
    finally:
        app.close()
        app.studio.worker.close()
    print(f"screenshots in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
