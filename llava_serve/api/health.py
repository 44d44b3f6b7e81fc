"""`/health`: whether the model deployment is answering, asked cheaply and not too often."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from llava_serve.errors import LlavaServeError, Unavailable, unwrap


class HealthProbe:
    """Asks the model replica a question that costs no forward pass, at most once per
    `cache_s`; concurrent callers share one question in flight."""

    def __init__(self, ask: Callable[[], Awaitable[dict]], cache_s: float, timeout_s: float):
        self.ask = ask
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self._answer: dict | LlavaServeError | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def check(self) -> dict:
        """The model's answer, or raise `Unavailable` saying why there is none."""
        async with self._lock:
            if self._answer is None or time.monotonic() - self._at >= self.cache_s:
                self._answer = await self._ask()
                self._at = time.monotonic()
        if isinstance(self._answer, LlavaServeError):
            raise self._answer
        return self._answer

    async def _ask(self) -> dict | LlavaServeError:
        try:
            return await asyncio.wait_for(self.ask(), self.timeout_s)
        except TimeoutError:
            return Unavailable(f"the model deployment did not answer within {self.timeout_s}s")
        except Exception as e:
            return Unavailable(f"the model deployment is not healthy: {unwrap(e).message}")
