"""LLaVA-OneVision: SigLIP + Qwen2, anyres_max_9. A lone image is tiled like LLaVA-NeXT (its
features pooled down past 9 tiles' worth); in a request with several images every image is its
base tile only, as OneVision was trained."""

from __future__ import annotations

import types

import torch

from llava_serve.models.base import ImageAdapter


class LlavaOnevisionAdapter(ImageAdapter):
    model_type = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"

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

    def base_only(self, detail: str | None, num_images: int) -> bool:
        return detail == "low" or num_images > 1

    def num_tokens(self, height: int, width: int, base_only: bool) -> int:
        side = self.config.vision_config.image_size
        n = self.tokens_per_tile + 1 if base_only else self._count(height, width, side, side)
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    @classmethod
    def encode(cls, model, pixels, sizes, base_only):
        aspect = model.config.vision_aspect_ratio
        features: list[torch.Tensor | None] = [None] * len(pixels)
        tiled = [i for i, low in enumerate(base_only) if not low]
        if tiled:
            out = model.model.get_image_features(
                pixel_values=torch.cat([pixels[i] for i in tiled]),
                image_sizes=torch.tensor([sizes[i] for i in tiled]),
                vision_aspect_ratio=aspect,
                batch_num_images=torch.ones(len(tiled), dtype=torch.long),
            ).pooler_output
            for i, f in zip(tiled, out, strict=True):
                features[i] = f
        low = [i for i, flag in enumerate(base_only) if flag]
        if low:
            tiles = cls.tile_features(model, torch.cat([pixels[i][:1] for i in low]))
            packed, _ = model.model.pack_image_features(
                [t[None] for t in tiles],
                torch.tensor([sizes[i] for i in low]),
                image_newline=model.model.image_newline,
                vision_aspect_ratio=aspect,
            )
            for i, f in zip(low, packed, strict=True):
                features[i] = f
        return features
