"""Runners and engines with the handles tests and benchmarks need, as subclasses: the production
classes carry none of them."""

from __future__ import annotations

import torch

from llava_serve.engine import Engine
from llava_serve.engine.runner import Chunk, ModelRunner
from llava_serve.types import PreparedImage


class WholeRunner(ModelRunner):
    """A runner driven as a whole-prompt engine would drive it: prompts in one pass into fresh
    slots, then decode steps over all of them. What the runner's own tests and the KV and GPU
    benchmarks use."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[int] = []  # the slots decoding, in order

    def prefill_whole(self, seq_ids: list[int], prompts: list[tuple[list[int], list[PreparedImage]]]):
        """Whole prompts in one pass into fresh slots; their last positions' logits. `commit`
        with their first tokens makes them decoding rows."""
        embeds = [self.embed(ids, images) for ids, images in prompts]
        slots = [self.kv.allocate() for _ in prompts]
        try:
            logits = self.execute([], [Chunk(s, 0, e) for s, e in zip(slots, embeds, strict=True)])
        except Exception:
            for s in slots:
                self.kv.release(s)
            raise
        self._staged = slots
        return logits

    def commit(self, first_tokens: list[int]) -> None:
        self.set_next(self._staged, torch.tensor(first_tokens))
        self.rows += self._staged

    def decode(self) -> torch.Tensor:
        return self.execute(self.rows, [])

    def set_last_tokens(self, tokens: list[int]) -> None:
        self.set_next(self.rows, torch.tensor(tokens))

    def keep(self, rows: list[int]) -> None:
        """Only these slots go on decoding; the others are given back."""
        for slot in self.rows:
            if slot not in rows:
                self.kv.release(slot)
        self.rows = [s for s in self.rows if s in rows]


class ProbedRunner(ModelRunner):
    """A runner whose step layouts pass through `step_hook` before the decoder runs: how tests
    make a forward pass fail inside the model for the steps they pick."""

    step_hook = None

    def _decoder(self, x, positions, cache, layout):
        if self.step_hook is not None:
            self.step_hook(layout)
        return super()._decoder(x, positions, cache, layout)


class ProbedEngine(Engine):
    """An engine whose step logits pass through `logits_hook` before sampling: how tests make a
    row's logits go bad, or the step loop itself fail."""

    logits_hook = None

    def _sample(self, seqs, logits):
        if self.logits_hook is not None:
            logits = self.logits_hook(seqs, logits)
        return super()._sample(seqs, logits)
