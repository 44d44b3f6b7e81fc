"""Random weights shaped like llava-1.5-7b (or small), built on a device: nothing downloads."""

import torch

SHAPES = {
    # llava-hf/llava-1.5-7b-hf: Vicuna-7B and CLIP ViT-L/14 at 336 px.
    "7b": {
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
    },
    "small": {
        "text": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096),
        "vision": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       image_size=112, patch_size=14, projection_dim=256),
    },
}  # fmt: skip


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    dims = SHAPES[shape]
    config = LlavaConfig(
        text_config=LlamaConfig(**dims["text"], bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=CLIPVisionConfig(**dims["vision"]),
        image_token_index=32000,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()
