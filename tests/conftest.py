"""Session fixtures that build real things once: the tiny checkpoint, its processor and model."""

from __future__ import annotations

import base64
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from PIL import Image

from llava_serve import tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(tiny.ensure("tiny", tmp_path_factory.mktemp("checkpoints")))


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def adapter(tiny_dir):
    from llava_serve.models import load_adapter

    return load_adapter(tiny_dir)


def image_token_count(processor) -> int:
    """How many placeholder tokens the processor itself expands one (LLaVA-1.5) image to."""
    out = processor(text=processor.image_token, images=[random_image(0)], return_tensors="np")
    return int((out["input_ids"][0] == processor.image_token_id).sum())


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()


def random_image(seed: int, size: tuple[int, int] = (48, 64), mode: str = "RGB") -> Image.Image:
    """A noise image (width, height) in `mode`; noise makes every pixel matter to the comparison."""
    rng = np.random.RandomState(seed)
    rgba = Image.fromarray(rng.randint(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return rgba.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(encode(image, fmt)).decode()}"


# The engine's cases and engines, shared by the engine test modules (defined after the helpers
# above, which they use).
from tests.engine_cases import cases, engine  # noqa: E402, F401
