"""The generation engine: one model, one thread that runs it, a continuously batched step loop.

Each step is plan -> execute -> output (`core`):

- `scheduler`: the plan, a pure function of the requests' state (who retires, who is admitted and
  starts, how many tokens each computes under the step's token and vision budgets);
- `kv`: the KV slots, the slot table and the prefix index (`prefix`);
- `runner`: one forward path for every step, over `attention`'s per-row-length interface;
- `sampler`: the batch's next tokens, one copy to the host (`sampling`: per-request parameters);
- `output`: text, stop strings and logprobs on their own thread (`detok`);
- `sequence`: one request's token-level state.
"""

from llava_serve.engine.core import Engine
from llava_serve.engine.output import out_is_partial

__all__ = ["Engine", "out_is_partial"]
