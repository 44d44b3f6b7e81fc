"""LLaVA-OneVision: SigLIP + Qwen2, anyres_max_9. A lone image is tiled like LLaVA-NeXT (its
features pooled down past 9 tiles' worth); in a request with several images every image is one
tile, padded to a square with the mean colour and resized, as OneVision was trained."""

from __future__ import annotations

import math
import types

import numpy as np
import torch
from PIL import Image

from llava_serve.models.base import ImageAdapter, checkpoint_json

# LlavaOnevisionVideoProcessor's defaults, for checkpoints that ship no video_preprocessor_config.json.
VIDEO_DEFAULTS = {
    "size": {"height": 384, "width": 384},
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


_COMPANION = Image.new("RGB", (1, 1))


class LlavaOnevisionAdapter(ImageAdapter):
    model_type = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    takes_video = True

    def __init__(self, tokenizer, image_processor, config, processor_config):
        super().__init__(tokenizer, image_processor, config, processor_config)
        from transformers import LlavaOnevisionProcessor

        side = config.vision_config.image_size // config.vision_config.patch_size
        self.tokens_per_tile = processor_config.get("num_image_tokens") or side * side
        self.vision_aspect_ratio = processor_config.get("vision_aspect_ratio", config.vision_aspect_ratio)
        # The processor's own counting code, bound to just what it reads: the processor itself
        # cannot be built without torchvision (its video processor needs it).
        counter = types.SimpleNamespace(
            image_processor=image_processor,
            num_image_tokens=self.tokens_per_tile,
            vision_aspect_ratio=self.vision_aspect_ratio,
        )
        counter._get_unpadded_features = types.MethodType(
            LlavaOnevisionProcessor._get_unpadded_features, counter
        )
        self._count = types.MethodType(LlavaOnevisionProcessor._get_number_of_features, counter)
        self.video_token = processor_config.get("video_token") or "<video>"
        self.video_token_id = config.video_token_id
        self.video_config = dict(VIDEO_DEFAULTS)  # from_pretrained adds the checkpoint's own

    @classmethod
    def from_pretrained(cls, path: str) -> ImageAdapter:
        adapter = super().from_pretrained(path)
        adapter.video_config = VIDEO_DEFAULTS | checkpoint_json(path, "video_preprocessor_config.json")
        return adapter

    def preprocess_video(self, frames):
        """Each frame resized to the tower's input, rescaled and normalized, as the checkpoint's
        video processor does (which needs torchvision; this is its arithmetic, with PIL)."""
        size, cfg = self.video_config["size"], self.video_config
        mean = np.asarray(cfg["image_mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(cfg["image_std"], dtype=np.float32)[:, None, None]
        out = []
        for frame in frames:
            resized = frame.resize(
                (size["width"], size["height"]), resample=Image.Resampling(cfg["resample"])
            )
            pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) * cfg["rescale_factor"]
            out.append((pixels - mean) / std)
        return np.ascontiguousarray(np.stack(out), dtype=np.float32)

    def video_tokens(self, num_frames: int) -> int:
        """The processor's count: each frame's patches pooled 2x2, and one image_newline."""
        side = int(math.sqrt(self.tokens_per_tile))
        return num_frames * math.ceil(side / 2) ** 2 + 1

    @classmethod
    def encode_video(cls, model, frames):
        return model.model.get_video_features(pixel_values_videos=frames[None]).pooler_output[0]

    def base_only(self, detail: str | None, num_images: int) -> bool:
        return detail == "low" or num_images > 1

    def preprocess(self, image: Image.Image, base_only: bool) -> np.ndarray:
        """A base-only image is the processor's multi-image branch, which differs from the first
        tile of the single-image one (a square pad with the mean colour, then the resize). The
        processor picks that branch per sample, so the image goes in beside a 1x1 companion whose
        tile is dropped: the processor's own arithmetic, at the cost of one tile of a 1x1 image."""
        if not base_only:
            return super().preprocess(image, base_only)
        out = self.image_processor(images=[[image, _COMPANION]], return_tensors="np")
        return np.ascontiguousarray(out["pixel_values"][0][:1], dtype=np.float32)

    def processed_pixels(self, height: int, width: int, base_only: bool) -> int:
        """One tile is a square pad of the whole image first; anyres resizes into a pinpoint."""
        tile = self.config.vision_config.image_size**2
        return max(max(height, width) ** 2 if base_only else self._largest_pinpoint(), tile)

    def num_tokens(self, height: int, width: int, base_only: bool) -> int:
        side = self.config.vision_config.image_size
        n = self.tokens_per_tile + 1 if base_only else self._count(height, width, side, side)
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    @classmethod
    def tiled_features(cls, model, pixels, sizes):
        return model.model.get_image_features(
            pixel_values=pixels,
            image_sizes=sizes,
            vision_aspect_ratio=model.config.vision_aspect_ratio,
            batch_num_images=torch.ones(len(sizes), dtype=torch.long),  # each a lone image: tiled
        ).pooler_output

    @classmethod
    def pack_base_tiles(cls, model, tiles, sizes):
        packed, _ = model.model.pack_image_features(
            tiles,
            sizes,
            image_newline=model.model.image_newline,
            vision_aspect_ratio=model.config.vision_aspect_ratio,
        )
        return packed
