"""Continuous-batching generation engine on a never-blocked asyncio loop.

One background task drives the step loop: admit -> (executor) retire, decode, prefill ->
emit. Each step's model work runs in one dedicated thread, the only thread that touches
the model, so the event loop stays free to accept requests, stream tokens and notice
cancellations. With nothing to do, the loop sleeps on an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from llava_serve import checkpoint
from llava_serve.config import EngineConfig, ModelConfig
from llava_serve.errors import EngineError, InvalidRequest, LlavaServeError, Overloaded
from llava_serve.images import PreparedImage
from llava_serve.runner import ModelRunner
from llava_serve.sampling import SamplingParams
from llava_serve.sequence import Sequence, StepOutput

logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, eos_ids: list[int], config: EngineConfig):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.config = config
        # The single owner of the model: every forward pass goes through this thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-engine")
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.cancelled = 0
        self.last_step_end = time.monotonic()
        # Called with each admitted request's queue wait (s); the deployment points it at a metric.
        self.on_admit: Callable[[float], None] | None = None

    @classmethod
    def load(cls, model: ModelConfig, config: EngineConfig) -> Engine:
        """Load the checkpoint and build an engine around it (blocking: call from a constructor)."""
        processor = checkpoint.load_processor(model)
        weights = checkpoint.load_model(model)
        eos = weights.generation_config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        return cls(ModelRunner(weights, config.image_cache_bytes), processor.tokenizer, eos_ids, config)

    # -- public API (event loop) -------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict:
        cache = self.runner.vision_cache
        return {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "kv_tokens_reserved": sum(s.kv_budget for s in self._running.values()),
            "kv_tokens_budget": self.config.max_batch_tokens,
            "steps": self.steps,
            "cancelled": self.cancelled,
            "image_cache_hits": cache.hits,
            "image_cache_misses": cache.misses,
            "image_cache_bytes": cache.bytes,
        }

    async def generate(
        self, input_ids: list[int], images: list[PreparedImage], params: SamplingParams
    ) -> AsyncIterator[StepOutput]:
        """Stream one request's tokens. Closing the iterator cancels the request at the next step."""
        seq = Sequence.create(input_ids, images, params, self.tokenizer, self.eos_ids, self.runner.device)
        if seq.kv_budget > self.config.max_batch_tokens:
            raise InvalidRequest(
                f"prompt ({len(input_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"engine's token budget of {self.config.max_batch_tokens}",
                "max_tokens",
            )
        if len(self._waiting) >= self.config.max_queue:
            raise Overloaded(f"the engine's queue is full ({self.config.max_queue} waiting); retry later")
        self._ensure_started()
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                out = await seq.outputs.get()
                if isinstance(out, Exception):
                    raise out
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True
                self.cancelled += 1
                with contextlib.suppress(ValueError):
                    self._waiting.remove(seq)  # a cancelled request must not hold a queue slot
                self._wake.set()

    def check_health(self) -> None:
        """Raise if the step loop has died or is wedged (work pending, no step for too long)."""
        if self._task is not None and self._task.done():
            why = "cancelled" if self._task.cancelled() else repr(self._task.exception())
            raise EngineError(f"engine loop exited: {why}")
        busy = self._running or self._waiting
        stalled = time.monotonic() - self.last_step_end
        if busy and stalled > self.config.stall_timeout_s:
            raise EngineError(f"engine has pending work but no step finished for {stalled:.0f}s")

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the step loop ---------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="llava-engine-loop")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._running:
                self.last_step_end = time.monotonic()  # idle until now: nothing could have stalled
            decoding = [s for s in self._running.values() if not s.cancelled]
            admit = self._admit()
            if not decoding and not admit:
                if self.runner.num_rows:  # the last rows were cancelled: free their KV now
                    await loop.run_in_executor(self._executor, self.runner.keep, set())
                continue
            outputs = await loop.run_in_executor(self._executor, self._step, decoding, admit)
            self.steps += 1
            self.last_step_end = time.monotonic()
            self._emit(outputs)
            if self._running or self._waiting:
                self._wake.set()

    def _admit(self) -> list[Sequence]:
        """Move waiting requests into the batch while its size and token budget allow (FIFO)."""
        admit: list[Sequence] = []
        budget = self.config.max_batch_tokens - sum(s.kv_budget for s in self._running.values())
        while self._waiting and len(self._running) + len(admit) < self.config.max_batch_size:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                continue
            if seq.kv_budget > budget:
                break
            budget -= seq.kv_budget
            admit.append(self._waiting.popleft())
        now = time.monotonic()
        for seq in admit:
            self._running[seq.seq_id] = seq
            if self.on_admit is not None:
                self.on_admit(now - seq.created_at)
        return admit

    def _step(
        self, decoding: list[Sequence], admit: list[Sequence]
    ) -> list[tuple[Sequence, StepOutput | Exception]]:
        """Executor thread: retire cancelled rows, decode the running ones, prefill the new ones."""
        outputs: list[tuple[Sequence, StepOutput | Exception]] = []
        self.runner.keep({s.seq_id for s in decoding})
        if decoding:
            outputs += self._guarded(decoding, self._decode)
        if admit:
            outputs += self._guarded(admit, self._prefill)
        self.runner.keep({s.seq_id for s in decoding + admit if not s.finished})
        return outputs

    def _guarded(self, seqs: list[Sequence], phase) -> list[tuple[Sequence, StepOutput | Exception]]:
        """Run one phase; a failure fails only the requests in it, with a typed error."""
        try:
            return phase(seqs)
        except Exception as e:
            if phase == self._prefill and len(seqs) > 1:
                # Nothing was committed: prefill them one by one so only the culprit fails.
                return [out for seq in seqs for out in self._guarded([seq], phase)]
            logger.exception("engine phase %s failed for %d requests", phase.__name__, len(seqs))
            if phase == self._decode:
                self.runner.reset()  # a half-updated cache cannot be trusted
            error = (
                e if isinstance(e, LlavaServeError) else EngineError(f"generation failed: {type(e).__name__}")
            )
            for seq in seqs:
                seq.finished = True
            return [(seq, error) for seq in seqs]

    def _decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, StepOutput]]:
        logits = self.runner.decode()
        row = {sid: i for i, sid in enumerate(self.runner.batch.seq_ids)}
        outs = [(seq, seq.advance(logits[row[seq.seq_id]])) for seq in seqs]
        self.runner.set_last_tokens([o.token_id for _, o in sorted(outs, key=lambda x: row[x[0].seq_id])])
        return outs

    def _prefill(self, seqs: list[Sequence]) -> list[tuple[Sequence, StepOutput]]:
        logits = self.runner.prefill([s.seq_id for s in seqs], [(s.input_ids, s.images) for s in seqs])
        outs = [(seq, seq.advance(logits[i])) for i, seq in enumerate(seqs)]
        self.runner.commit([o.token_id for _, o in outs])
        return outs

    def _emit(self, outputs: list[tuple[Sequence, StepOutput | Exception]]) -> None:
        """Event loop: hand each output to its request's stream; forget finished requests."""
        for seq, out in outputs:
            seq.outputs.put_nowait(out)
        for seq in list(self._running.values()):
            if seq.finished or seq.cancelled:
                del self._running[seq.seq_id]
