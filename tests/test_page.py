"""The page in a real browser: Debian's Chromium driven by Playwright against a real server.

Playwright's own browser download cannot work here, so the test launches /usr/bin/chromium
(``apt-get install chromium``; .ci/run installs it) and is skipped, with the reason, only where
that browser is missing. Set CNNSERVE_UPDATE_SCREENSHOT=1 to refresh docs/img/explain-page.png.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, SHARED_CIFAR, distinct_images, png_bytes

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "docs" / "img" / "explain-page.png"

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the dev extra has it)")
if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium); Playwright's own download cannot work here",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start.
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def image_file(server, tmp_path_factory) -> Path:
    """A held-out CIFAR-10 image (the page's cat sample) when the data is present, else a drawn one."""
    path = tmp_path_factory.mktemp("page") / "input.png"
    if SHARED_CIFAR.exists():
        doc = httpx.get(f"{server.http}/samples", timeout=60).json()
        path.write_bytes(httpx.get(f"{server.http}{doc['samples'][3]['url']}").content)
    else:
        path.write_bytes(png_bytes(distinct_images(1, seed=21)[0]))
    return path


def test_upload_shows_the_api_label_and_every_layer(server, browser, image_file, tmp_path):
    expected = httpx.post(
        f"{server.http}/predict", content=image_file.read_bytes(), headers={"Content-Type": "image/png"}
    ).json()["results"][0]["predictions"][0]["label"]
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.http}/")
    if SHARED_CIFAR.exists():
        page.wait_for_selector("#samples button img")
    page.set_input_files("#file", str(image_file))
    page.wait_for_selector("#layer-pool .maps img")
    assert page.inner_text("#top-label") == expected
    assert page.inner_text("#bars li:first-child span:first-child") == expected
    # conv1: 32 filters + 32 maps; conv2 and pool: 32 maps each; all decoded by the browser.
    counts = {name: page.locator(f"#layer-{name} .maps img").count() for name in ("conv1", "conv2", "pool")}
    assert counts == {"conv1": 64, "conv2": 32, "pool": 32}
    assert page.evaluate("[...document.querySelectorAll('.maps img')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#layer-fc3 canvas").count() == 1
    assert page.locator("#scores tbody tr").count() == 10
    # The heat map and the input were drawn (not blank canvases).
    painted = (
        "id => { const c = document.getElementById(id); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i];"
        " return s; }"
    )
    assert page.evaluate(f"({painted})('heat-view')") > 0
    assert page.evaluate(f"({painted})('input-view')") > 0
    # Every image has alt text; every canvas is an image with a label.
    assert page.evaluate("[...document.images].every(i => i.alt.trim().length > 0)")
    assert page.evaluate(
        "[...document.querySelectorAll('canvas')].every(c => c.getAttribute('role') === 'img'"
        " && c.getAttribute('aria-label'))"
    )
    # Keyboard: choose another attribution method with the arrow key; the page explains again.
    page.focus("#method")
    page.keyboard.press("ArrowDown")
    page.wait_for_function("document.getElementById('heat-caption').textContent.startsWith('rise')")
    page.focus("#method")
    page.keyboard.press("ArrowUp")
    page.wait_for_function("document.getElementById('heat-caption').textContent.startsWith('occlusion')")
    assert errors == []
    page.evaluate("document.activeElement.blur()")
    shot = tmp_path / "explain-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("CNNSERVE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    page.close()


def test_phone_width_has_no_sideways_scrolling(server, browser, image_file):
    page = browser.new_page(viewport={"width": 375, "height": 740}, is_mobile=True)
    page.goto(f"{server.http}/")
    page.set_input_files("#file", str(image_file))
    page.wait_for_selector("#layer-pool .maps img")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.close()


def test_a_bad_file_is_reported_on_the_page(server, browser, image_file, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page = browser.new_page()
    page.goto(f"{server.http}/")
    page.set_input_files("#file", str(image_file))
    page.wait_for_selector("#result:not([hidden])")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('status').textContent.includes('Could not explain')")
    assert "415" in page.inner_text("#status") or "unsupported" in page.inner_text("#status").lower()
    assert page.is_hidden("#result")  # the previous image's answer is not left under the error
    page.close()
