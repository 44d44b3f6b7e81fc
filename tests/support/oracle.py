"""What `transformers` alone answers for an OpenAI-style request: the oracle for our outputs.

Nothing here imports llava_serve. A reference is the checkpoint's own processor (its chat
template, its `__call__` with the images nested per sample, as transformers expects) and
`model.generate`; the OpenAI message shape is turned into transformers' chat shape by
`conversation`, which is written from OpenAI's API reference, not from our protocol code.

Two places cannot be transformers' processor whole, and say how they stand in:
- OneVision's processor cannot be built without torchvision (its video half needs it), so
  `processor_for` builds transformers' own `LlavaOnevisionProcessor` class over the image
  processor and tokenizer alone; its `__call__`, placeholder counts and image branches are
  transformers' code.
- For video, that processor is given a video processor made of transformers' image
  transforms with the checkpoint's saved video settings (`TransformsVideoProcessor`); the
  processor's own `__call__` counts and expands the `<video>` placeholders.
- LLaVA-NeXT at `detail: low` has no transformers equivalent: `next_low_detail_greedy` takes the
  processor's base tile and runs it through the model's own tower, projector and
  `pack_image_features` (the one-tile branch); the placeholder count is the packed length.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from tests.support.media import random_image


def conversation(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages in transformers' chat-template shape. OpenAI's meanings: `developer`
    is the system turn of newer models, a string is one text part, null content (an assistant
    turn holding only tool calls) is no content, an `image_url` part is an image and a
    `video_url` part (vLLM's extension) a video."""
    out = []
    for message in messages:
        content = message.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            kinds = {"image_url": "image", "video_url": "video"}
            parts = [
                {"type": "text", "text": p["text"]} if p["type"] == "text" else {"type": kinds[p["type"]]}
                for p in content
            ]
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": parts})
    return out


@functools.cache
def processor_for(path: str):
    """The checkpoint's transformers processor (see the module's note on OneVision)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    if AutoConfig.from_pretrained(path).model_type != "llava_onevision":
        return AutoProcessor.from_pretrained(path)
    from transformers import LlavaOnevisionProcessor

    class ImagesOnlyOnevisionProcessor(LlavaOnevisionProcessor):
        # ProcessorMixin takes its sub-processors from the __init__ signature: this one has no video
        # half, and every method is LlavaOnevisionProcessor's own.
        def __init__(self, image_processor, tokenizer, **kwargs):
            super().__init__(image_processor, tokenizer, None, **kwargs)

    settings = json.loads((Path(path) / "processor_config.json").read_text())
    settings.pop("processor_class", None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return ImagesOnlyOnevisionProcessor(
        AutoImageProcessor.from_pretrained(path),
        tokenizer,
        chat_template=tokenizer.chat_template,
        **settings,
    )


def reference_model(path: str):
    """The checkpoint as transformers loads it by itself, in float32."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def render(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(conversation(messages), add_generation_prompt=True, tokenize=False)


def reference_inputs(processor, messages: list[dict], images: list, videos: list | None = None):
    """`processor(...)` for one sample: the rendered chat, its images (and videos) nested per sample."""
    kwargs = {"images": [images]} if images else {}
    if videos:
        kwargs["videos"] = [videos]
    return processor(text=[render(processor, messages)], return_tensors="pt", **kwargs)


def greedy_ids(model, inputs, max_tokens: int, **generate_kwargs) -> list[int]:
    """The new token ids of `model.generate(do_sample=False)`; `generate_kwargs` are its own
    (`repetition_penalty`, `logits_processor`, ...)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, **generate_kwargs)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def greedy_logits(model, inputs, max_tokens: int) -> list[torch.Tensor]:
    """Each step's logits [vocab] of `model.generate(do_sample=False)`."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return [step[0] for step in out.logits]


def hf_greedy(processor, model, messages: list[dict], images: list, max_tokens: int) -> tuple[str, int]:
    """(completion text, prompt tokens) of `model.generate(do_sample=False)`."""
    inputs = reference_inputs(processor, messages, images)
    ids = greedy_ids(model, inputs, max_tokens)
    return processor.tokenizer.decode(ids, skip_special_tokens=True), inputs["input_ids"].shape[1]


