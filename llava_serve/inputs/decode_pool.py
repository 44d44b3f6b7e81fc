"""Decoding and preprocessing in worker processes, each item under a wall-clock deadline.

A decoder stuck in a hostile file (thousands of progressive-JPEG scans, a GIF of thousands of
frames on a large canvas, a video read to its last sampled frame) cannot be stopped from another
thread, so the work runs in a pool of processes (Pebble's), and a worker past its deadline is
killed and replaced. A worker that dies under a payload (a codec crash, the kernel's OOM killer)
costs that request a 400 and nothing else: the replica, and the other requests, carry on.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

import pebble

from llava_serve.config import ImageConfig, ModelConfig
from llava_serve.errors import ImageError, Unavailable
from llava_serve.inputs import images, video
from llava_serve.models import checkpoint
from llava_serve.types import PreparedImage

_adapter = None  # the checkpoint's image adapter, loaded once per worker process
# Imported by the fork server before any worker forks: the heavy packages, and the checkpoint's
# processor modules, which transformers imports lazily (most of a worker's 4 s start).
_PRELOADED = ["torch", "numpy", "PIL.Image", "tokenizers", "transformers", "llava_serve.inputs.decode_pool"]


def _load(model: ModelConfig) -> None:
    global _adapter
    _adapter = checkpoint.load_adapter(model)


def _prepare(data: bytes, limits: ImageConfig, param: str | None, base_only: bool) -> PreparedImage:
    return images.prepare(data, _adapter, limits, param, base_only)


def _prepare_video(data: bytes, limits: ImageConfig, param: str | None) -> PreparedImage:
    return video.prepare(data, _adapter, limits, param)


def _ready() -> bool:
    return _adapter is not None


class DecodePool:
    """`workers` processes, each with the checkpoint's adapter, preparing one item at a time.
    `adapter` is the same adapter in this process, for what the caller asks of it without decoding."""

    def __init__(self, model: ModelConfig, limits: ImageConfig, workers: int):
        self.limits = limits
        self._model, self._workers = model, workers
        # Workers fork from a fork server, a single-threaded process that has imported what they
        # need: never from the replica itself (a Ray worker with threads of its own), and a
        # replacement for a killed worker starts in a fraction of a second, not after the imports
        # of torch and the checkpoint's processor classes (4 s here). Which processor modules is
        # what loading the adapter imported in this process.
        self.adapter = checkpoint.load_adapter(model)
        self._context = multiprocessing.get_context("forkserver")
        models = sorted(m for m in sys.modules if m.startswith("transformers.models."))
        self._context.set_forkserver_preload([*_PRELOADED, *models])
        self._pool = self._new_pool()

    def _new_pool(self) -> pebble.ProcessPool:
        return pebble.ProcessPool(
            max_workers=self._workers, initializer=_load, initargs=(self._model,), context=self._context
        )

    def _schedule(self, fn, args: tuple = (), timeout: float | None = None) -> pebble.ProcessFuture:
        try:
            return self._pool.schedule(fn, args, timeout=timeout)
        except RuntimeError:  # the pool gave up (see `_run`): a new one takes its place
            self._pool.stop()
            self._pool = self._new_pool()
            return self._pool.schedule(fn, args, timeout=timeout)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until a worker has loaded the adapter, so the first request does not wait for it."""
        self._schedule(_ready).result(timeout)

    def worker_pids(self) -> list[int]:
        """This pool's worker processes alive now (Pebble's worker table; pinned in pyproject)."""
        workers = self._pool._pool_manager.worker_manager.workers
        return [pid for pid, process in list(workers.items()) if process.is_alive()]

    async def prepare(self, data: bytes, param: str | None, base_only: bool) -> PreparedImage:
        return await self._run(
            _prepare, (data, self.limits, param, base_only), self.limits.decode_timeout_s, "image", param
        )

    async def prepare_video(self, data: bytes, param: str | None) -> PreparedImage:
        return await self._run(
            _prepare_video, (data, self.limits, param), self.limits.video_decode_timeout_s, "video", param
        )

    async def _run(self, fn, args: tuple, timeout: float, what: str, param: str | None) -> PreparedImage:
        future = self._schedule(fn, args, timeout)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # a running item's worker is stopped too: nobody waits for it
            raise
        except FutureTimeout:
            knob = "decode_timeout_s" if what == "image" else "video_decode_timeout_s"
            raise ImageError(
                f"decoding this {what} took longer than {timeout:g}s (images.{knob})", param, "decode_timeout"
            ) from None
        except BrokenProcessPool:
            # A worker died before it had taken any item (while one was still on its way to it):
            # Pebble cannot tell whose it was and stops the pool. The next call starts a new one;
            # this request was never shown to be the cause, so it may be retried.
            raise Unavailable(f"the {what} decoder restarted before it took this {what}; retry") from None
        except pebble.ProcessExpired as e:
            raise ImageError(
                f"decoding this {what} ended its worker process (exit code {e.exitcode})",
                param,
                "decode_failed",
            ) from None

    def close(self) -> None:
        self._pool.stop()
        self._pool.join(timeout=5)
