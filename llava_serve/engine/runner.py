"""The model and its KV slots. Only the engine's executor thread calls in here.

Rows that decode are slots `0..n-1` (the running `Batch`): a decode step is one forward pass over
them, each writing at its own length. A request's prompt is written into a slot taken from the top
of the free ones, in chunks (`prefill`), possibly after a cached prefix was copied in
(`load_prefix`); once it is whole, `join` makes it decoding row n. `step` does a decode and chunks
in one pass. A row that leaves gives its slot back, and the last decoding row moves into the
hole, so the decoding rows stay a view.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_serve.engine.attention import ATTENTION, Segment, StepLayout
from llava_serve.engine.head import OutputHead
from llava_serve.engine.kvcache import SlotKV, WritePlan
from llava_serve.engine.linear import turned_linears, wrap_linears
from llava_serve.engine.vision import VisionCache
from llava_serve.errors import EngineError, InvalidRequest
from llava_serve.types import PreparedImage


@dataclass
class Batch:
    """The decoding rows, in slot order (row i is slot i): their ids, lengths (tokens in the
    cache) and last sampled tokens (the next step's inputs)."""

    seq_ids: list[int]
    lengths: torch.Tensor
    last_tokens: torch.Tensor


@dataclass
class Chunk:
    """The next positions of one prompt: `embeds` [n, hidden] written into `slot` from `start`."""

    slot: int
    start: int
    embeds: torch.Tensor


class ModelRunner:
    """Runs batched forward passes of a LLaVA-family model; images are encoded by the adapter
    of its architecture (`llava_serve.models`)."""

    def __init__(self, model, image_cache_bytes: int, slots: int = 16, max_len: int | None = None):
        from llava_serve.models import ADAPTERS

        self.model = model
        # The text decoder runs without the model's own output layer: only each row's last
        # position needs logits, and `OutputHead` computes them faster on CPU.
        self.decoder = model.get_decoder()
        self.head = OutputHead(model.get_output_embeddings())
        # On CPU its linear layers, too, run turned round at decode batch sizes (`linear.py`).
        self.turn_linears = model.device.type == "cpu" and wrap_linears(self.decoder) > 0
        # A step that both decodes and prefills runs as one pass when attention is SDPA (the
        # default): `ATTENTION` is SDPA for every other caller of the model.
        self.fused = model.config.get_text_config()._attn_implementation in ("sdpa", ATTENTION)
        if self.fused:
            model.config.get_text_config()._attn_implementation = ATTENTION
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
        # Slots holding a prompt being written (not decoding yet): slot -> tokens written.
        self.staged: dict[int, int] = {}

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the output embedding's rows; may exceed the tokenizer's size)."""
        return self.head.vocab_size

    @property
    def num_rows(self) -> int:
        return 0 if self.batch is None else len(self.batch.seq_ids)

    @property
    def free_slots(self) -> int:
        return self.kv.slots - self.num_rows - len(self.staged)

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

    @torch.inference_mode()
    def embed(
        self,
        input_ids: list[int],
        images: list[PreparedImage],
        features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """A prompt's input embeddings [tokens, hidden], image features (encoded here unless
        given) in their slots. Computed once per request; its prefill chunks are slices of it."""
        ids = torch.tensor(input_ids, device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        if features is None:
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

    # -- slots ----------------------------------------------------------------------------

    def take_slot(self) -> int:
        """A free slot for a new prompt: the highest one, away from the decoding rows below."""
        taken = set(self.staged)
        for slot in range(self.kv.slots - 1, self.num_rows - 1, -1):
            if slot not in taken:
                self.staged[slot] = 0
                return slot
        raise EngineError(f"all {self.kv.slots} KV slots are in use")

    def release(self, slot: int) -> None:
        """Give back a slot whose prompt will not be finished (failed or cancelled)."""
        self.staged.pop(slot, None)

    def load_prefix(self, slot: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Copy a cached prefix's KV ([heads, length, dim] per layer) into a staged slot."""
        length = keys[0].shape[1]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.kv.keys[layer][slot, :, :length] = k
            self.kv.values[layer][slot, :, :length] = v
        self.staged[slot] = length

    def export(self, seq_id: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A decoding row's KV, copied out ([heads, length, dim] per layer), for the prefix cache."""
        row = self.batch.seq_ids.index(seq_id)
        length = int(self.batch.lengths[row])
        keys = [k[row, :, :length].clone() for k in self.kv.keys]
        values = [v[row, :, :length].clone() for v in self.kv.values]
        return keys, values

    # -- prefill and decode ----------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """Write the chunks into their staged slots in one forward pass; return each chunk's
        last-position logits [K, vocab] (its next token's, once its prompt is whole).

        A chunk's queries attend to everything already in its slot and to their own earlier
        positions, so a prompt computes the same in chunks as in one piece. A failure leaves the
        decoding rows untouched (they live in other slots); the caller releases the chunks' slots.
        """
        self._check(chunks)
        sizes = torch.tensor([c.embeds.shape[0] for c in chunks], device=self.device)
        starts = torch.tensor([c.start for c in chunks], device=self.device)
        q = int(sizes.max())
        kv_len = int((starts + sizes).max())
        # Left-padded, so every chunk's last real position is the batch's last query.
        inputs = torch.stack([F.pad(c.embeds, (0, 0, q - c.embeds.shape[0], 0)) for c in chunks])
        columns = torch.arange(q, device=self.device)
        offset = columns[None, :] - (q - sizes)[:, None]  # index within the chunk; < 0 is padding
        valid = offset >= 0
        position = starts[:, None] + offset  # each query's position in its own slot
        batch, query = valid.nonzero(as_tuple=True)
        slots = [c.slot for c in chunks]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        slot_of = torch.tensor(slots, device=self.device)
        plan = WritePlan(
            rows=slice(slots[0], slots[-1] + 1) if contiguous else slot_of,
            kv_len=kv_len,
            batch=batch,
            query=query,
            slot=slot_of[batch],
            position=position[batch, query],
        )
        keys = torch.arange(kv_len, device=self.device)
        # A query sees its slot's positions up to its own; a padding query sees position 0 only
        # (its output is never used; a row with nothing to attend to would be NaN).
        sees = (keys[None, None, :] <= position[:, :, None]) & valid[:, :, None]
        sees |= ~valid[:, :, None] & (keys == 0)
        hidden = self._decoder(
            inputs_embeds=inputs,
            attention_mask=self._additive(sees),
            position_ids=position.clamp(min=0),
            cache=self.kv.cache(plan),
        )
        self._written(chunks)
        return self.head(hidden[:, -1])

    @torch.inference_mode()
    def step(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass that decodes a token for every decoding row and writes the chunks into
        their staged slots: the rows' logits [B, vocab] and each chunk's last-position logits
        [K, vocab], as `decode` and `prefill` would give them apart, with the weights read once.
        A failure leaves the runner as it was (the caller may then run the two apart)."""
        b = self.batch
        n = len(b.seq_ids)
        self._check(chunks)
        decode_len = self._decode_len()
        sizes = [c.embeds.shape[0] for c in chunks]
        segments, offset = [], n
        for c, size in zip(chunks, sizes, strict=True):
            segments.append(Segment(c.slot, c.start, size, offset))
            offset += size
        d = self.device
        embeds = torch.cat([self.model.get_input_embeddings()(b.last_tokens), *[c.embeds for c in chunks]])
        position = torch.cat(
            [
                b.lengths,
                *[
                    torch.arange(c.start, c.start + size, device=d)
                    for c, size in zip(chunks, sizes, strict=True)
                ],
            ]
        )
        chunk_slots = torch.tensor([c.slot for c in chunks], device=d)
        slot = torch.cat(
            [torch.arange(n, device=d), chunk_slots.repeat_interleave(torch.tensor(sizes, device=d))]
        )
        tokens = embeds.shape[0]
        plan = WritePlan(
            rows=slice(None),
            kv_len=self.kv.max_len,
            batch=torch.zeros(tokens, dtype=torch.long, device=d),
            query=torch.arange(tokens, device=d),
            slot=slot,
            position=position,
        )
        layout = StepLayout(n, decode_len, self._decode_mask(decode_len), segments)
        hidden = self._decoder(
            inputs_embeds=embeds[None],
            attention_mask=layout.decode_mask,  # passed through untouched (4D); the layout does the masking
            position_ids=position[None],
            cache=self.kv.cache(plan),
            step_layout=layout,
        )[0]
        last = torch.tensor([s.offset + s.length - 1 for s in segments], dtype=torch.long, device=d)
        logits = self.head(torch.cat([hidden[:n], hidden[last]]))
        b.lengths = b.lengths + 1
        self._written(chunks)
        return logits[:n], logits[n:]

    def _decoder(self, **inputs) -> torch.Tensor:
        """The text decoder's last hidden states, its linears turned round where that is faster."""
        with turned_linears() if self.turn_linears else contextlib.nullcontext():
            return self.decoder(**inputs).last_hidden_state

    def _check(self, chunks: list[Chunk]) -> None:
        """Each chunk continues its staged prompt where it stopped, and the prompt fits its slot."""
        for c in chunks:
            if self.staged.get(c.slot) != c.start:
                raise EngineError(f"slot {c.slot} holds {self.staged.get(c.slot)} tokens, not {c.start}")
            end = c.start + c.embeds.shape[0]
            if end > self.kv.max_len:
                raise InvalidRequest(f"a prompt of {end} tokens does not fit a KV slot of {self.kv.max_len}")

    def _written(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            self.staged[c.slot] = c.start + c.embeds.shape[0]

    def _decode_len(self) -> int:
        """Positions a decode step attends over: the longest row's tokens and the new one."""
        kv_len = int(self.batch.lengths.max()) + 1
        if kv_len > self.kv.max_len:
            raise EngineError(f"a row outgrew its KV slot of {self.kv.max_len} tokens")
        return kv_len

    def _decode_mask(self, kv_len: int) -> torch.Tensor:
        """Each decoding row sees its own tokens and the one it is writing."""
        sees = torch.arange(kv_len, device=self.device)[None, None, :] <= self.batch.lengths[:, None, None]
        return self._additive(sees)

    def join(self, slot: int, seq_id: int, first_token: int) -> int | None:
        """Make a staged slot, its prompt whole, the next decoding row. It moves down to slot n
        unless it is there already; a staged prompt that sat in slot n trades places with it, and
        then n is returned (that prompt's slot is now `slot`)."""
        length = self.staged.pop(slot)
        n = self.num_rows
        displaced = None
        if slot != n:
            if n in self.staged:
                self.kv.swap(n, slot, max(length, self.staged[n]))
                self.staged[slot] = self.staged.pop(n)
                displaced = n
            else:
                self.kv.move(slot, n, length)
        new = Batch(
            [seq_id],
            torch.tensor([length], dtype=torch.long, device=self.device),
            torch.tensor([first_token], dtype=torch.long, device=self.device),
        )
        b = self.batch
        self.batch = (
            new
            if b is None
            else Batch(
                b.seq_ids + new.seq_ids,
                torch.cat([b.lengths, new.lengths]),
                torch.cat([b.last_tokens, new.last_tokens]),
            )
        )
        return displaced

    def fork(self, source_id: int, seq_id: int, first_token: int, length: int) -> tuple[int, int | None]:
        """A new decoding row holding a copy of decoding row `source_id`'s first `length` positions
        (another answer to the same prompt). Returns the slot it was staged in and what `join`
        returned for it."""
        n = self.num_rows
        # Straight into row n when it is free; else staged elsewhere, and `join` trades places.
        slot = n if n < self.kv.slots and n not in self.staged else self.take_slot()
        self.kv.move(self.batch.seq_ids.index(source_id), slot, length)
        self.staged[slot] = length
        return slot, self.join(slot, seq_id, first_token)

    def _additive(self, sees: torch.Tensor) -> torch.Tensor:
        """A boolean [rows, queries, keys] visibility as the 4D additive mask attention takes."""
        blocked = torch.finfo(self.dtype).min
        return torch.where(sees, 0.0, blocked).to(self.dtype)[:, None]

    def synchronized(self) -> float:
        """Now, once the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every decoding row, each written at its own length; logits [B, vocab]."""
        b = self.batch
        n = len(b.seq_ids)
        rows = torch.arange(n, device=self.device)
        kv_len = self._decode_len()
        plan = WritePlan(
            rows=slice(0, n),
            kv_len=kv_len,
            batch=rows,
            query=torch.zeros_like(rows),
            slot=rows,
            position=b.lengths,
        )
        hidden = self._decoder(
            input_ids=b.last_tokens[:, None],
            attention_mask=self._decode_mask(kv_len),
            position_ids=b.lengths[:, None],
            cache=self.kv.cache(plan),
        )
        b.lengths = b.lengths + 1
        return self.head(hidden[:, -1])

    def set_last_tokens(self, tokens: list[int] | torch.Tensor) -> None:
        self.batch.last_tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)

    def keep(self, seq_ids: set[int]) -> None:
        """Give back the slots of every decoding row not in `seq_ids`. Each hole below the new
        row count is filled by moving a surviving row from above it (its valid tokens only), so
        the rest of the cache is never touched. Staged slots lie above every decoding row."""
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
        """Drop every row and staged prompt, e.g. after a failed decode left the cache in an
        unknown state."""
        self.batch = None
        self.staged.clear()
