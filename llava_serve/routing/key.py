"""The key of a prompt's prefix, position by position, and its digest block by block.

The engine's prefix cache matches a new prompt against the KV it kept, position by position: a
position is its token id, or, where an image's (or a video's) placeholder stands, that image's
full content hash. Two prompts that differ only in their pictures share nothing past the first
picture, and the same picture fetched through two URLs is the same key.

A router cannot compare whole keys with everything every replica holds, so the same key is also
cut into blocks of `block_tokens` positions, each block's digest chained on the one before it
(as vLLM's block hashes are): a replica holds a prompt's first k blocks exactly when it holds
their k-th digest. Digests are 64 bits. A collision would only send a request to a replica that
holds less than the router thought; it never changes an answer, since the engine matches the
full key itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple, Protocol

BLOCK_TOKENS = 16


class Media(Protocol):
    """What the key needs of an image or video: `PreparedImage` and `MediaSlot` both carry it."""

    kind: str  # "image" or "video"
    content_hash: str
    num_tokens: int


class MediaSlot(NamedTuple):
    """An image as the tokenizer knows it: no pixels, only what its positions are keyed by."""

    kind: str
    content_hash: str
    num_tokens: int


def position_key(
    input_ids: Sequence[int], media: Iterable[Media], image_token: int, video_token: int | None
) -> tuple[Hashable, ...]:
    """One hashable per prompt position: its token id, or its image's content hash."""
    media = list(media)
    owners = {
        kind: iter([m.content_hash for m in media if m.kind == kind for _ in range(m.num_tokens)])
        for kind in ("image", "video")
    }
    key: list[Hashable] = []
    for token in input_ids:
        kind = "image" if token == image_token else "video" if token == video_token else None
        # A slot no image accounts for (the prompt fails at embedding anyway) matches nothing.
        key.append(next(owners[kind], object()) if kind else token)
    return tuple(key)


def block_digests(key: Sequence[Hashable], block_tokens: int = BLOCK_TOKENS) -> tuple[int, ...]:
    """The chained digest of each whole block of `key`; a partial last block has none."""
    digests: list[int] = []
    previous = b""
    for start in range(0, len(key) - block_tokens + 1, block_tokens):
        block = key[start : start + block_tokens]
        text = "\x1f".join(_text(p) for p in block)
        previous = hashlib.blake2b(previous + text.encode(), digest_size=8).digest()
        digests.append(int.from_bytes(previous))
    return tuple(digests)


def _text(position: Hashable) -> str:
    if isinstance(position, int):
        return str(position)
    if isinstance(position, str):
        return "#" + position  # an image's hash never reads as a token id
    return f"?{id(position)}"  # a position no image accounts for: it matches nothing
