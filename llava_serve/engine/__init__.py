"""The generation engine: one model, one thread that runs it, a continuously batched step loop.

- `core`: the step loop on the event loop, and the public API (submit, stream, cancel).
- `scheduler`: which requests run each step: admission by free KV capacity, prefill chunks
  under the step's token budget, preemption.
- `runner`: batched forward passes (decode rows and prefill chunks) over `kvcache`.
- `kvcache`: preallocated per-layer KV slots written in place.
- `prefix`: KV of finished requests kept for reuse, keyed by token ids and image hashes.
- `sampler` / `sampling`: a step's tokens for every row; per-request parameters.
- `sequence`: one request's state; `detok`: its incremental text and stop strings.
"""

from llava_serve.engine.core import Engine, out_is_partial

__all__ = ["Engine", "out_is_partial"]