def family_greedy(
    path: str, model, messages: list[dict], images: list, max_tokens: int, detail: str | None = None
) -> tuple[str, int]:
    """`hf_greedy` for any supported checkpoint by path; `detail="low"` for LLaVA-NeXT takes the
    model-module reference (transformers has no low-detail path)."""
    processor = processor_for(path)
    if detail == "low" and model.config.model_type == "llava_next":
        return next_low_detail_greedy(processor, model, messages, images, max_tokens)
    return hf_greedy(processor, model, messages, images, max_tokens)


def next_low_detail_greedy(processor, model, messages, images, max_tokens) -> tuple[str, int]:
    """LLaVA-NeXT with every image reduced to its base tile: the processor's base tile through
    the model's own tower, projector and one-tile `pack_image_features`, whose packed length is
    the image's placeholder count; `generate` takes the embeddings."""
    config = model.config
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"][:, 0]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[
            config.vision_feature_layer
        ]
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        tiles = model.model.multi_modal_projector(hidden)
        packed, _ = model.model.pack_image_features(
            [t[None] for t in tiles],
            torch.tensor([(im.height, im.width) for im in images]),
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            image_newline=model.model.image_newline,
        )
        parts = render(processor, messages).split(processor.image_token)
        text = parts[0] + "".join(
            processor.image_token * len(p) + rest for p, rest in zip(packed, parts[1:], strict=True)
        )
        ids = processor.tokenizer(text, return_tensors="pt")
        embeds = model.get_input_embeddings()(ids["input_ids"])
        slots = (ids["input_ids"] == config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(slots, torch.cat(packed).to(embeds.dtype))
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=ids["attention_mask"],
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    return processor.tokenizer.decode(out[0], skip_special_tokens=True), ids["input_ids"].shape[1]


class TransformsVideoProcessor:
    """OneVision's video processor (which needs torchvision) as transformers' image transforms
    with the checkpoint's saved video settings: each frame resized, rescaled and normalized."""

    def __init__(self, path: str):
        self.settings = json.loads((Path(path) / "video_preprocessor_config.json").read_text())

    def __call__(self, videos, return_tensors=None, **_):
        from transformers import BatchFeature
        from transformers.image_transforms import normalize, rescale, resize
        from transformers.image_utils import ChannelDimension, PILImageResampling

        cfg, last = self.settings, ChannelDimension.LAST
        size = (cfg["size"]["height"], cfg["size"]["width"])
        out = []
        for frames in videos:
            clip = []
            for frame in frames:
                array = resize(np.asarray(frame), size, resample=PILImageResampling(cfg["resample"]))
                array = rescale(array.astype(np.float32), cfg["rescale_factor"], input_data_format=last)
                array = normalize(array, cfg["image_mean"], cfg["image_std"], input_data_format=last)
                clip.append(array.transpose(2, 0, 1))
            out.append(np.stack(clip))
        return BatchFeature({"pixel_values_videos": np.stack(out)}, tensor_type=return_tensors)


def onevision_video_greedy(path: str, model, messages: list[dict], frames: list, max_tokens: int):
    """(completion text, prompt tokens) for a OneVision request with one video, `frames` already
    sampled, through the processor's own `__call__` (module note)."""
    processor = processor_for(path)
    processor.video_processor = TransformsVideoProcessor(path)
    try:
        inputs = reference_inputs(processor, messages, [], videos=frames)
    finally:
        del processor.video_processor
    ids = greedy_ids(model, inputs, max_tokens)
    return processor.tokenizer.decode(ids, skip_special_tokens=True), inputs["input_ids"].shape[1]


def image_token_count(processor) -> int:
    """How many placeholder tokens the processor itself expands one (LLaVA-1.5) image to."""
    out = processor(text=processor.image_token, images=[random_image(0)], return_tensors="np")
    return int((out["input_ids"][0] == processor.image_token_id).sum())
