"""CPU deployments that turn a request into model inputs; stateless, scaled on their own."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from deployments.metrics import FetchMetrics
from llava_serve import checkpoint, images, process
from llava_serve.config import AppConfig
from llava_serve.fetch import ImageFetcher
from llava_serve.images import PreparedImage
from llava_serve.prompts import PromptBuilder, PromptInputs, TemplateMessage
from llava_serve.telemetry import source_kind


@serve.deployment
class ImagePreprocessor:
    """Fetch, decode and preprocess one image; decoding runs off the event loop."""

    def __init__(self, config: AppConfig):
        self.limits = config.images
        self.image_processor = checkpoint.load_processor(config.model).image_processor
        self.fetcher = ImageFetcher(self.limits)
        self.metrics = FetchMetrics()
        # As many decoding threads as the replica has CPUs: more would only contend and hold memory.
        threads = max(1, math.ceil(config.image_preprocessor.num_cpus))
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    async def __call__(self, source: str, param: str | None = None) -> PreparedImage:
        start, data = time.monotonic(), None
        try:
            data = await self.fetcher.fetch(source, param)
        finally:
            size = None if data is None else len(data)
            self.metrics.record(source_kind(source), time.monotonic() - start, size)
        fetched = time.monotonic()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self.executor, images.prepare, data, self.image_processor, self.limits, param
        )
        return dataclasses.replace(prepared, fetch_s=fetched - start, preprocess_s=time.monotonic() - fetched)

    def stats(self) -> dict:
        cache = self.fetcher.cache
        return {
            "pid": os.getpid(),
            "rss_bytes": process.rss_bytes(),
            "fetch_cache_bytes": cache.bytes,
            "fetch_cache_entries": len(cache.entries),
        }


@serve.deployment
class PromptTokenizer:
    """Render the chat template and tokenize, with image placeholders expanded."""

    def __init__(self, config: AppConfig):
        processor = checkpoint.load_processor(config.model)
        self.builder = PromptBuilder(processor, checkpoint.context_length(config.model))

    async def __call__(self, messages: list[TemplateMessage], max_tokens: int) -> PromptInputs:
        start = time.monotonic()
        prompt = await asyncio.to_thread(self.builder.build, messages, max_tokens)
        return dataclasses.replace(prompt, tokenize_s=time.monotonic() - start)
