"""One image or video part, from its URL to model-ready tiles: the image preprocessor's job."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from llava_serve.config import ImageConfig, ModelConfig
from llava_serve.inputs.decode_pool import DecodePool
from llava_serve.inputs.fetch import ImageFetcher
from llava_serve.types import PreparedImage

# Called after every fetch with (the source URL, seconds, bytes or None when it failed).
FetchObserver = Callable[[str, float, int | None], None]


class MediaPreparer:
    """Fetches under the image or the video limits, decodes and preprocesses in the decode pool's
    worker processes, and times both stages for the request's record."""

    def __init__(
        self, model: ModelConfig, limits: ImageConfig, workers: int, on_fetch: FetchObserver | None = None
    ):
        self.fetcher = ImageFetcher(limits)
        self.video_fetcher = ImageFetcher(limits.for_video())
        self.decoder = DecodePool(model, limits, workers)
        self.adapter = self.decoder.adapter  # loaded once, by the pool, for its fork server's imports
        self.on_fetch = on_fetch
        self.decoder.wait_ready()

    async def prepare(
        self,
        source: str,
        param: str | None = None,
        detail: str | None = None,
        num_images: int = 1,
        kind: str = "image",
    ) -> PreparedImage:
        start, data = time.monotonic(), None
        try:
            data = await (self.fetcher if kind == "image" else self.video_fetcher).fetch(source, param)
        finally:
            if self.on_fetch is not None:
                self.on_fetch(source, time.monotonic() - start, None if data is None else len(data))
        fetched = time.monotonic()
        if kind == "video":
            prepared = await self.decoder.prepare_video(data, param)
        else:
            prepared = await self.decoder.prepare(data, param, self.adapter.base_only(detail, num_images))
        return dataclasses.replace(prepared, fetch_s=fetched - start, preprocess_s=time.monotonic() - fetched)

    def close(self) -> None:
        self.decoder.close()
