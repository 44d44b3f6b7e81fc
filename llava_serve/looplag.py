"""Measures how late an asyncio loop runs a timer: the lag every request on that loop feels."""

from __future__ import annotations

import asyncio
import time
from collections import deque


class LoopLagMonitor:
    """A ticker that sleeps `interval_s` and records how much later than asked it woke."""

    def __init__(self, interval_s: float = 0.01, window: int = 20_000):
        self.interval_s = interval_s
        self.samples: deque[float] = deque(maxlen=window)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick(), name="loop-lag-monitor")

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.samples.append(max(0.0, time.perf_counter() - t0 - self.interval_s))

    def reset(self) -> None:
        self.samples.clear()

    def percentiles_ms(self) -> dict[str, float]:
        data = sorted(self.samples)
        if not data:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}

        def pick(q: float) -> float:
            return round(1000 * data[min(len(data) - 1, int(q * len(data)))], 2)

        return {"p50": pick(0.50), "p99": pick(0.99), "max": round(1000 * data[-1], 2), "n": len(data)}
