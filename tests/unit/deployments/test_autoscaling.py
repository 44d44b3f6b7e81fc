"""The engine-load autoscaling policy as Serve runs it: through Serve's own wrapper, which applies
the config's delays and scaling factors, with the per-replica loads the replicas report."""

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from llava_serve.config import EngineAutoscaling

DEPLOYMENT = DeploymentID(name="LlavaModel", app_name="llava")


def decide(config: AutoscalingConfig, loads: list[float] | None, current: int) -> int:
    replicas = [ReplicaID(f"r{i}", DEPLOYMENT) for i in range(current)]
    metrics = None if loads is None else {"engine_load": dict(zip(replicas, loads, strict=True))}
    ctx = AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name="LlavaModel",
        app_name="llava",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=replicas,
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=config,
    )
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    return policy(ctx)[0]


@pytest.fixture
def config() -> AutoscalingConfig:
    ours = EngineAutoscaling(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0)
    return AutoscalingConfig(**ours.to_serve())


def test_replicas_follow_the_engines_load(config):
    # (Serve then holds the count at max_replicas.)
    assert decide(config, [1.5, 1.5], 2) == 4  # 3.0 of load at 0.75 a replica
    assert decide(config, [3.0, 3.0], 2) == 8
    assert decide(config, [0.3, 0.3], 2) == 1  # 0.6 of load fits one replica
    assert decide(config, [0.0, 0.0], 2) == 1  # never below min_replicas


def test_without_reports_the_count_stays(config):
    assert decide(config, None, 3) == 3
