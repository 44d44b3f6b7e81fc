"""Decode caller-supplied image bytes and preprocess them exactly as the checkpoint does.

Everything here is CPU-bound and synchronous; callers run it off the event loop.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_serve.config import ImageConfig
from llava_serve.errors import ImageError


@dataclass(frozen=True)
class PreparedImage:
    """Model-ready pixels plus the content hash that keys the engine's vision cache."""

    pixel_values: np.ndarray  # float32 [3, H, W]
    content_hash: str
    # Seconds this image spent being fetched and decoded + preprocessed (filled by the preprocessor).
    fetch_s: float = 0.0
    preprocess_s: float = 0.0


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


def preprocess(image: Image.Image, image_processor) -> np.ndarray:
    """Resize, crop and normalize with the checkpoint's own image processor: [3, H, W] float32."""
    out = image_processor(images=image, return_tensors="np")
    return np.ascontiguousarray(out["pixel_values"][0], dtype=np.float32)


def content_hash(pixel_values: np.ndarray) -> str:
    """Hash of the preprocessed pixels: equal images share vision-tower output whatever their encoding."""
    return hashlib.blake2b(pixel_values.tobytes(), digest_size=16).hexdigest()


def prepare(data: bytes, image_processor, limits: ImageConfig, param: str | None = None) -> PreparedImage:
    """Bytes in, model-ready pixels out."""
    pixels = preprocess(decode(data, limits, param), image_processor)
    return PreparedImage(pixels, content_hash(pixels))
