"""LLaVA-1.5 (and the interleave checkpoints): one tile, a fixed number of tokens per image."""

from __future__ import annotations

from llava_serve.models.base import ImageAdapter


class LlavaAdapter(ImageAdapter):
    model_type = "llava"
    model_class = "LlavaForConditionalGeneration"

    def num_tokens(self, height: int, width: int, base_only: bool) -> int:
        crop = self.image_processor.crop_size or self.image_processor.size
        side_h = crop["height"] if "height" in crop else crop["shortest_edge"]
        side_w = crop["width"] if "width" in crop else crop["shortest_edge"]
        patch = self.config.vision_config.patch_size
        n = (side_h // patch) * (side_w // patch) + self.processor_config.get(
            "num_additional_image_tokens", 0
        )
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    @classmethod
    def tiled_features(cls, model, pixels, sizes):
        return list(model.model.get_image_features(pixel_values=pixels).pooler_output)
