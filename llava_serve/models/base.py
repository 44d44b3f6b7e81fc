"""What every architecture's adapter provides, and what they share."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from PIL import Image


def checkpoint_json(path: str, name: str) -> dict:
    """A JSON file of the checkpoint, or {} when it has none. Processor configs are read directly:
    some processors cannot be built without optional packages (OneVision's video processor needs
    torchvision)."""
    import json
    from pathlib import Path

    from transformers.utils import cached_file

    file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(file).read_text()) if file else {}


def _size(size, key: str) -> int | None:
    """A field of an image processor's `size` (a dict or transformers' SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class ImageAdapter:
    """Loads a checkpoint's tokenizer and image processor, and knows its image geometry.

    CPU side (`preprocess`, `num_tokens`) runs in the preprocessing deployments; model side
    (`encode`) in the model replica. `detail` is "low" or "high" (OpenAI's "auto" is "high");
    `base_only` marks an image reduced to its base tile (detail low, or OneVision's rule for
    several images in one request), which changes both its token count and its features.
    """

    model_type: ClassVar[str]
    model_class: ClassVar[str]  # the transformers class, by name
    takes_video: ClassVar[bool] = False
    video_token: str | None = None
    video_token_id: int | None = None

    def __init__(self, tokenizer, image_processor, config, processor_config: dict):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.processor_config = processor_config
        self.image_token = processor_config.get("image_token") or "<image>"
        self.image_token_id = config.image_token_id
        self.chat_template = tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path: str) -> ImageAdapter:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        return cls(
            AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path),
            AutoConfig.from_pretrained(path),
            checkpoint_json(path, "processor_config.json"),
        )

    def load_model(self, path: str, dtype):
        import transformers

        return getattr(transformers, self.model_class).from_pretrained(path, dtype=dtype)

    # -- CPU side -------------------------------------------------------------------------

    def base_only(self, detail: str | None, num_images: int) -> bool:
        """Whether an image of this request is reduced to its base tile."""
        return False

    def preprocess(self, image: Image.Image, base_only: bool) -> np.ndarray:
        """The tiles the vision tower sees: float32 [tiles, 3, H, W], base tile first."""
        out = self.image_processor(images=[image], return_tensors="np")
        pixels = np.asarray(out["pixel_values"][0], dtype=np.float32)
        if pixels.ndim == 3:  # one tile, no tile axis
            pixels = pixels[None]
        return np.ascontiguousarray(pixels[:1] if base_only else pixels)

    def num_tokens(self, height: int, width: int, base_only: bool) -> int:
        """How many placeholder tokens an image of this original size becomes."""
        raise NotImplementedError

    def processed_pixels(self, height: int, width: int, base_only: bool) -> int:
        """The most pixels of any image the processor builds from one of this size, known before it
        runs. A CLIP-style resize scales the shortest edge to the tower's side, so a thin image
        grows by its aspect ratio (20000x1 at 336 px: 2.2 billion pixels)."""
        size = self.image_processor.size
        side = _size(size, "shortest_edge")
        if side is None:
            return _size(size, "height") * _size(size, "width")
        short, long = sorted((max(height, 1), max(width, 1)))
        return side * -(-side * long // short)

    def _largest_pinpoint(self) -> int:
        return max(h * w for h, w in self.image_processor.image_grid_pinpoints)

    # -- model side -----------------------------------------------------------------------

    @classmethod
    def encode(cls, model, pixels: list[torch.Tensor], sizes: list[tuple[int, int]], base_only: list[bool]):
        """Projected, packed features [tokens, hidden] per image (model side: needs only the
        model, whose config says all the rest). Tiled images go through the model's own
        `get_image_features` together; base-only images through the tower and the one-tile
        branch of its packing."""
        features: list[torch.Tensor | None] = [None] * len(pixels)
        tiled = [i for i, low in enumerate(base_only) if not low]
        if tiled:
            stacked = torch.cat([pixels[i] for i in tiled])
            out = cls.tiled_features(model, stacked, torch.tensor([sizes[i] for i in tiled]))
            for i, f in zip(tiled, out, strict=True):
                features[i] = f
        low = [i for i, flag in enumerate(base_only) if flag]
        if low:
            tiles = cls.tile_features(model, torch.cat([pixels[i][:1] for i in low]))
            packed = cls.pack_base_tiles(
                model, [t[None] for t in tiles], torch.tensor([sizes[i] for i in low])
            )
            for i, f in zip(low, packed, strict=True):
                features[i] = f
        return features

    @classmethod
    def tiled_features(cls, model, pixels: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
        """Packed features per image of a stack of images' tiles (`sizes`: their original sizes)."""
        return model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output

    @classmethod
    def pack_base_tiles(cls, model, tiles: list[torch.Tensor], sizes: torch.Tensor) -> list[torch.Tensor]:
        """Each image's base-tile features [1, patches, hidden] packed as the model packs one tile."""
        raise NotImplementedError

    def preprocess_video(self, frames: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def video_tokens(self, num_frames: int) -> int:
        raise NotImplementedError

    @classmethod
    def encode_video(cls, model, frames: torch.Tensor) -> torch.Tensor:
        """Features [tokens, hidden] of one video's frames [frames, 3, H, W]."""
        raise NotImplementedError

    @staticmethod
    def tile_features(model, pixels: torch.Tensor) -> torch.Tensor:
        """Projected features [tiles, patches, hidden] of a stack of tiles, selected as the model's
        own `get_image_features` selects them (feature layer(s), CLS dropped for "default")."""
        config = model.config
        out = model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layer = config.vision_feature_layer
        if isinstance(layer, int):
            hidden = out.hidden_states[layer]
        else:
            hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return model.model.multi_modal_projector(hidden)
