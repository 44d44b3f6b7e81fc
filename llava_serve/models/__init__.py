"""One adapter per LLaVA architecture: what differs between them (how an image is cut into tiles,
how many tokens it becomes, how its features are computed and packed), chosen from the
checkpoint's config. The engine, the prompt builder and the deployments only talk to adapters.
"""

from __future__ import annotations

from llava_serve.models.base import ImageAdapter
from llava_serve.models.llava import LlavaAdapter
from llava_serve.models.llava_next import LlavaNextAdapter
from llava_serve.models.llava_onevision import LlavaOnevisionAdapter

ADAPTERS: dict[str, type[ImageAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
}


def model_type(path: str) -> str:
    """The checkpoint's `model_type` (config.json), without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type


def load_adapter(path: str) -> ImageAdapter:
    kind = model_type(path)
    if kind not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"{path}: model_type {kind!r} is not a supported LLaVA architecture ({supported})")
    return ADAPTERS[kind].from_pretrained(path)


__all__ = ["ADAPTERS", "ImageAdapter", "load_adapter", "model_type"]
