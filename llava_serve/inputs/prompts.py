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
import time

from llava_serve.errors import ContextLengthExceeded, InvalidRequest
from llava_serve.routing.key import BLOCK_TOKENS, MediaSlot, block_digests, position_key
from llava_serve.types import PromptInputs, TemplateMessage

# Private-use code points: no chat template or tokenizer gives them a meaning.
_MARKER = "\ue000{}\ue001"
_MARKER_RE = re.compile("\ue000(\\d+)\ue001")


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

    def __init__(self, source, context_length: int, block_tokens: int = BLOCK_TOKENS):
        self.tokenizer = source.tokenizer
        self.image_token = source.image_token
        self.image_token_id = source.image_token_id
        # Checkpoints that take video (OneVision) have a second placeholder.
        self.video_token = getattr(source, "video_token", None)
        self.video_token_id = getattr(source, "video_token_id", None)
        self.chat_template = source.chat_template
        self.context_length = context_length
        self.block_tokens = block_tokens
        self._first, self._rest = _plain_text_tokenizers(self.tokenizer)
        specials = {t: self.tokenizer.convert_tokens_to_ids(t) for t in self.tokenizer.all_special_tokens}
        specials |= {str(t): i for i, t in self.tokenizer.added_tokens_decoder.items()}
        specials[self.image_token] = self.image_token_id
        if self.video_token is not None:
            specials[self.video_token] = self.video_token_id
        self._special_ids = specials
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        # What the tokenizer adds around a sequence itself (a BOS for Llama, nothing for Qwen2).
        with_specials = self.tokenizer("a")["input_ids"]
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(with_specials)) if with_specials[i : i + len(bare)] == bare)
        self._prefix, self._suffix = with_specials[:at], with_specials[at + len(bare) :]

    def render(self, messages: list[TemplateMessage], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise InvalidRequest("this checkpoint has no chat template", "model")
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except Exception as e:  # checkpoint templates raise their own errors for shapes they refuse
            raise InvalidRequest(f"the chat template cannot render these messages: {e}", "messages") from e

    def build(
        self,
        messages: list[TemplateMessage],
        max_tokens: int,
        media_tokens: list[int],
        add_generation_prompt: bool = True,
        media_hashes: list[str] | None = None,
    ) -> PromptInputs:
        """Token ids for `messages`, each image's or video's placeholder expanded to its count in
        `media_tokens` (in the order of the parts; from its adapter), checked to leave room for
        `max_tokens` of output. With each image's content hash (`media_hashes`, same order), the
        prompt also gets its routing key; without, image positions key as unknown."""
        start = time.monotonic()
        texts: list[str] = []
        marked = []
        kinds = []
        for message in messages:
            content = []
            for part in message["content"]:
                if part["type"] == "text":
                    content.append({"type": "text", "text": _MARKER.format(len(texts))})
                    texts.append(part["text"])
                else:
                    kinds.append(part["type"])
                    content.append(part)
            marked.append({**message, "content": content})
        if len(media_tokens) != len(kinds):
            raise InvalidRequest(
                f"{len(kinds)} images and videos in the messages but {len(media_tokens)} token counts"
            )
        if "video" in kinds and self.video_token is None:
            raise InvalidRequest("this model does not take video (video_url parts)", "messages")
        counts = {
            kind: [n for k, n in zip(kinds, media_tokens, strict=True) if k == kind]
            for kind in ("image", "video")
        }
        ids, placed = self._tokenize(self.render(marked, add_generation_prompt), texts, counts)
        if placed != len(kinds):
            raise InvalidRequest(
                f"the chat template placed {placed} images and videos but the messages carry {len(kinds)}; "
                "images are only allowed in user turns",
                "messages",
            )
        if len(ids) + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"prompt is {len(ids)} tokens (including {sum(media_tokens)} image tokens) "
                f"and max_tokens is {max_tokens}: {len(ids) + max_tokens} is over the model's context "
                f"length of {self.context_length}"
            )
        hashes = media_hashes if media_hashes is not None else [""] * len(kinds)
        if len(hashes) != len(kinds):
            raise InvalidRequest(f"{len(kinds)} images and videos in the messages but {len(hashes)} hashes")
        slots = [MediaSlot(k, h, n) for k, h, n in zip(kinds, hashes, media_tokens, strict=True)]
        key = position_key(ids, slots, self.image_token_id, self.video_token_id)
        blocks = block_digests(key, self.block_tokens)
        return PromptInputs(ids, placed, time.monotonic() - start, blocks)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text` as the tokenizer itself encodes it (special-token strings match), for /tokenize."""
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """The text of `ids` as the tokenizer decodes them, special tokens included, for /detokenize."""
        self._check_ids(ids)
        return self.tokenizer.decode(ids)

    def pieces(self, ids: list[int]) -> list[str]:
        """Each id's vocabulary string."""
        self._check_ids(ids)
        return self.tokenizer.convert_ids_to_tokens(ids)

    def _check_ids(self, ids: list[int]) -> None:
        size = len(self.tokenizer)
        if any(not 0 <= i < size for i in ids):
            raise InvalidRequest(f"tokens holds an id outside the vocabulary (0..{size - 1})", "tokens")

    def _tokenize(
        self, rendered: str, texts: list[str], counts: dict[str, list[int]]
    ) -> tuple[list[int], int]:
        """Ids of a rendering whose text parts are markers: the template's special tokens as
        themselves (placeholders expanded, each kind's in its own order: a template may hoist
        images before videos), everything else as plain text."""
        ids, start = list(self._prefix), 0
        placed = {"image": 0, "video": 0}
        slots = {self.image_token: ("image", self.image_token_id)}
        if self.video_token is not None:
            slots[self.video_token] = ("video", self.video_token_id)
        for match in [*self._special_re.finditer(rendered), None]:
            end = match.start() if match else len(rendered)
            run = _MARKER_RE.sub(lambda m: texts[int(m.group(1))], rendered[start:end])
            if run:
                ids += (self._first if start == 0 else self._rest).encode(run, add_special_tokens=False).ids
            if match is None:
                break
            token = match.group()
            if token in slots:
                kind, token_id = slots[token]
                if placed[kind] < len(counts[kind]):  # more placeholders than media: refused by build()
                    ids += [token_id] * counts[kind][placed[kind]]
                placed[kind] += 1
            else:
                ids.append(self._special_ids[token])
            start = match.end()
        return ids + self._suffix, placed["image"] + placed["video"]
