"""Session fixtures that build real things once: the tiny checkpoint, its processor and model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from llava_serve.models import tiny

# Fixtures shared by the engine's and the structured outputs' tests: the cases and an engine.
from tests.support.engines import cases, engine  # noqa: F401


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


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()
