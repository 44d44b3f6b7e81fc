"""What a stranger on the network (or another local user) can do to the Ray cluster under a server
we started: nothing without the cluster's token."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import psutil

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# Ray's settings for the second driver that reads the endpoints (tests/e2e/ray_endpoints.py).
PROBE_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": ""}


def session_of(pid: int) -> Path:
    """The Ray session directory of the cluster whose driver is `pid`."""
    (session,) = Path("/tmp/ray").glob(f"session_*_{pid}")
    return session


def listening(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every TCP socket listening in `pid`'s process tree."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    names = {p.pid: p.name() for p in tree}
    return [
        (c.laddr.ip, c.laddr.port, names[c.pid])
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in names
    ]


def assert_ray_is_closed(pid: int) -> dict:
    """Check the cluster whose driver is `pid`; its endpoints (`dashboard`: host:port) and the
    headers that carry its token."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.ray_endpoints", str(session_of(pid))],
        env={**os.environ, **PROBE_ENV},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    token_file = Path.home() / ".ray" / "auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # no other user reads the token
    token = {"authorization": f"Bearer {token_file.read_text().strip()}"}

    dashboard = f"http://{found['dashboard']}/api/version"
    assert httpx.get(dashboard).status_code == 401
    assert httpx.get(dashboard, headers=token).status_code == 200  # the right port: it answers the token
    jobs = f"http://{found['dashboard']}/api/jobs/"
    assert httpx.post(jobs, json={"entrypoint": "id"}).status_code == 401  # no job submitted
    if found["agent_port"] > 0:  # -1: another cluster on this machine holds the agent's port
        agent = f"http://127.0.0.1:{found['agent_port']}/api/job_agent/jobs/"
        assert httpx.post(agent, json={"entrypoint": "id"}).status_code == 401

    ip, port = found["replica"]
    assert grpc_refuses(f"{ip}:{port}", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats", token)

    # A cluster of one machine keeps Ray's sockets on loopback. What Ray binds on all interfaces
    # whatever it is told (Serve's inter-deployment gRPC server in each replica, `[::]:0` in its
    # code) must refuse a call without the token.
    for address, port, name in listening(pid):
        if address not in LOOPBACK:
            assert name.startswith("ray::ServeReplica"), (address, port, name)
            inter_deployment = "/ray.serve.ASGIService/HandleRequest"
            assert grpc_refuses(f"127.0.0.1:{port}", inter_deployment, token), (port, name)
    return {**found, "token": token}


def grpc_refuses(target: str, method: str, token: dict) -> bool:
    """A tokenless call to `method` is UNAUTHENTICATED, and the same call with the token gets past
    the check (to an answer, or to the method's own complaint about an empty request)."""

    def code(metadata) -> grpc.StatusCode:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            try:
                call(b"", timeout=10, metadata=metadata)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()

    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    return (
        code(None) == unauthenticated and code([("authorization", token["authorization"])]) != unauthenticated
    )
