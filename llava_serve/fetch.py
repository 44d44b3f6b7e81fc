"""The one place image bytes come from: `data:` URIs, http(s) URLs and allowed local files.

Every path that accepts an image source goes through `ImageFetcher.fetch`, so the limits on
scheme, address, size and time hold for all of them. HTTP fetches follow redirects by hand so
that every hop passes the SSRF guard, and connect to the address the guard checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.netguard import AddressPolicy, Resolver, parse_ip_literal, system_resolver

_REDIRECTS = {301, 302, 303, 307, 308}


def _too_big(n: int, limits: ImageConfig, param: str | None) -> ImageError:
    return ImageError(
        f"image is larger than the limit of {limits.max_bytes} bytes (got at least {n})",
        param,
        "image_too_large",
    )


def check_data_uri(uri: str, limits: ImageConfig, param: str | None = None) -> str:
    """The base64 payload of a `data:` URI, refused if it is not base64 or decodes past `max_bytes`.

    Cheap enough for the ingress, which checks before shipping the string to a preprocessor.
    """
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError("data: image URIs must be base64 encoded (data:<mime>;base64,<data>)", param)
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _too_big(len(payload) * 3 // 4, limits, param)
    return payload


def decode_data_uri(uri: str, limits: ImageConfig, param: str | None = None) -> bytes:
    """Bytes of a base64 `data:` URI; the size is checked before decoding."""
    payload = check_data_uri(uri, limits, param)
    try:
        return base64.b64decode(payload, validate=True)
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
    `max_ttl_s`, in an LRU bounded by bytes. `Expires` and validators are not used.
    """

    def __init__(self, max_bytes: int, max_ttl_s: float):
        self.max_bytes = max_bytes
        self.max_ttl_s = max_ttl_s
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

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
        entry = self.entries.get(url)
        if entry is None:
            return None
        expires, body = entry
        if time.monotonic() >= expires:
            self._drop(url)
            return None
        self.entries.move_to_end(url)
        return body

    def put(self, url: str, body: bytes, cache_control: str | None) -> None:
        ttl = min(self.ttl(cache_control), self.max_ttl_s)
        if ttl <= 0 or len(body) > self.max_bytes:
            return
        if url in self.entries:
            self._drop(url)
        self.entries[url] = (time.monotonic() + ttl, body)
        self.bytes += len(body)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, url: str) -> None:
        _, body = self.entries.pop(url)
        self.bytes -= len(body)


class ImageFetcher:
    """Turns an image source string into bytes under the configured limits and SSRF policy."""

    def __init__(self, limits: ImageConfig, resolver: Resolver = system_resolver):
        self.limits = limits
        self.policy = AddressPolicy(limits.allow_hosts)
        self.resolver = resolver
        self.cache = ResponseCache(limits.fetch_cache_bytes, limits.fetch_cache_max_ttl_s)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s),
            follow_redirects=False,  # every hop must pass the guard: see `_fetch_http`
            trust_env=False,  # a proxy from the environment would bypass the address checks
        )

    async def fetch(self, source: str, param: str | None = None) -> bytes:
        if source.startswith("data:"):
            return decode_data_uri(source, self.limits, param)
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
        """A GET for `url` that connects to an address the policy allows, and to nothing else."""
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
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL as e:
            raise ImageError(f"image URL is not valid: {e}", param, "invalid_image_url") from e
        ip = addresses[0]
        extensions = {}
        if target.scheme == "https" and literal is None:
            extensions["sni_hostname"] = host  # TLS still verifies the certificate for the real name
        return self.client.build_request(
            "GET",
            target.copy_with(host=str(ip)),
            # Raw bytes only: a compressed body could inflate far past `max_bytes` in one chunk.
            headers={"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"},
            extensions=extensions,
        )

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
