"""The common pattern we measure against: `model.generate` + `TextIteratorStreamer`, a thread per request.

This is how Ray Serve's streaming example and the original LLaVA `model_worker` serve a model:
each request starts `generate` in its own thread and the async method polls the streamer with a
zero timeout, sleeping 1 ms between empty polls. Written faithfully (same checkpoint, same
sampling semantics, same inputs and output type as `deployments.model.LlavaModel`), so the
benchmark can swap one for the other behind the same handle call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from queue import Empty
from threading import Thread

import numpy as np
import torch
from ray import serve
from transformers import TextIteratorStreamer

from llava_serve import checkpoint
from llava_serve.config import AppConfig
from llava_serve.images import PreparedImage
from llava_serve.looplag import LoopLagMonitor
from llava_serve.prompts import PromptInputs
from llava_serve.sampling import SamplingParams
from llava_serve.sequence import StepOutput


class CountingStreamer(TextIteratorStreamer):
    """`TextIteratorStreamer` that also counts generated tokens (it yields text by words)."""

    tokens = 0

    def put(self, value):
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.tokens += value.numel()
        super().put(value)


@serve.deployment
class StreamerModel:
    def __init__(self, config: AppConfig):
        self.processor = checkpoint.load_processor(config.model)
        self.model = checkpoint.load_model(config.model)
        self.lag = LoopLagMonitor()

    async def generate(
        self, prompt: PromptInputs, params: SamplingParams, *images: PreparedImage
    ) -> AsyncIterator[StepOutput]:
        self.lag.start()
        device = self.model.device
        inputs = {
            "input_ids": torch.tensor([prompt.input_ids], device=device),
            "attention_mask": torch.ones(1, len(prompt.input_ids), dtype=torch.long, device=device),
        }
        if images:
            pixels = np.concatenate([im.pixel_values for im in images])  # one tile each (LLaVA-1.5)
            inputs["pixel_values"] = torch.from_numpy(pixels).to(device, self.model.dtype)
        streamer = CountingStreamer(self.processor.tokenizer, skip_prompt=True, timeout=0)
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
            }
        )
        kwargs = dict(inputs, streamer=streamer, max_new_tokens=params.max_tokens, **sampling)
        Thread(target=self.model.generate, kwargs=kwargs, daemon=True).start()
        while True:
            try:
                for text in streamer:
                    yield StepOutput((), text, None, len(prompt.input_ids), streamer.tokens)
                break
            except Empty:
                await asyncio.sleep(0.001)
        yield StepOutput((), "", "length", len(prompt.input_ids), streamer.tokens)

    async def loop_lag(self, reset: bool = False) -> dict:
        stats = self.lag.percentiles_ms()
        if reset:
            self.lag.reset()
        return stats
