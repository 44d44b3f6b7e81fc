"""CPU deployments that turn a request into model inputs; stateless, scaled on their own."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time

import ray
from ray import serve

from deployments.heap import freeze_startup_heap
from deployments.metrics import FetchMetrics, process_stats
from llava_serve.api.telemetry import source_kind
from llava_serve.config import AppConfig
from llava_serve.inputs.media import MediaPreparer
from llava_serve.inputs.prompts import PromptBuilder
from llava_serve.models import checkpoint
from llava_serve.types import PreparedImage, PromptInputs, TemplateMessage


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
        self.metrics = FetchMetrics()
        # As many decoding processes as the replica has CPUs: more would only contend and hold memory.
        workers = config.images.decode_workers or max(1, math.ceil(config.image_preprocessor.num_cpus))
        self.media = MediaPreparer(config.model, config.images, workers, self._fetched)
        self.held = HeldObjects(config.images.pixel_hold_s)
        freeze_startup_heap()

    def _fetched(self, source: str, seconds: float, size: int | None) -> None:
        self.metrics.record(source_kind(source), seconds, size)

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
        prepared = await self.media.prepare(source, param, detail, num_images, kind)
        return dataclasses.replace(prepared, pixel_values=self.held.put(prepared.pixel_values))

    def __del__(self):
        self.media.close()

    def stats(self) -> dict:
        cache = self.media.fetcher.cache
        return {
            **process_stats(),
            "decode_worker_pids": self.media.decoder.worker_pids(),
            "fetch_cache_bytes": cache.bytes,
            "fetch_cache_entries": len(cache.entries),
        }


@serve.deployment
class PromptTokenizer:
    """Render the chat template and tokenize, with image placeholders expanded from the counts
    the image preprocessor computed; it never sees pixels."""

    def __init__(self, config: AppConfig):
        self.builder = PromptBuilder(
            checkpoint.load_adapter(config.model),
            checkpoint.context_length(config.model),
            config.routing.block_tokens,
        )
        freeze_startup_heap()

    async def __call__(
        self,
        messages: list[TemplateMessage],
        max_tokens: int,
        media_tokens: list[int],
        add_generation_prompt: bool = True,
        media_hashes: list[str] | None = None,
    ) -> PromptInputs:
        return await asyncio.to_thread(
            self.builder.build, messages, max_tokens, media_tokens, add_generation_prompt, media_hashes
        )

    # /tokenize and /detokenize (the ingress's routes; vLLM's shapes).
    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return await asyncio.to_thread(self.builder.encode, text, add_special_tokens)

    async def decode(self, ids: list[int]) -> str:
        return await asyncio.to_thread(self.builder.decode, ids)

    async def pieces(self, ids: list[int]) -> list[str]:
        return await asyncio.to_thread(self.builder.pieces, ids)

    async def context_length(self) -> int:
        return self.builder.context_length

    def stats(self) -> dict:
        return process_stats()
