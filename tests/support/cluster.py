"""The test cluster's settings: the app config every e2e test serves, and free loopback ports."""

from __future__ import annotations

import socket

from llava_serve.config import AppConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(tiny_dir: str) -> AppConfig:
    small = {"num_cpus": 0.1}
    return AppConfig.model_validate(
        {
            "model": {"name": tiny_dir, "served_name": "llava-tiny"},
            "generation": {"max_tokens": 16},
            # The default SSRF policy, plus one host the fetch tests serve from (see image_server).
            "images": {"allow_hosts": ["127.0.0.2/32"], "max_bytes": 1024 * 1024, "total_timeout_s": 2.0},
            "ingress": small,
            "image_preprocessor": small,
            "prompt_tokenizer": small,
            "llava_model": {"num_cpus": 0.5, "max_ongoing_requests": 128},
        }
    )


def deploy_declared(app: str, args: dict, model_replicas: int, route_prefix: str | None = None) -> None:
    """Deploy as `serve deploy` does, without waiting: the app from its import path and args, the
    model's replica count in its `deployments:` list, so that changing only the count scales
    without restarting anything (a `serve.run` from Python restarts every replica)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    entry = {
        "name": app,
        "route_prefix": route_prefix or f"/{app}",
        "import_path": "deployments.app:build_app",
        "args": args,
        "deployments": [{"name": "LlavaModel", "num_replicas": model_replicas}],
    }
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [entry]}))


def running_replicas(app: str, deployment: str = "LlavaModel") -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return status.deployments[deployment].replica_states.get("RUNNING", 0)
