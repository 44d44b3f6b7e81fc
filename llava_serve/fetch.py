"""The one place image bytes come from: `data:` URIs, http(s) URLs and allowed local files.

Every path that accepts an image source goes through `fetch_image_bytes`, so the limits on
size, time and scheme hold for all of them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError


def _too_big(n: int, limits: ImageConfig, param: str | None) -> ImageError:
    return ImageError(
        f"image is larger than the limit of {limits.max_bytes} bytes (got at least {n})",
        param,
        "image_too_large",
    )


def decode_data_uri(uri: str, limits: ImageConfig, param: str | None = None) -> bytes:
    """Bytes of a base64 `data:` URI; the size is checked before decoding."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageError("data: image URIs must be base64 encoded (data:<mime>;base64,<data>)", param)
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _too_big(len(payload) * 3 // 4, limits, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data: URI is not valid base64: {e}", param) from e


def read_local(path: str, limits: ImageConfig, param: str | None = None) -> bytes:
    """A file under `allowed_local_root`; symlinks and `..` are resolved before the check."""
    if limits.allowed_local_root is None:
        raise ImageError("local file image sources are disabled", param, "invalid_image_url")
    root = Path(limits.allowed_local_root).resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise ImageError("image path is outside the allowed local root or does not exist", param)
    if target.stat().st_size > limits.max_bytes:
        raise _too_big(target.stat().st_size, limits, param)
    return target.read_bytes()


async def fetch_http(
    url: str, client: httpx.AsyncClient, limits: ImageConfig, param: str | None = None
) -> bytes:
    """GET `url`, streaming, stopping at `max_bytes` and at `total_timeout_s` whatever the server does."""
    try:
        async with asyncio.timeout(limits.total_timeout_s):
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageError(
                        f"image URL returned HTTP {response.status_code}", param, "image_fetch_failed"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise _too_big(int(declared), limits, param)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limits.max_bytes:
                        raise _too_big(size, limits, param)
                    chunks.append(chunk)
                return b"".join(chunks)
    except TimeoutError as e:
        raise ImageError(
            f"image fetch took longer than {limits.total_timeout_s}s", param, "image_fetch_timeout"
        ) from e
    except httpx.TooManyRedirects as e:
        raise ImageError(f"image URL redirected more than {limits.max_redirects} times", param) from e
    except httpx.TimeoutException as e:
        raise ImageError(f"image fetch timed out: {type(e).__name__}", param, "image_fetch_timeout") from e
    except httpx.HTTPError as e:
        raise ImageError(
            f"could not fetch image: {type(e).__name__}: {e}", param, "image_fetch_failed"
        ) from e


def make_client(limits: ImageConfig) -> httpx.AsyncClient:
    timeout = httpx.Timeout(limits.read_timeout_s, connect=limits.connect_timeout_s)
    return httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=True,
        max_redirects=limits.max_redirects,
        trust_env=False,  # a proxy from the environment must not bypass the checks here
    )


async def fetch_image_bytes(
    source: str, client: httpx.AsyncClient, limits: ImageConfig, param: str | None = None
) -> bytes:
    """Resolve an image source string to its bytes under the configured limits."""
    if source.startswith("data:"):
        return decode_data_uri(source, limits, param)
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return await fetch_http(source, client, limits, param)
    if scheme == "" and limits.allowed_local_root is not None:
        return await asyncio.to_thread(read_local, os.fspath(source), limits, param)
    raise ImageError(
        f"image URL scheme {scheme or '(none)'!r} is not allowed; use http(s) or a data: URI",
        param,
        "invalid_image_url",
    )
