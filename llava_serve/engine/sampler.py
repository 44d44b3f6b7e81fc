"""A step's next tokens for every row it samples, chosen together on the device.

Grammar masks are filled and applied to the constrained rows together, penalties and logit bias
row by row (only rows that have them), then every row is sampled in a few batched operations
(`sampling.sample_batch`). The tokens, and which rows had finite logits, come back to the host in
one copy: the step's only read of the device (a second one only when some row asks for logprobs).
A row whose logits are not finite, or whose grammar, penalties or sampling fail, fails alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from llava_serve.engine.sampling import sample_batch, sample_row
from llava_serve.engine.sequence import Sequence
from llava_serve.errors import EngineError
from llava_serve.structured.grammar import MaskBuffer

logger = logging.getLogger(__name__)


@dataclass
class RowLogprobs:
    """A sampled token's log-probability under the model's own distribution (before penalties and
    temperature, as OpenAI reports), and the most likely tokens', on the host."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sampled:
    tokens: torch.Tensor  # [rows] on the device: the next inputs (a failed row's is never read)
    picked: dict[int, int] = field(default_factory=dict)  # row -> token, for the rows that did not fail
    failures: dict[int, Exception] = field(default_factory=dict)
    logprobs: dict[int, RowLogprobs] = field(default_factory=dict)


class Sampler:
    def __init__(self, vocab_size: int, ops=None):
        self._masks = MaskBuffer(vocab_size)
        # The engine's CPU ops (`kernels`): the greedy picks and the finiteness check in one pass.
        self._ops = ops

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> Sampled:
        """Row i of `logits` [rows, vocab] is `seqs[i]`'s."""
        # Checked on the model's own logits; their argmax is every greedy row's token unless a
        # grammar or penalties change them below.
        if self._ops is not None and logits.device.type == "cpu" and logits.is_contiguous():
            greedy, finite = self._ops.argmax_finite(logits)
        else:
            greedy, finite = None, torch.isfinite(logits).all(-1)
        constrained = [(i, s.grammar) for i, s in enumerate(seqs) if s.grammar is not None]
        failures: dict[int, Exception] = {}
        if constrained:
            logits = (
                logits.clone()
            )  # masked in place; the step's own logits stay (another choice samples them)
        try:
            failures = dict(self._masks.apply(logits, constrained))
        except Exception:
            logger.exception("applying output grammars failed")
            error = EngineError("the output grammar could not be applied to this request")
            failures = {i: error for i, _ in constrained}
        scored = logits
        adjusted = [i for i, s in enumerate(seqs) if s.adjusts and i not in failures]
        if adjusted:
            scored = logits.to(torch.float32, copy=True)  # the logprobs read the model's own
            for i in adjusted:
                try:
                    scored[i] = seqs[i].scores(logits[i])
                except Exception as e:
                    failures[i] = e
        params, generators = [s.params for s in seqs], [s.generator for s in seqs]
        try:
            changed = constrained or adjusted
            tokens = sample_batch(scored, params, generators, None if changed else greedy)
            picked, ok = torch.stack([tokens, finite.long()]).tolist()  # the step's one copy to the host
        except Exception:  # find the row that broke it; the others sample as they would have
            ok, picked = finite.tolist(), [0] * len(seqs)
            for i in range(len(seqs)):
                if i not in failures:
                    try:
                        picked[i] = sample_row(scored[i], params[i], generators[i])
                    except Exception as e:
                        failures[i] = e
            tokens = torch.tensor(picked, device=logits.device)
        for i, good in enumerate(ok):
            if not good:
                failures[i] = EngineError("the model produced non-finite logits for this request")
        out = Sampled(tokens, {i: t for i, t in enumerate(picked) if i not in failures}, failures)
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs and i in out.picked]
        if wanted:
            out.logprobs = self._logprobs(logits, wanted, [out.picked[i] for i in wanted], seqs)
        return out

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, rows: list[int], tokens: list[int], seqs: list[Sequence]
    ) -> dict[int, RowLogprobs]:
        index = torch.tensor(rows, device=logits.device)
        logprobs = torch.log_softmax(logits[index].float(), -1)
        chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
        k = max(seqs[i].params.top_logprobs for i in rows)
        values, ids = torch.topk(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0].long())
        chosen, values, ids = chosen.tolist(), values.tolist(), ids.tolist()
        out = {}
        for j, i in enumerate(rows):
            n = seqs[i].params.top_logprobs
            top = [(t, v) for t, v in zip(ids[j][:n], values[j][:n], strict=True) if v > float("-inf")]
            out[i] = RowLogprobs(chosen[j], top)  # under a grammar, fewer may be possible at all
        return out
