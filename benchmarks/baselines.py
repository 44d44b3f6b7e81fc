"""The baselines: Ray Serve's streaming tutorial as its authors wrote it, its two `Chatbot` ingress
deployments, serving the same checkpoint over HTTP.

doc/source/serve/doc_code/streaming_tutorial.py serves a chatbot straight from one FastAPI ingress
deployment whose handler returns a `StreamingResponse` of plain-text chunks:

- `ThreadChatbot` is the basic chatbot: the handler starts `model.generate` on the loop's default
  executor with a `TextIteratorStreamer(timeout=0, skip_prompt=True, skip_special_tokens=True)`
  and streams what `consume_streamer` polls from it (sleeping 10 ms on `Empty`);
- `BatchChatbot` is the batched chatbot: `@serve.batch` on `run_model`, a `RawStreamer` fed by
  `generate` on the default executor, each step's tokens decoded one by one, the prompts skipped.

Line for line the tutorial's, except what LLaVA and the benchmark need: the request is a JSON body
(an image as a data URI, or none for a text prompt; a question; `max_tokens`) rather than a
`prompt` query string; the
processor turns the image and the chat-templated question into the model's inputs inside
`generate_text` (where the tutorial tokenizes); decoding is greedy for `max_tokens` new tokens
(the tutorial's `max_length=1000` would only make the baselines slower); the batch is left-padded
(right padding would generate from pad tokens) with the size and wait set for the workload (16 and
100 ms rather than 2 and 15 s); a batched request's stream ends after its own `max_tokens`; and
the `RawStreamer` is polled with a zero timeout as `consume_streamer` expects (the tutorial's
`RawStreamer()` has none, so each `get` would block the replica's event loop until a token came).
"""

import asyncio
import base64
import io
from queue import Empty, Queue

from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from ray import serve
from starlette.responses import StreamingResponse
from transformers import TextIteratorStreamer

from llava_serve.config import AppConfig
from llava_serve.models import checkpoint


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
    """The tutorial's batched `Chatbot.run_model`, wrapped in `@serve.batch` below (its own name
    kept: Serve finds `self` by it)."""
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
    """The tutorial's batched `Chatbot.consume_streamer`."""
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


thread_app = FastAPI()
batch_app = FastAPI()


class Question(BaseModel):
    image: str | None = None  # data:image/png;base64,...; None: a text prompt
    question: str
    max_tokens: int


def model_inputs(processor, questions: list[Question]) -> dict:
    """The processor's inputs for a batch: each image decoded, each question chat-templated."""
    images = [
        Image.open(io.BytesIO(base64.b64decode(q.image.split(",", 1)[1]))).convert("RGB")
        for q in questions
        if q.image
    ]
    prompts = [
        processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        *([{"type": "image"}] if q.image else []),
                        {"type": "text", "text": q.question},
                    ],
                }
            ],
            add_generation_prompt=True,
        )
        for q in questions
    ]
    return processor(images=images or None, text=prompts, padding=True, return_tensors="pt")


@serve.deployment
@serve.ingress(thread_app)
class ThreadChatbot:
    def __init__(self, config: AppConfig):
        self.loop = asyncio.get_running_loop()

        self.processor = checkpoint.load_processor(config.model)
        self.model = checkpoint.load_model(config.model)
        self.tokenizer = self.processor.tokenizer

    @thread_app.post("/")
    def handle_request(self, question: Question):
        streamer = TextIteratorStreamer(self.tokenizer, timeout=0, skip_prompt=True, skip_special_tokens=True)
        self.loop.run_in_executor(None, self.generate_text, question, streamer)
        return StreamingResponse(self.consume_streamer(streamer), media_type="text/plain")

    def generate_text(self, question: Question, streamer: TextIteratorStreamer):
        inputs = model_inputs(self.processor, [question])
        self.model.generate(**inputs, streamer=streamer, max_new_tokens=question.max_tokens, do_sample=False)

    async def consume_streamer(self, streamer: TextIteratorStreamer):
        while True:
            try:
                for token in streamer:
                    yield token
                break
            except Empty:
                await asyncio.sleep(0.01)


@serve.deployment
@serve.ingress(batch_app)
class BatchChatbot:
    def __init__(self, config: AppConfig, max_batch_size: int = 16):
        self.loop = asyncio.get_running_loop()

        self.processor = checkpoint.load_processor(config.model)
        self.processor.tokenizer.padding_side = "left"
        self.model = checkpoint.load_model(config.model)
        self.tokenizer = self.processor.tokenizer
        self.run_model.set_max_batch_size(max_batch_size)  # Serve's setter; the tutorial's is 16

    @batch_app.post("/")
    async def handle_request(self, question: Question):
        return StreamingResponse(self.own_tokens(question), media_type="text/plain")

    async def own_tokens(self, question: Question):
        n = 0
        async for text in self.run_model(question):
            yield text
            n += 1
            if n == question.max_tokens:
                break

    run_model = serve.batch(max_batch_size=16, batch_wait_timeout_s=0.1)(run_model)

    def generate_text(self, questions: list[Question], streamer: RawStreamer):
        inputs = model_inputs(self.processor, questions)
        max_new = max(q.max_tokens for q in questions)
        self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new, do_sample=False)

    consume_streamer = consume_streamer
