"""Operating it: overload, dead replicas, slow image hosts, metrics and request logs.

Destructive tests run against their own app ("ops", served under /ops) so the shared app the
other tests use is never disturbed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import statistics
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from deployments.app import build
from llava_serve.config import AppConfig
from llava_serve.errors import Unavailable
from tests.support.client import image_request
from tests.support.cluster import app_config
from tests.support.load import closed_loop, started_together
from tests.support.media import data_uri, encode, random_image

STAGES = [
    "image_fetch",
    "image_preprocess",
    "tokenize",
    "queue",
    "vision_encode",
    "prefill",
    "time_per_output_token",
    "end_to_end",
]
OPS_CONFIG: dict = {}  # the "ops" app's config, for tests that redeploy it
LONG = {"messages": [{"role": "user", "content": "Talk."}], "max_tokens": 1500}


@pytest.fixture(scope="module")
def ops_url(serve_url, tiny_dir):
    """A second copy of the app with a tight engine queue and two preprocessor replicas."""
    base = app_config(tiny_dir).model_dump()
    base["image_preprocessor"] |= {"num_replicas": 2}
    base["llava_model"] |= {"graceful_shutdown_timeout_s": 1.0}
    base["engine"] |= {"max_batch_size": 2, "max_queue": 2}
    base["admission"] = {"max_inflight_requests": 6}
    base["http"] = {"sse_keepalive_s": 0.2}
    base["ingress"] |= {"playground": False}
    OPS_CONFIG.update(base)
    serve.run(build(AppConfig.model_validate(base)), name="ops", route_prefix="/ops")
    yield f"{serve_url}/ops"
    serve.delete("ops")


def replica_pids(app: str, deployment: str, replicas: int = 1) -> list[int]:
    """Process ids of a deployment's replicas, as they report them (calls spread over replicas)."""
    handle = serve.get_deployment_handle(deployment, app)
    pids: set[int] = set()
    for _ in range(50):
        pids.add(handle.stats.remote().result()["pid"])
        if len(pids) == replicas:
            return sorted(pids)
    raise AssertionError(f"saw {len(pids)} of {replicas} {deployment} replicas")


def wait_until_serving(url: str, timeout_s: float = 90) -> None:
    start = time.monotonic()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not recover within {timeout_s}s")


