"""LLaVA-NeXT (1.6): anyres. An image becomes a base tile plus a grid of tiles chosen from
`image_grid_pinpoints` for its size; its token count depends on that size (`image_sizes`)."""

from __future__ import annotations

from llava_serve.models.base import ImageAdapter


class LlavaNextAdapter(ImageAdapter):
    model_type = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"

    def __init__(self, tokenizer, image_processor, config, processor_config):
        super().__init__(tokenizer, image_processor, config, processor_config)
        from transformers import LlavaNextProcessor

        # The processor's own counting, given only what it reads (no chat template needed).
        self._counter = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=processor_config.get("patch_size", config.vision_config.patch_size),
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=processor_config.get("num_additional_image_tokens", 0),
        )

    @property
    def tile_side(self) -> int:
        return self.config.vision_config.image_size

    def base_only(self, detail: str | None, num_images: int) -> bool:
        return detail == "low"

    def num_tokens(self, height: int, width: int, base_only: bool) -> int:
        side = self.tile_side
        if base_only:  # the base tile's patches and one image_newline, as pack_image_features packs it
            patches = (side // self.config.vision_config.patch_size) ** 2
            n = patches + self.processor_config.get("num_additional_image_tokens", 0) + 1
        else:
            n = self._counter._get_number_of_features(height, width, side, side)
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    def processed_pixels(self, height: int, width: int, base_only: bool) -> int:
        """Anyres resizes into the best of `image_grid_pinpoints` and tiles are square: bounded."""
        return max(self._largest_pinpoint(), self.tile_side**2)

    @classmethod
    def pack_base_tiles(cls, model, tiles, sizes):
        packed, _ = model.model.pack_image_features(
            tiles,
            sizes,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            image_newline=model.model.image_newline,
        )
        return packed
