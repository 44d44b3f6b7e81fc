"""The affinity choice: longest held prefix first, least loaded when the match is short or the
best holder is overloaded, and what a replica reported, evicted or lost kept straight."""

import random

from llava_serve.routing.affinity import AffinityIndex


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def index(**kw) -> tuple[AffinityIndex[str], Clock]:
    clock = Clock()
    return AffinityIndex(clock=clock, rng=random.Random(0), **kw), clock


KEY = (1, 2, 3, 4)


def test_the_replica_holding_the_longest_prefix_wins():
    idx, _ = index()
    idx.sent("a", KEY[:2])
    idx.sent("b", KEY[:3])
    decision = idx.choose(KEY, {"a": 0, "b": 1})
    assert (decision.ranked, decision.reason, decision.matched_blocks) == (["b", "a"], "affinity", 3)


def test_a_short_match_goes_to_the_least_loaded():
    idx, _ = index(min_match_share=0.5)
    idx.sent("a", KEY[:1])
    decision = idx.choose(KEY, {"a": 3, "b": 1})
    assert (decision.ranked[0], decision.reason) == ("b", "short_match")


def test_new_keys_spread_over_equally_loaded_replicas():
    idx, _ = index()
    firsts = {idx.choose((k,), {"a": 0, "b": 0}).ranked[0] for k in range(20)}
    assert firsts == {"a", "b"}


def test_an_overloaded_holder_loses_to_the_least_loaded():
    idx, _ = index(max_imbalance=2)
    idx.sent("a", KEY)
    assert idx.choose(KEY, {"a": 2, "b": 0}).reason == "affinity"
    decision = idx.choose(KEY, {"a": 3, "b": 0})
    assert (decision.ranked, decision.reason) == (["b", "a"], "imbalanced")


def test_a_report_replaces_what_was_believed_and_evictions_are_forgotten():
    idx, clock = index(recent_s=10)
    idx.sent("a", KEY)
    clock.now = 11  # the send is older than any report's lag: only reports count now
    idx.reported("a", KEY[:2])
    assert idx.matched("a", KEY) == 2
    idx.reported("a", ())  # evicted
    assert idx.matched("a", KEY) == 0


def test_requests_sent_since_the_last_report_still_count():
    idx, clock = index(recent_s=10)
    idx.reported("a", ())
    idx.sent("a", KEY)
    clock.now = 5
    idx.reported("a", ())  # a report taken before the request reached the replica
    assert idx.matched("a", KEY) == 4


def test_a_dead_or_removed_replica_is_forgotten():
    idx, _ = index()
    idx.sent("a", KEY)
    idx.reported("b", KEY)
    idx.forget("a")
    idx.keep_only(["c"])
    assert idx.held_blocks("a") == idx.held_blocks("b") == 0


def test_sent_digests_are_bounded_oldest_first():
    idx, _ = index(max_sent_blocks=3)
    idx.sent("a", (1, 2, 3, 4, 5))
    assert idx.held_blocks("a") == 3 and idx.matched("a", (1, 2)) == 0 and idx.matched("a", (9, 5)) == 2
