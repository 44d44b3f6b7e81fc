"""Two model replicas that behave as one cache: a follow-up goes where its conversation's KV is,
new conversations spread, a dead replica is forgotten, and a replica the autoscaler removes
finishes its streams first. Each runs against its own app, so the shared one is not disturbed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from ray import serve

from deployments.app import build
from llava_serve.config import AppConfig
from tests.support.cluster import app_config, deploy_declared, running_replicas
from tests.support.media import data_uri, random_image

TWO = {"num_replicas": 2, "num_cpus": 0.25, "max_ongoing_requests": 64}


def two_replica_app(tiny_dir: str, name: str, model: dict, **sections) -> AppConfig:
    base = app_config(tiny_dir).model_dump()
    base["llava_model"] |= model
    base["routing"] = {"stats_period_s": 0.5}
    base["ingress"] |= {"playground": False}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return AppConfig.model_validate(base)


@pytest.fixture(scope="module")
def route_url(serve_url, tiny_dir):
    serve.run(build(two_replica_app(tiny_dir, "route", TWO)), name="route", route_prefix="/route")
    yield f"{serve_url}/route"
    serve.delete("route")


def model_stats(app: str, replicas: int = 2) -> dict[int, dict]:
    """Each model replica's stats by pid (calls go to either replica, so ask until all answered)."""
    handle = serve.get_deployment_handle("LlavaModel", app)
    seen: dict[int, dict] = {}
    for _ in range(60):
        stats = handle.stats.remote().result()
        seen[stats["pid"]] = stats
        if len(seen) == replicas:
            return seen
    raise AssertionError(f"saw {len(seen)} of {replicas} model replicas")


class Chat:
    """One conversation about its own picture, turn by turn."""

    def __init__(self, url: str, seed: int):
        self.url = url
        self.messages: list[dict] = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(random_image(seed))}},
                    {"type": "text", "text": f"Picture {seed}: what is in it?"},
                ],
            }
        ]

    async def turn(self, client: httpx.AsyncClient, question: str | None = None) -> dict:
        if question is not None:
            self.messages.append({"role": "user", "content": question})
        body = {"messages": self.messages, "max_tokens": 6, "temperature": 0}
        response = await client.post(f"{self.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        self.messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        return answer["usage"]


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


async def conversations(url: str, seeds: range) -> tuple[list[Chat], list[dict], list[dict]]:
    chats = [Chat(url, seed) for seed in seeds]
    async with httpx.AsyncClient() as client:
        firsts = await asyncio.gather(*(c.turn(client) for c in chats))
        await asyncio.sleep(1.5)  # past a routing report: the replicas' own accounts must carry it
        follows = await asyncio.gather(*(c.turn(client, "And its colour?") for c in chats))
    return chats, firsts, follows


def test_follow_ups_go_to_the_replica_holding_their_conversation(route_url):
    before = model_stats("route")
    _, firsts, follows = asyncio.run(conversations(route_url, range(300, 306)))
    # On the wrong replica a follow-up reuses nothing of its image; by chance all six would
    # land right one time in 64.
    assert all(cached(f) >= first["prompt_tokens"] for first, f in zip(firsts, follows, strict=True))
    assert all(cached(first) < first["prompt_tokens"] // 2 for first in firsts)
    # New conversations match nothing anywhere: they went to the less loaded, so both served.
    after = model_stats("route")
    served = [after[pid]["prefix_cache_misses"] - before[pid]["prefix_cache_misses"] for pid in after]
    assert min(served) >= 1, served


def test_a_dead_replica_is_forgotten_and_its_conversations_carry_on(route_url):
    chats, _, _ = asyncio.run(conversations(route_url, range(310, 314)))
    victim = next(iter(model_stats("route")))
    os.kill(victim, signal.SIGKILL)

    async def carry_on() -> list[tuple[dict, dict]]:
        async with httpx.AsyncClient() as client:
            second = await asyncio.gather(*(c.turn(client, "Its shape?") for c in chats))
            await asyncio.sleep(1.5)
            third = await asyncio.gather(*(c.turn(client, "Anything else?") for c in chats))
        return list(zip(second, third, strict=True))

    for second, third in asyncio.run(carry_on()):
        # Wherever the second turn went (the survivor, or the replacement), the third found it.
        assert cached(third) >= second["prompt_tokens"]
    deadline = time.monotonic() + 90  # the replacement up before the next test
    while running_replicas("route") < 2 and time.monotonic() < deadline:
        time.sleep(1)


def test_a_replica_removed_by_a_scale_down_finishes_its_streams(serve_url, tiny_dir):
    """Two replicas, each streaming; the config goes to one replica. The one Serve removes takes
    no new request and finishes its streams before it stops: every stream ends whole."""
    config = two_replica_app(tiny_dir, "drain", {**TWO, "graceful_shutdown_timeout_s": 120})
    args = config.model_dump(mode="json") | {"auth": {"require_ray_token": False}}
    deploy_declared("drain", args, 2)
    url = f"{serve_url}/drain"
    try:
        deadline = time.monotonic() + 120
        while running_replicas("drain") < 2 or serve.status().applications["drain"].status != "RUNNING":
            assert time.monotonic() < deadline, "the app never ran with two model replicas"
            time.sleep(0.2)

        async def stream(client: httpx.AsyncClient, i: int) -> tuple[str | None, int]:
            body = {
                "messages": [{"role": "user", "content": f"Story {i}: tell it, {'at length ' * i}."}],
                "max_tokens": 1500,
                "min_tokens": 1500,  # no early end of text: the stream lasts through the scale-down
                "stream": True,
                "stream_options": {"include_usage": True},
                "temperature": 1.0,
                "seed": i,
            }
            finish, tokens = None, 0
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        for choice in chunk["choices"]:
                            finish = choice["finish_reason"] or finish
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            return finish, tokens

        async def run() -> tuple[list, list[int]]:
            async with httpx.AsyncClient() as client:
                streams = []
                for i in range(4):
                    streams.append(asyncio.ensure_future(stream(client, i)))
                    await asyncio.sleep(0.3)
                running = [s["running"] for s in (await asyncio.to_thread(model_stats, "drain")).values()]
                done_before = sum(s.done() for s in streams)
                await asyncio.to_thread(deploy_declared, "drain", args, 1)
                while running_replicas("drain") > 1:  # Serve stops routing to the one it removes
                    await asyncio.sleep(0.1)
                # Meanwhile a new request goes to the replica that stays, and succeeds.
                during = await client.post(
                    f"{url}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                    timeout=60,
                )
                assert during.status_code == 200, during.text
                results = await asyncio.gather(*streams)
                return results, running, done_before

        results, running, done_before = asyncio.run(run())
        assert all(n >= 1 for n in running), running  # the replica removed had streams
        assert done_before == 0, "the streams ended before the scale-down: make them longer"
        assert results == [("length", 1500)] * 4
    finally:
        serve.delete("drain")
