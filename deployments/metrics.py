"""Prometheus metrics through `ray.serve.metrics`; every name and label is listed in docs/operations.md.

Ray exports them (prefixed `ray_`) from each node's metrics agent, with Serve's own
`deployment`, `replica` and `application` labels added.
"""

from __future__ import annotations

import gc
import os

import psutil
from ray.serve import metrics

from llava_serve.api.telemetry import RequestRecord


def process_stats() -> dict:
    """What every replica's `stats()` reports of its process: its pid, resident set size, and
    how many objects its startup left frozen out of the collector's reach (`deployments.heap`)."""
    return {
        "pid": os.getpid(),
        "rss_bytes": int(psutil.Process().memory_info().rss),
        "gc_frozen_objects": gc.get_freeze_count(),
    }


def _histogram(name: str, description: str, boundaries=None, tags: tuple[str, ...] = ()):
    return metrics.Histogram(name, description, boundaries=boundaries or _LATENCY_S, tag_keys=tags)


_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_BYTES = [1e3, 1e4, 1e5, 1e6, 4e6, 16e6, 64e6]


class IngressMetrics:
    def __init__(self):
        self.requests = metrics.Counter(
            "llava_requests_total", "Chat completion requests by outcome.", tag_keys=("outcome", "stream")
        )
        self.errors = metrics.Counter("llava_errors_total", "Failed requests by type.", tag_keys=("type",))
        self.ttft = _histogram("llava_ttft_seconds", "Time to first token.")
        self.itl = _histogram("llava_inter_token_seconds", "Time between output tokens.")
        self.e2e = _histogram("llava_e2e_latency_seconds", "Whole request, as the ingress sees it.")
        self.tokens = metrics.Counter("llava_tokens_total", "Tokens in and out.", tag_keys=("kind",))
        self.stages = _histogram(
            "llava_stage_seconds",
            "Time a request spent in each stage: image_fetch, image_preprocess, tokenize, queue, "
            "vision_encode, prefill, time_per_output_token, end_to_end.",
            tags=("stage",),
        )

    def record(self, r: RequestRecord) -> None:
        stream = "unknown" if r.stream is None else str(r.stream).lower()
        self.requests.inc(tags={"outcome": r.outcome, "stream": stream})
        if r.outcome not in ("ok", "cancelled"):
            self.errors.inc(tags={"type": r.outcome})
        if r.ttft_s is not None:
            self.ttft.observe(r.ttft_s)
        for gap in r.inter_token_s:
            self.itl.observe(gap)
        self.e2e.observe(r.total_s)
        for stage, seconds in r.stage_seconds().items():
            self.stages.observe(seconds, tags={"stage": stage})
        for kind, n in (("prompt", r.prompt_tokens), ("completion", r.completion_tokens)):
            if n > 0:  # Ray's counters refuse increments of 0
                self.tokens.inc(n, tags={"kind": kind})


# Engine stats that count cache lookups -> (the counter attribute, its `result` tag).
_CACHE_COUNTERS = {
    "image_cache_hits": ("image_cache", "hit"),
    "image_cache_misses": ("image_cache", "miss"),
    "grammar_cache_hits": ("grammar_cache", "hit"),
    "grammar_cache_misses": ("grammar_cache", "miss"),
    "prefix_cache_hits": ("prefix_cache", "hit"),
    "prefix_cache_misses": ("prefix_cache", "miss"),
    "prefix_cache_hit_tokens": ("prefix_tokens", "reused"),
}


class EngineMetrics:
    """Gauges sampled from the engine's stats; counters advanced by their deltas."""

    def __init__(self):
        self.queue_wait = _histogram("llava_queue_wait_seconds", "Admission queue wait before prefill.")
        self.running = metrics.Gauge("llava_running_requests", "Requests in the running batch.")
        self.waiting = metrics.Gauge("llava_waiting_requests", "Requests in the admission queue.")
        self.kv_tokens = metrics.Gauge(
            "llava_kv_tokens_used", "KV positions the running requests hold now (prompt + generated)."
        )
        self.kv_capacity = metrics.Gauge(
            "llava_kv_tokens_capacity", "KV positions the slots hold in all (slots x slot length)."
        )
        self.kv_bytes = metrics.Gauge("llava_kv_cache_bytes", "KV cache slots, allocated once at start.")
        self.image_cache = metrics.Counter(
            "llava_image_cache_total", "Vision-embedding cache lookups.", tag_keys=("result",)
        )
        self.image_cache_bytes = metrics.Gauge("llava_image_cache_bytes", "Bytes held by the vision cache.")
        self.grammar_cache = metrics.Counter(
            "llava_grammar_cache_total",
            "Output-grammar lookups (response_format schemas, forced tool calls).",
            tag_keys=("result",),
        )
        self.prefix_cache = metrics.Counter(
            "llava_prefix_cache_total", "Prompt-prefix KV lookups as requests start.", tag_keys=("result",)
        )
        self.prefix_tokens = metrics.Counter(
            "llava_prefix_cache_tokens_total",
            "Prompt positions whose KV was copied from the prefix cache instead of computed.",
            tag_keys=("result",),
        )
        self.prefix_cache_bytes = metrics.Gauge("llava_prefix_cache_bytes", "Bytes held by the prefix cache.")
        self.joining = metrics.Gauge("llava_joining_requests", "Requests whose prompts are being written.")
        self._last = {key: 0 for key in _CACHE_COUNTERS}

    def sample(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_tokens.set(stats["kv_tokens_used"])
        self.kv_capacity.set(stats["kv_tokens_capacity"])
        self.kv_bytes.set(stats["kv_cache_bytes"])
        self.image_cache_bytes.set(stats["image_cache_bytes"])
        self.prefix_cache_bytes.set(stats["prefix_cache_bytes"])
        self.joining.set(stats["joining"])
        for key, (counter, result) in _CACHE_COUNTERS.items():
            delta = stats[key] - self._last[key]
            if delta > 0:
                getattr(self, counter).inc(delta, tags={"result": result})
            self._last[key] = stats[key]


class FetchMetrics:
    def __init__(self):
        self.latency = _histogram(
            "llava_image_fetch_seconds", "Getting one image's bytes.", tags=("source", "result")
        )
        self.bytes = _histogram("llava_image_fetch_bytes", "Encoded bytes per image.", _BYTES, ("source",))

    def record(self, source: str, seconds: float, size: int | None) -> None:
        result = "ok" if size is not None else "error"
        self.latency.observe(seconds, tags={"source": source, "result": result})
        if size is not None:
            self.bytes.observe(size, tags={"source": source})
