"""The Ray cluster under the app: token authentication on by our choice (not Ray's default),
its token file readable by its owner alone, and, for a cluster of one machine, every Ray socket
on loopback.

Ray 2.60 enables token auth for a new local cluster when `RAY_AUTH_MODE` is unset, writes the
token to `~/.ray/auth_token` with the process umask (0644 on most systems), and binds its gRPC
servers (GCS, raylet, every worker) and agents on all interfaces unless the node's address is
loopback, which it becomes only with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

logger = logging.getLogger("ray.serve")

AUTH_MODE = "RAY_AUTH_MODE"
# Ray's switch for "this machine is the whole cluster": the node address becomes 127.0.0.1 and
# its servers bind there alone.
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Read by Serve's proxy and direct-ingress servers when they start (deployments/proxy.py).
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
EDGE_LIMIT = "LLAVA_SERVE_EDGE_MAX_INFLIGHT"  # read by deployments.proxy


def token_path() -> Path | None:
    """Where Ray reads the cluster token from, or None when it comes in `RAY_AUTH_TOKEN` itself."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def protect_token_file() -> None:
    """The token file mode 0600, if it is ours."""
    path = token_path()
    if path is None or not path.exists() or path.stat().st_uid != os.getuid():
        return
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        path.chmod(0o600)
        logger.info("Ray's token file %s was readable by other users; it is now 0600", path)


def prepare_local_cluster(single_machine: bool, edge_max_inflight: int = 0) -> None:
    """Before Ray is imported, for a cluster of our own: token auth on, a private token, Serve's HTTP
    front with our middlewares (refusing past `edge_max_inflight` requests, where it is set), and
    with `single_machine` every Ray socket on 127.0.0.1 (Ray reads these settings at import; the
    proxy inherits the environment)."""
    mode = os.environ.setdefault(AUTH_MODE, "token")
    if mode != "token":
        logger.warning("%s=%s: Ray's own endpoints answer anyone who can reach them", AUTH_MODE, mode)
    if single_machine:
        os.environ.setdefault(SINGLE_MACHINE, "0")
    os.environ.setdefault(PROXY_CALLBACK, "deployments.proxy:middlewares")
    if edge_max_inflight:
        os.environ.setdefault(EDGE_LIMIT, str(edge_max_inflight))
    if "ray" in sys.modules:  # imported already: its config is re-read, as Ray's own enabling does
        from ray._raylet import Config

        Config.initialize("")
    path = token_path()
    if mode == "token" and path is not None and not path.exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        old = os.umask(0o077)  # written private from the first byte
        try:
            generate_and_save_token()
        finally:
            os.umask(old)
    protect_token_file()


def require_token_auth() -> None:
    """Refuse to build the app on a Ray cluster without token authentication: anyone who reaches
    its ports could run code in the model replica. (`auth.require_ray_token: false` to allow it.)"""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise RuntimeError(
            "this Ray cluster runs without token authentication (RAY_AUTH_MODE is not 'token'); "
            "start it with RAY_AUTH_MODE=token (README, Security), or set auth.require_ray_token: "
            "false to serve anyway"
        )
    protect_token_file()
