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

import torch

from llava_serve.config import EngineConfig, ModelConfig
from llava_serve.engine.detok import TokenBytes
from llava_serve.engine.kvcache import SlotKV, gpu_kv_budget, slot_length
from llava_serve.engine.prefix import PrefixCache
from llava_serve.engine.runner import Chunk, ModelRunner
from llava_serve.engine.sampling import SamplingParams, sample_batch, sample_row
from llava_serve.engine.sequence import Sequence
from llava_serve.errors import EngineError, InvalidRequest, LlavaServeError, Overloaded, Unavailable
from llava_serve.models import checkpoint
from llava_serve.routing.key import position_key
from llava_serve.structured.grammar import Grammar, GrammarCompiler, MaskBuffer
from llava_serve.structured.spec import OutputFormat
from llava_serve.types import ACCEPTED, PreparedImage, PromptInputs, StepOutput

logger = logging.getLogger(__name__)
Result = StepOutput | LlavaServeError


def _tiles(image: PreparedImage) -> int:
    """Tiles (or video frames) an image sends through the vision tower."""
    return image.pixel_values.shape[0]


def _model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-engine")


def out_is_partial(out: StepOutput | Exception) -> bool:
    """More of this request's outputs may follow."""
    return isinstance(out, StepOutput) and out.finish_reason is None


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
        self.token_bytes = TokenBytes(tokenizer)
        self.eos_ids = eos_ids
        self.config = config
        # The single owner of the model: every forward pass goes through this thread.
        self._executor = model_thread or _model_thread()
        # Output grammars compile on their own thread: neither the loop nor a step waits for one.
        self._grammar_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-grammar")
        vocab = runner.vocab_size
        self.grammars = GrammarCompiler(
            tokenizer, vocab, eos_ids, config.grammar_cache_bytes, config.grammar_limits
        )
        self._masks = MaskBuffer(vocab)
        self.prefixes = PrefixCache(config.prefix_cache_bytes)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.fused_steps = 0  # steps that decoded and prefilled in one forward pass
        self.prefill_tokens = 0  # prompt positions computed (not copied from a cache or a choice)
        self.cancelled = 0
        self.last_step_end = time.monotonic()
        # Called with each admitted request's queue wait (s); the deployment points it at a metric.
        self.on_admit: Callable[[float], None] | None = None

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
            SlotKV.bytes_per_token(weights.config, weights.dtype),
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
            "kv_tokens_capacity": self.runner.kv.slots * self.runner.kv.max_len,
            "kv_cache_bytes": self.runner.kv.nbytes,
            "kv_slot_tokens": self.runner.kv.max_len,
            "steps": self.steps,
            "fused_steps": self.fused_steps,
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
        kv = self.runner.kv.slots * self.runner.kv.max_len
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
        seq = Sequence.create(
            input_ids, images, params, self.token_bytes, self.eos_ids, self.runner.device, grammar
        )
        seq.forks = [seq.fork(i, self.token_bytes, self.runner.device) for i in range(1, params.n)]
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
        iterator cancels the request.

        The first output goes out at once. After it, a message carries whatever a choice
        produced since the last one (`stream_interval`), or piled up while the consumer was busy:
        every message costs each hop through Serve the same, whatever it carries."""
        running = {s.index for s in seq.group}
        try:
            sent_at = None
            while running:
                out = await seq.outputs.get()
                if sent_at is not None and out_is_partial(out):
                    await asyncio.sleep(self.stream_interval() - (time.monotonic() - sent_at))
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
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._grammar_executor.shutdown(wait=False, cancel_futures=True)

    def _fail_all(self, error: LlavaServeError) -> None:
        """End every request the engine holds with `error`, so none of their streams can hang."""
        for seq in [*self._waiting, *self._running.values()]:
            if not (seq.finished or seq.cancelled):
                seq.finished = True
                seq.outputs.put_nowait(error)
        self._waiting.clear()
        self._running.clear()

    # -- the step loop ---------------------------------------------------------------------

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
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._running:
                self.last_step_end = time.monotonic()  # idle until now: nothing could have stalled
            self._admit()
            decoding = [s for s in self._running.values() if s.joined and not s.cancelled]
            # A request's other choices join when its prompt is whole (`_fork`), not by computing it.
            joining = [s for s in self._running.values() if not s.joined and s.fork_of is None]
            if not decoding and not any(not s.cancelled for s in joining):
                if self.runner.num_rows or self.runner.staged:  # the last were cancelled: free their KV
                    await loop.run_in_executor(self._executor, self._step, [], joining)
                    self._emit([])
                continue
            outputs = await loop.run_in_executor(self._executor, self._step, decoding, joining)
            self.steps += 1
            self.last_step_end = time.monotonic()
            self._emit(outputs)
            if self._running or self._waiting:
                self._wake.set()

    def _admit(self) -> None:
        """Move waiting requests into the batch while slots are free (FIFO), and within
        `engine.max_batch_tokens` when it is set. A request's choices come in together."""
        admit: list[Sequence] = []
        cap = self.config.max_batch_tokens
        budget = float("inf") if cap is None else cap - sum(s.kv_budget for s in self._running.values())
        rows = len(self._running)
        while self._waiting:
            seq = self._waiting[0]
            if seq.cancelled:
                self._waiting.popleft()
                continue
            size = len(seq.group)
            if rows + size > self.config.max_batch_size or seq.kv_budget * size > budget:
                break
            budget -= seq.kv_budget * size
            rows += size
            admit.append(self._waiting.popleft())
        now = time.monotonic()
        for seq in admit:
            for member in seq.group:
                self._running[member.seq_id] = member
                member.stages["queue"] = now - seq.created_at
            if self.on_admit is not None:
                self.on_admit(now - seq.created_at)

    def _step(self, decoding: list[Sequence], joining: list[Sequence]) -> list[tuple[Sequence, Result]]:
        """Executor thread: retire cancelled rows, decode the running ones, then spend the rest of
        the step's token budget on the joining requests' prompts, oldest first."""
        outputs: list[tuple[Sequence, Result]] = []
        self.runner.keep({s.seq_id for s in decoding})
        for seq in joining:
            if seq.cancelled and seq.slot is not None:
                self.runner.release(seq.slot)
                seq.slot = None
        budget = self.config.max_step_tokens - len(decoding)
        chunks, failed = self._chunks([s for s in joining if not s.cancelled], budget)
        outputs += failed
        if decoding and chunks and self.runner.fused:
            outputs += self._fused(decoding, chunks)
        else:
            if decoding:
                outputs += self._decode(decoding)
            if chunks:
                outputs += self._prefill(chunks)
        self._remember([seq for seq, out in outputs if isinstance(out, StepOutput) and out.finish_reason])
        joined = decoding + [m for s in joining for m in s.group]  # a request's choices join with it
        self.runner.keep({s.seq_id for s in joined if s.joined and not s.finished})
        return outputs

    def _chunks(
        self, joining: list[Sequence], budget: int
    ) -> tuple[list[tuple[Sequence, int]], list[tuple[Sequence, Result]]]:
        """How many prompt positions each joining request computes this step: oldest first, as
        far as `budget` goes. A request starts by taking a slot, copying in the longest cached
        prefix of its prompt and computing its prompt's embeddings (the images of every request
        starting this step encoded together, up to `engine.max_step_vision_tiles`)."""
        plan: list[tuple[Sequence, int]] = []
        tiles = self.config.max_step_vision_tiles
        for seq in joining:
            if budget <= 0:
                break
            if seq.embeds is None:  # starting: its images go through the tower this step
                need = sum(_tiles(im) for im in seq.images)
                if need > tiles and any(s.embeds is None for s, _ in plan):
                    break  # the tower's share of this step is spent; it starts next step
                tiles -= need
            plan.append((seq, min(seq.prompt_left, budget)))
            budget -= plan[-1][1]
        failed = self._start([seq for seq, _ in plan if seq.embeds is None])
        # A prefix hit leaves less to compute than planned; a failed start computes nothing.
        plan = [(seq, min(n, seq.prompt_left)) for seq, n in plan if not seq.finished]
        return plan, failed

    def _start(self, seqs: list[Sequence]) -> list[tuple[Sequence, Result]]:
        failed: list[tuple[Sequence, Result]] = []
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
                failed += self._failed([seq], e)
                continue
            seq.slot = self.runner.take_slot()
            hit = self.prefixes.lookup(self._prefix_key(seq)) if self.prefixes.enabled else None
            if hit is not None:
                entry, length = hit
                self.runner.load_prefix(
                    seq.slot, [k[:, :length] for k in entry.keys], [v[:, :length] for v in entry.values]
                )
                seq.prefilled = seq.cached_tokens = length
        now = self.runner.synchronized()
        for seq in seqs:
            seq.stages["vision_encode"] = now - start
        return failed

    def _prefix_key(self, seq: Sequence) -> tuple:
        """The prompt's prefix-cache key, built once per request (looked up at start, stored at the end)."""
        if seq.prefix_key is None:
            image, video = self.runner.image_token_id, self.runner.video_token_id
            seq.prefix_key = position_key(seq.input_ids, seq.images, image, video)
        return seq.prefix_key

    def _remember(self, finished: list[Sequence]) -> None:
        """Keep finished requests' KV for prompts that start the same (a follow-up turn)."""
        if not self.prefixes.enabled:
            return
        for seq in finished:
            try:
                keys, values = self.runner.export(seq.seq_id)
            except ValueError:  # not a decoding row (failed before joining)
                continue
            length = keys[0].shape[1]
            key = self._prefix_key(seq) + tuple(seq.generated)
            self.prefixes.put(key[:length], keys, values, seq.route_blocks)

    def _decode(self, seqs: list[Sequence]) -> list[tuple[Sequence, Result]]:
        """One token for every running row. A failed forward pass fails them all (the cache
        cannot be trusted after it); a failed row fails alone."""
        try:
            logits = self.runner.decode()
        except Exception as e:
            logger.exception("decode failed for %d requests", len(seqs))
            self.runner.reset()
            for seq in self._running.values():  # staged prompts were dropped with the cache
                seq.slot, seq.embeds, seq.prefilled = None, None, 0
            return self._failed(seqs, e)
        return self._decoded(seqs, logits)

    def _fused(
        self, decoding: list[Sequence], plan: list[tuple[Sequence, int]]
    ) -> list[tuple[Sequence, Result]]:
        """The running rows' decode and the planned prompt chunks in one forward pass (the weights
        read once). If it fails, the two run apart, each with its own failure handling."""
        chunks = self._cut(plan)
        start = time.perf_counter()
        try:
            rows, last = self.runner.step(chunks)
        except Exception:
            logger.exception(
                "a step of %d rows and %d prompt chunks failed as one pass", len(decoding), len(plan)
            )
            outputs = self._decode(decoding)
            # A failed decode drops the staged prompts with the cache; they start again next step.
            plan = [(seq, n) for seq, n in plan if seq.slot is not None]
            return outputs + (self._prefill(plan) if plan else [])
        took = self.runner.synchronized() - start
        self.fused_steps += 1
        return self._decoded(decoding, rows) + self._prefilled(plan, last, took)

    @staticmethod
    def _cut(plan: list[tuple[Sequence, int]]) -> list[Chunk]:
        """Each planned request's next `n` prompt positions, to be written into its slot."""
        return [Chunk(s.slot, s.prefilled, s.embeds[s.prefilled : s.prefilled + n]) for s, n in plan]

    def _decoded(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, Result]]:
        """Sample the running rows' next tokens from a decode's logits (rows in slot order)."""
        row = {sid: i for i, sid in enumerate(self.runner.batch.seq_ids)}
        outs = self._sample(seqs, logits[[row[s.seq_id] for s in seqs]])
        tokens = {seq.seq_id: out.token_id for seq, out in outs if isinstance(out, StepOutput)}
        # A failed row's next input does not matter: it leaves the batch at the end of this step.
        self.runner.set_last_tokens([tokens.get(sid, 0) for sid in self.runner.batch.seq_ids])
        return outs

    def _prefill(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, Result]]:
        """The planned prompt chunks in one forward pass; requests whose prompts are now whole get
        their first tokens and join the batch. If the pass fails, each request is tried alone so
        only the culprit fails; nothing about a request changes before its pass succeeds, so a
        retry starts from the same state."""
        chunks = self._cut(plan)
        start = time.perf_counter()
        try:
            logits = self.runner.prefill(chunks)
        except Exception as e:
            if len(plan) > 1:
                return [out for one in plan for out in self._prefill([one])]
            logger.exception("prefill failed")
            seq = plan[0][0]
            self.runner.release(seq.slot)
            return self._failed([seq], e)
        return self._prefilled(plan, logits, self.runner.synchronized() - start)

    def _prefilled(
        self, plan: list[tuple[Sequence, int]], logits: torch.Tensor, took: float
    ) -> list[tuple[Sequence, Result]]:
        """Requests whose prompts a pass (`took` s) made whole sample their first tokens and join."""
        whole: list[tuple[Sequence, torch.Tensor]] = []
        for (seq, n), row in zip(plan, logits, strict=True):
            seq.prefilled += n
            self.prefill_tokens += n
            seq.stages["prefill"] = seq.stages.get("prefill", 0.0) + took
            if seq.prompt_left == 0:
                whole.append((seq, row))
        if not whole:
            return []
        outs = self._sample([s for s, _ in whole], torch.stack([r for _, r in whole]))
        rows = {seq.seq_id: row for seq, row in whole}
        forked: list[tuple[Sequence, Result]] = []
        for seq, out in outs:
            seq.embeds = None  # the slot holds the prompt now
            if isinstance(out, StepOutput):
                self._joined(seq.slot, self.runner.join(seq.slot, seq.seq_id, out.token_id))
                seq.joined = True
                forked += self._fork(seq, rows[seq.seq_id])
            else:
                self.runner.release(seq.slot)
        return outs + forked

    def _joined(self, slot: int, displaced: int | None) -> None:
        """A staged prompt that traded places with a joining row (`ModelRunner.join`) is in `slot` now."""
        if displaced is not None:
            moved = next(s for s in self._running.values() if not s.joined and s.slot == displaced)
            moved.slot = slot

    def _fork(self, seq: Sequence, logits: torch.Tensor) -> list[tuple[Sequence, Result]]:
        """A request's other choices, its prompt now whole: each samples its first token from the
        same logits with its own generator and joins with a copy of the prompt's KV, so the
        prompt is computed once whatever `n` is."""
        forks = [f for f in seq.forks if not f.cancelled]
        if not forks:
            return []
        # A copy per choice: a grammar's mask is applied to its row in place.
        outs = self._sample(forks, logits.expand(len(forks), -1).clone())
        for fork, out in outs:
            fork.prefilled = seq.prefilled
            if isinstance(out, StepOutput):
                slot, displaced = self.runner.fork(seq.seq_id, fork.seq_id, out.token_id, seq.prefilled)
                self._joined(slot, displaced)
                fork.joined = True
        return outs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, Result]]:
        """Each row's next token, sampled for all rows together; the tokens and which rows had
        finite logits come back to the host in one copy. A row whose logits are not finite, or
        whose penalties or sampling fail, fails that request alone."""
        finite = torch.isfinite(logits).all(-1)  # checked on the model's own logits, read below
        # Constrained rows' masks are filled and applied together; free rows are not touched.
        constrained = [(i, s.grammar) for i, s in enumerate(seqs) if s.grammar is not None]
        failures: dict[int, Exception] = {}
        try:
            failures = dict(self._masks.apply(logits, constrained))
        except Exception:
            logger.exception("applying output grammars failed")
            error = EngineError("the output grammar could not be applied to this request")
            failures = {i: error for i, _ in constrained}
        rows: list[torch.Tensor] = []
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            try:
                rows.append(seq.scores(row).float() if i not in failures else row.float())
            except Exception as e:
                failures[i] = e
                rows.append(row.float())
        live = [i for i in range(len(seqs)) if i not in failures]
        tokens: dict[int, int] = {}
        try:
            picked = sample_batch(torch.stack(rows), [s.params for s in seqs], [s.generator for s in seqs])
            picked, ok = torch.stack([picked, finite.long()]).tolist()  # the step's one copy to the host
            tokens = {i: picked[i] for i in live}
        except Exception:  # find the row that broke it; the others sample as they would have
            ok = finite.tolist()
            for i in live:
                try:
                    tokens[i] = sample_row(rows[i], seqs[i].params, seqs[i].generator)
                except Exception as e:
                    failures[i] = e
        outs: list[tuple[Sequence, Result]] = []
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            try:
                if not ok[i]:
                    raise EngineError("the model produced non-finite logits for this request")
                if i in failures:
                    raise failures[i]
                outs.append((seq, seq.accept(tokens[i], row)))
            except Exception as e:
                logger.exception("sampling failed for request %d", seq.seq_id)
                outs += self._failed([seq], e)
        return outs

    @staticmethod
    def _failed(seqs: list[Sequence], error: Exception) -> list[tuple[Sequence, Result]]:
        typed = (
            error
            if isinstance(error, LlavaServeError)
            else EngineError(f"generation failed: {type(error).__name__}")
        )
        # Choices waiting for a prompt that will not be whole fail with it.
        seqs = seqs + [f for s in seqs for f in s.forks if not (f.joined or f.finished)]
        for seq in seqs:
            seq.finished = True
        return [(seq, typed) for seq in seqs]

    def _emit(self, outputs: list[tuple[Sequence, Result]]) -> None:
        """Event loop: hand each output to its request's stream; forget finished requests."""
        for seq, out in outputs:
            seq.outputs.put_nowait(out)
        for seq in list(self._running.values()):
            # A cancelled request still holding a prompt slot keeps its place until the next step
            # gives the slot back.
            if seq.finished or (seq.cancelled and (seq.joined or seq.slot is None)):
                del self._running[seq.seq_id]
