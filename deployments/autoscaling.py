"""The model deployment's autoscaling policy: replicas from the engines' own load.

Serve's default policy counts requests per replica, which for a batching engine says little: 16
short streams fill a replica no more than 4 long ones fill its KV. Each replica reports its
engine's load instead (`LlavaModel.record_autoscaling_stats`: the larger of its rows in use and
its KV in use, over 1 when requests wait), and this policy asks for as many replicas as keep each
near `target_load`. Serve applies `min_replicas`, `max_replicas` and the up/down delays around it
(`llava_model.autoscaling` in the config). A replica it removes drains: Serve stops routing to
it, then waits for its streams up to `graceful_shutdown_timeout_s`.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

METRIC = "engine_load"


class EngineLoadPolicy:
    def __init__(self, target_load: float = 0.75):
        self.target_load = target_load

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        loads = (ctx.aggregated_metrics or {}).get(METRIC) or {}
        if not loads:  # no report yet (replicas starting): keep what Serve aims at
            return ctx.target_num_replicas, {}
        return sum(loads.values()) / self.target_load, {}
