"""Who may call the HTTP API: bearer API keys, and which Host names the server answers to.

Keys come from the config, an environment variable and a file (so they need not sit in YAML),
and are held only as SHA-256 digests. A presented key is hashed and compared with every digest
in constant time, so neither its length nor how much of it matches shows in the answer's
timing. Handle calls from other Ray Serve apps never pass through here: the cluster is trusted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

from llava_serve.config import AuthConfig
from llava_serve.errors import InvalidRequest, Unauthorized

logger = logging.getLogger(__name__)


def load_keys(config: AuthConfig) -> list[str]:
    """Every configured key: the list, then the variable (comma-separated), then the file (one per
    line, `#` comments). A key file others can read is used, with a warning."""
    keys = [k.get_secret_value() for k in config.api_keys]
    if config.api_keys_env and os.environ.get(config.api_keys_env):
        keys += os.environ[config.api_keys_env].split(",")
    if config.api_keys_file:
        path = Path(config.api_keys_file).expanduser()
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("API key file %s is readable by other users; chmod 600 it", path)
        keys += [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [k.strip() for k in keys if k.strip()]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The bearer check. With no keys configured, every caller is let in."""

    def __init__(self, keys: list[str]):
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: bytes | None) -> None:
        """Raise `Unauthorized` unless `authorization` is `Bearer <a configured key>`."""
        if not self._digests:
            return
        scheme, _, token = (authorization or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>' (the OpenAI clients' api_key)"
            )
        presented = _digest(token.strip())
        match = False
        for digest in self._digests:  # every digest compared: no early exit to time
            match |= hmac.compare_digest(presented, digest)
        if not match:
            raise Unauthorized("incorrect API key provided")


class HostCheck:
    """An optional allow-list of Host header names: with it, a page on another origin that
    rebinds its DNS name to 127.0.0.1 still cannot drive a developer's local server."""

    def __init__(self, allowed: list[str]):
        self.allowed = {h.lower().rstrip(".") for h in allowed}

    def check(self, host: bytes | None) -> None:
        if not self.allowed:
            return
        name = (host or b"").decode("latin-1").strip().lower()
        name = name[1 : name.index("]")] if name.startswith("[") and "]" in name else name.rsplit(":", 1)[0]
        if name.rstrip(".") not in self.allowed:
            raise InvalidRequest(
                f"host {name!r} is not served here (http.allowed_hosts)", None, "invalid_host"
            )
