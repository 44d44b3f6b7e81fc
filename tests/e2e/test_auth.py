"""API keys and the Host allow-list on a real app: the official client with each key source, a
wrong key and none, a refusal before the body arrives, handles untouched, the playground in a
browser with its key field and its Content-Security-Policy."""

from __future__ import annotations

import os
import shutil
import socket
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from ray import serve

from deployments.app import build
from llava_serve.config import AppConfig
from tests.support.client import image_request
from tests.support.cluster import app_config
from tests.support.media import data_uri, random_image

KEYS = {"yaml": "sk-yaml-0123", "env": "sk-env-4567", "file": "sk-file-89ab"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def guarded(serve_url, tiny_dir, tmp_path_factory) -> str:
    key_file = tmp_path_factory.mktemp("auth") / "keys"
    key_file.write_text(f"# keys for the test\n{KEYS['file']}\n")
    os.chmod(key_file, 0o600)
    config = app_config(tiny_dir).model_dump(mode="json")
    config["auth"] = {"api_keys": [KEYS["yaml"]], "api_keys_file": str(key_file)}
    config["ingress"]["env_vars"] = {"LLAVA_SERVE_API_KEYS": KEYS["env"]}  # the replica's environment
    config["http"]["allowed_hosts"] = ["127.0.0.1", "localhost"]
    config["llava_model"]["num_cpus"] = 0.2
    serve.run(build(AppConfig.model_validate(config)), name="auth", route_prefix="/auth")
    yield f"{serve_url}/auth"
    serve.delete("auth")


def body() -> dict:
    return image_request(data_uri(random_image(3)), "Hi", max_tokens=4, temperature=0)


@pytest.mark.parametrize("source", sorted(KEYS))
def test_the_official_client_with_a_key_from_each_source_is_answered(guarded, source):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key=KEYS[source], max_retries=0)
    out = client.chat.completions.create(model="llava-tiny", **body())
    assert out.choices[0].message.content is not None
    assert client.models.list().data[0].id == "llava-tiny"


def test_a_wrong_key_and_no_key_are_401s_in_openai_s_shape(guarded):
    client = openai.OpenAI(base_url=f"{guarded}/v1", api_key="sk-not-ours", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="llava-tiny", **body())
    assert info.value.body["code"] == "invalid_api_key"
    for path in ("/v1/chat/completions", "/v1/models", "/openapi.json"):
        r = httpx.request("POST" if "chat" in path else "GET", guarded + path, json=body())
        assert r.status_code == 401, path
        assert r.json()["error"]["message"].startswith("missing API key"), path
    assert httpx.get(f"{guarded}/health", timeout=30).status_code == 200  # liveness stays open
    assert httpx.get(f"{guarded}/docs").status_code in (401, 404)  # no CDN-backed docs page


def test_a_stranger_is_refused_before_sending_the_body(guarded):
    """Headers announcing 10 MB, no body: the 401 comes at once, not after a read timeout."""
    url = urlsplit(guarded)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(
            f"POST {url.path}/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n".encode()
        )
        start = time.monotonic()
        head = s.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 401"), head
    assert time.monotonic() - start < 5


def test_a_host_outside_the_allow_list_is_refused(guarded):
    headers = {"authorization": f"Bearer {KEYS['yaml']}", "host": "rebound.attacker.example"}
    r = httpx.get(f"{guarded}/v1/models", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    r = httpx.get(f"{guarded}/v1/models", headers=headers | {"host": "localhost"})
    assert r.status_code == 200


async def test_handle_calls_inside_the_cluster_need_no_key(guarded):
    out = await serve.get_app_handle("auth").chat.remote(body())
    assert out["choices"][0]["message"]["content"] is not None


def test_the_playground_sends_a_strict_content_security_policy(guarded):
    r = httpx.get(f"{guarded}/")  # the page itself is open: it holds nothing
    assert r.status_code == 200
    policy = dict(
        d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";") if d.strip()
    )
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert "unsafe-inline" not in r.headers["content-security-policy"]
    assert policy["frame-ancestors"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
async def test_the_playground_asks_with_the_key_typed_into_it(guarded):
    from playwright.async_api import async_playwright, expect

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: "Content Security Policy" in m.text and problems.append(m.text))
        await page.goto(f"{guarded}/")
        await page.fill('[data-testid="prompt"]', "Hi")
        await page.fill("#max_tokens", "4")
        await page.click('[data-testid="send"]')
        await page.locator(".error").last.wait_for(timeout=30_000)
        assert "API key" in await page.locator(".error").last.text_content()  # the server's 401
        await page.fill('[data-testid="api-key"]', KEYS["env"])
        await page.dispatch_event('[data-testid="api-key"]', "change")
        # Locator waits, not wait_for_function: that evaluates a string, which the page's CSP forbids.
        await expect(page.locator("#model")).to_have_text("llava-tiny", timeout=30_000)
        await page.fill('[data-testid="prompt"]', "Hi again")
        await page.click('[data-testid="send"]')
        await page.wait_for_selector('[data-testid="stats"]:has-text("tokens/s")', timeout=30_000)
        assert await page.evaluate("sessionStorage.getItem('llava-serve-api-key')") == KEYS["env"]
        assert KEYS["env"] not in page.url
        await page.reload()  # the key stays for the tab
        assert await page.input_value('[data-testid="api-key"]') == KEYS["env"]
        assert problems == []
        await browser.close()
