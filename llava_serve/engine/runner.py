"""The model and the running batch. Only the engine's executor thread calls in here.

The batch lives in `SlotKV`: row i is KV slot i, written in place at its own length, with its own
positions, so a request computes what it would alone. Rows join after a batched prefill (into
the next free slots) and leave at step boundaries (their slots given back).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_serve.engine.kvcache import SlotKV, WritePlan
from llava_serve.errors import EngineError, InvalidRequest
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


@dataclass
class Batch:
    """The running rows, in slot order (row i is slot i): their ids, lengths (tokens in the cache)
    and last sampled tokens (the next step's inputs)."""

    seq_ids: list[int]
    lengths: torch.Tensor
    last_tokens: torch.Tensor


class ModelRunner:
    """Runs batched forward passes of a LLaVA-family model; images are encoded by the adapter
    of its architecture (`llava_serve.models`)."""

    def __init__(self, model, image_cache_bytes: int, slots: int = 16, max_len: int | None = None):
        from llava_serve.models import ADAPTERS

        self.model = model
        self.encoder = ADAPTERS[model.config.model_type]
        self.device = model.device
        self.dtype = model.dtype
        self.image_token_id = model.config.image_token_id
        self.video_token_id = getattr(model.config, "video_token_id", None)
        self.text_config = model.config.get_text_config()
        self.vision_cache = VisionCache(image_cache_bytes)
        max_len = max_len or self.text_config.max_position_embeddings
        self.kv = SlotKV(model.config, slots, max_len, self.dtype, self.device)
        self.batch: Batch | None = None
        self._staged: tuple[list[int], list[int]] | None = None
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
            stills = [by_hash[h] for h in missing if by_hash[h].kind == "image"]
            features = self.encoder.encode(
                self.model,
                [self._tensor(im) for im in stills],
                [im.size for im in stills],
                [im.base_only for im in stills],
            )
            computed = {im.content_hash: f for im, f in zip(stills, features, strict=True)}
            for h in missing:
                if by_hash[h].kind == "video":
                    computed[h] = self.encoder.encode_video(self.model, self._tensor(by_hash[h]))
            for h, f in computed.items():
                found[h] = f
                self.vision_cache.put(h, f)
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
        """Run the prompts as one batch into the next free slots; return last-position logits
        [K, vocab].

        The new rows are staged, not yet part of the running batch: call `commit()` once their
        first tokens are sampled, so a failure here leaves the running batch untouched (the slots
        it wrote are past the running ones and are written again by the next prefill).
        """
        start = time.perf_counter()
        first = self.num_rows
        if first + len(prompts) > self.kv.slots:
            raise EngineError(f"{first + len(prompts)} rows for {self.kv.slots} KV slots")
        embeds = [self._embed(ids, images) for ids, images in prompts]
        vision_done = self._synchronized()
        lengths = [e.shape[0] for e in embeds]
        if max(lengths) > self.kv.max_len:
            raise InvalidRequest(
                f"a prompt of {max(lengths)} tokens does not fit a KV slot of {self.kv.max_len}"
            )
        # Left-padded, so every row's last real token is the batch's last position.
        q = max(lengths)
        pads = torch.tensor([q - n for n in lengths], device=self.device)
        inputs = torch.stack([F.pad(e, (0, 0, q - e.shape[0], 0)) for e in embeds])
        columns = torch.arange(q, device=self.device)
        slot_pos = columns[None, :] - pads[:, None]  # each query's position in its own row
        valid = slot_pos >= 0
        batch, query = valid.nonzero(as_tuple=True)
        plan = WritePlan(
            first=first,
            count=len(prompts),
            kv_len=q,
            batch=batch,
            query=query,
            slot=batch + first,
            position=slot_pos[batch, query],
        )
        # Row i's query at position s sees its own positions 0..s; a padding query sees position 0
        # only (its output is never used; a row with nothing to attend to would be NaN).
        sees = (columns[None, None, :] <= slot_pos[:, :, None]) | (~valid[:, :, None] & (columns == 0))
        out = self.model(
            inputs_embeds=inputs,
            attention_mask=self._additive(sees),
            position_ids=slot_pos.clamp(min=0),
            cache=self.kv.cache(plan),
            logits_to_keep=1,
        )
        # Each request in the batch waited for all of it: the times are the batch's.
        self.last_prefill_stages = {
            "vision_encode": vision_done - start,
            "prefill": self._synchronized() - vision_done,
        }
        self._staged = (list(seq_ids), lengths)
        return out.logits[:, -1, :]

    def _additive(self, sees: torch.Tensor) -> torch.Tensor:
        """A boolean [rows, queries, keys] visibility as the 4D additive mask attention takes."""
        blocked = torch.finfo(self.dtype).min
        return torch.where(sees, 0.0, blocked).to(self.dtype)[:, None]

    def _synchronized(self) -> float:
        """Now, once the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def commit(self, first_tokens: list[int]) -> None:
        """Add the staged prefill rows, with their first sampled tokens, to the running batch."""
        (seq_ids, lengths), self._staged = self._staged, None
        new = Batch(
            seq_ids,
            torch.tensor(lengths, dtype=torch.long, device=self.device),
            torch.tensor(first_tokens, dtype=torch.long, device=self.device),
        )
        if self.batch is None:
            self.batch = new
            return
        b = self.batch
        self.batch = Batch(
            b.seq_ids + new.seq_ids,
            torch.cat([b.lengths, new.lengths]),
            torch.cat([b.last_tokens, new.last_tokens]),
        )

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every running row, each written at its own length; logits [B, vocab]."""
        b = self.batch
        n = len(b.seq_ids)
        rows = torch.arange(n, device=self.device)
        kv_len = int(b.lengths.max()) + 1
        if kv_len > self.kv.max_len:
            raise EngineError(f"a row outgrew its KV slot of {self.kv.max_len} tokens")
        plan = WritePlan(
            first=0,
            count=n,
            kv_len=kv_len,
            batch=rows,
            query=torch.zeros_like(rows),
            slot=rows,
            position=b.lengths,
        )
        sees = torch.arange(kv_len, device=self.device)[None, None, :] <= b.lengths[:, None, None]
        out = self.model(
            input_ids=b.last_tokens[:, None],
            attention_mask=self._additive(sees),
            position_ids=b.lengths[:, None],
            cache=self.kv.cache(plan),
            logits_to_keep=1,
        )
        b.lengths = b.lengths + 1
        return out.logits[:, -1, :]

    def set_last_tokens(self, tokens: list[int]) -> None:
        self.batch.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)

    def keep(self, seq_ids: set[int]) -> None:
        """Give back the slots of every sequence not in `seq_ids`. Each hole below the new row
        count is filled by moving a surviving row from above it (its valid tokens only), so the
        rest of the cache is never touched."""
        b = self.batch
        if b is None:
            return
        survivors = [i for i, sid in enumerate(b.seq_ids) if sid in seq_ids]
        if len(survivors) == len(b.seq_ids):
            return
        if not survivors:
            self.batch = None
            return
        n = len(survivors)
        kept = set(survivors)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in survivors if i >= n]
        order = list(range(len(b.seq_ids)))
        lengths = b.lengths.tolist()
        for hole, mover in zip(holes, movers, strict=True):
            self.kv.move(mover, hole, lengths[mover])
            order[hole] = mover
        index = torch.tensor(order[:n], device=self.device)
        self.batch = Batch([b.seq_ids[i] for i in order[:n]], b.lengths[index], b.last_tokens[index])

    def reset(self) -> None:
        """Drop the whole batch, e.g. after a failed decode left the cache in an unknown state."""
        self.batch = None
        self._staged = None
