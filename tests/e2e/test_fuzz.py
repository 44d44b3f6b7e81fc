"""Property-based fuzzing of the real ingress, and a memory bound under repeated abuse."""

from __future__ import annotations

import asyncio
import base64
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from tests.support.client import image_request, ok_request
from tests.support.media import encode, png_bomb, random_image

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SEEDS = [encode(random_image(7, (24, 24)), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")]

finite = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
json_scalars = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
text_part = st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=40))
image_part = st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, st.text(max_size=40))
content = st.text(max_size=40) | st.lists(text_part | image_part | json_values, max_size=3)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | json_values, "content": content}
)
near_valid = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3)},
    optional={
        "max_tokens": st.integers(-2, 6) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-0.5, 1.5, allow_nan=False),
        "top_k": st.integers(-3, 50),
        "seed": st.integers(-(2**70), 2**70),
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=5) | json_values,
        "stream": st.booleans(),
        "n": st.integers(-1, 3),
        "model": st.text(max_size=10),
    },
)


def ints_around(*edges: int) -> st.SearchStrategy[int]:
    """Each edge, one either side of it, and numbers no field can hold."""
    near = {e + d for e in edges for d in (-1, 0, 1)}
    return st.sampled_from(sorted(near | {2**31, 2**63 - 1, 2**63, 2**64, 2**70, -(2**63) - 1, -(2**70)}))


# Each field's bounds, the engine's and the test app's limits (max_tokens_limit 4096, context 2048,
# vocabulary 1024), and floats that overflow, underflow or sit just past a bound.
EDGE_FLOATS = st.sampled_from(
    [-1e308, -2.0000001, -2.0, -1.0, -0.0, 0.0, 5e-324, 1e-300, 1e-6, 1e-5, 0.01, 0.5, 1.0]
)
EDGE_FLOATS |= st.sampled_from([1.0000001, 2.0, 2.0000001, 10.0, 10.0000001, 1e308])
at_the_limits = st.fixed_dictionaries(
    {"messages": st.just([{"role": "user", "content": "Count to three."}])},
    optional={
        "max_tokens": ints_around(0, 1, 4, 2048, 4096),
        "max_completion_tokens": ints_around(1, 4096),
        "temperature": EDGE_FLOATS,
        "top_p": EDGE_FLOATS,
        "top_k": ints_around(0, 1, 1024),
        "seed": ints_around(0, -(2**63), 2**64 - 1),
        "presence_penalty": EDGE_FLOATS,
        "frequency_penalty": EDGE_FLOATS,
        "repetition_penalty": EDGE_FLOATS,
        "logprobs": st.booleans(),
        "top_logprobs": ints_around(0, 20),
        "stream": st.booleans(),
    },
)


# Schema-shaped values: JSON Schema keywords with values that are sometimes right and often not.
KEYWORDS = [
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "const",
    "minItems",
    "maxItems",
    "maxLength",
    "minimum",
    "maximum",
    "multipleOf",
    "pattern",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "additionalProperties",
    "format",
    "uniqueItems",
    "not",
    "if",
    "then",
]
TYPES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "objectx"])
schemas = st.recursive(
    st.fixed_dictionaries({"type": TYPES}) | st.just({}),
    lambda inner: st.dictionaries(
        st.sampled_from(KEYWORDS),
        inner
        | TYPES
        | json_values
        | st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_size=4,
    ),
    max_leaves=12,
)
function = st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "bad name"])}, optional={"parameters": schemas}
)
with_formats = st.fixed_dictionaries(
    {"messages": st.just([{"role": "user", "content": "JSON, please."}]), "max_tokens": st.integers(1, 6)},
    optional={
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
            optional={
                "json_schema": st.fixed_dictionaries({"name": st.just("s")}, optional={"schema": schemas})
            },
        )
        | json_values,
        "tools": st.lists(
            st.fixed_dictionaries({"type": st.just("function"), "function": function}), max_size=3
        ),
        "tool_choice": st.sampled_from(["none", "auto", "required"])
        | st.builds(lambda n: {"type": "function", "function": {"name": n}}, st.sampled_from(["f", "g"])),
        "logit_bias": st.dictionaries(st.sampled_from(["0", "5", "1023", "1024", "-1", "x"]), EDGE_FLOATS),
        "stream": st.booleans(),
        "temperature": st.sampled_from([0.0, 1.0]),
    },
)


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut or len(data)])


