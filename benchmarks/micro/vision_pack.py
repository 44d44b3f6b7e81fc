"""An image through the vision tower and projector: the checkpoint's own `nn.Linear`s (MKL) next
to them packed for oneDNN and packed for the engine's own kernels (`kernels/products.cpp` in
float32, `kernels/tiles.cpp` in bfloat16, as the engine runs them), in one process, the sides
taking turns in a rotated order.

    python benchmarks/micro/vision_pack.py                    # small-336 preset and a CLIP-L/14-336 tower
    python benchmarks/micro/vision_pack.py --towers clip-l --dtypes bfloat16 --repeats 20

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

from benchmarks.report import rotated, save, table  # noqa: E402
from llava_serve.engine import kernels  # noqa: E402
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
def measure(tower: str, images: int, repeats: int, dtype: torch.dtype) -> dict:
    mkl = load(tower).to(dtype)
    onednn, engine = copy.deepcopy(mkl), copy.deepcopy(mkl)
    pack_vision(onednn)
    pack_vision(engine, kernels.load())
    size = mkl.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    sides = {"mkl": mkl, "onednn": onednn, "engine": engine}
    times: dict[str, list[float]] = {name: [] for name in sides}
    out = {}
    for r in range(repeats + 2):
        for name in rotated(list(sides), r):
            start = time.perf_counter()
            out[name] = sides[name].model.get_image_features(pixel_values=pixels).pooler_output
            if r >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - start)
    features = {name: torch.cat(list(out[name])).float() for name in sides}
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return {
        "tower": tower,
        "dtype": str(dtype).removeprefix("torch."),
        "images": images,
        "tokens": features["mkl"].shape[0],
        **{f"{name}_ms": ms[name] for name in sides},
        "onednn_max_abs_diff": (features["onednn"] - features["mkl"]).abs().max().item(),
        "engine_max_abs_diff": (features["engine"] - features["mkl"]).abs().max().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--towers", nargs="+", default=["small-336", "clip-l"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/vision_pack.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure(tower, args.images, args.repeats, getattr(torch, dtype))
        for tower in args.towers
        for dtype in args.dtypes
    ]
    print(
        table(
            [
                "tower",
                "dtype",
                "images (tokens)",
                "MKL ms",
                "oneDNN packed ms",
                "engine's kernels ms",
                "oneDNN/MKL",
                "engine/oneDNN",
                "max |diff| oneDNN / engine vs MKL",
            ],
            [
                [
                    r["tower"],
                    r["dtype"],
                    f"{r['images']} ({r['tokens']})",
                    f"{r['mkl_ms']:.1f}",
                    f"{r['onednn_ms']:.1f}",
                    f"{r['engine_ms']:.1f}",
                    f"{r['onednn_ms'] / r['mkl_ms']:.2f}x",
                    f"{r['engine_ms'] / r['onednn_ms']:.2f}x",
                    f"{r['onednn_max_abs_diff']:.1e} / {r['engine_max_abs_diff']:.1e}",
                ]
                for r in rows
            ],
        )
    )
    save({"rows": rows}, args)


if __name__ == "__main__":
    main()
