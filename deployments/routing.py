"""The model deployment's request router: a request goes to the replica that holds the longest
cached prefix of its prompt (`llava_serve.routing.affinity`), on Serve's custom request router API.

One router lives in each process that holds a handle to the model (each ingress replica). Each
counts the requests it has in flight per replica (its load signal) and records the routing key of
every request it sends. The replicas' own accounts of what they hold (`record_routing_stats`,
every `routing.stats_period_s`) reach every router through the controller, so routers in several
ingress replicas agree on what is cached where, and whatever a replica evicted is forgotten at its
next report. A replica removed or dead is forgotten whole.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter
from ray.serve.request_router import FIFOMixin
from ray.util import metrics

from llava_serve.routing.affinity import AffinityIndex, Decision
from llava_serve.types import PromptInputs

_PENDING_S = 30.0  # a ranked request not sent by then was cancelled
_DECISION_S = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1]


def route_blocks(request: PendingRequest | None) -> tuple[int, ...]:
    """The routing key a `generate` call carries in its prompt; other methods have none."""
    if request is None or request.metadata.call_method != "generate" or not request.args:
        return ()
    prompt = request.args[0]
    return prompt.route_blocks if isinstance(prompt, PromptInputs) else ()


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """`FIFOMixin`: the replica chosen for a request goes to the request with its internal id, or
    else to the oldest one waiting. `RequestRouter` alone matches the id only, and requests that a
    caller issues together from one request of its own share their caller's id, which Serve
    indexes once: the second of them could never be matched, and its routing task looped
    on a replica it had found, never sending it (a test of `caption_many`'s three calls hung so,
    its ingress on 72% of a core)."""

    def initialize_state(self, **policy: Any) -> None:
        """`policy`: `AffinityIndex`'s thresholds (`request_router_kwargs`, from `routing:`)."""
        self.index: AffinityIndex[ReplicaID] = AffinityIndex(**policy)
        self.inflight: Counter[ReplicaID] = Counter()
        # By request, until it is routed: a burst's requests are all ranked before the first is
        # sent, so each counts on its first choice meanwhile (or they would all pick the same).
        self._decisions: dict[str, tuple[Decision[ReplicaID], float]] = {}
        self._reports: dict[ReplicaID, Any] = {}  # the last report read from each replica
        self._routed = metrics.Counter(
            "llava_routing_decisions_total",
            "Model requests routed, by why they went where they did: affinity (the replica holding "
            "the longest prefix), short_match, imbalanced, busy (the affinity replica was full), "
            "no_key.",
            tag_keys=("reason", "application", "deployment"),
        )
        self._decision_s = metrics.Histogram(
            "llava_routing_decision_seconds",
            "The router's time to rank replicas.",
            boundaries=_DECISION_S,
            tag_keys=("application", "deployment"),
        )
        # Not a replica's own metric (the router runs in its caller), so the labels Serve adds
        # to those are set here: the dashboard filters by application.
        where = {"application": self._deployment_id.app_name, "deployment": self._deployment_id.name}
        self._routed.set_default_tags(where)
        self._decision_s.set_default_tags(where)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        start = time.perf_counter()
        self._read_reports(candidate_replicas)
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {rid: self.inflight[rid] for rid in by_id}
        for request_id, (pending, at) in list(self._decisions.items()):
            if start - at > _PENDING_S:  # cancelled before it was sent
                del self._decisions[request_id]
            elif pending.ranked and pending.ranked[0] in loads:
                loads[pending.ranked[0]] += 1
        decision = self.index.choose(route_blocks(pending_request), loads)
        if pending_request is not None:
            self._decisions[pending_request.metadata.internal_request_id] = (decision, start)
        self._decision_s.observe(time.perf_counter() - start)
        # One replica per rank: Serve tries each in turn, skipping one whose queue is full.
        return [[by_id[rid]] for rid in decision.ranked]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        self.inflight[replica_id] += 1
        self.index.sent(replica_id, route_blocks(pending_request))
        decision, _ = self._decisions.pop(pending_request.metadata.internal_request_id, (None, 0.0))
        if decision is None or pending_request.metadata.call_method != "generate":
            return
        busy = decision.reason == "affinity" and decision.ranked[0] != replica_id
        self._routed.inc(tags={"reason": "busy" if busy else decision.reason})

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self.inflight[replica_id] > 0:
            self.inflight[replica_id] -= 1
        self._decisions.pop(internal_request_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        self.index.keep_only(alive)
        for gone in set(self.inflight) - alive:
            del self.inflight[gone]
        self._reports = {rid: report for rid, report in self._reports.items() if rid in alive}
        self._read_reports(replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id)
        self.inflight.pop(replica_id, None)
        self._reports.pop(replica_id, None)

    def _read_reports(self, replicas: list[RunningReplica]) -> None:
        """Take each replica's newest account of what it holds, once per report."""
        for replica in replicas:
            stats = replica.routing_stats or {}
            report = stats.get("report")
            if report is not None and self._reports.get(replica.replica_id) != report:
                self._reports[replica.replica_id] = report
                self.index.reported(replica.replica_id, stats.get("held_blocks", ()))
