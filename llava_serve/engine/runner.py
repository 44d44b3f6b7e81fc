"""The model's forward passes: one path, `execute`, for every step.

A step is decode rows (one token each, for requests whose prompts are whole) and prompt chunks (the
next positions of prompts being written), in any mix: a step with no chunks is a decode, a step
with no decode rows is a prefill, and both run the same code. The step's tokens are one flattened
sequence through the text decoder, so the weights are read once; each token writes its key and
value into its own KV slot (`engine.kv`) and attends to that slot only (`engine.attention`).

Decode rows are addressed by their slot: the decode part of a step is a query for each slot below
`rows` (the smallest bucket above the highest slot decoding), and slots in that range that are not
decoding are padding rows, which write nothing. With few bucket sizes and the inputs
gathered from `next_tokens` (each slot's next input, written by the sampler on the device), the
decode part has the fixed shapes a CUDA graph needs; its sizes all come from lengths kept on the
host, so nothing reads the device to plan a step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llava_serve.engine import kernels
from llava_serve.engine.attention import ATTENTION, PASS_THROUGH, Segment, StepLayout
from llava_serve.engine.decoder import StepDecoder
from llava_serve.engine.head import OutputHead
from llava_serve.engine.kv import KVManager, WritePlan
from llava_serve.engine.norms import fuse_norms
from llava_serve.engine.packed import pack_decoder, pack_vision
from llava_serve.engine.vision import VisionCache
from llava_serve.errors import EngineError, InvalidRequest
from llava_serve.types import PreparedImage


@dataclass
class Chunk:
    """The next positions of one prompt: `embeds` [n, hidden] written into `slot` from `start`;
    `last` when they complete the prompt (its last position's logits are then sampled)."""

    slot: int
    start: int
    embeds: torch.Tensor
    last: bool = True


def decode_buckets(slots: int, device: torch.device) -> list[int]:
    """The decode part's sizes. On CPU every size (padding rows cost arithmetic, and there is no
    graph to reuse); on CUDA a few, so a captured graph serves each (1, 2, 4, 8, then every 8)."""
    if device.type != "cuda":
        return list(range(1, slots + 1))
    small = [b for b in (1, 2, 4) if b < slots]
    return small + list(range(8, slots, 8)) + [slots]


class ModelRunner:
    """Runs batched forward passes of a LLaVA-family model; images are encoded by the adapter
    of its architecture (`llava_serve.models`)."""

    def __init__(
        self,
        model,
        image_cache_bytes: int,
        slots: int = 16,
        max_len: int | None = None,
    ):
        from llava_serve.models import ADAPTERS

        self.model = model
        # The engine's own CPU ops (`kernels`), built on this machine at first use.
        self.ops = kernels.load() if model.device.type == "cpu" else None
        # The text decoder runs without the model's own output layer: only the sampled positions
        # need logits, and `OutputHead` computes them faster on CPU.
        self.decoder = model.get_decoder()
        self.embed_tokens = model.get_input_embeddings()
        self.head = OutputHead(model.get_output_embeddings(), self.ops)
        # On CPU its linear layers run on prepacked, fused weights: the engine's product kernels
        # where the ops have them (float32 on AVX-512, bfloat16 on AMX), else oneDNN (`packed.py`).
        self.packed = pack_decoder(self.decoder, self.ops) > 0
        # The vision tower and projector too (an image is hundreds of rows; the same kernels).
        pack_vision(model, self.ops)
        fuse_norms(self.decoder)
        # A packed Llama-shaped decoder runs a step as straight-line code over them (`decoder.py`).
        self.step_decoder = StepDecoder.of(self.decoder, self.ops)
        text = model.config.get_text_config()
        # The engine's attention over the KV slots (SDPA for any call without a step layout).
        text._attn_implementation = ATTENTION
        self.encoder = ADAPTERS[model.config.model_type]
        self.device = model.device
        self.dtype = model.dtype
        self.image_token_id = model.config.image_token_id
        self.video_token_id = getattr(model.config, "video_token_id", None)
        self.text_config = text
        self.vision_cache = VisionCache(image_cache_bytes)
        max_len = max_len or text.max_position_embeddings
        self.kv = KVManager(model.config, slots, max_len, self.dtype, self.device)
        # Each slot's next input token; the sampler writes them on the device.
        self.next_tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.buckets = decode_buckets(slots, self.device)
        self._ints = torch.empty(0, dtype=torch.long, device=self.device)  # see `_upload`
        self._pass_through = PASS_THROUGH.to(self.device)

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the output embedding's rows; may exceed the tokenizer's size)."""
        return self.head.vocab_size

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

    # -- the step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, decode: list[int], chunks: list[Chunk]) -> torch.Tensor:
        """One forward pass: a token for each slot in `decode` (written at its length) and each
        chunk written into its slot. Returns the logits to sample, [rows, vocab]: the decode rows
        in `decode`'s order, then each chunk with `last` set. A failure changes no slot's length
        (what it wrote lies past them), so the other slots are as they were."""
        kv = self.kv
        rows = self._bucket(max(decode) + 1) if decode else 0
        decoding = set(decode)
        for slot in decode:
            if kv.lengths[slot] >= kv.max_len:
                raise EngineError(f"a row outgrew its KV slot of {kv.max_len} tokens")
        for c in chunks:
            if kv.lengths[c.slot] != c.start:
                raise EngineError(f"slot {c.slot} holds {kv.lengths[c.slot]} tokens, not {c.start}")
            if c.start + c.embeds.shape[0] > kv.max_len:
                end = c.start + c.embeds.shape[0]
                raise InvalidRequest(f"a prompt of {end} tokens does not fit a KV slot of {kv.max_len}")
        # Each step token's slot and position: the decode rows' (a padding row reads position 0 of
        # its slot and writes nothing), then the chunks'.
        step_slot = list(range(rows))
        step_position = [kv.lengths[s] if s in decoding else 0 for s in range(rows)]
        lengths = [p + 1 for p in step_position]
        segments, last = [], []
        for c in chunks:
            n = c.embeds.shape[0]
            segments.append(Segment(c.slot, c.start, n, len(step_slot)))
            step_slot += [c.slot] * n
            step_position += range(c.start, c.start + n)
            if c.last:
                last.append(len(step_slot) - 1)
        writers = [*sorted(decoding), *range(rows, len(step_slot))]  # decode row t is slot t
        partial = len(writers) < len(step_slot)
        slot_t, position_t, lengths_t, sampled, *writers_t = self._upload(
            [step_slot, step_position, lengths, decode + last, *([writers] if partial else [])]
        )
        write = (
            WritePlan(slot_t[writers_t[0]], position_t[writers_t[0]], writers_t[0])
            if partial
            else WritePlan(slot_t, position_t)
        )
        kv_len = max(lengths, default=0)
        layout = StepLayout(rows, lengths_t, kv_len, segments, any(n != kv_len for n in lengths))
        embeds = [self.embed_tokens(self.next_tokens[:rows])] if rows else []
        cache = kv.cache(write)  # the pass's writes go where `write` says, on either path
        hidden = self._decoder(torch.cat([*embeds, *(c.embeds for c in chunks)]), position_t, cache, layout)
        logits = self.head(hidden[sampled])
        for s in decode:
            kv.lengths[s] += 1
        for c in chunks:
            kv.lengths[c.slot] = c.start + c.embeds.shape[0]
        return logits

    def _upload(self, lists: list[list[int]]) -> list[torch.Tensor]:
        """The step's host-side integers on the device in one copy, as one tensor per list. On a
        GPU they land in a buffer kept across steps (the static inputs a captured graph reads)."""
        host = torch.tensor([x for values in lists for x in values], dtype=torch.long)
        if self.device.type == "cuda":
            n = host.numel()
            if self._ints.numel() < n:
                self._ints = torch.empty(2 * n, dtype=torch.long, device=self.device)
            self._ints[:n].copy_(host.pin_memory(), non_blocking=True)
            host = self._ints[:n]
        return list(host.split([len(values) for values in lists]))

    def _bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    def _decoder(self, x: torch.Tensor, positions: torch.Tensor, cache, layout: StepLayout) -> torch.Tensor:
        """The text decoder's last hidden states [tokens, hidden] for the step's tokens `x`."""
        if self.step_decoder is not None:
            return self.step_decoder(x, positions, self.kv, layout)
        return self.decoder(
            inputs_embeds=x[None],
            attention_mask=self._pass_through,
            position_ids=positions[None],
            cache=cache,
            step_layout=layout,
        ).last_hidden_state[0]

    def set_next(self, slots: list[int], tokens: torch.Tensor) -> None:
        """The sampled tokens [len(slots)], on the device, as those slots' next inputs."""
        index = torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        self.next_tokens.index_copy_(0, index, tokens.to(torch.long))

    def synchronized(self) -> float:
        """Now, once the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
