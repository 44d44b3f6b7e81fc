"""Ray Serve's documented way to batch streamed generation: `@serve.batch` on an async generator.

Written after the "Batch requests and stream the output for each" part of Ray Serve's streaming
tutorial (doc/source/serve/doc_code/streaming_tutorial.py): a `RawStreamer` (the docs' class,
line for line) receives each generation step's token batch from `model.generate` running on the
loop's default executor; `consume_streamer` polls it with a zero timeout, sleeping 10 ms on
`Empty`, and decodes each row's token; the batched method yields one list per step, the prompts
skipped first. What differs from the tutorial is only what LLaVA and the benchmark need: images go
into the batch's `pixel_values`, the batch is left-padded, decoding is greedy, and the batch
size and wait are set for the workload (16 and 100 ms rather than the tutorial's 2 and 15 s,
which would only make the baseline look worse). Each request still reads only its own
`max_tokens`; the batch runs until its longest request is done, as static batching does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from queue import Empty, Queue

import numpy as np
import torch
from ray import serve

from llava_serve import checkpoint
from llava_serve.config import AppConfig
from llava_serve.engine.sampling import SamplingParams
from llava_serve.engine.sequence import StepOutput
from llava_serve.images import PreparedImage
from llava_serve.looplag import LoopLagMonitor
from llava_serve.prompts import PromptInputs


class RawStreamer:
    def __init__(self, timeout: float | None = None):
        self.q = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def put(self, values):
        self.q.put(values)

    def end(self):
        self.q.put(self.stop_signal)

    def __iter__(self):
        return self

    def __next__(self):
        result = self.q.get(timeout=self.timeout)
        if result == self.stop_signal:
            raise StopIteration()
        else:
            return result


async def run_model(self, requests: list):
    """The tutorial's batched `Chatbot.run_model`, shared by both batched baselines, each of which
    wraps it in `@serve.batch` (its own name kept: Serve finds `self` by it)."""
    streamer = RawStreamer(timeout=0)
    self.loop.run_in_executor(None, self.generate_text, requests, streamer)
    on_prompt_tokens = True
    async for decoded_token_batch in self.consume_streamer(streamer):
        # The first batch of tokens contains the prompts, so we skip it.
        if not on_prompt_tokens:
            yield decoded_token_batch
        else:
            on_prompt_tokens = False


async def consume_streamer(self, streamer: RawStreamer):
    """The tutorial's batched `Chatbot.consume_streamer`, shared by both batched baselines."""
    while True:
        try:
            for token_batch in streamer:
                decoded_tokens = []
                for token in token_batch:
                    decoded_tokens.append(self.tokenizer.decode(token, skip_special_tokens=True))
                yield decoded_tokens
            break
        except Empty:
            await asyncio.sleep(0.01)


@serve.deployment
class BatchedModel:
    def __init__(self, config: AppConfig, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.1):
        self.loop = asyncio.get_running_loop()
        self.processor = checkpoint.load_processor(config.model)
        self.tokenizer = self.processor.tokenizer
        self.model = checkpoint.load_model(config.model)
        self.run_model.set_max_batch_size(max_batch_size)
        self.run_model.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.lag = LoopLagMonitor()

    async def generate(
        self, prompt: PromptInputs, params: SamplingParams, *images: PreparedImage
    ) -> AsyncIterator[StepOutput]:
        """The same call as `deployments.model.LlavaModel.generate`, served by the batch."""
        self.lag.start()
        n = 0
        async for text in self.run_model((prompt, list(images), params.max_tokens)):
            n += 1
            yield StepOutput((), text, None, len(prompt.input_ids), n)
            if n == params.max_tokens:
                break
        yield StepOutput((), "", "length", len(prompt.input_ids), n)

    run_model = serve.batch(max_batch_size=16, batch_wait_timeout_s=0.1)(run_model)

    def generate_text(self, requests: list, streamer: RawStreamer):
        length = max(len(prompt.input_ids) for prompt, _, _ in requests)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(p.input_ids)) + p.input_ids for p, _, _ in requests])
        mask = torch.tensor(
            [[0] * (length - len(p.input_ids)) + [1] * len(p.input_ids) for p, _, _ in requests]
        )
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        pixels = [im.pixel_values for _, images, _ in requests for im in images]
        if pixels:
            inputs["pixel_values"] = torch.from_numpy(np.concatenate(pixels)).to(self.model.dtype)
        max_new = max(max_tokens for _, _, max_tokens in requests)
        self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new, do_sample=False)

    consume_streamer = consume_streamer

    async def loop_lag(self, reset: bool = False) -> dict:
        stats = self.lag.percentiles_ms()
        if reset:
            self.lag.reset()
        return stats
