"""End to end in a real browser: `medclip app` serves the page, headless Chromium (Debian's `chromium`, driven by
Playwright) types a query, sees the images come back and saves a screenshot.

Skipped when Chromium or the playwright package is missing (`apt-get install chromium`, `pip install playwright`;
never `playwright install`: the system Chromium is used). Another browser binary: MEDCLIP_CHROMIUM=/path.

README screenshot: after `make demo`, from the repository root,
    MEDCLIP_SAVE_SCREENSHOT=assets/app_screenshot.png .venv/bin/python -m pytest -q tests/test_app_browser.py
serves the demo's own model and index (`medclip app` without arguments) and saves the page there too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medclip.app import handlers
from tests.test_app import build_workspace

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]
SERVER_START_TIMEOUT_S = 180  # imports JAX and TensorFlow, loads and compiles the model
IMAGE = '[data-testid="stImage"] img'
# True once the page shows `expected` (the captions, best first) under loaded images: after a new query the old
# images stay on screen a moment while the caption line above them already names the new query.
SHOWS_EXPECTED = """expected => {
    const images = [...document.querySelectorAll('[data-testid="stImage"]')];
    return images.length === expected.length && images.every((image, i) => {
        const img = image.querySelector('img'), caption = image.innerText.trim();
        return img.complete && img.naturalWidth > 0 && caption.startsWith(`#${i + 1} · `)
            && caption.endsWith(expected[i]);
    });
}"""


@pytest.fixture
def chromium():
    """(playwright's sync API, the Chromium binary); checked before any server is started."""
    path = os.environ.get("MEDCLIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium installed (apt-get install chromium, or set MEDCLIP_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "playwright; the system Chromium is used, no `playwright install`)")
    return sync_api, path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"`medclip app` exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"`medclip app` did not answer within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")


def stop(server: subprocess.Popen) -> None:
    """Stops the server's process group (the launcher and the streamlit child it started)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def app_url(tmp_path):
    """(url, model, index) of `medclip app --headless` on a free port; the demo's outputs for the README."""
    if os.environ.get("MEDCLIP_SAVE_SCREENSHOT"):
        if not Path("outputs/demo/index.npz").is_file():
            pytest.skip("MEDCLIP_SAVE_SCREENSHOT shows the demo's model and index: run `make demo` first")
        model, index, paths = "outputs/demo", "outputs/demo/index.npz", []  # `medclip app` without arguments
    else:
        model, index, _ = build_workspace(tmp_path / "workspace")
        paths = ["--model", str(model), "--index", str(index)]
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "medclip.cli", "app", *paths, "--port", str(port),
                                   "--address", "127.0.0.1", "--headless"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(server, port, log)
        yield f"http://127.0.0.1:{port}", str(model), str(index)
    finally:
        stop(server)


def test_query_in_a_real_browser_shows_images(chromium, app_url, tmp_path):
    sync_api, executable = chromium
    url, model, index = app_url
    query = handlers.EXAMPLE_QUERIES[1]
    embedder = handlers.load_embedder(model)  # what the page must show, computed here
    hits = handlers.search_images(embedder, handlers.load_index(index, embedder), query, 10)
    expected = [hit.caption for hit in hits]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector(IMAGE, timeout=SERVER_START_TIMEOUT_S * 1000)  # the first example's results

            box = page.get_by_label("Search query")
            box.fill(query)
            box.press("Enter")
            page.get_by_text(f'for "{query}"').wait_for(timeout=60_000)
            page.wait_for_function(SHOWS_EXPECTED, arg=expected, timeout=60_000)
            assert page.locator(IMAGE).count() == 10

            page.get_by_role("heading", name="medclip").click()  # no focus ring in the screenshot
            page.mouse.move(1390, 1090)  # away from anything that shows on hover
            page.wait_for_function(SHOWS_EXPECTED, arg=expected, timeout=60_000)
            screenshot = tmp_path / "app.png"
            page.screenshot(path=str(screenshot))
            assert screenshot.stat().st_size > 10_000
        finally:
            browser.close()
    if os.environ.get("MEDCLIP_SAVE_SCREENSHOT"):
        shrink_png(screenshot, Path(os.environ["MEDCLIP_SAVE_SCREENSHOT"]))


def shrink_png(source: Path, target: Path, max_bytes: int = 300_000) -> None:
    """Saves the screenshot for the README, palette-quantised so it stays small."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(source).convert("RGB").quantize(colors=128).save(target, optimize=True)
    assert target.stat().st_size < max_bytes, f"{target} is {target.stat().st_size} bytes"
