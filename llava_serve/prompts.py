"""Chat messages to token ids through the checkpoint's own chat template.

Each `<image>` placeholder is expanded to the number of image tokens exactly as the
checkpoint's processor expands it, so the ids here equal `processor(text, images)`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from llava_serve.errors import ContextLengthExceeded, InvalidRequest
from llava_serve.protocol import ChatMessage, ImagePart


@dataclass(frozen=True)
class PromptInputs:
    input_ids: list[int]
    num_images: int


def image_sources(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """(url, request field) of every image part, in the order the prompt places them."""
    return [
        (part.image_url.url, f"messages[{i}].content[{j}].image_url.url")
        for i, message in enumerate(messages)
        for j, part in enumerate(message.parts())
        if isinstance(part, ImagePart)
    ]


def to_template_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI parts to the `{"type": "image"}` / `{"type": "text"}` form chat templates expect."""
    out = []
    for message in messages:
        content = [
            {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.parts()
        ]
        out.append({"role": message.role, "content": content})
    return out


class PromptBuilder:
    """Renders and tokenizes prompts for one checkpoint."""

    def __init__(self, processor, context_length: int):
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.chat_template = processor.chat_template
        self.processor = processor
        self.context_length = context_length
        self.tokens_per_image = self._tokens_per_image(processor)

    @staticmethod
    def _tokens_per_image(processor) -> int:
        crop = processor.image_processor.crop_size
        n = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
        n += processor.num_additional_image_tokens
        return n - 1 if processor.vision_feature_select_strategy == "default" else n

    def render(self, messages: list[ChatMessage]) -> str:
        if self.chat_template is None:
            raise InvalidRequest("this checkpoint has no chat template", "model")
        try:
            return self.processor.apply_chat_template(
                to_template_messages(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # checkpoint templates raise their own errors for shapes they refuse
            raise InvalidRequest(f"the chat template cannot render these messages: {e}", "messages") from e

    def build(self, messages: list[ChatMessage], max_tokens: int) -> PromptInputs:
        """Token ids for `messages`, checked to leave room for `max_tokens` of output."""
        text = self.render(messages)
        num_images = text.count(self.image_token)
        expected = len(image_sources(messages))
        if num_images != expected:
            raise InvalidRequest(
                f"the chat template placed {num_images} images but the messages carry {expected}; "
                "images are only allowed in user turns",
                "messages",
            )
        expanded = text.replace(self.image_token, self.image_token * self.tokens_per_image)
        ids = self.tokenizer(expanded)["input_ids"]
        if len(ids) + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"prompt is {len(ids)} tokens (including {num_images * self.tokens_per_image} image tokens) "
                f"and max_tokens is {max_tokens}: {len(ids) + max_tokens} is over the model's context "
                f"length of {self.context_length}"
            )
        return PromptInputs(ids, num_images)
