"""LLaVA-NeXT and LLaVA-OneVision served end to end: greedy answers over HTTP (streamed and not)
and through handles equal `transformers`' own processor and `generate` (tests/support/oracle.py) on the
same checkpoint and images, for images of every shape, one to three images in a turn and across
turns, all in one mixed batch."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass

import httpx
import pytest
from ray import serve

from deployments.app import build
from llava_serve.config import AppConfig
from llava_serve.inputs import video
from llava_serve.models import tiny
from tests.support.cluster import app_config
from tests.support.media import data_uri, random_image
from tests.support.oracle import family_greedy, onevision_video_greedy, reference_model
from tests.support.videos import decoded_frames, make_mp4

ARCHS = {"next": "llava_next", "onevision": "llava_onevision"}  # each served as its own app
# LLaVA-1.5 is the session's main app (tests/e2e/conftest.py), served at the root.
ALL = ["llava", *ARCHS]
SIZES = {"wide": (120, 30), "tall": (24, 100), "tiny": (6, 6), "over one tile": (90, 70), "small": (40, 30)}
MAX_TOKENS = 8


@dataclass
class Served:
    name: str
    url: str
    path: str
    model: object


@pytest.fixture(scope="module")
def family(serve_url, tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    served = {"llava": Served("llava", serve_url, tiny_dir, reference_model(tiny_dir))}
    for name, arch in ARCHS.items():
        path = str(tiny.ensure("tiny", root, arch=arch))
        config = app_config(path).model_dump()
        config["model"]["served_name"] = f"tiny-{name}"
        config["llava_model"]["num_cpus"] = 0.3
        serve.run(build(AppConfig.model_validate(config)), name=name, route_prefix=f"/{name}")
        served[name] = Served(name, f"{serve_url}/{name}", path, reference_model(path))
    yield served
    for name in ARCHS:
        serve.delete(name)


def image_part(image, detail: str | None = None) -> dict:
    url = {"url": data_uri(image)} | ({"detail": detail} if detail else {})
    return {"type": "image_url", "image_url": url}


def cases() -> dict[str, tuple[list[dict], list]]:
    """name -> (messages, the images in prompt order)."""
    out = {}
    for i, (label, size) in enumerate(SIZES.items()):
        image = random_image(20 + i, size)
        out[label] = (
            [{"role": "user", "content": [image_part(image), {"type": "text", "text": "What is it?"}]}],
            [image],
        )
    a, b, c = random_image(30, (50, 30)), random_image(31, (30, 50)), random_image(32, (120, 30))
    text = [{"type": "text", "text": "Compare"}]
    out["two images"] = ([{"role": "user", "content": [image_part(a), *text, image_part(b)]}], [a, b])
    out["three images"] = (
        [{"role": "user", "content": [image_part(a), image_part(b), *text, image_part(c)]}],
        [a, b, c],
    )
    out["two turns"] = (
        [
            {"role": "user", "content": [image_part(a), {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A pattern."},
            {"role": "user", "content": [image_part(b), {"type": "text", "text": "And this one?"}]},
        ],
        [a, b],
    )
    out["two images, then one"] = (
        [
            {"role": "user", "content": [image_part(c), image_part(a), *text]},
            {"role": "assistant", "content": "Two patterns."},
            {"role": "user", "content": [image_part(b), {"type": "text", "text": "And this one?"}]},
        ],
        [c, a, b],
    )
    return out


async def http_answer(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, int]:
    if not body.get("stream"):
        r = await client.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["prompt_tokens"]
    text, usage = [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text), usage["prompt_tokens"]


async def handle_answer(app: str, body: dict) -> tuple[str, int]:
    out = await serve.get_app_handle(app).chat.remote(body)
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens"]


@pytest.mark.parametrize("name", ALL)
async def test_every_shape_and_conversation_equals_transformers_in_one_mixed_batch(family, name):
    served = family[name]
    calls, expected = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        for label, (messages, pictures) in cases().items():
            reference = family_greedy(served.path, served.model, messages, pictures, MAX_TOKENS)
            body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
            streamed = body | {"stream": True, "stream_options": {"include_usage": True}}
            for how, call in [
                ("http", http_answer(client, served.url, body)),
                ("http stream", http_answer(client, served.url, streamed)),
                ("handle", handle_answer(name, body)),
            ]:
                calls.append(call)
                expected.append((label, how, reference))
        answers = await asyncio.gather(*calls)
    for (label, how, reference), answer in zip(expected, answers, strict=True):
        assert answer == reference, (label, how)


async def test_next_detail_low_is_one_tile_and_fewer_tokens(family):
    served = family["next"]
    image = random_image(40, (90, 70))  # a 2x2 grid plus the base tile at full detail
    answers = {}
    async with httpx.AsyncClient(timeout=60) as client:
        for detail in ("low", "high", "auto"):
            messages = [
                {"role": "user", "content": [image_part(image, detail), {"type": "text", "text": "Hi"}]}
            ]
            body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
            answers[detail] = await http_answer(client, served.url, body)
            reference = family_greedy(served.path, served.model, messages, [image], MAX_TOKENS, detail)
            assert answers[detail] == reference, detail
    assert answers["low"][1] < answers["high"][1] == answers["auto"][1]


def video_part(data: bytes) -> dict:
    return {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()},
    }


async def test_a_onevision_video_equals_transformers(family, config):
    served = family["onevision"]
    data = make_mp4(frames=20, size=(64, 48))
    every = decoded_frames(data)
    frames = [every[i] for i in video.sample_indices(len(every), config.images.max_video_frames)]
    messages = [{"role": "user", "content": [video_part(data), {"type": "text", "text": "What happens?"}]}]
    reference = onevision_video_greedy(served.path, served.model, messages, frames, MAX_TOKENS)
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as client:
        assert await http_answer(client, served.url, body) == reference
        assert (
            await http_answer(
                client, served.url, body | {"stream": True, "stream_options": {"include_usage": True}}
            )
            == reference
        )


@pytest.mark.parametrize(
    ("app", "data", "says"),
    [
        ("onevision", make_mp4(frames=300, fps=2), "over the limit of 120s"),
        ("onevision", b"not a video at all" * 10, "could not decode video"),
        ("next", make_mp4(frames=4), "does not take video"),
    ],
)
def test_videos_that_cannot_be_served_are_a_400_naming_the_part(family, app, data, says):
    body = {"messages": [{"role": "user", "content": [video_part(data), {"type": "text", "text": "Hi"}]}]}
    r = httpx.post(f"{family[app].url}/v1/chat/completions", json=body | {"max_tokens": 2}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and says in error["message"], error
    assert error["param"] in ("messages[0].content[0].video_url.url", "messages")
