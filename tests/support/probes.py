"""Runners and engines with the handles tests and benchmarks need, as subclasses: the production
classes carry none of them."""

from __future__ import annotations

from llava_serve.engine import Engine
from llava_serve.engine.runner import Chunk, ModelRunner
from llava_serve.types import PreparedImage


class WholeRunner(ModelRunner):
    """A runner that also writes whole prompts in one pass, as engine v1 did: what the runner's
    own tests and the KV benchmarks drive it with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._whole: list[tuple[int, int]] = []  # (seq_id, slot) of `prefill_whole`, for `commit`

    def prefill_whole(self, seq_ids: list[int], prompts: list[tuple[list[int], list[PreparedImage]]]):
        """Whole prompts in one pass into fresh slots; `commit` with their first tokens makes them
        decoding rows. A failure gives the slots back and leaves the decoding rows as they were."""
        slots: list[int] = []
        try:
            embeds = [self.embed(ids, images) for ids, images in prompts]
            slots = [self.take_slot() for _ in prompts]
            logits = self.prefill([Chunk(s, 0, e) for s, e in zip(slots, embeds, strict=True)])
        except Exception:
            for s in slots:
                self.release(s)
            raise
        self._whole = list(zip(seq_ids, slots, strict=True))
        return logits

    def commit(self, first_tokens: list[int]) -> None:
        """Join the rows of the last `prefill_whole`, with their first sampled tokens."""
        seq_ids, slots = [sid for sid, _ in self._whole], [slot for _, slot in self._whole]
        self._whole = []
        for i, token in enumerate(first_tokens):
            displaced = self.join(slots[i], seq_ids[i], token)
            if displaced is not None:  # a later row of this prefill moved up into slots[i]
                slots = [slots[i] if slot == displaced else slot for slot in slots]


class ProbedEngine(Engine):
    """An engine whose step logits pass through `logits_hook` before sampling: how tests make a
    row's logits go bad, or the step loop itself fail."""

    logits_hook = None

    def _sample(self, seqs, logits):
        if self.logits_hook is not None:
            logits = self.logits_hook(seqs, logits)
        return super()._sample(seqs, logits)
