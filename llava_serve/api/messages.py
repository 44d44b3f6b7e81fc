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
    """OpenAI parts to the `{"type": "image"}` / `{"type": "text"}` form chat templates expect.

    LLaVA checkpoints' chat templates have no format for tool calls, so a history that holds them
    is written in plain text: an assistant turn's calls as `Called <name>(<arguments>).` after
    its text, each `tool` message as a user turn `Result of <name> (call <id>): <content>`, and
    consecutive results as one turn (templates that insist on alternating roles accept that)."""
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or ()}
    out: list[TemplateMessage] = []
    results: TemplateMessage | None = None  # the user turn the latest run of tool results went into
    for message in messages:
        content = [
            {"type": "image"}
            if isinstance(part, ImagePart)
            else {"type": "video"}
            if isinstance(part, VideoPart)
            else {"type": "text", "text": part.text}
            for part in message.parts()
        ]
        if message.role != "tool":
            if message.tool_calls:
                calls = " ".join(
                    f"Called {c.function.name}({c.function.arguments})." for c in message.tool_calls
                )
                content.append({"type": "text", "text": calls})
            out.append({"role": message.role, "content": content})
            results = None
            continue
        text = "".join(part["text"] for part in content)
        name = names.get(message.tool_call_id, "the tool")
        result = {"type": "text", "text": f"Result of {name} (call {message.tool_call_id}): {text}"}
        if results is None:
            results = {"role": "user", "content": [result]}
            out.append(results)
        else:
            results["content"] += [{"type": "text", "text": "\n"}, result]
    return out
