"""Decode caller-supplied image bytes and preprocess them exactly as the checkpoint does.

Everything here is CPU-bound and synchronous; callers run it off the event loop.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError
from llava_serve.types import PreparedImage


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white: what `transformers.convert_to_rgb` does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode(data: bytes, limits: ImageConfig, param: str | None = None) -> Image.Image:
    """Decode the first frame of `data` into an RGB image, enforcing format and pixel limits."""
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format or "unknown"
        if fmt.upper() not in limits.allowed_formats:
            raise ImageError(
                f"image format {fmt} is not accepted (allowed: {', '.join(limits.allowed_formats)})",
                param,
                "unsupported_image_format",
            )
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
                param,
                "image_too_large",
            )
        # A freshly opened file stands at its first frame, and load() decodes only that one:
        # animations and multi-page files are reduced to frame 0 without touching the rest
        # (asking for `n_frames` would walk every frame of a hostile GIF).
        image.load()
    except ImageError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageError("data is not an image in a format this server can decode", param) from e
    except Image.DecompressionBombError as e:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        too_large = f"image is past Pillow's bomb guard, so over the limit of {limits.max_pixels} pixels"
        raise ImageError(too_large, param, "image_too_large") from e
    except Exception as e:  # Pillow raises many types for corrupt input; all mean the same to a caller
        raise ImageError(f"could not decode image: {e}", param) from e
    return to_rgb(image)


def content_hash(pixel_values: np.ndarray, base_only: bool = False, kind: str = "image") -> str:
    """Hash of the preprocessed tiles and their encoding: equal images share vision-tower output
    whatever their file format, and the same image at another detail does not."""
    digest = hashlib.blake2b(pixel_values.tobytes(), digest_size=16)
    digest.update(repr((pixel_values.shape, base_only, kind)).encode())
    return digest.hexdigest()


def check_geometry(
    height: int, width: int, adapter, limits: ImageConfig, param: str | None, base_only: bool
) -> None:
    """Refuse, before the processor runs, an image whose shape makes it cost far more than its
    bytes: processors scale the shortest edge up (or pad to a square), so a PNG of a few hundred
    bytes can become gigabytes of float32."""
    ratio = max(height, width) / max(min(height, width), 1)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(
            f"image is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1 (images.max_aspect_ratio)",
            param,
            "image_too_large",
        )
    grown = adapter.processed_pixels(height, width, base_only)
    if grown > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height}, which this model's processor would make {grown} pixels, "
            f"over the limit of {limits.max_pixels} (images.max_pixels)",
            param,
            "image_too_large",
        )


def prepare(
    data: bytes, adapter, limits: ImageConfig, param: str | None = None, base_only: bool = False
) -> PreparedImage:
    """Bytes in, model-ready tiles and their token count out (`adapter`: the checkpoint's
    `llava_serve.models.ImageAdapter`)."""
    image = decode(data, limits, param)
    width, height = image.size
    check_geometry(height, width, adapter, limits, param, base_only)
    try:
        pixels = adapter.preprocess(image, base_only)
    except Exception as e:  # whatever the processor makes of an odd image is this request's problem
        raise ImageError(f"could not preprocess image ({width}x{height}): {e}", param) from e
    return PreparedImage(
        pixels,
        content_hash(pixels, base_only),
        (height, width),
        adapter.num_tokens(height, width, base_only),
        base_only,
    )
