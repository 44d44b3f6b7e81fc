"""Chat messages to token ids through the checkpoint's own chat template.

Each image part becomes the checkpoint's image placeholder, expanded to that image's number of
tokens (which its architecture's adapter computes as the processor does, from the image's size
and detail), so the ids here equal `processor(text, images)`'s. No pixels are needed here.

What a caller writes is always text. A user who types `<image>`, `</s>` or `[INST]` gets
those characters tokenized as characters: only the template's own output can hold special
tokens, and only `image_url` parts make image slots. To tell the two apart, the template is
rendered with a marker in place of every text part; the special tokens found in that
rendering are the template's, and the text between them (markers replaced by the caller's
text) is tokenized with special-token matching switched off. Splitting at special tokens is
what the tokenizer itself does before anything else, so for text without special-looking
strings the ids are the same as tokenizing the whole rendering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llava_serve.errors import ContextLengthExceeded, InvalidRequest
from llava_serve.protocol import ChatMessage, ImagePart

# A template message: {"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"}]}.
# The shape chat templates expect, and all the tokenizer needs: it never sees image bytes.
TemplateMessage = dict[str, Any]

# Private-use code points: no chat template or tokenizer gives them a meaning.
_MARKER = "\ue000{}\ue001"
_MARKER_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class PromptInputs:
    input_ids: list[int]
    num_images: int
    tokenize_s: float = 0.0  # filled by the tokenizer deployment


def image_sources(messages: list[ChatMessage]) -> list[tuple[str, str, str | None]]:
    """(url, request field, detail) of every image part, in the order the prompt places them."""
    return [
        (part.image_url.url, f"messages[{i}].content[{j}].image_url.url", part.image_url.detail)
        for i, message in enumerate(messages)
        for j, part in enumerate(message.parts())
        if isinstance(part, ImagePart)
    ]


def to_template_messages(messages: list[ChatMessage]) -> list[TemplateMessage]:
    """OpenAI parts to the `{"type": "image"}` / `{"type": "text"}` form chat templates expect."""
    out = []
    for message in messages:
        content = [
            {"type": "image"} if isinstance(part, ImagePart) else {"type": "text", "text": part.text}
            for part in message.parts()
        ]
        out.append({"role": message.role, "content": content})
    return out


def _plain_text_tokenizers(tokenizer):
    """Two copies of the backend tokenizer that match no special token: one for text at the very
    start of the prompt, one for text after a special token. They differ only for SentencePiece
    tokenizers that mark the first word alone (`Metaspace(prepend_scheme="first")`): the
    tokenizer's own splitter gives the text after a special token no leading `▁`."""
    from tokenizers import Tokenizer, pre_tokenizers

    first = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    rest = Tokenizer.from_str(first.to_str())
    for tok in (first, rest):
        tok.encode_special_tokens = True
        tok.no_padding()
        tok.no_truncation()
    pre = rest.pre_tokenizer
    stages = list(pre) if isinstance(pre, pre_tokenizers.Sequence) else [pre]
    for stage in stages:
        if isinstance(stage, pre_tokenizers.Metaspace) and stage.prepend_scheme == "first":
            stage.prepend_scheme = "never"
    return first, rest


class PromptBuilder:
    """Renders and tokenizes prompts for one checkpoint. `source` is anything that carries the
    checkpoint's `tokenizer`, `chat_template`, `image_token` and `image_token_id`: its adapter
    (`llava_serve.models`) or a transformers processor."""

    def __init__(self, source, context_length: int):
        self.tokenizer = source.tokenizer
        self.image_token = source.image_token
        self.image_token_id = source.image_token_id
        self.chat_template = source.chat_template
        self.context_length = context_length
        self._first, self._rest = _plain_text_tokenizers(self.tokenizer)
        specials = {t: self.tokenizer.convert_tokens_to_ids(t) for t in self.tokenizer.all_special_tokens}
        specials |= {str(t): i for i, t in self.tokenizer.added_tokens_decoder.items()}
        specials[self.image_token] = self.image_token_id
        self._special_ids = specials
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        # What the tokenizer adds around a sequence itself (a BOS for Llama, nothing for Qwen2).
        with_specials = self.tokenizer("a")["input_ids"]
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(with_specials)) if with_specials[i : i + len(bare)] == bare)
        self._prefix, self._suffix = with_specials[:at], with_specials[at + len(bare) :]

    def render(self, messages: list[TemplateMessage]) -> str:
        if self.chat_template is None:
            raise InvalidRequest("this checkpoint has no chat template", "model")
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # checkpoint templates raise their own errors for shapes they refuse
            raise InvalidRequest(f"the chat template cannot render these messages: {e}", "messages") from e

    def build(
        self, messages: list[TemplateMessage], max_tokens: int, image_tokens: list[int]
    ) -> PromptInputs:
        """Token ids for `messages`, each image's placeholder expanded to its count in
        `image_tokens` (from its adapter), checked to leave room for `max_tokens` of output."""
        texts: list[str] = []
        marked = []
        for message in messages:
            content = []
            for part in message["content"]:
                if part["type"] == "text":
                    content.append({"type": "text", "text": _MARKER.format(len(texts))})
                    texts.append(part["text"])
                else:
                    content.append(part)
            marked.append({**message, "content": content})
        expected = sum(part["type"] == "image" for m in messages for part in m["content"])
        if len(image_tokens) != expected:
            raise InvalidRequest(f"{expected} images in the messages but {len(image_tokens)} token counts")
        ids, num_images = self._tokenize(self.render(marked), texts, image_tokens)
        if num_images != expected:
            raise InvalidRequest(
                f"the chat template placed {num_images} images but the messages carry {expected}; "
                "images are only allowed in user turns",
                "messages",
            )
        if len(ids) + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"prompt is {len(ids)} tokens (including {sum(image_tokens)} image tokens) "
                f"and max_tokens is {max_tokens}: {len(ids) + max_tokens} is over the model's context "
                f"length of {self.context_length}"
            )
        return PromptInputs(ids, num_images)

    def _tokenize(self, rendered: str, texts: list[str], image_tokens: list[int]) -> tuple[list[int], int]:
        """Ids of a rendering whose text parts are markers: the template's special tokens as
        themselves (image placeholders expanded), everything else as plain text."""
        ids, num_images, start = list(self._prefix), 0, 0
        for match in [*self._special_re.finditer(rendered), None]:
            end = match.start() if match else len(rendered)
            run = _MARKER_RE.sub(lambda m: texts[int(m.group(1))], rendered[start:end])
            if run:
                ids += (self._first if start == 0 else self._rest).encode(run, add_special_tokens=False).ids
            if match is None:
                break
            token = match.group()
            if token == self.image_token:
                if num_images < len(image_tokens):  # more placeholders than images: refused by build()
                    ids += [self.image_token_id] * image_tokens[num_images]
                num_images += 1
            else:
                ids.append(self._special_ids[token])
            start = match.end()
        return ids + self._suffix, num_images
