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


def build_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE (the Llama-3/GPT-2 family's scheme) on a seeded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(max(20_000, vocab_size * 12), seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def build(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a complete checkpoint (model, tokenizer, processor) to `out_dir`."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

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
    image_token_id = raw.token_to_id("<image>")
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
        vision_config=CLIPVisionConfig(
            hidden_size=p.vision_hidden,
            intermediate_size=p.vision_hidden * 4,
            num_hidden_layers=p.vision_layers,
            num_attention_heads=p.vision_heads,
            image_size=p.image_size,
            patch_size=p.patch_size,
            projection_dim=p.vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=raw.get_vocab_size(),
            hidden_size=p.text_hidden,
            intermediate_size=p.text_intermediate,
            num_hidden_layers=p.text_layers,
            num_attention_heads=p.text_heads,
            num_key_value_heads=p.text_kv_heads,
            max_position_embeddings=p.max_positions,
            bos_token_id=raw.token_to_id("<s>"),
            eos_token_id=raw.token_to_id("</s>"),
            pad_token_id=raw.token_to_id("<pad>"),
        ),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    # Random init gives near-uniform logits; a wider spread makes greedy decoding robust to
    # float noise so batched and solo runs pick the same tokens, as a trained model would.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "llava_serve_tiny.json").write_text(json.dumps({"preset": preset, "seed": seed}))
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAVA_SERVE_CACHE", Path.home() / ".cache" / "llava-serve"))


def ensure(preset: str = "tiny", cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Return the directory of the embedded checkpoint, building it once if missing.

    Built into a temporary sibling and renamed, so concurrent replicas never see half a
    checkpoint and a crash mid-build leaves nothing behind.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"{preset}-seed{seed}"
    if (target / "llava_serve_tiny.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp, preset, seed)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target