def check_response(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        assert '"server_error"' not in r.text, r.text  # a model-side failure after the stream began


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30) as c:
        yield c


@FUZZ
@given(body=json_values | near_valid)
def test_fuzzed_request_bodies_get_2xx_or_4xx(serve_url, client, body):
    check_response(client.post(f"{serve_url}/v1/chat/completions", json=body))


@settings(FUZZ, max_examples=150)
@given(body=with_formats)
def test_fuzzed_formats_tools_and_biases_get_2xx_or_4xx(serve_url, client, body):
    """Broken schemas, schemas the grammar cannot enforce, tool choices that do not fit their
    tools: each a 400, never a 5xx, and the answers that are served end cleanly."""
    check_response(client.post(f"{serve_url}/v1/chat/completions", json=body))


@settings(FUZZ, max_examples=120)
@given(body=at_the_limits)
def test_numbers_at_the_limits_of_every_field_get_2xx_or_4xx(serve_url, client, body):
    # A generous max_tokens is capped so that a valid draw stays quick; the bounds are drawn anyway.
    if isinstance(body.get("max_tokens"), int) and 4 < body["max_tokens"] < 2048:
        body["max_tokens"] = 4
    check_response(client.post(f"{serve_url}/v1/chat/completions", json=body))


@FUZZ
@given(data=mutated_image() | st.binary(max_size=600), stream=st.booleans())
def test_fuzzed_image_bytes_get_2xx_or_4xx(serve_url, client, data, stream):
    source = f"data:image/png;base64,{base64.b64encode(data).decode()}"
    body = image_request(source, max_tokens=2, stream=stream)
    check_response(client.post(f"{serve_url}/v1/chat/completions", json=body))


def test_normal_requests_succeed_after_fuzzing(serve_url):
    ok_request(serve_url)


async def test_preprocessor_memory_stays_bounded_under_repeated_abuse(serve_url, image_server):
    """200 bombs and oversize bodies: the preprocessor's RSS grows by less than 128 MiB.

    About 50 of the attempts each stream a full 1 MiB before being cut off, so keeping them
    would cost well over 128 MiB; what remains is allocator slack and not-yet-collected garbage,
    which goes up and down between samples rather than climbing.
    """
    image_server.endless("/rss-endless")
    image_server.add("/rss-bomb", png_bomb(60_000, 60_000))
    sources = [
        f"{image_server.base_url}/rss-endless",  # stopped at max_bytes (1 MiB here)
        f"{image_server.base_url}/rss-bomb",
        f"data:image/png;base64,{base64.b64encode(png_bomb(30_000, 90_000)).decode()}",
        "data:image/png;base64," + "A" * (3 * 1024 * 1024 // 2),
    ]
    preprocessor = serve.get_deployment_handle("ImagePreprocessor", "llava")

    async def abuse(n: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            for i in range(0, n, 8):
                batch = [random.choice(sources) for _ in range(min(8, n - i))]
                for r in await _gather(client, serve_url, batch):
                    assert r.status_code == 400, r.text

    await abuse(48)  # warm-up: allocator pools and lazy imports settle first
    before = (await preprocessor.stats.remote())["rss_bytes"]
    await abuse(200)
    after = (await preprocessor.stats.remote())["rss_bytes"]
    assert after - before < 128 * 1024 * 1024, (before, after)
    ok_request(serve_url)


async def _gather(client: httpx.AsyncClient, serve_url: str, sources: list[str]) -> list[httpx.Response]:
    return await asyncio.gather(
        *[
            client.post(f"{serve_url}/v1/chat/completions", json=image_request(s, max_tokens=2))
            for s in sources
        ]
    )
