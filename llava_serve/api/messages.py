"""The API's messages as the inputs see them: where each image or video comes from, and the
text-and-slots form the chat template renders."""

from __future__ import annotations

from dataclasses import dataclass

from llava_serve.api.protocol import ChatMessage, ImagePart, VideoPart
from llava_serve.types import TemplateMessage


@dataclass(frozen=True)
class MediaSource:
    """An image or video part: where to get it, the request field to name in errors, its kind."""

    url: str
    param: str
    kind: str = "image"  # or "video"
    detail: str | None = None


def media_sources(messages: list[ChatMessage]) -> list[MediaSource]:
    """Every image and video part, in the order the prompt places them."""
    out = []
    for i, message in enumerate(messages):
        for j, part in enumerate(message.parts()):
            if isinstance(part, ImagePart):
                where = f"messages[{i}].content[{j}].image_url.url"
                out.append(MediaSource(part.image_url.url, where, "image", part.image_url.detail))
            elif isinstance(part, VideoPart):
                out.append(
                    MediaSource(part.video_url.url, f"messages[{i}].content[{j}].video_url.url", "video")
                )
    return out


def to_template_messages(messages: list[ChatMessage]) -> list[TemplateMessage]:
    """OpenAI parts to the `{"type": "image"}` / `{"type": "text"}` form chat templates expect."""
    out = []
    for message in messages:
        content = [
            {"type": "image"}
            if isinstance(part, ImagePart)
            else {"type": "video"}
            if isinstance(part, VideoPart)
            else {"type": "text", "text": part.text}
            for part in message.parts()
        ]
        out.append({"role": message.role, "content": content})
    return out
