"""Which replica a request should go to, from what each replica is believed to hold.

A replica holds the KV of its running requests and of the finished ones its prefix cache kept.
It reports the block digests of both every few seconds (`reported`); between reports, the
requests sent to it count as held too (`sent`), since it will hold their prompts once they start.
A digest it reported and then evicted is gone at its next report, and a replica that died or was
removed is forgotten whole.

The choice: the replica holding the longest prefix of the request's key, unless that prefix is a
small share of the prompt (a new conversation matches only the template's first block, if that)
or that replica has more requests in flight than the least loaded one by more than
`max_imbalance`. Then the least loaded replica, ties broken at random so new conversations
spread out.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

R = TypeVar("R", bound=Hashable)

# Why a request went where it did, as the router's metrics count it.
Reason = Literal["affinity", "short_match", "imbalanced", "no_key"]


@dataclass(frozen=True)
class Decision(Generic[R]):
    ranked: list[R]  # every candidate, the one to try first first
    reason: Reason
    matched_blocks: int  # of the key, on the replica chosen for affinity (else the best match)


class AffinityIndex(Generic[R]):
    """Per replica, the digests it reported and those of the requests sent to it since. Each
    replica's sent digests are bounded (`max_sent_blocks`, oldest dropped) and dropped once
    `recent_s` old: by then the replica's report covers them, or it evicted them."""

    def __init__(
        self,
        min_match_share: float = 0.5,
        max_imbalance: int = 8,
        max_sent_blocks: int = 65536,
        recent_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.min_match_share = min_match_share
        self.max_imbalance = max_imbalance
        self.max_sent_blocks = max_sent_blocks
        self.recent_s = recent_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._reported: dict[R, frozenset[int]] = {}
        self._sent: dict[R, OrderedDict[int, float]] = {}

    def sent(self, replica: R, digests: Iterable[int]) -> None:
        sent = self._sent.setdefault(replica, OrderedDict())
        at = self._clock()
        for digest in digests:
            sent[digest] = at
            sent.move_to_end(digest)
        while len(sent) > self.max_sent_blocks:
            sent.popitem(last=False)

    def reported(self, replica: R, digests: Iterable[int]) -> None:
        """What `replica` holds now, by its own account; replaces its previous report."""
        self._reported[replica] = frozenset(digests)
        self._expire(replica)

    def forget(self, replica: R) -> None:
        self._reported.pop(replica, None)
        self._sent.pop(replica, None)

    def keep_only(self, replicas: Iterable[R]) -> None:
        alive = set(replicas)
        for replica in set(self._reported) | set(self._sent):
            if replica not in alive:
                self.forget(replica)

    def held_blocks(self, replica: R) -> int:
        return len(self._reported.get(replica, ())) + len(self._sent.get(replica, ()))

    def matched(self, replica: R, digests: Sequence[int]) -> int:
        """How many of `digests`' leading blocks `replica` holds. Digests are chained, so holding
        the k-th means holding the k before it: the longest held one is the answer."""
        self._expire(replica)
        reported, sent = self._reported.get(replica, frozenset()), self._sent.get(replica, {})
        for k in range(len(digests), 0, -1):
            if digests[k - 1] in reported or digests[k - 1] in sent:
                return k
        return 0

    def choose(self, digests: Sequence[int], loads: Mapping[R, int]) -> Decision[R]:
        """Rank `loads`' replicas (each with its requests in flight) for a request with key
        `digests`."""
        least = sorted(loads, key=lambda r: (loads[r], self._rng.random()))
        if not digests or not least:
            return Decision(least, "no_key", 0)
        matches = {r: self.matched(r, digests) for r in least}
        best = max(least, key=lambda r: matches[r])  # ties: the less loaded (`least` order)
        if matches[best] < self.min_match_share * len(digests) or matches[best] == 0:
            return Decision(least, "short_match", matches[best])
        if loads[best] - loads[least[0]] > self.max_imbalance:
            return Decision(least, "imbalanced", matches[best])
        return Decision([best, *(r for r in least if r != best)], "affinity", matches[best])

    def _expire(self, replica: R) -> None:
        sent = self._sent.get(replica)
        if not sent:
            return
        horizon = self._clock() - self.recent_s
        while sent and next(iter(sent.values())) < horizon:
            sent.popitem(last=False)
