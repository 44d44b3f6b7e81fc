"""Resolve a model setting to a checkpoint and load its processor and weights.

`tiny` is the embedded random-weight checkpoint; anything else is a local directory or a hub
id, loaded through the same `from_pretrained` calls.
"""

from __future__ import annotations

from pathlib import Path

from llava_serve.config import ModelConfig
from llava_serve.models import tiny

# The embedded random-weight checkpoints, one per architecture.
TINY = {"tiny": "llava", "tiny-next": "llava_next", "tiny-onevision": "llava_onevision"}


def resolve_path(cfg: ModelConfig) -> str:
    if cfg.name in TINY:
        return str(tiny.ensure(cfg.tiny_preset, cfg.cache_dir, arch=TINY[cfg.name]))
    return str(Path(cfg.name)) if Path(cfg.name).exists() else cfg.name


def load_adapter(cfg: ModelConfig):
    """The checkpoint's `llava_serve.models.ImageAdapter` (tokenizer, image processor, geometry)."""
    from llava_serve.models import load_adapter

    return load_adapter(resolve_path(cfg))


def takes_video(cfg: ModelConfig) -> bool:
    """Whether the checkpoint's architecture takes video parts (from config.json alone)."""
    from llava_serve.models import ADAPTERS, model_type

    adapter = ADAPTERS.get(model_type(resolve_path(cfg)))
    return adapter is not None and adapter.takes_video


def load_processor(cfg: ModelConfig):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(resolve_path(cfg))


def context_length(cfg: ModelConfig) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_path(cfg)).get_text_config().max_position_embeddings


def pick_device(cfg: ModelConfig):
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def pick_dtype(cfg: ModelConfig, device):
    import torch

    if cfg.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_model(cfg: ModelConfig, adapter=None):
    """The architecture's `*ForConditionalGeneration` in eval mode on the configured device and dtype."""
    adapter = adapter or load_adapter(cfg)
    device = pick_device(cfg)
    model = adapter.load_model(resolve_path(cfg), pick_dtype(cfg, device))
    return model.to(device).eval()
