"""CPU deployments that turn a request into model inputs; stateless, scaled on their own."""

from __future__ import annotations

import asyncio

from ray import serve

from llava_serve import checkpoint, images
from llava_serve.config import AppConfig
from llava_serve.fetch import fetch_image_bytes, make_client
from llava_serve.images import PreparedImage
from llava_serve.prompts import PromptBuilder, PromptInputs
from llava_serve.protocol import ChatMessage


@serve.deployment
class ImagePreprocessor:
    """Fetch, decode and preprocess one image; decoding runs off the event loop."""

    def __init__(self, config: AppConfig):
        self.limits = config.images
        self.image_processor = checkpoint.load_processor(config.model).image_processor
        self.client = make_client(self.limits)

    async def __call__(self, source: str, param: str | None = None) -> PreparedImage:
        data = await fetch_image_bytes(source, self.client, self.limits, param)
        return await asyncio.to_thread(images.prepare, data, self.image_processor, self.limits, param)


@serve.deployment
class PromptTokenizer:
    """Render the chat template and tokenize, with image placeholders expanded."""

    def __init__(self, config: AppConfig):
        processor = checkpoint.load_processor(config.model)
        self.builder = PromptBuilder(processor, checkpoint.context_length(config.model))

    async def __call__(self, messages: list[ChatMessage], max_tokens: int) -> PromptInputs:
        return await asyncio.to_thread(self.builder.build, messages, max_tokens)
