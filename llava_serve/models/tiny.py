"""Build a deterministic random-weight LLaVA checkpoint offline.

Real classes all the way down: `LlavaForConditionalGeneration` (CLIP vision tower + Llama text
model), a byte-level BPE tokenizer trained here with `tokenizers`, and a `LlavaProcessor` with a
chat template, saved so `from_pretrained(dir)` works with `HF_HUB_OFFLINE=1`. The same seed
gives the same bytes, so tests can compare against `transformers.generate` on it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# LLaVA-1.5 conversation format, with each image placed where its part stands (llava-hf's
# template hoists all images to the front of a turn, which loses the order of several images).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS_SEED_TEXT = (
    "A photo of a cat sitting on a red chair next to the window. The dog runs across the green "
    "field under a blue sky. What is shown in this image? Describe the picture in detail. "
    "There are two people walking along the beach at sunset, and a boat in the distance. "
    "Émile paid 12,50 € for café au lait; 東京 is large; naïve résumé — ünïcödé ✓ 🙂."
)


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    max_positions: int


PRESETS = {
    # Small enough that the test suite runs many generations in seconds on two cores.
    "tiny": Preset(1024, 64, 2, 4, 2, 128, 32, 2, 2, 64, 16, 2048),
    # Large enough that compute matters (~60M parameters, 32k vocab, 112 px): for benchmarks.
    "small": Preset(32000, 512, 8, 8, 4, 1376, 256, 4, 4, 112, 14, 4096),
    # The small model at LLaVA-1.5's image size (336 px in patches of 14: 576 tokens an image), for
    # what depends on how much of a prompt the image is (prefix reuse across turns).
    "small-336": Preset(32000, 512, 8, 8, 4, 1376, 256, 4, 4, 336, 14, 4096),
}


def _corpus(n_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghklmnprstvwz" for b in "aeiouy"] + list("aeiou")
    lines = [_CORPUS_SEED_TEXT] * 20
    words = []
    for _ in range(n_words):
        w = "".join(rng.choice(syllables) for _ in range(rng.randint(1, 5)))
        words.append(w.capitalize() if rng.random() < 0.1 else w)
        if len(words) == 16:
            lines.append(" ".join(words) + rng.choice([".", ",", "?", "!", ""]))
            words = []
    return lines


def build_tokenizer(
    vocab_size: int, seed: int, special_tokens: list[str] = SPECIAL_TOKENS, bos: str | None = "<s>"
):
    """Train a byte-level BPE (the Llama-3/GPT-2/Qwen2 family's scheme) on a seeded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(max(20_000, vocab_size * 12), seed), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


ARCHS = ("llava", "llava_next", "llava_onevision")


def build(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0, arch: str = "llava") -> Path:
    """Write a complete checkpoint (model, tokenizer, processor) of `arch` to `out_dir`."""
    builders = {"llava": _build_llava, "llava_next": _build_next, "llava_onevision": _build_onevision}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    builders[arch](out, PRESETS[preset], seed)
    (out / "llava_serve_tiny.json").write_text(json.dumps({"preset": preset, "seed": seed, "arch": arch}))
    return out


def _save(model, processor, out: Path, seed: int) -> None:
    import torch

    # Random init gives near-uniform logits; a wider spread makes greedy decoding robust to
    # float noise so batched and solo runs pick the same tokens, as a trained model would.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    text = model.config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _llama_tokenizer(p: Preset, seed: int):
    from transformers import PreTrainedTokenizerFast

    raw = build_tokenizer(p.vocab_size, seed)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return raw, tokenizer


def _text_dims(p: Preset, raw) -> dict:
    """The language model's size, whatever its family."""
    return {
        "vocab_size": raw.get_vocab_size(),
        "hidden_size": p.text_hidden,
        "intermediate_size": p.text_intermediate,
        "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.text_heads,
        "num_key_value_heads": p.text_kv_heads,
        "max_position_embeddings": p.max_positions,
    }


def _llama_config(p: Preset, raw):
    from transformers import LlamaConfig

    return LlamaConfig(
        **_text_dims(p, raw),
        bos_token_id=raw.token_to_id("<s>"),
        eos_token_id=raw.token_to_id("</s>"),
        pad_token_id=raw.token_to_id("<pad>"),
    )


def _clip_config(p: Preset, image_size: int, patch_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=p.vision_hidden,
        intermediate_size=p.vision_hidden * 4,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=p.vision_hidden,
    )


# LLaVA-NeXT: tiles of half the 1.5 preset's side, on the grid llava-v1.6 uses (1x2, 2x1, 2x2,
# 1x3, 3x1 tiles), so a 5-tile image (base + 2x2) stays small enough for CI.
def _next_tile(p: Preset) -> tuple[int, int]:
    return p.image_size // 2, p.patch_size // 2


NEXT_CHAT_TEMPLATE = (  # llava-v1.6-mistral's conversation format, images where their parts stand
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] %}{{ ' ' + part['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def _build_next(out: Path, p: Preset, seed: int) -> None:
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    raw, tokenizer = _llama_tokenizer(p, seed)
    tile, patch = _next_tile(p)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=NEXT_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=_clip_config(p, tile, patch),
        text_config=_llama_config(p, raw),
        image_token_id=raw.token_to_id("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    _save(LlavaNextForConditionalGeneration(config).eval(), processor, out, seed)


class _Parts:
    """Saves a processor's parts and config files without building the processor."""

    def __init__(self, parts: list, config: dict, video_config: dict):
        self.parts, self.config, self.video_config = parts, config, video_config

    def save_pretrained(self, out: Path) -> None:
        for part in self.parts:
            part.save_pretrained(out)
        (out / "processor_config.json").write_text(json.dumps(self.config, indent=2))
        (out / "video_preprocessor_config.json").write_text(json.dumps(self.video_config, indent=2))


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# llava-onevision-qwen2's conversation format (ChatML), images and videos where their parts stand.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'video' %}{{ '<video>' }}"
    "{% else %}{{ '\n' + part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _build_onevision(out: Path, p: Preset, seed: int) -> None:
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipVisionConfig,
    )

    raw = build_tokenizer(p.vocab_size, seed, QWEN_SPECIAL_TOKENS, bos=None)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )
    tile, patch = _next_tile(p)
    side = tile // patch
    # OneVision's grid: every 1x1 .. 6x6 arrangement of tiles, at most 9 tiles' worth of features.
    pinpoints = [[tile * i, tile * j] for i in range(1, 7) for j in range(1, 7)]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    # The processor itself is not built here: its video processor needs torchvision. Its parts
    # and its config are written as `LlavaOnevisionProcessor.save_pretrained` writes them, so
    # `AutoProcessor.from_pretrained` loads the checkpoint wherever torchvision is installed.
    processor = _Parts(
        [tokenizer, image_processor],
        {
            "processor_class": "LlavaOnevisionProcessor",
            "num_image_tokens": side * side,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
            "image_token": "<image>",
            "video_token": "<video>",
        },
        {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "processor_class": "LlavaOnevisionProcessor",
            "size": {"height": tile, "width": tile},
            "do_resize": True,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
        },
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=p.vision_hidden,
            intermediate_size=p.vision_hidden * 4,
            num_hidden_layers=p.vision_layers,
            num_attention_heads=p.vision_heads,
            image_size=tile,
            patch_size=patch,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(
            **_text_dims(p, raw),
            eos_token_id=raw.token_to_id("<|im_end|>"),
            pad_token_id=raw.token_to_id("<|endoftext|>"),
            tie_word_embeddings=False,
        ),
        image_token_id=raw.token_to_id("<image>"),
        video_token_id=raw.token_to_id("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    _save(LlavaOnevisionForConditionalGeneration(config).eval(), processor, out, seed)


def _build_llava(out: Path, p: Preset, seed: int) -> None:
    import torch
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    raw, tokenizer = _llama_tokenizer(p, seed)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=_clip_config(p, p.image_size, p.patch_size),
        text_config=_llama_config(p, raw),
        image_token_id=raw.token_to_id("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    _save(LlavaForConditionalGeneration(config).eval(), processor, out, seed)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_SERVE_CACHE", Path.home() / ".cache" / "llava-serve"))


def ensure(
    preset: str = "tiny", cache_dir: str | os.PathLike | None = None, seed: int = 0, arch: str = "llava"
) -> Path:
    """Return the directory of the embedded checkpoint, building it once if missing.

    Built into a temporary sibling and renamed, so concurrent replicas never see half a
    checkpoint and a crash mid-build leaves nothing behind.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / (f"{preset}-seed{seed}" if arch == "llava" else f"{arch}-{preset}-seed{seed}")
    if (target / "llava_serve_tiny.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, preset, seed, arch)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target
