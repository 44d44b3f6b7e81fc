"""The health probe: answers cached, silence reported."""

import asyncio

import pytest

from llava_serve.api.health import HealthProbe
from llava_serve.errors import Unavailable


async def test_health_probe_caches_answers_and_reports_silence():
    calls = []

    async def answer():
        calls.append(1)
        return {"running": 0}

    probe = HealthProbe(answer, cache_s=60, timeout_s=1)
    assert await asyncio.gather(probe.check(), probe.check(), probe.check()) == [{"running": 0}] * 3
    assert len(calls) == 1

    async def silent():
        await asyncio.sleep(10)

    probe = HealthProbe(silent, cache_s=0, timeout_s=0.05)
    with pytest.raises(Unavailable, match=r"did not answer within 0\.05s"):
        await probe.check()
