"""Output processing, off the model thread: tokens to text deltas, stop strings, logprobs.

The model thread leaves each step's `TokenEvent`s here and goes on to the next forward pass; one
output thread turns them into `StepOutput`s (while the next step runs) and hands them to their
requests' streams on the event loop. Text comes from `tokenizers`' `DecodeStream` for byte-level
BPE tokenizers (Llama-3, Qwen2), seeded with the prompt's last tokens; where it cannot go on (a
byte sequence it refuses), the request carries on with the window detokenizer
(`detok.IncrementalDetokenizer`). SentencePiece tokenizers with byte fallback (Llama-2, Mistral)
use the window detokenizer throughout: `DecodeStream` renders an invalid byte run differently
from the tokenizer's own `decode` (a lone fallback byte as its character, not U+FFFD), and the
text must be the one `decode` gives. A stop string is found here, so the request it ends
is marked finished and retires at the engine's next step; whatever it computed meanwhile is
dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from tokenizers.decoders import DecodeStream

from llava_serve.engine.detok import IncrementalDetokenizer, StopMatcher, TokenBytes
from llava_serve.engine.sequence import Sequence, TokenEvent
from llava_serve.errors import EngineError
from llava_serve.types import SampledLogprob, StepOutput

logger = logging.getLogger(__name__)

# Prompt tokens decoded as left context: SentencePiece decoders drop a sequence's leading space.
PROMPT_CONTEXT = 5


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


class Detokenizer:
    """A request's text, one token at a time; never emits a broken UTF-8 character."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.read = len(self.ids)  # tokens whose text has been emitted
        streams = _byte_level(tokenizer)
        self._backend = tokenizer.backend_tokenizer if streams else None
        self._stream = DecodeStream(ids=self.ids, skip_special_tokens=self.skip) if streams else None
        self._window: IncrementalDetokenizer | None = None if streams else self._fallback()

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self._stream is not None:
            try:
                text = self._stream.step(self._backend, token)
            except Exception:
                self._stream = None
                self._window = self._fallback()
            else:
                if text is not None:
                    self.read = len(self.ids)
                return text or ""
        return self._window.advance()

    def flush(self) -> str:
        """At the end: whatever was held back, an incomplete character included (as U+FFFD)."""
        if self._window is None:
            if self.read == len(self.ids):
                return ""
            self._window = self._fallback()
        return self._window.flush()

    def _fallback(self) -> IncrementalDetokenizer:
        """The window detokenizer, from the last token whose text was emitted."""
        return IncrementalDetokenizer(
            self.tokenizer, self.ids, max(0, self.read - PROMPT_CONTEXT), self.read, self.skip
        )


class RequestText:
    """One request's text state: its detokenizer, its stop strings, whether its answer ended."""

    def __init__(self, seq: Sequence, tokenizer):
        params = seq.params
        self.detok = Detokenizer(tokenizer, seq.input_ids, params.skip_special_tokens)
        self.stop = StopMatcher(params.stop, params.include_stop_str_in_output)
        self.done = False

    def step(self, seq: Sequence, event: TokenEvent, token_bytes: TokenBytes) -> StepOutput:
        params, end = seq.params, event.end
        if end == "eos" or (end == "stop_token" and not params.include_stop_str_in_output):
            new = self.detok.flush()
        else:
            new = self.detok.push(event.token)
        if end in ("length", "complete", "stop_token"):
            new += self.detok.flush()
        logprob = None if event.logprob is None else self._logprob(event, new, token_bytes)
        text, hit = self.stop.feed(new) if event.may_end else (new, False)  # none before min_tokens
        finish = "stop" if hit or end in ("eos", "stop_token", "complete") else "length" if end else None
        if finish is not None and not hit:
            text += self.stop.flush()
        self.done = finish is not None
        return StepOutput(
            (event.token,),
            text,
            finish,
            len(seq.input_ids),
            event.completion_tokens,
            () if logprob is None else (logprob,),
            event.stages,
            seq.index,
            event.cached_tokens,
        )

    def _logprob(self, event: TokenEvent, text: str, token_bytes: TokenBytes) -> SampledLogprob:
        decode = self.detok.tokenizer.decode
        row = event.logprob
        top = tuple((decode([i]), token_bytes(i), v) for i, v in row.top)
        return SampledLogprob(text, token_bytes(event.token), row.logprob, top)


class OutputProcessor:
    """Runs on its own thread; `process` is called with each step's events, in step order."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop | None = None):
        self.tokenizer = tokenizer
        self.token_bytes = TokenBytes(tokenizer)
        self.loop = loop

    def text_for(self, seq: Sequence) -> RequestText:
        return RequestText(seq, self.tokenizer)

    def process(self, events: list[tuple[Sequence, TokenEvent | Exception]]) -> None:
        ready = []
        for seq, event in events:
            if seq.text.done:
                continue  # ended by a stop string: what it computed since is dropped
            if isinstance(event, Exception):
                seq.text.done = True
                ready.append((seq, event))
                continue
            try:
                out = seq.text.step(seq, event, self.token_bytes)
            except Exception as e:
                logger.exception("output processing failed for request %d", seq.seq_id)
                out = EngineError(f"the answer's text could not be produced: {type(e).__name__}")
                seq.text.done = True
            if seq.text.done:
                seq.finished = True  # a stop string: it retires at the engine's next step
            ready.append((seq, out))
        if ready:
            self.loop.call_soon_threadsafe(_deliver, ready)


def _deliver(ready: list[tuple[Sequence, StepOutput | Exception]]) -> None:
    """Event loop: each output into its request's stream."""
    for seq, out in ready:
        seq.outputs.put_nowait(out)


def out_is_partial(out: StepOutput | Exception) -> bool:
    """More of this request's outputs may follow."""
    return isinstance(out, StepOutput) and out.finish_reason is None


async def paced(seq: Sequence, interval: Callable[[], float]) -> AsyncIterator[StepOutput]:
    """A request's outputs, every choice's, as its stream sends them: the first at once, then at
    most one message per choice every `interval()` seconds, carrying whatever that choice produced
    since (or piled up while the consumer was busy). Every message costs each hop through Serve
    the same, whatever it carries (benchmarks/micro/serve_hop.py)."""
    running = {s.index for s in seq.group}
    sent_at = None
    while running:
        out = await seq.outputs.get()
        if sent_at is not None and out_is_partial(out):
            await asyncio.sleep(interval() - (time.monotonic() - sent_at))
        ready: dict[int, StepOutput] = {}
        while True:
            if isinstance(out, Exception):
                raise out
            ready[out.index] = ready[out.index] + out if out.index in ready else out
            if seq.outputs.empty():
                break
            out = seq.outputs.get_nowait()
        for index in sorted(ready):
            yield ready[index]
            if ready[index].finish_reason is not None:
                running.discard(index)
        sent_at = time.monotonic()
