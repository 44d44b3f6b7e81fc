"""CPU deployments that turn a request into model inputs; stateless, scaled on their own."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import pickle
import time

import ray
from ray import serve

from deployments.metrics import FetchMetrics
from llava_serve import checkpoint, process
from llava_serve.config import AppConfig
from llava_serve.decode_pool import DecodePool
from llava_serve.fetch import ImageFetcher
from llava_serve.images import PreparedImage
from llava_serve.prompts import PromptBuilder, PromptInputs, TemplateMessage
from llava_serve.telemetry import source_kind


class HeldObjects:
    """Puts values in the object store and keeps this replica's reference to each for `hold_s`.

    The reference a caller receives inside a returned value is not always counted as a borrow by
    the time this replica lets go of its own (results travel through Serve's own transport), so
    the owner keeps every object alive until the model replica has had time to fetch it."""

    def __init__(self, hold_s: float):
        self.hold_s = hold_s
        self._held: collections.deque[tuple[float, ray.ObjectRef]] = collections.deque()

    def put(self, value) -> ray.ObjectRef:
        now = time.monotonic()
        while self._held and self._held[0][0] < now:
            self._held.popleft()
        ref = ray.put(value)
        self._held.append((now + self.hold_s, ref))
        return ref


@serve.deployment
class ImagePreprocessor:
    """Fetch, decode and preprocess one image; decoding runs off the event loop."""

    def __init__(self, config: AppConfig):
        self.limits = config.images
        self.fetcher = ImageFetcher(self.limits)
        self.video_fetcher = ImageFetcher(self.limits.for_video())
        self.held = HeldObjects(self.limits.pixel_hold_s)
        self.metrics = FetchMetrics()
        # As many decoding processes as the replica has CPUs: more would only contend and hold memory.
        workers = self.limits.decode_workers or max(1, math.ceil(config.image_preprocessor.num_cpus))
        self.decoder = DecodePool(config.model, self.limits, workers)
        self.adapter = self.decoder.adapter  # loaded once, by the pool, for its fork server's imports
        self.decoder.wait_ready()

    async def __call__(
        self,
        source: str,
        param: str | None = None,
        detail: str | None = None,
        num_images: int = 1,
        kind: str = "image",
    ) -> PreparedImage:
        """The image's tiles, size and token count; the tiles go into the object store and travel
        to the model replica as a reference, so the ingress only ever holds their address."""
        start, data = time.monotonic(), None
        try:
            data = await (self.fetcher if kind == "image" else self.video_fetcher).fetch(source, param)
        finally:
            size = None if data is None else len(data)
            self.metrics.record(source_kind(source), time.monotonic() - start, size)
        fetched = time.monotonic()
        if kind == "video":
            prepared = await self.decoder.prepare_video(data, param)
        else:
            prepared = await self.decoder.prepare(data, param, self.adapter.base_only(detail, num_images))
        return dataclasses.replace(
            prepared,
            pixel_values=self.held.put(prepared.pixel_values),
            fetch_s=fetched - start,
            preprocess_s=time.monotonic() - fetched,
        )

    def __del__(self):
        self.decoder.close()

    def stats(self) -> dict:
        cache = self.fetcher.cache
        return {
            "pid": os.getpid(),
            "decode_worker_pids": self.decoder.worker_pids(),
            "rss_bytes": process.rss_bytes(),
            "fetch_cache_bytes": cache.bytes,
            "fetch_cache_entries": len(cache.entries),
        }


@serve.deployment
class PromptTokenizer:
    """Render the chat template and tokenize, with image placeholders expanded from the counts
    the image preprocessor computed; it never sees pixels."""

    def __init__(self, config: AppConfig):
        self.builder = PromptBuilder(
            checkpoint.load_adapter(config.model), checkpoint.context_length(config.model)
        )
        self.last_call_bytes = 0

    async def __call__(
        self, messages: list[TemplateMessage], max_tokens: int, media_tokens: list[int]
    ) -> PromptInputs:
        start = time.monotonic()
        # What a call carries, for `stats()`: text and counts, a few hundred bytes, never pixels.
        self.last_call_bytes = len(pickle.dumps((messages, max_tokens, media_tokens)))
        prompt = await asyncio.to_thread(self.builder.build, messages, max_tokens, media_tokens)
        return dataclasses.replace(prompt, tokenize_s=time.monotonic() - start)

    def stats(self) -> dict:
        return {"pid": os.getpid(), "rss_bytes": process.rss_bytes(), "last_call_bytes": self.last_call_bytes}
