"""The one place image bytes come from: `data:` URIs, http(s) URLs and allowed local files.

Every path that accepts an image source goes through `ImageFetcher.fetch`, so the limits on
scheme, address, size and time hold for all of them. HTTP fetches follow redirects by hand so
that every hop passes the SSRF guard, and connect only to the addresses the guard checked.

URLs keep their host name all the way down: connections are pooled per name (a connection
whose certificate was verified for one name is never reused for another name on the same
address), TLS verifies the certificate for that name, and only the TCP connect is pinned to
the vetted addresses (`PinnedBackend`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import ssl
import time
import typing
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx
from cachetools import LRUCache, TLRUCache

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.inputs.netguard import AddressPolicy, IPAddress, Resolver, parse_ip_literal, system_resolver

_REDIRECTS = {301, 302, 303, 307, 308}


def _too_big(n: int, limits: ImageConfig, param: str | None) -> ImageError:
    return ImageError(
        f"image is larger than the limit of {limits.max_bytes} bytes (got at least {n})",
        param,
        "image_too_large",
    )


def check_data_uri(uri: str, limits: ImageConfig, param: str | None = None) -> int:
    """Where the base64 payload of a `data:` URI starts, refused if it is not base64 or decodes
    past `max_bytes`.

    Cheap enough for the ingress's event loop, which checks before shipping the string to a
    preprocessor: it reads the header and the length, and copies nothing (a split of a 20 MiB
    URI would copy it with the GIL held).
    """
    comma = uri.find(",", 0, 1024)  # the header: a media type, its parameters and ";base64"
    if comma < 0 or not uri.endswith(";base64", 0, comma):
        raise ImageError("data: image URIs must be base64 encoded (data:<mime>;base64,<data>)", param)
    decoded = (len(uri) - comma - 1) * 3 // 4
    if decoded > limits.max_bytes:
        raise _too_big(decoded, limits, param)
    return comma + 1


# Base64 characters per decoding call (a multiple of 4). One call holds the GIL throughout, so
# a 20 MiB payload decoded in one go would stall the event loop even from another thread.
_B64_CHUNK = 1 << 20


def decode_data_uri(uri: str, limits: ImageConfig, param: str | None = None) -> bytes:
    """Bytes of a base64 `data:` URI; the size is checked before decoding."""
    start = check_data_uri(uri, limits, param)
    try:
        chunks = range(start, len(uri), _B64_CHUNK)
        return b"".join(base64.b64decode(uri[i : i + _B64_CHUNK], validate=True) for i in chunks)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data: URI is not valid base64: {e}", param) from e


def read_local(path: str, limits: ImageConfig, param: str | None = None) -> bytes:
    """A file under `allowed_local_root`; symlinks and `..` are resolved before the check."""
    if limits.allowed_local_root is None:
        raise ImageError("local file image sources are disabled", param, "invalid_image_url")
    root = Path(limits.allowed_local_root).resolve()
    target = (root / path).resolve()  # an absolute `path` replaces root here, and then fails the check
    if not target.is_relative_to(root) or not target.is_file():
        raise ImageError("image path is outside the allowed local root or does not exist", param)
    if target.stat().st_size > limits.max_bytes:
        raise _too_big(target.stat().st_size, limits, param)
    return target.read_bytes()


class ResponseCache:
    """Recently fetched image bodies by URL, kept only as long as the origin said they may be.

    Only a 200 with `Cache-Control: max-age` (or `s-maxage`) > 0 and none of `no-store`,
    `no-cache` or `private` is kept (this is a cache shared by every caller), for at most
    `max_ttl_s`, in cachetools' time-aware LRU bounded by bytes. `Expires` and validators are not
    used.
    """

    def __init__(self, max_bytes: int, max_ttl_s: float):
        self.max_bytes = max_bytes
        self.max_ttl_s = max_ttl_s
        # Each value is (seconds to keep, body): the cache works out when it expires.
        self.entries: TLRUCache[str, tuple[float, bytes]] = TLRUCache(
            maxsize=max_bytes,
            ttu=lambda _url, value, now: now + value[0],
            getsizeof=lambda value: len(value[1]),
        )

    @property
    def bytes(self) -> int:
        return int(self.entries.currsize)

    @staticmethod
    def ttl(cache_control: str | None) -> float:
        directives = {}
        for part in (cache_control or "").lower().split(","):
            name, _, value = part.strip().partition("=")
            directives[name] = value.strip('"')
        if directives.keys() & {"no-store", "no-cache", "private"}:
            return 0.0
        age = directives.get("s-maxage") or directives.get("max-age") or "0"
        return float(age) if age.isdigit() else 0.0

    def get(self, url: str) -> bytes | None:
        entry = self.entries.get(url)  # None once expired
        return None if entry is None else entry[1]

    def put(self, url: str, body: bytes, cache_control: str | None) -> None:
        ttl = min(self.ttl(cache_control), self.max_ttl_s)
        if ttl <= 0 or len(body) > self.max_bytes:
            return
        self.entries[url] = (ttl, body)  # evicts the least recently used until it fits


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting a host name only to the addresses vetted for it.

    Addresses are tried in turn, IPv6 first, all within one connect timeout. A name nobody
    vetted cannot be connected to at all.
    """

    def __init__(self):
        self.inner = httpcore.AnyIOBackend()
        # Written just before each request by the fetcher; every entry passed the policy.
        self.vetted: LRUCache[str, list[IPAddress]] = LRUCache(maxsize=4096)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = sorted(self.vetted.get(host, []), key=lambda ip: ip.version != 6)
        if not addresses:
            raise httpcore.ConnectError(f"no vetted address for {host!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        error: Exception | None = None
        for ip in addresses:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise httpcore.ConnectTimeout(f"connecting to {host!r} took longer than {timeout}s")
            try:
                return await self.inner.connect_tcp(
                    str(ip), port, timeout=left, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as e:
                error = e
        raise error if isinstance(error, httpcore.ConnectTimeout) else httpcore.ConnectError(str(error))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _client(limits: ImageConfig, backend: PinnedBackend) -> httpx.AsyncClient:
    verify = ssl.create_default_context(cafile=limits.tls_ca_bundle) if limits.tls_ca_bundle else True
    ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False)
    # httpx takes no network backend: its pool is rebuilt with ours and httpx's default limits
    # (httpx is pinned to 0.28.x for this).
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=backend,
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s),
        follow_redirects=False,  # every hop must pass the guard: see `_fetch_http`
        trust_env=False,  # a proxy from the environment would bypass the address checks
    )


