"""The playground at `/` in a real browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from tests.support.media import encode, random_image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


@pytest.fixture
async def page(serve_url):
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # Playwright's wait_for_function evaluates strings, which the page's CSP forbids; the
        # policy itself is tested with the browser in tests/e2e/test_auth.py.
        page = await browser.new_page(viewport={"width": 1200, "height": 820}, bypass_csp=True)
        page.problems = []
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        await page.goto(serve_url + "/")
        yield page
        await browser.close()


async def ask(page, question: str, image: Path | None = None, **settings) -> None:
    for name, value in settings.items():
        await page.fill(f"#{name}", str(value))
    if image is not None:
        await page.set_input_files('[data-testid="image-input"]', str(image))
        await page.wait_for_selector("#pending img")
    await page.fill('[data-testid="prompt"]', question)
    await page.click('[data-testid="send"]')


async def count_answer_updates(page) -> None:
    """Count every change to the latest answer's text, from the page itself."""
    await page.evaluate(
        """() => { window.updates = 0;
            new MutationObserver(() => window.updates++).observe(document.getElementById('chat'),
                {subtree: true, childList: true, characterData: true}); }"""
    )


async def test_an_image_and_a_question_stream_an_answer_then_stats(page, tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(encode(random_image(90, (80, 60))))
    await count_answer_updates(page)
    await ask(page, "What is in this image?", image, max_tokens=48, temperature=0)
    await page.wait_for_selector('[data-testid="stats"]:has-text("tokens/s")', timeout=30_000)
    answer = await page.locator('[data-testid="answer"]').last.text_content()
    assert answer
    assert await page.evaluate("window.updates") >= 3  # the answer grew in several steps, then stats
    assert "TTFT" in await page.locator('[data-testid="stats"]').text_content()
    # A second turn, with the first in the history.
    await ask(page, "And the colours?", max_tokens=8, temperature=0)
    await page.wait_for_function("document.querySelectorAll('[data-testid=answer]').length == 2")
    await page.wait_for_selector("#send:not([disabled])")
    assert page.problems == []
    (ROOT / "docs").mkdir(exist_ok=True)
    await page.screenshot(path=str(ROOT / "docs" / "playground.png"), full_page=True)


async def test_stop_ends_the_stream_and_the_server_cancels_generation(page):
    model = serve.get_deployment_handle("LlavaModel", "llava")
    before = (await model.stats.remote())["cancelled"]
    await ask(page, "Talk.", max_tokens=1500, temperature=0)
    await page.wait_for_function(
        "document.querySelector('[data-testid=answer]')?.textContent.length > 10", timeout=30_000
    )
    await page.click('[data-testid="stop"]')
    await page.wait_for_selector('[data-testid="stats"]:has-text("stopped")', timeout=10_000)
    start = time.monotonic()
    while (await model.stats.remote())["cancelled"] < before + 1:
        assert time.monotonic() - start < 5, "the server kept generating after Stop"
        await asyncio.sleep(0.05)
    assert page.problems == []


async def test_a_non_image_file_shows_the_servers_400_message(page, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"these are notes, not pixels")
    await ask(page, "What is this?", fake)
    error = page.locator(".error").last
    await error.wait_for(timeout=30_000)
    assert "not an image" in await error.text_content()
    assert "not an image" in await page.locator('[data-testid="stats"]').text_content()


def test_the_playground_is_served_and_needs_nothing_from_elsewhere(serve_url):
    r = httpx.get(serve_url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "http://" not in r.text and "https://" not in r.text.replace("https://…", "")  # no CDN, no fonts
