"""What `transformers` itself generates for an OpenAI-style request: the oracle for our outputs."""

from __future__ import annotations

import torch

from llava_serve.prompts import PromptBuilder, to_template_messages
from llava_serve.protocol import ChatMessage


def hf_greedy(processor, model, messages: list[dict], pil_images: list, max_tokens: int) -> tuple[str, int]:
    """(completion text, prompt tokens) from `model.generate(do_sample=False)` with the chat template."""
    msgs = [ChatMessage.model_validate(m) for m in messages]
    text = PromptBuilder(processor, 10**6).render(to_template_messages(msgs))
    inputs = processor(text=text, images=pil_images or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return processor.tokenizer.decode(out[0, n:], skip_special_tokens=True), n


def image_request(url: str, question: str = "What is in this image?", **params) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        **params,
    }


def family_greedy(
    path: str, model, messages: list[dict], pil_images: list, max_tokens: int, detail: str | None = None
) -> tuple[str, int]:
    """`family`'s oracle: (completion text, prompt tokens) from `model.generate(do_sample=False)`
    for any supported architecture, from transformers' own pieces.

    LLaVA-NeXT at full detail goes through its processor whole. OneVision's processor cannot be
    built without torchvision, so its two halves are used: the image processor for the tiles and
    the processor's counting code (bound in the adapter) for the placeholders; the model gets
    `batch_num_images` as the processor would give it. LLaVA-NeXT at detail "low" has no
    transformers equivalent: its base tile goes through the model's own vision tower, projector
    and `pack_image_features` (the one-tile branch), and `generate` takes the embeddings."""
    from transformers import AutoProcessor

    from llava_serve.models import load_adapter

    adapter = load_adapter(path)
    msgs = [ChatMessage.model_validate(m) for m in messages]
    text = PromptBuilder(adapter, 10**6).render(to_template_messages(msgs))
    kind = model.config.model_type
    if kind in ("llava", "llava_next") and detail != "low":
        processor = AutoProcessor.from_pretrained(path)
        inputs = processor(text=text, images=pil_images or None, return_tensors="pt")
        return _generate(adapter, model, inputs, max_tokens)
    pixels = adapter.image_processor(images=pil_images, return_tensors="pt") if pil_images else {}
    sizes = [(im.height, im.width) for im in pil_images]
    base_only = adapter.base_only(detail, len(pil_images))
    parts = text.split(adapter.image_token)
    expanded = parts[0] + "".join(
        adapter.image_token * adapter.num_tokens(h, w, base_only) + rest
        for (h, w), rest in zip(sizes, parts[1:], strict=True)
    )
    inputs = adapter.tokenizer(expanded, return_tensors="pt")
    if kind == "llava_onevision":
        if pil_images:
            inputs["pixel_values"] = pixels["pixel_values"]
            inputs["image_sizes"] = pixels["image_sizes"]
            inputs["batch_num_images"] = torch.tensor([len(pil_images)])
        return _generate(adapter, model, inputs, max_tokens)
    with torch.no_grad():  # LLaVA-NeXT, base tile only
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        if pil_images:
            hidden = model.model.vision_tower(
                pixels["pixel_values"][:, 0], output_hidden_states=True
            ).hidden_states[model.config.vision_feature_layer]
            if model.config.vision_feature_select_strategy == "default":
                hidden = hidden[:, 1:]
            tiles = model.model.multi_modal_projector(hidden)
            packed, _ = model.model.pack_image_features(
                [t[None] for t in tiles],
                torch.tensor(sizes),
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                image_newline=model.model.image_newline,
            )
            slots = (ids == model.config.image_token_id)[..., None]
            embeds = embeds.masked_scatter(slots, torch.cat(packed).to(embeds.dtype))
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    return adapter.tokenizer.decode(out[0], skip_special_tokens=True), ids.shape[1]


def _generate(adapter, model, inputs, max_tokens: int) -> tuple[str, int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    n = inputs["input_ids"].shape[1]
    return adapter.tokenizer.decode(out[0, n:], skip_special_tokens=True), n


def onevision_video_greedy(
    path: str, model, messages: list[dict], frames: list, max_tokens: int
) -> tuple[str, int]:
    """The oracle for a OneVision request with one video: `frames` (already sampled) resized,
    rescaled and normalized with transformers' own image transforms (the checkpoint's video
    processor needs torchvision), the `<video>` placeholder expanded as the processor counts it
    (frames x pooled patches + one newline), and `generate` given `pixel_values_videos`."""
    import math

    import numpy as np
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    from llava_serve.models import load_adapter

    adapter = load_adapter(path)
    cfg = adapter.video_config
    size = (cfg["size"]["height"], cfg["size"]["width"])
    pixels = []
    for frame in frames:
        array = resize(
            np.asarray(frame),
            size,
            resample=PILImageResampling.BICUBIC,
            input_data_format=ChannelDimension.LAST,
        )
        array = rescale(
            array.astype(np.float32), cfg["rescale_factor"], input_data_format=ChannelDimension.LAST
        )
        array = normalize(array, cfg["image_mean"], cfg["image_std"], input_data_format=ChannelDimension.LAST)
        pixels.append(array.transpose(2, 0, 1))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    count = len(frames) * math.ceil(side / 2) ** 2 + 1
    msgs = [ChatMessage.model_validate(m) for m in messages]
    text = PromptBuilder(adapter, 10**6).render(to_template_messages(msgs))
    inputs = adapter.tokenizer(
        text.replace(adapter.video_token, adapter.video_token * count), return_tensors="pt"
    )
    inputs["pixel_values_videos"] = torch.from_numpy(np.stack(pixels)[None].astype(np.float32))
    return _generate(adapter, model, inputs, max_tokens)
