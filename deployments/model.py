"""The GPU deployment: holds the weights and streams tokens from the batching engine."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import AsyncIterator

import ray
import torch
from ray import serve

from deployments.heap import freeze_startup_heap
from deployments.metrics import EngineMetrics, process_stats
from llava_serve.config import AppConfig, with_runtime
from llava_serve.engine import Engine
from llava_serve.engine.sampling import SamplingParams
from llava_serve.types import PreparedImage, PromptInputs, StepOutput


async def _resolved(image: PreparedImage) -> PreparedImage:
    """The image with its tiles fetched from the object store (the preprocessor put them there)."""
    if isinstance(image.pixel_values, ray.ObjectRef):
        return dataclasses.replace(image, pixel_values=await image.pixel_values)
    return image


@serve.deployment
class LlavaModel:
    def __init__(self, config: AppConfig):
        # As many intra-op threads as CPUs the replica reserved: torch's default (every core)
        # spins the cores that the proxy, ingress and preprocessors were promised.
        torch.set_num_threads(max(1, math.ceil(config.llava_model.num_cpus)))
        self.config = self.base_config = config  # the app's args; user_config is laid over these
        self.engine = Engine.load(config.model, config.engine)
        self.metrics = EngineMetrics()
        self._sampler: asyncio.Task | None = None
        self._reports = 0
        freeze_startup_heap()

    def reconfigure(self, user_config: dict) -> None:
        """Runtime knobs (stream pacing, the stall and grammar timeouts) from Serve's user_config:
        the engine reads them at each use, so running streams carry on under the new values."""
        self.config = with_runtime(self.base_config, "LlavaModel", user_config)
        self.engine.config = self.config.engine

    async def generate(
        self, prompt: PromptInputs, params: SamplingParams, *images: PreparedImage
    ) -> AsyncIterator[StepOutput]:
        """Stream one request's tokens; call with `handle.options(stream=True)`.

        Images come as separate positional arguments because Serve resolves upstream
        `DeploymentResponse`s only at the top level of the arguments.
        """
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_metrics())
        resolved = await asyncio.gather(*(_resolved(image) for image in images))
        outputs = self.engine.serve(prompt, params, list(resolved))
        try:
            async for out in outputs:
                if out.stages and "queue" in out.stages:  # on the first token only
                    self.metrics.queue_wait.observe(out.stages["queue"])
                yield out
        finally:
            await outputs.aclose()  # a caller gone cancels the request (Engine.serve)

    async def _sample_metrics(self) -> None:
        while True:
            self.metrics.sample(self.engine.stats())
            await asyncio.sleep(1.0)

    async def ping(self) -> dict:
        """For the ingress's /health: raises if the engine loop died or is wedged; no forward pass."""
        self.engine.check_health()
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting}

    async def stats(self) -> dict:
        return {**self.engine.stats(), **process_stats()}

    async def record_routing_stats(self) -> dict:
        """For the request router (`deployments.routing`): the routing digests of every prompt
        this replica holds KV for, or will once it runs (Serve polls this every
        `routing.stats_period_s`)."""
        self._reports += 1
        return {"report": self._reports, "held_blocks": sorted(self.engine.held_blocks())}

    async def record_autoscaling_stats(self) -> dict:
        """For the replica autoscaler (`deployments.autoscaling`): how full the engine is."""
        return {"engine_load": self.engine.utilization()}

    async def check_health(self) -> None:
        self.engine.check_health()

    async def __del__(self):
        await self.engine.shutdown()
