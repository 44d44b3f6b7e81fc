"""Ray Serve's documented streaming pattern: `model.generate` + `TextIteratorStreamer(timeout=0)`.

As in Ray Serve's streaming tutorial (doc/source/serve/doc_code/streaming_tutorial.py, the basic
chatbot): each request runs `generate` with `loop.run_in_executor(None, ...)` on the loop's
default (bounded) executor, and the async method polls the streamer, sleeping 10 ms whenever it
is empty. Same checkpoint, sampling semantics, inputs and output type as
`deployments.model.LlavaModel`, so the benchmark can swap one for the other behind the same
handle call. The original LLaVA `model_worker` serves the same way with a thread per request.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from queue import Empty

import numpy as np
import torch
from ray import serve
from transformers import TextIteratorStreamer

from llava_serve import checkpoint
from llava_serve.config import AppConfig
from llava_serve.engine.sampling import SamplingParams
from llava_serve.engine.sequence import StepOutput
from llava_serve.images import PreparedImage
from llava_serve.looplag import LoopLagMonitor
from llava_serve.prompts import PromptInputs


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
        asyncio.get_running_loop().run_in_executor(None, functools.partial(self.model.generate, **kwargs))
        while True:
            try:
                for text in streamer:
                    yield StepOutput((), text, None, len(prompt.input_ids), streamer.tokens)
                break
            except Empty:
                await asyncio.sleep(0.01)
        yield StepOutput((), "", "length", len(prompt.input_ids), streamer.tokens)

    async def loop_lag(self, reset: bool = False) -> dict:
        stats = self.lag.percentiles_ms()
        if reset:
            self.lag.reset()
        return stats
