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
