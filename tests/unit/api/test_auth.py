"""API keys and the Host allow-list in front of a real FastAPI app, over ASGI (no network)."""

from __future__ import annotations

import os

import httpx
import pytest
from fastapi import FastAPI

from llava_serve.api.admission import Admission
from llava_serve.api.auth import ApiKeys, HostCheck, load_keys
from llava_serve.api.http import RequestGuard
from llava_serve.config import AdmissionConfig, AuthConfig, LimitsConfig
from llava_serve.errors import Unauthorized


def app_behind(keys: list[str], hosts: list[str] = (), public_models: bool = False) -> httpx.AsyncClient:
    app = FastAPI()
    seen: list[str] = []

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        seen.append("read")
        return body

    guard = RequestGuard(
        app,
        LimitsConfig(),
        Admission(AdmissionConfig()),
        keys=ApiKeys(keys),
        hosts=HostCheck(list(hosts)),
        public_models=public_models,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(guard), base_url="http://localhost")
    client.seen = seen
    return client


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "missing API key"),
        ({"authorization": "Bearer sk-wrong"}, "incorrect API key"),
        ({"authorization": "Bearer sk-one-"}, "incorrect API key"),  # a prefix of a key
        ({"authorization": "Basic c2stb25lLTE="}, "missing API key"),
        ({"authorization": "Bearer "}, "missing API key"),
    ],
)
async def test_no_key_or_a_wrong_one_is_a_401_in_openai_s_shape_before_the_body_is_read(headers, says):
    async with app_behind(["sk-one-1", "sk-two-2"]) as client:
        r = await client.post("/v1/chat/completions", json={"x": 1}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert says in error["message"] and error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
        assert client.seen == []  # the handler never ran


async def test_every_configured_key_is_accepted_and_health_stays_open():
    async with app_behind(["sk-one-1", "sk-two-2"]) as client:
        for key in ("sk-one-1", "sk-two-2"):
            r = await client.post(
                "/v1/chat/completions", json={"x": 1}, headers={"authorization": f"Bearer {key}"}
            )
            assert r.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401


async def test_models_follow_the_setting():
    async with app_behind(["sk-one-1"], public_models=True) as client:
        assert (await client.get("/v1/models")).status_code == 200
        assert (await client.post("/v1/chat/completions", json={})).status_code == 401


async def test_no_keys_means_an_open_api():
    async with app_behind([]) as client:
        assert (await client.post("/v1/chat/completions", json={"x": 1})).status_code == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost", 200),
        ("LOCALHOST:8000", 200),
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),
        ("rebound.attacker.example", 400),
        ("localhost.attacker.example:8000", 400),
    ],
)
async def test_the_host_allow_list(host, status):
    async with app_behind([], hosts=["localhost", "127.0.0.1", "::1"]) as client:
        r = await client.get("/health", headers={"host": host})
        assert r.status_code == status
        if status == 400:
            assert r.json()["error"]["code"] == "invalid_host"


def test_keys_come_from_the_list_the_environment_and_a_file(tmp_path, monkeypatch, caplog):
    file = tmp_path / "keys"
    file.write_text("# ops keys\nsk-file-1\n\n  sk-file-2  \n")
    os.chmod(file, 0o600)
    monkeypatch.setenv("TEST_KEYS", "sk-env-1, sk-env-2")
    config = AuthConfig(api_keys=["sk-yaml"], api_keys_env="TEST_KEYS", api_keys_file=str(file))
    assert load_keys(config) == ["sk-yaml", "sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]
    assert "readable by other users" not in caplog.text
    os.chmod(file, 0o644)
    load_keys(config)
    assert "readable by other users" in caplog.text
    assert "sk-yaml" not in repr(config)  # keys never show in a logged config


def test_the_check_compares_digests():
    keys = ApiKeys(["sk-a"])
    keys.check(b"Bearer sk-a")
    keys.check(b"bearer   sk-a")
    with pytest.raises(Unauthorized):
        keys.check(b"Bearer sk-a" + b"\xff")
