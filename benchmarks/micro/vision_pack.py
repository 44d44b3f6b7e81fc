"""An image through the vision tower and projector: the checkpoint's own `nn.Linear`s (MKL) next
to the engine's oneDNN-packed ones, in one process, the sides alternating.

    python benchmarks/micro/vision_pack.py                    # small-336 preset and a CLIP-L/14-336 tower
    python benchmarks/micro/vision_pack.py --towers small-336 --images 4 --repeats 20

`small-336` is the tiny checkpoint (576 tokens an image); `clip-l` is LLaVA-1.5's tower shape
(CLIP ViT-L/14 at 336 px: 24 layers of width 1024, 577 positions) with random weights, built in
memory. Each side encodes the same random pixels through the model's own `get_image_features`;
the figure is the median of `--repeats`, and the largest difference between the sides' features
says they compute the same thing. Prints a table, writes JSON with the commit it ran on.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.report import save, table  # noqa: E402
from llava_serve.engine.packed import pack_vision  # noqa: E402


def load(tower: str):
    if tower == "clip-l":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        )
        text = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=1, vocab_size=1000)
        torch.manual_seed(0)
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text)).eval()
    from llava_serve.config import ModelConfig
    from llava_serve.models import checkpoint

    return checkpoint.load_model(ModelConfig(name="tiny", tiny_preset=tower))


@torch.inference_mode()
def measure(tower: str, images: int, repeats: int) -> dict:
    mkl = load(tower)
    packed = copy.deepcopy(mkl)
    pack_vision(packed)
    size = mkl.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    sides = {"mkl": mkl, "onednn": packed}
    times: dict[str, list[float]] = {name: [] for name in sides}
    out = {}
    for r in range(repeats + 2):
        for name, model in sides.items() if r % 2 else reversed(sides.items()):
            start = time.perf_counter()
            out[name] = model.model.get_image_features(pixel_values=pixels).pooler_output
            if r >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - start)
    features = [torch.cat(list(out[name])) for name in sides]
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return {
        "tower": tower,
        "images": images,
        "tokens": features[0].shape[0],
        "mkl_ms": ms["mkl"],
        "onednn_ms": ms["onednn"],
        "max_abs_diff": (features[0] - features[1]).abs().max().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", nargs="+", default=["small-336", "clip-l"])
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/vision_pack.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(tower, args.images, args.repeats) for tower in args.towers]
    print(
        table(
            ["tower", "images (tokens)", "MKL ms", "oneDNN packed ms", "packed/MKL", "max |diff|"],
            [
                [
                    r["tower"],
                    f"{r['images']} ({r['tokens']})",
                    f"{r['mkl_ms']:.1f}",
                    f"{r['onednn_ms']:.1f}",
                    f"{r['onednn_ms'] / r['mkl_ms']:.2f}x",
                    f"{r['max_abs_diff']:.1e}",
                ]
                for r in rows
            ],
        )
    )
    save({"rows": rows}, args)


if __name__ == "__main__":
    main()
