"""The model and the running batch's KV cache. Only the engine's executor thread calls in here.

The batch is a left-padded `DynamicCache`: row i holds one request's keys and values, padding
columns are masked, and each row has its own next position, so a request's positions are the
same as if it ran alone. Rows join after a batched prefill and leave at step boundaries.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llava_serve.errors import InvalidRequest
from llava_serve.images import PreparedImage


class VisionCache:
    """LRU of projected vision-tower outputs, keyed by the preprocessor's content hash, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]  # F.pad lists dims last-first
    return F.pad(t, pad)


@dataclass
class Batch:
    """The running rows: their cache, padding mask [B, S], next positions [B] and last tokens [B]."""

    seq_ids: list[int]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor
    last_tokens: torch.Tensor

    def merge(self, other: Batch) -> None:
        """Append `other`'s rows. Every new tensor is built before any is assigned, so a failure
        (out of memory, say) leaves this batch as it was: rows join all at once or not at all."""
        length = max(self.mask.shape[1], other.mask.shape[1])

        def joined(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(a, length, dim), _left_pad(b, length, dim)])

        layers = [
            (joined(mine.keys, theirs.keys, 2), joined(mine.values, theirs.values, 2))
            for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True)
        ]
        for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
            layer.keys, layer.values = keys, values
        self.mask = joined(self.mask, other.mask, 1)
        self.positions = torch.cat([self.positions, other.positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        self.seq_ids += other.seq_ids

    def keep(self, seq_ids: set[int]) -> None:
        """Drop every row not in `seq_ids`, then trim columns that are padding in every row left."""
        rows = [i for i, s in enumerate(self.seq_ids) if s in seq_ids]
        if len(rows) == len(self.seq_ids):
            return  # called twice every step; indexing would copy the whole cache for nothing
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        start = int(self.mask[index].any(0).nonzero()[0]) if rows else 0
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = self.mask[index, start:]
        self.positions = self.positions[index]
        self.last_tokens = self.last_tokens[index]
        self.seq_ids = [self.seq_ids[i] for i in rows]


class ModelRunner:
    """Runs batched forward passes of a LLaVA-family model; images are encoded by the adapter
    of its architecture (`llava_serve.models`)."""

    def __init__(self, model, image_cache_bytes: int):
        from llava_serve.models import ADAPTERS

        self.model = model
        self.encoder = ADAPTERS[model.config.model_type]
        self.device = model.device
        self.dtype = model.dtype
        self.image_token_id = model.config.image_token_id
        self.video_token_id = getattr(model.config, "video_token_id", None)
        self.text_config = model.config.get_text_config()
        self.vision_cache = VisionCache(image_cache_bytes)
        self.batch: Batch | None = None
        self.last_prefill_stages: dict[str, float] = {}

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the output embedding's rows; may exceed the tokenizer's size)."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_rows(self) -> int:
        return 0 if self.batch is None else len(self.batch.seq_ids)

    # -- vision ---------------------------------------------------------------------------

    def encode_images(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        """Projected features [tokens, hidden] per image or video; cache misses go through the
        tower together (images), or one clip at a time (videos)."""
        found = {im.content_hash: self.vision_cache.get(im.content_hash) for im in images}
        missing = [h for h, v in found.items() if v is None]
        if missing:
            by_hash = {im.content_hash: im for im in images}
            todo = [by_hash[h] for h in missing if by_hash[h].kind == "image"]
            features = self.encoder.encode(
                self.model,
                [self._tensor(im) for im in todo],
                [im.size for im in todo],
                [im.base_only for im in todo],
            )
            computed = dict(zip([im.content_hash for im in todo], features, strict=True))
            for h in missing:
                if by_hash[h].kind == "video":
                    computed[h] = self.encoder.encode_video(self.model, self._tensor(by_hash[h]))
            for h in missing:
                found[h] = computed[h]
                self.vision_cache.put(h, computed[h])
        return [found[im.content_hash] for im in images]

    def _tensor(self, image: PreparedImage) -> torch.Tensor:
        return torch.from_numpy(image.pixel_values).to(self.device, self.dtype)

    # -- prefill and decode ----------------------------------------------------------------

    def _embed(self, input_ids: list[int], images: list[PreparedImage]) -> torch.Tensor:
        ids = torch.tensor(input_ids, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        features = self.encode_images(images) if images else []
        # Images fill the image slots and videos the video slots, each kind in its own order (a
        # template may place all of a turn's images before its videos).
        for kind, token_id in (("image", self.image_token_id), ("video", self.video_token_id)):
            slots = ids == token_id if token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
            rows = [f for f, im in zip(features, images, strict=True) if im.kind == kind]
            filling = torch.cat(rows) if rows else embeds[:0]
            # masked_scatter fills slots from whatever rows it is given; a mismatch would silently
            # shift every image's features (or read past them), so it fails the request instead.
            if int(slots.sum()) != filling.shape[0]:
                raise InvalidRequest(
                    f"the prompt has {int(slots.sum())} {kind} positions but its {len(rows)} {kind}s give "
                    f"{filling.shape[0]} feature rows",
                    "messages",
                )
            if rows:
                embeds = embeds.masked_scatter(slots[:, None], filling.to(embeds.dtype))
        return embeds

    @torch.inference_mode()
    def prefill(
        self, seq_ids: list[int], prompts: list[tuple[list[int], list[PreparedImage]]]
    ) -> torch.Tensor:
        """Run the prompts as one left-padded batch; return last-position logits [K, vocab].

        The new rows are staged, not yet part of the running batch: call `commit()` once
        their first tokens are sampled, so a failure here leaves the running batch untouched.
        """
        start = time.perf_counter()
        embeds = [self._embed(ids, images) for ids, images in prompts]
        vision_done = self._synchronized()
        length = max(e.shape[0] for e in embeds)
        inputs = torch.stack([_left_pad(e, length, 0) for e in embeds])
        mask = torch.stack(
            [
                _left_pad(torch.ones(e.shape[0], dtype=torch.long, device=self.device), length, 0)
                for e in embeds
            ]
        )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.text_config)
        out = self.model(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            logits_to_keep=1,
        )
        # Each request in the batch waited for all of it: the times are the batch's.
        self.last_prefill_stages = {
            "vision_encode": vision_done - start,
            "prefill": self._synchronized() - vision_done,
        }
        self._staged = Batch(
            seq_ids=list(seq_ids),
            cache=cache,
            mask=mask,
            positions=mask.sum(-1),
            last_tokens=torch.zeros(len(seq_ids), dtype=torch.long, device=self.device),
        )
        return out.logits[:, -1, :]

    def _synchronized(self) -> float:
        """Now, once the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def commit(self, first_tokens: list[int]) -> None:
        """Add the staged prefill rows, with their first sampled tokens, to the running batch."""
        staged, self._staged = self._staged, None
        staged.last_tokens = torch.tensor(first_tokens, dtype=torch.long, device=self.device)
        if self.batch is None:
            self.batch = staged
        else:
            self.batch.merge(staged)

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every running row; return logits [B, vocab]."""
        b = self.batch
        b.mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], dim=1)
        out = self.model(
            input_ids=b.last_tokens[:, None],
            attention_mask=b.mask,
            position_ids=b.positions[:, None],
            cache=b.cache,
            logits_to_keep=1,
        )
        b.positions = b.positions + 1
        return out.logits[:, -1, :]

    def set_last_tokens(self, tokens: list[int]) -> None:
        self.batch.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def keep(self, seq_ids: set[int]) -> None:
        """Free the KV rows of every sequence not in `seq_ids`."""
        if self.batch is None:
            return
        self.batch.keep(seq_ids)
        if not self.batch.seq_ids:
            self.batch = None

    def reset(self) -> None:
        """Drop the whole batch, e.g. after a failed decode left the cache in an unknown state."""
        self.batch = None
        self._staged = None