class ImageFetcher:
    """Turns an image source string into bytes under the configured limits and SSRF policy."""

    def __init__(self, limits: ImageConfig, resolver: Resolver = system_resolver):
        self.limits = limits
        self.policy = AddressPolicy(limits.allow_hosts)
        self.resolver = resolver
        self.cache = ResponseCache(limits.fetch_cache_bytes, limits.fetch_cache_max_ttl_s)
        self.backend = PinnedBackend()
        self.client = _client(limits, self.backend)

    async def fetch(self, source: str, param: str | None = None) -> bytes:
        if source.startswith("data:"):  # up to max_bytes of base64: too much work for the event loop
            return await asyncio.to_thread(decode_data_uri, source, self.limits, param)
        scheme = urlsplit(source).scheme.lower()
        if scheme in ("http", "https"):
            return await self._fetch_http(source, param)
        if scheme == "" and self.limits.allowed_local_root is not None:
            return await asyncio.to_thread(read_local, os.fspath(source), self.limits, param)
        raise ImageError(
            f"image URL scheme {scheme or '(none)'!r} is not allowed; use http(s) or a data: URI",
            param,
            "invalid_image_url",
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _fetch_http(self, url: str, param: str | None) -> bytes:
        cached = self.cache.get(url)
        if cached is not None:
            return cached
        limits, requested = self.limits, url
        try:
            async with asyncio.timeout(limits.total_timeout_s):
                for _ in range(limits.max_redirects + 1):
                    request = await self._pinned_request(url, param)
                    response = await self.client.send(request, stream=True)
                    try:
                        if response.status_code in _REDIRECTS and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        if response.status_code != 200:
                            raise ImageError(
                                f"image URL returned HTTP {response.status_code}", param, "image_fetch_failed"
                            )
                        body = await self._read_body(response, param)
                    finally:
                        await response.aclose()
                    self.cache.put(requested, body, response.headers.get("cache-control"))
                    return body
                too_many = f"image URL redirected more than {limits.max_redirects} times"
                raise ImageError(too_many, param, "image_fetch_failed")
        except TimeoutError as e:
            raise ImageError(
                f"image fetch took longer than {limits.total_timeout_s}s", param, "image_fetch_timeout"
            ) from e
        except httpx.TimeoutException as e:
            timed_out = f"image fetch timed out: {type(e).__name__}"
            raise ImageError(timed_out, param, "image_fetch_timeout") from e
        except httpx.HTTPError as e:
            raise ImageError(
                f"could not fetch image: {type(e).__name__}: {e}", param, "image_fetch_failed"
            ) from e

    async def _pinned_request(self, url: str, param: str | None) -> httpx.Request:
        """A GET for `url` whose host name may connect only to the addresses the policy allowed."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            raise ImageError(
                f"image URL redirected to a {parts.scheme or 'relative'!r} URL; only http(s) is followed",
                param,
                "invalid_image_url",
            )
        try:
            host, port = parts.hostname or "", parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as e:  # a port that is not a number
            raise ImageError(f"image URL is not valid: {e}", param, "invalid_image_url") from e
        if not host:
            raise ImageError("image URL has no host", param, "invalid_image_url")
        literal = parse_ip_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = await self.resolver(host, port)
            except OSError as e:
                unresolved = f"image host {host!r} could not be resolved"
                raise ImageError(unresolved, param, "image_fetch_failed") from e
        # Every answer must pass: a mixed public/private answer is how DNS rebinding starts.
        if not addresses or not all(self.policy.allows(host, ip) for ip in addresses):
            raise ImageError(
                f"image host {host!r} is or resolves to a private, loopback, link-local or reserved "
                "address; such URLs are refused",
                param,
                "image_url_forbidden",
            )
        # Public hosts only on the web's ports: an open port elsewhere on a public address (a
        # mail or database server's) is nobody's image. Hosts the operator listed are trusted.
        if port not in self.limits.allowed_ports and not all(
            self.policy.listed(host, ip) for ip in addresses
        ):
            raise ImageError(
                f"image URL port {port} is not allowed (images.allowed_ports: {self.limits.allowed_ports})",
                param,
                "image_url_forbidden",
            )
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise ImageError(f"image URL is not valid: {e}", param, "invalid_image_url") from e
        self.backend.vetted[target.host] = addresses
        # Raw bytes only: a compressed body could inflate far past `max_bytes` in one chunk.
        return self.client.build_request("GET", target, headers={"Accept-Encoding": "identity"})

    async def _read_body(self, response: httpx.Response, param: str | None) -> bytes:
        limits = self.limits
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            raise _too_big(int(declared), limits, param)
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > limits.max_bytes:  # a body longer than declared, or endless, stops here
                chunks.clear()  # not kept alive by the traceback
                raise _too_big(size, limits, param)
            chunks.append(chunk)
        return b"".join(chunks)
