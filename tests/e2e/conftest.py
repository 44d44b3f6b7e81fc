"""One real Ray Serve instance per test session, serving the tiny checkpoint on loopback."""

from __future__ import annotations

import os

import pytest

from llava_serve.config import AppConfig
from tests.support.cluster import app_config, free_port
from tests.support.imageserver import ImageServer

METRICS_PORT = free_port()


def pytest_collection_modifyitems(items):
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def image_server():
    """The allowlisted image host, on 127.0.0.2 so that 127.0.0.1 stays refused by policy."""
    with ImageServer("127.0.0.2") as server:
        yield server


@pytest.fixture(scope="session")
def forbidden_target():
    """A server on 127.0.0.1 that URLs under the default policy must never reach."""
    with ImageServer("127.0.0.1") as server:
        yield server


@pytest.fixture(scope="session")
def serve_url(tiny_dir):
    """Base URL of the llava app on a fresh Ray Serve instance (app name 'llava')."""
    import ray
    from ray import serve

    from deployments.app import build
    from deployments.cluster import prepare_local_cluster

    # As `llava-serve serve` prepares its own cluster (the proxy's edge limit from the config: 128).
    prepare_local_cluster(single_machine=False, edge_max_inflight=app_config(tiny_dir).edge_max_inflight())
    # The proxy drops a reader that stopped after 2 s of one write waiting (30 by default), so
    # that the test of it takes seconds; no other test holds a write that long.
    os.environ["LLAVA_SERVE_SEND_TIMEOUT_S"] = "2"
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _metrics_export_port=METRICS_PORT,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(app_config(tiny_dir)), name="llava", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def config(tiny_dir) -> AppConfig:
    return app_config(tiny_dir)


@pytest.fixture(scope="session")
def metrics_url(serve_url) -> str:
    """Ray's Prometheus endpoint for this node."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"