async def test_overload_is_a_fast_503_with_retry_after(ops_url):
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int):
            start = time.monotonic()
            r = await client.post(f"{ops_url}/v1/chat/completions", json={**LONG, "max_tokens": 200})
            return r, time.monotonic() - start

        results = await asyncio.gather(*[one(i) for i in range(12)])
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert refused and any(r.status_code == 200 for r, _ in results)
    fastest_answer = min(t for r, t in results if r.status_code == 200)
    for r, elapsed in refused:
        error = r.json()["error"]
        assert error["type"] == "overloaded_error" and "retry later" in error["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert elapsed < fastest_answer  # refused at once, not after waiting for a slot
    assert all(r.status_code in (200, 503) for r, _ in results)


def test_with_the_playground_off_the_root_is_a_404(ops_url):
    r = httpx.get(f"{ops_url}/", timeout=10)
    assert r.status_code == 404 and "ingress.playground" in r.json()["error"]["message"]


async def test_300_streams_at_once_each_end_complete_or_as_a_503_that_does_not_wait(serve_url):
    """The door check counts requests before their bodies are parsed: past the limit (128 here)
    a refusal costs a header lookup, every admitted stream completes, and no other answer (Serve's
    own 503, a 5xx) appears.

    "Fast" is checked as a ratio, not a wall-clock bound (the client, the test process and every
    replica share two cores here): a typical refusal must come back sooner than a typical admitted
    stream, which a refusal that queued for an engine slot could not. The absolute figure lives in
    `benchmarks/serve.py burst` against `make serve`."""
    results = await started_together(f"{serve_url}/v1/chat/completions", 300, max_tokens=4)
    kinds = [kind for kind, _, _ in results]
    assert kinds.count("other") == 0, [got for kind, _, got in results if kind == "other"]
    assert kinds.count("complete") >= 128, kinds
    refused = statistics.median(elapsed for kind, elapsed, _ in results if kind == "refused")
    complete = statistics.median(elapsed for kind, elapsed, _ in results if kind == "complete")
    print(f"complete {kinds.count('complete')} (median {complete:.2f}s), refused (median {refused:.2f}s)")
    assert refused < complete


def test_a_stream_waiting_in_the_queue_gets_keepalive_comments(ops_url):
    """ops serves two rows at a time and sends an SSE comment every 0.2 s."""
    url = f"{ops_url}/v1/chat/completions"
    body = {**LONG, "stream": True, "temperature": 0}  # greedy "Talk." runs past 1500 tokens
    with (
        httpx.stream("POST", url, json=body, timeout=60) as a,
        httpx.stream("POST", url, json=body, timeout=60) as b,
    ):
        held = [a.iter_lines(), b.iter_lines()]  # kept: dropping one would close its stream
        for lines in held:  # both batch slots are taken
            assert next(lines).startswith("data: {")
        short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
        with httpx.stream("POST", url, json=short, timeout=60) as r:
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            lines = r.iter_lines()
            assert '"role":"assistant"' in next(lines)  # queued: the stream has begun
            stats = serve.get_deployment_handle("LlavaModel", "ops").stats.remote().result()
            assert (stats["running"], stats["waiting"]) == (2, 1)
            seen = [next(lines) for _ in range(4)]
            assert any(line.startswith(":") for line in seen), seen  # a comment before any token
            assert not any('"content":"' in line and '"content":""' not in line for line in seen)


def test_killing_the_model_replica_mid_stream_ends_the_stream_with_an_error(ops_url):
    [pid] = replica_pids("ops", "LlavaModel")
    body = {**LONG, "stream": True}
    with httpx.stream("POST", f"{ops_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        rest = list(lines)
    assert time.monotonic() - start < 10
    events = [line[len("data: ") :] for line in rest if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "replica_unavailable"
    wait_until_serving(ops_url)  # Serve replaced the replica


async def test_a_handle_caller_gets_a_typed_error_when_the_model_dies(ops_url):
    await asyncio.to_thread(wait_until_serving, ops_url)
    [pid] = await asyncio.to_thread(replica_pids, "ops", "LlavaModel")
    stream = serve.get_app_handle("ops").options(stream=True).chat_stream.remote({**LONG, "stream": True})
    await anext(stream)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Unavailable):
        async for _ in stream:
            pass
    await asyncio.to_thread(wait_until_serving, ops_url)


async def test_killing_a_preprocessor_replica_under_load_fails_cleanly(ops_url):
    await asyncio.to_thread(wait_until_serving, ops_url)
    pids = await asyncio.to_thread(replica_pids, "ops", "ImagePreprocessor", 2)

    slots = asyncio.Semaphore(2)  # within this app's batch size: nothing is refused as overload
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(i: int) -> httpx.Response:
            async with slots:
                body = image_request(data_uri(random_image(60 + i)), max_tokens=2)
                return await client.post(f"{ops_url}/v1/chat/completions", json=body)

        async def kill():
            await asyncio.sleep(0.3)
            os.kill(pids[0], signal.SIGKILL)

        *responses, _ = await asyncio.gather(*[one(i) for i in range(16)], kill())
    # Preprocessing is idempotent and nothing was sent yet: the ingress retries such requests.
    failed = [r.text for r in responses if r.status_code != 200]
    assert not failed, failed
    await asyncio.to_thread(wait_until_serving, ops_url)


async def test_a_hanging_image_host_does_not_stall_inline_images(serve_url, image_server):
    url = image_server.drip("/hang.png", b"\x89PNG" * 100, interval_s=0.5)
    async with httpx.AsyncClient(timeout=60) as client:
        hanging = [
            asyncio.create_task(
                client.post(f"{serve_url}/v1/chat/completions", json=image_request(url, max_tokens=2))
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.2)
        start = time.monotonic()
        for i in range(4):
            body = image_request(data_uri(random_image(70 + i)), max_tokens=2)
            assert (await client.post(f"{serve_url}/v1/chat/completions", json=body)).status_code == 200
        inline_s = time.monotonic() - start
        results = await asyncio.gather(*hanging)
    assert inline_s < 2.0  # done while the hanging fetches were still waiting (total timeout 2 s)
    assert all(r.status_code == 400 and "longer than 2.0s" in r.json()["error"]["message"] for r in results)


def test_prometheus_metrics_are_exported(serve_url, metrics_url, image_server):
    url = image_server.add("/metrics-cat.png", encode(random_image(80)))
    for body in (
        image_request(url, max_tokens=4),
        image_request(data_uri(random_image(81)), max_tokens=4, stream=True),
        image_request("data:image/png;base64,AAAA", max_tokens=4),  # a 400 from the preprocessor
        {**LONG, "max_tokens": 4, "response_format": {"type": "json_object"}},
    ):
        httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=30)
    # A body declared over the limit: refused at the door, before the app, and still counted.
    host, port = serve_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        assert b" 413 " in conn.recv(1024)
    wanted = [
        'ray_llava_requests_total{outcome="ok"',
        'ray_llava_requests_total{outcome="invalid_request_error",stream="false"',
        'ray_llava_requests_total{outcome="invalid_request_error",stream="unknown"',
        "ray_llava_ttft_seconds_bucket",
        "ray_llava_inter_token_seconds_bucket",
        "ray_llava_e2e_latency_seconds_bucket",
        "ray_llava_queue_wait_seconds_bucket",
        "ray_llava_running_requests",
        "ray_llava_kv_tokens_capacity",
        "ray_llava_image_cache_total",
        "ray_llava_grammar_cache_total",
        'ray_llava_prefix_cache_total{result="miss"',
        "ray_llava_prefix_cache_bytes",
        'ray_llava_image_fetch_seconds_bucket{result="ok",source="http"',
        "ray_llava_image_fetch_bytes_bucket",
        'ray_llava_errors_total{type="invalid_request_error"',
        'ray_llava_tokens_total{kind="completion"',
        *[f'ray_llava_stage_seconds_bucket{{stage="{stage}"' for stage in STAGES],
    ]
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(metrics_url, timeout=10).text
        missing = [w for w in wanted if not _has(text, w)]
        if not missing:
            return
        assert time.monotonic() < deadline, f"never exported: {missing}"
        time.sleep(1)


def test_every_metric_on_the_grafana_dashboard_is_exported(serve_url, metrics_url):
    dashboard = json.loads((Path(__file__).parents[2] / "deployments/grafana/llava-serve.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    names = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_llava_\w+", e)}
    assert len(names) >= 15
    httpx.post(f"{serve_url}/v1/chat/completions", json=image_request(data_uri(random_image(83))), timeout=30)
    deadline = time.monotonic() + 60
    while True:
        exported = {
            line.split("{")[0].split(" ")[0] for line in httpx.get(metrics_url, timeout=10).text.splitlines()
        }
        missing = sorted(n for n in names if not {n, f"{n}_bucket"} & exported)
        if not missing:
            return
        assert time.monotonic() < deadline, f"on the dashboard but never exported: {missing}"
        time.sleep(1)


def _has(text: str, wanted: str) -> bool:
    """`name{a="x"` matches whatever other labels Ray adds and in whatever order."""
    name, _, labels = wanted.partition("{")
    pairs = [p for p in labels.split(",") if p]
    lines = (line for line in text.splitlines() if line.startswith(name))
    return any(all(p.rstrip('"') + '"' in line for p in pairs) for line in lines)


def log_record(request_id: str) -> dict:
    """The JSON log line the ingress wrote for `request_id`."""
    logs = os.path.join(_session_dir(), "logs", "serve")
    deadline = time.monotonic() + 10
    while True:
        files = [Path(logs, name) for name in os.listdir(logs) if name.startswith("replica_llava_Ingress")]
        text = "\n".join(f.read_text(errors="replace") for f in files)
        lines = [line for line in text.splitlines() if f'"request_id": "{request_id}"' in line]
        if lines:
            return json.loads(lines[0][lines[0].index("{") :])
        assert time.monotonic() < deadline, f"no log line for request {request_id}"
        time.sleep(0.2)


def test_a_body_fastapi_refuses_is_logged_and_counted_too(serve_url):
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}
    r = httpx.post(
        f"{serve_url}/v1/chat/completions", json=body, headers={"x-request-id": "bad-7"}, timeout=30
    )
    assert r.status_code == 400
    record = log_record("bad-7")
    assert (record["outcome"], record["status"], record["stream"]) == ("invalid_request_error", 400, None)


def test_each_request_leaves_one_structured_log_line(serve_url):
    body = image_request(data_uri(random_image(82)), max_tokens=3)
    r = httpx.post(
        f"{serve_url}/v1/chat/completions", json=body, headers={"x-request-id": "log-line-7"}, timeout=30
    )
    assert r.status_code == 200
    record = log_record("log-line-7")
    assert record["event"] == "chat_completion" and record["outcome"] == "ok" and record["status"] == 200
    assert record["image_sources"] == ["data"] and record["completion_tokens"] == 3
    assert record["prompt_tokens"] > 0 and record["ttft_ms"] <= record["total_ms"]
    stages = record["stages_ms"]
    assert set(stages) == set(STAGES) and all(v >= 0 for v in stages.values())
    # The stages before the first token fit inside it.
    before_first = sum(
        stages[s] for s in ("image_fetch", "image_preprocess", "queue", "vision_encode", "prefill")
    )
    assert before_first <= record["ttft_ms"]


def _session_dir() -> str:
    import ray

    return ray._private.worker.global_worker.node.get_session_dir_path()


async def test_load_with_cancellations_loses_no_request(serve_url):
    """The CI-sized version of `benchmarks/serve.py load`: every request ends cleanly, one way or another."""
    report = await closed_loop(serve_url, n=60, concurrency=16, cancel_fraction=0.1, max_tokens=(2, 24))
    summary = report.summary()
    assert summary["lost"] == 0, summary["lost_details"]
    assert summary["cancelled"] == 6 and summary["complete"] == 54, summary
    model = serve.get_deployment_handle("LlavaModel", "llava")
    start = time.monotonic()
    while (await model.stats.remote())["running"]:
        assert time.monotonic() - start < 5, "cancelled requests still hold batch slots"
        await asyncio.sleep(0.05)


def test_serve_backpressure_between_deployments_is_an_overloaded_error():
    """Serve's own queue limit (max_queued_requests) raises this inside the ingress."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from llava_serve.errors import Overloaded, unwrap

    error = BackPressureError(num_queued_requests=5, max_queued_requests=5, retry_after_s=2.5)
    for raised in (error, RayTaskError("generate", "traceback", error)):
        typed = unwrap(raised)
        assert isinstance(typed, Overloaded) and typed.status_code == 503 and typed.retry_after_s == 3
        assert "max_queued_requests=5" in typed.message


def test_a_redeploy_ends_in_flight_streams_within_the_grace_period(ops_url):
    """graceful_shutdown_timeout_s is 1 s here: the old replica's streams finish or end cleanly."""
    wait_until_serving(ops_url)
    body = {**LONG, "stream": True}
    with httpx.stream("POST", f"{ops_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        changed = OPS_CONFIG | {"llava_model": OPS_CONFIG["llava_model"] | {"num_cpus": 0.4}}
        serve.run(build(AppConfig.model_validate(changed)), name="ops", route_prefix="/ops", blocking=False)
        start = time.monotonic()
        rest = list(lines)
        ended_after = time.monotonic() - start
    events = [line[len("data: ") :] for line in rest if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last or last["choices"][0]["finish_reason"] in ("stop", "length")
    assert ended_after < 30  # the replacement replica loads in the meantime; the grace period is 1 s
    wait_until_serving(ops_url)


def test_every_replica_freezes_its_startup_heap(serve_url):
    """A full collection walks every object the collector tracks, with the GIL held: Ray's,
    torch's, transformers' and the model's, ~200 ms in a process this size. Each replica moves
    them out of the collector's reach once it has started (`deployments/heap.py`)."""
    for deployment in ("Ingress", "ImagePreprocessor", "PromptTokenizer", "LlavaModel"):
        stats = serve.get_deployment_handle(deployment, "llava").stats.remote().result()
        assert stats["gc_frozen_objects"] > 100_000, deployment
