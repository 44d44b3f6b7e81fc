"""A SentencePiece-style (Llama-2 / Mistral) tokenizer built offline, beside the tiny model's
byte-level BPE, so that behaviour that differs between the two schemes is tested on both."""

from __future__ import annotations

import json
from functools import cache

from llava_serve.models.tiny import CHAT_TEMPLATE, _corpus


@cache
def _trained() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(_corpus(20_000, 0), trainers.BpeTrainer(vocab_size=600, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    # Llama's layout: specials, then the 256 byte-fallback pieces, then the learned pieces.
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def sentencepiece_tokenizer(legacy: bool = False):
    """transformers' own `LlamaTokenizer` (byte fallback; `legacy=False` marks only the first word)."""
    from transformers import LlamaTokenizer

    vocab, merges = _trained()
    return LlamaTokenizer(
        vocab=vocab, merges=merges, legacy=legacy, extra_special_tokens={"image_token": "<image>"}
    )


def llava_processor(tokenizer, like):
    """A `LlavaProcessor` with `tokenizer` and the image side of the tiny checkpoint's processor `like`."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=like.image_processor,
        tokenizer=tokenizer,
        patch_size=like.patch_size,
        vision_feature_select_strategy=like.vision_feature_select_strategy,
        num_additional_image_tokens=like.num_additional_image_tokens,
        chat_template=CHAT_TEMPLATE,
    )
