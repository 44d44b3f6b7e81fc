"""Continuous-batching generation engine on a never-blocked asyncio loop.

Each step is plan -> execute -> output:

- plan: `scheduler.schedule`, a pure function of the requests' state, says which requests retire,
  which are admitted and start, and how many tokens each computes;
- execute, on the model thread (the only thread that touches the model): retire and start as
  planned, one forward pass (`ModelRunner.execute`), the batch's next tokens (`Sampler`);
- output, on the output thread (`OutputProcessor`), while the model thread runs the next step:
  text, stop strings, logprobs, into each request's stream.

The event loop only hands steps to the model thread and outputs to the streams, so it stays free
to accept requests, stream tokens and notice cancellations. With nothing to do, it sleeps on an
event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from llava_serve.config import EngineConfig, ModelConfig
from llava_serve.engine.kv import KVManager, gpu_kv_budget, slot_length
from llava_serve.engine.output import OutputProcessor, paced
from llava_serve.engine.runner import Chunk, ModelRunner
from llava_serve.engine.sampler import Sampled, Sampler
from llava_serve.engine.sampling import SamplingParams
from llava_serve.engine.scheduler import Limits, StepPlan, schedule
from llava_serve.engine.sequence import Sequence, TokenEvent
from llava_serve.errors import EngineError, InvalidRequest, LlavaServeError, Overloaded, Unavailable
from llava_serve.models import checkpoint
from llava_serve.routing.key import position_key
from llava_serve.structured.grammar import Grammar, GrammarCompiler
from llava_serve.structured.spec import OutputFormat
from llava_serve.types import ACCEPTED, PreparedImage, PromptInputs, StepOutput

logger = logging.getLogger(__name__)
Event = tuple[Sequence, TokenEvent | Exception]


def _thread(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)


def _model_thread() -> ThreadPoolExecutor:
    return _thread("llava-engine")


@dataclass
class Step:
    """What the model thread did in one step, for the event loop to carry into its queues."""

    plan: StepPlan
    events: list[Event]


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        eos_ids: list[int],
        config: EngineConfig,
        model_thread: ThreadPoolExecutor | None = None,
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.config = config
        # The single owner of the model: every forward pass goes through this thread.
        self._executor = model_thread or _model_thread()
        # Text, stop strings and logprobs of a step while the model thread runs the next.
        self._output_executor = _thread("llava-output")
        self.output = OutputProcessor(tokenizer)
        # Output grammars compile on their own thread: neither the loop nor a step waits for one.
        self._grammar_executor = _thread("llava-grammar")
        vocab = runner.vocab_size
        self.grammars = GrammarCompiler(
            tokenizer, vocab, eos_ids, config.grammar_cache_bytes, config.grammar_limits
        )
        self.sampler = Sampler(vocab, runner.ops)
        runner.kv.keep_prefixes(config.prefix_cache_bytes)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # admission order
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.prefill_tokens = 0  # prompt positions computed (not copied from a cache or a choice)
        self.cancelled = 0
        self.last_step_end = time.monotonic()

    @property
    def prefixes(self):
        return self.runner.kv.prefixes

    @classmethod
    def load(cls, model: ModelConfig, config: EngineConfig) -> Engine:
        """Load the checkpoint and build an engine around it (blocking: call from a constructor).

        The weights are loaded and the KV slots allocated on the engine's model thread, the
        thread that will run every forward pass. Each thread that runs a parallel torch op gets
        its own OpenMP team, and once a process has more OpenMP threads than cores, libgomp
        stops its idle threads spinning, so each of a decode step's ~60 small matrix products
        waits for a sleeping thread to wake: a one-row step of the small preset on two cores
        took 23 ms with the weights loaded on another thread, 11 ms this way.
        """
        thread = _model_thread()
        try:
            runner, tokenizer, eos_ids = thread.submit(cls._build, model, config).result()
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(runner, tokenizer, eos_ids, config, thread)

    @staticmethod
    def _build(model: ModelConfig, config: EngineConfig) -> tuple[ModelRunner, object, list[int]]:
        adapter = checkpoint.load_adapter(model)
        weights = checkpoint.load_model(model, adapter)
        eos = weights.generation_config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        budget = config.kv_cache_bytes
        if budget is None and weights.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(weights.device)
            caches = config.prefix_cache_bytes + config.image_cache_bytes  # device memory, filled later
            budget = gpu_kv_budget(free, total, config.gpu_memory_utilization, caches)
        max_len = slot_length(
            budget,
            config.max_batch_size,
            KVManager.bytes_per_token(weights.config, weights.dtype),
            weights.config.get_text_config().max_position_embeddings,
        )
        runner = ModelRunner(weights, config.image_cache_bytes, config.max_batch_size, max_len)
        return runner, adapter.tokenizer, eos_ids

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
            "kv_tokens_used": self._kv_tokens_used(),
            "kv_tokens_capacity": self.runner.kv.capacity,
            "kv_cache_bytes": self.runner.kv.nbytes,
            "kv_slot_tokens": self.runner.kv.max_len,
            "steps": self.steps,
            "prefill_tokens": self.prefill_tokens,
            "cancelled": self.cancelled,
            "image_cache_hits": cache.hits,
            "image_cache_misses": cache.misses,
            "image_cache_bytes": cache.bytes,
            "prefix_cache_hits": self.prefixes.hits,
            "prefix_cache_misses": self.prefixes.misses,
            "prefix_cache_hit_tokens": self.prefixes.hit_tokens,
            "prefix_cache_bytes": self.prefixes.bytes,
            "joining": sum(not s.joined for s in self._running.values()),
            "grammar_cache_hits": self.grammars.hits,
            "grammar_cache_misses": self.grammars.misses,
            "grammar_cache_bytes": self.grammars.cache_bytes,
        }

    def utilization(self) -> float:
        """How full this engine is, 0..1 and more when requests wait: the larger of its rows in
        use (running and waiting, over `max_batch_size`) and its KV positions in use. What the
        replica autoscaler aims at."""
        rows = (self.num_running + self.num_waiting) / self.config.max_batch_size
        kv = self.runner.kv.capacity
        return max(rows, self._kv_tokens_used() / kv if kv else 0.0)

    def _kv_tokens_used(self) -> int:
        # A copy first: the replica's loop reads this while the model thread changes the batch.
        return sum(s.prefilled + s.num_generated for s in list(self._running.values()))

    def held_blocks(self) -> set[int]:
        """The routing digests of every prompt whose KV this engine holds or will: its prefix
        cache's entries, and the requests running or waiting (they are cached when they end)."""
        live = list(self._running.values()) + list(self._waiting)
        return self.prefixes.route_blocks() | {d for seq in live for d in seq.route_blocks}

    async def compile(self, fmt: OutputFormat) -> Grammar:
        """A grammar for one request's output format, compiled (or copied from the cache) off
        the event loop and off the model thread; a format it cannot enforce is `InvalidRequest`."""
        refused = self.grammars.refusal(fmt)
        if refused is not None:  # answered here: the grammar thread may still be busy building it
            raise InvalidRequest(refused, fmt.param)
        future = self._grammar_executor.submit(self.grammars.compile, fmt)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.grammar_timeout_s)
        except TimeoutError:
            # The thread finishes the build within the grammar limits; the request does not wait.
            message = (
                f"{fmt.param}: this schema took longer than {self.config.grammar_timeout_s:g}s to "
                "compile (engine.grammar_timeout_s)"
            )
            self.grammars.refuse(fmt, message)
            raise InvalidRequest(message, fmt.param) from None

    def submit(
        self,
        input_ids: list[int],
        images: list[PreparedImage],
        params: SamplingParams,
        stages: dict[str, float] | None = None,
        grammar: Grammar | None = None,
        route_blocks: tuple[int, ...] = (),
    ) -> Sequence:
        """Queue one request, or refuse it at once (too long, queue full, engine stopped).
        `stages` are the seconds it already spent before reaching the engine, for its record;
        `grammar` (from `compile`) is required when `params.output` is set."""
        if self._task is not None and self._task.done():
            raise EngineError("the engine has stopped; this replica is being replaced")
        if (grammar is None) != (params.output is None):
            raise ValueError("a grammar goes with params.output, and only with it")
        if any(not 0 <= token < self.runner.vocab_size for token in params.stop_token_ids):
            raise InvalidRequest(
                f"stop_token_ids names a token id outside 0..{self.runner.vocab_size - 1}", "stop_token_ids"
            )
        if any(not 0 <= token < self.runner.vocab_size for token, _ in params.logit_bias):
            raise InvalidRequest(
                f"logit_bias names a token id outside 0..{self.runner.vocab_size - 1}", "logit_bias"
            )
        if params.n > self.config.max_batch_size:
            raise InvalidRequest(
                f"n is {params.n}, more than the engine runs at once "
                f"(engine.max_batch_size: {self.config.max_batch_size})",
                "n",
            )
        seq = Sequence.create(input_ids, images, params, self.eos_ids, self.runner.device, grammar)
        seq.forks = [seq.fork(i, self.runner.device) for i in range(1, params.n)]
        for member in seq.group:
            member.text = self.output.text_for(member)
        seq.stages.update(stages or {})
        seq.route_blocks = route_blocks
        # Each choice holds its own KV: a slot's worth each, and n times the tokens of the batch.
        limits = [(self.runner.kv.max_len, "the tokens of a KV slot (engine.kv_cache_bytes)")]
        if self.config.max_batch_tokens is not None:
            cap = self.config.max_batch_tokens // params.n
            which = "the engine's token cap (engine.max_batch_tokens)"
            limits.append((cap, which if params.n == 1 else f"{which} shared by n={params.n} choices"))
        limit, which = min(limits)
        if seq.kv_budget > limit:
            raise InvalidRequest(
                f"prompt ({len(input_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"{which}: {limit}",
                "max_tokens",
            )
        if len(self._waiting) >= self.config.max_queue:
            raise Overloaded(f"the engine's queue is full ({self.config.max_queue} waiting); retry later")
        self._ensure_started()
        self._waiting.append(seq)
        self._wake.set()
        return seq

    async def stream(self, seq: Sequence) -> AsyncIterator[StepOutput]:
        """A submitted request's outputs, every choice's (each output has its `index`); closing the
        iterator cancels the request. Paced by `output.paced` at `stream_interval()`."""
        try:
            async for out in paced(seq, self.stream_interval):
                yield out
        finally:
            self.cancel(seq)

    def stream_interval(self) -> float:
        """Seconds between a stream's messages now: `stream_interval_s`, or longer when the running
        requests' streams would together send more than `max_stream_messages_per_s`."""
        floor, budget = self.config.stream_interval_s, self.config.max_stream_messages_per_s
        return floor if budget == 0 else max(floor, len(self._running) / budget)

    def cancel(self, seq: Sequence) -> None:
        """Drop a request's choices that have not finished: from the queue at once, from the batch
        at the next step."""
        live = [s for s in seq.group if not (s.finished or s.cancelled)]
        if not live:
            return
        for member in live:
            member.cancelled = True
        self.cancelled += 1
        with contextlib.suppress(ValueError):
            self._waiting.remove(seq)  # a cancelled request must not hold a queue slot
        self._wake.set()

    async def generate(
        self, input_ids: list[int], images: list[PreparedImage], params: SamplingParams
    ) -> AsyncIterator[StepOutput]:
        """Compile the output format if any, submit and stream in one call."""
        grammar = None if params.output is None else await self.compile(params.output)
        seq = self.submit(input_ids, images, params, grammar=grammar)
        async for out in self.stream(seq):
            yield out

    async def serve(
        self, prompt: PromptInputs, params: SamplingParams, images: list[PreparedImage]
    ) -> AsyncIterator[StepOutput]:
        """One request as the model replica serves it: `ACCEPTED` once it passed every check and
        is queued (so its caller knows a retry would repeat work), then its outputs. Each stage
        it already went through (tokenize; each image's fetch and preprocess) goes on its record."""
        if prompt.num_images != len(images):
            raise InvalidRequest(f"prompt has {prompt.num_images} image slots for {len(images)} images")
        stages = {"tokenize": prompt.tokenize_s}
        if images:  # fetched and preprocessed in parallel: the request waited for the slowest
            stages |= {
                "image_fetch": max(i.fetch_s for i in images),
                "image_preprocess": max(i.preprocess_s for i in images),
            }
        grammar = None if params.output is None else await self.compile(params.output)
        seq = self.submit(prompt.input_ids, images, params, stages, grammar, prompt.route_blocks)
        try:
            yield ACCEPTED
            async for out in self.stream(seq):
                yield out
        finally:
            self.cancel(seq)  # also when the caller left before the stream began

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
        """Stop the loop; every request still waiting or running ends with `Unavailable`."""
        if self._task is not None:
            self._task.cancel()
        self._fail_all(Unavailable("the model replica is shutting down; retry"))
        for executor in (self._executor, self._output_executor, self._grammar_executor):
            executor.shutdown(wait=False, cancel_futures=True)

    def _fail_all(self, error: LlavaServeError) -> None:
        """End every request the engine holds with `error`, so none of their streams can hang."""
        for seq in [*self._waiting, *self._running.values()]:
            if not (seq.finished or seq.cancelled):
                seq.finished = True
                seq.outputs.put_nowait(error)
        self._waiting.clear()
        self._running.clear()

    # -- the step loop (event loop) ---------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="llava-engine-loop")

    async def _loop(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            self._fail_all(Unavailable("the model replica is shutting down; retry"))
            raise
        except BaseException as e:
            logger.exception("the engine loop died")
            self._fail_all(EngineError(f"the engine stopped: {type(e).__name__}"))
            raise

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        self.output.loop = loop
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._running:
                self.last_step_end = time.monotonic()  # idle until now: nothing could have stalled
            waiting, running = list(self._waiting), list(self._running.values())
            step = await loop.run_in_executor(self._executor, self._step, waiting, running)
            self._carry(step.plan, waiting)
            if step.plan.computes:
                self.steps += 1
                self.last_step_end = time.monotonic()
            if step.events:  # processed while the model thread runs the next step
                self._output_executor.submit(self.output.process, step.events)
            plan = step.plan
            moved = plan.computes or plan.retire or plan.admit or plan.drop
            if moved and (self._running or self._waiting):
                self._wake.set()

    def _carry(self, plan: StepPlan, waiting: list[Sequence]) -> None:
        """The plan's moves between the queue and the running requests. Admitted requests come from
        the snapshot the step saw: one cancelled meanwhile is running now, and retires next step."""
        left = set(plan.drop) | set(plan.admit)
        if left:
            self._waiting = deque(s for s in self._waiting if s.seq_id not in left)
        snapshot = {s.seq_id: s for s in waiting}
        for seq_id in plan.admit:
            for member in snapshot[seq_id].group:
                self._running[member.seq_id] = member
        for seq_id in plan.retire:
            self._running.pop(seq_id, None)

    @property
    def limits(self) -> Limits:
        c = self.config
        return Limits(c.max_batch_size, c.max_batch_tokens, c.max_step_tokens, c.max_step_vision_tiles)

    # -- one step (model thread) ------------------------------------------------------------

    def _step(self, waiting: list[Sequence], running: list[Sequence]) -> Step:
        self._match(waiting, running)
        plan = schedule(waiting, running, self.limits)
        by_id = {s.seq_id: s for s in [*running, *waiting]}
        for seq_id in plan.retire:
            self._retire(by_id[seq_id])
        now = time.monotonic()
        for seq_id in plan.admit:
            for member in by_id[seq_id].group:
                member.stages["queue"] = now - member.created_at
        events = self._start([by_id[seq_id] for seq_id in plan.start])
        decoding, chunks = [], []
        for seq_id, n in plan.tokens.items():
            seq = by_id[seq_id]
            if seq.joined:
                decoding.append(seq)
            elif not seq.finished:  # its start failed
                chunks.append((seq, n))
        if decoding or chunks:
            events += self._execute(decoding, chunks)
        return Step(plan, events)

    def _match(self, waiting: list[Sequence], running: list[Sequence]) -> None:
        """Find the cached prefix of each prompt that may start this step, once per request, so
        the plan sizes its first chunk by what is left to compute."""
        if not self.prefixes.enabled:
            return
        rows = self.config.max_batch_size - sum(not (s.finished or s.cancelled) for s in running)
        candidates = [s for s in running if not s.started and not s.is_choice]
        for seq in waiting:
            if rows < seq.rows:
                break
            rows -= seq.rows
            candidates.append(seq)
        for seq in candidates:
            if not seq.matched:
                seq.hit, seq.matched = self.prefixes.match(self._prefix_key(seq)), True

    def _retire(self, seq: Sequence) -> None:
        """Give a leaving request's slot back; an answer that ended keeps its KV for prefixes."""
        if seq.slot is not None:
            kv = self.runner.kv
            if seq.joined and seq.finished and not seq.failed:
                kv.keep(seq.slot, self._prefix_key(seq) + tuple(seq.generated), seq.route_blocks)
            kv.release(seq.slot)
            seq.slot = None
        seq.embeds = seq.hit = None

    def _start(self, seqs: list[Sequence]) -> list[Event]:
        """Starting requests' images through the tower together, their prompts embedded, a slot
        each, and the cached prefix of each prompt copied in."""
        failed: list[Event] = []
        if not seqs:
            return failed
        start = time.perf_counter()
        features: list[list[torch.Tensor] | None] = [None] * len(seqs)
        try:  # every starting request's images through the tower together
            flat = iter(self.runner.encode_images([im for s in seqs for im in s.images]))
            features = [[next(flat) for _ in s.images] for s in seqs]
        except Exception:
            logger.exception("vision encoding failed for %d requests; each is tried alone", len(seqs))
        for seq, found in zip(seqs, features, strict=True):
            try:
                seq.embeds = self.runner.embed(seq.input_ids, seq.images, found)
            except Exception as e:
                if not isinstance(e, LlavaServeError):
                    logger.exception("embedding the prompt of request %d failed", seq.seq_id)
                failed += self._fail([seq], e)
                continue
            seq.slot = self.runner.kv.allocate()
            if self.prefixes.enabled:
                self.prefixes.use(seq.hit)
            if seq.hit is not None:
                entry, length = seq.hit
                self.runner.kv.load_prefix(seq.slot, entry, length)
                seq.prefilled = seq.cached_tokens = length
        now = self.runner.synchronized()
        for seq in seqs:
            seq.stages["vision_encode"] = now - start
        return failed

    def _prefix_key(self, seq: Sequence) -> tuple:
        """The prompt's prefix-cache key, built once per request (matched at start, kept at the end)."""
        if seq.prefix_key is None:
            image, video = self.runner.image_token_id, self.runner.video_token_id
            seq.prefix_key = position_key(seq.input_ids, seq.images, image, video)
        return seq.prefix_key

    def _execute(self, decoding: list[Sequence], chunks: list[tuple[Sequence, int]]) -> list[Event]:
        """One forward pass for the decode rows and the prompt chunks, then the next token of every
        decode row and of every prompt made whole. A failed pass fails the requests in it (what it
        wrote lies past their slots' lengths; every other slot is untouched)."""
        start = time.perf_counter()
        cut = [
            Chunk(s.slot, s.prefilled, s.embeds[s.prefilled : s.prefilled + n], n == s.prompt_left)
            for s, n in chunks
        ]
        try:
            logits = self.runner.execute([s.slot for s in decoding], cut)
        except Exception as e:
            logger.exception("a step of %d rows and %d prompt chunks failed", len(decoding), len(chunks))
            return self._fail(decoding + [s for s, _ in chunks], e)
        # A prompt's record wants its passes' time, which on a GPU only a sync tells; a decode-only
        # step must not wait for the device before its one read of the sampled ids.
        took = self.runner.synchronized() - start if chunks else 0.0
        for seq, n in chunks:
            seq.prefilled += n
            self.prefill_tokens += n
            seq.stages["prefill"] = seq.stages.get("prefill", 0.0) + took
        whole = [s for s, _ in chunks if s.prompt_left == 0]
        rows = decoding + whole
        events = self._sampled(rows, self._sample(rows, logits))
        for seq, row in zip(whole, logits[len(decoding) :], strict=True):
            seq.embeds = None  # the slot holds the prompt now
            if seq.joined:  # its first token was taken
                events += self._fork(seq, row)
        return events

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> Sampled:
        return self.sampler.sample(seqs, logits)

    def _sampled(self, seqs: list[Sequence], sampled: Sampled) -> list[Event]:
        """Each row takes its token (the device's copy becomes its slot's next input)."""
        self.runner.set_next([s.slot for s in seqs], sampled.tokens)
        events: list[Event] = []
        for i, seq in enumerate(seqs):
            try:
                if i in sampled.failures:
                    raise sampled.failures[i]
                events.append((seq, seq.accept(sampled.picked[i], sampled.logprobs.get(i))))
                seq.joined = True
            except Exception as e:
                logger.exception("sampling failed for request %d", seq.seq_id)
                events += self._fail([seq], e)
        return events

    def _fork(self, seq: Sequence, logits: torch.Tensor) -> list[Event]:
        """A request's other choices, its prompt now whole: each samples its first token from the
        same logits with its own generator and starts from a copy of the prompt's KV, so the prompt
        is computed once whatever `n` is."""
        forks = [f for f in seq.forks if not (f.cancelled or f.finished)]
        if not forks:
            return []
        # A copy per choice: a grammar's mask is applied to its row in place.
        rows = logits.expand(len(forks), -1).clone()
        sampled = self._sample(forks, rows)
        for fork in forks:
            fork.slot = self.runner.kv.allocate()
            fork.prefilled = seq.prefilled
            self.runner.kv.copy(seq.slot, fork.slot, seq.prefilled)
        return self._sampled(forks, sampled)

    @staticmethod
    def _fail(seqs: list[Sequence], error: Exception) -> list[Event]:
        typed = (
            error
            if isinstance(error, LlavaServeError)
            else EngineError(f"generation failed: {type(error).__name__}")
        )
        # Choices waiting for a prompt that will not be whole fail with it.
        seqs = seqs + [f for s in seqs for f in s.forks if not (f.joined or f.finished)]
        for seq in seqs:
            seq.finished = seq.failed = True
        return [(seq, typed) for seq in seqs]
