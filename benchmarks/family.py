"""Prompt tokens per image for each architecture and detail, and TTFT by tile count, in one run.

    python benchmarks/family.py                    # tiny checkpoints of every architecture

For each architecture's embedded checkpoint (built offline), the prompt tokens an image of
several sizes becomes at each detail, from the adapter (the same counts the tests check against
transformers). Then, on LLaVA-NeXT, time to first token through the engine for a 1-tile image
(`detail: low`) and a 5-tile one (base + 2x2 grid), alternating, each request a fresh image so
the vision cache never answers: the cost of anyres, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from benchmarks.report import save
from llava_serve import images, tiny
from llava_serve.config import EngineConfig, ImageConfig, ModelConfig
from llava_serve.engine import Engine
from llava_serve.engine.sampling import SamplingParams
from llava_serve.models import load_adapter
from llava_serve.prompts import PromptBuilder, to_template_messages
from llava_serve.protocol import ChatMessage

SIZES = {
    "small 40x30": (40, 30),
    "square 90x70": (90, 70),
    "wide 120x30": (120, 30),
    "tall 24x100": (24, 100),
}


def picture(seed: int, size: tuple[int, int]) -> bytes:
    import io

    pixels = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def token_table(preset: str) -> dict:
    rows = {}
    print(f"\n{'architecture':<18}{'image':<16}{'detail high':>12}{'detail low':>12}{'in a pair':>11}")
    for arch in tiny.ARCHS:
        adapter = load_adapter(str(tiny.ensure(preset, arch=arch)))
        for label, (w, h) in SIZES.items():
            high = adapter.num_tokens(h, w, adapter.base_only("high", 1))
            low = adapter.num_tokens(h, w, adapter.base_only("low", 1))
            pair = adapter.num_tokens(h, w, adapter.base_only("high", 2))
            rows[f"{arch} {label}"] = {"high": high, "low": low, "pair": pair}
            print(f"{arch:<18}{label:<16}{high:>12}{low:>12}{pair:>11}")
    return rows


async def ttft(engine: Engine, builder: PromptBuilder, adapter, seed: int, base_only: bool) -> float:
    message = ChatMessage(
        role="user",
        content=[{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Hi"}],
    )
    start = time.perf_counter()
    image = images.prepare(picture(seed, (90, 70)), adapter, ImageConfig(), None, base_only)
    prompt = builder.build(to_template_messages([message]), 4, [image.num_tokens])
    async for _ in engine.generate(prompt.input_ids, [image], SamplingParams(max_tokens=4, temperature=0)):
        return time.perf_counter() - start
    raise AssertionError("no output")


async def main(args: argparse.Namespace) -> dict:
    tokens = token_table(args.preset)
    path = str(tiny.ensure(args.preset, arch="llava_next"))
    adapter = load_adapter(path)
    engine = Engine.load(ModelConfig(name=path), EngineConfig())
    builder = PromptBuilder(adapter, 4096)
    times: dict[str, list[float]] = {"1 tile (detail low)": [], "5 tiles (detail high)": []}
    await ttft(engine, builder, adapter, 0, False)  # warm up
    for i in range(args.rounds):
        times["1 tile (detail low)"].append(await ttft(engine, builder, adapter, 2 * i + 1, True))
        times["5 tiles (detail high)"].append(await ttft(engine, builder, adapter, 2 * i + 2, False))
    await engine.shutdown()
    base = statistics.median(times["1 tile (detail low)"])
    print(f"\nLLaVA-NeXT ({args.preset}), a 90x70 image, TTFT through the engine, {args.rounds} rounds")
    print(f"{'side':<24}{'TTFT ms (median)':>18}{'p90':>8}{'vs 1 tile':>11}")
    out = {}
    for name, samples in times.items():
        median, p90 = statistics.median(samples), float(np.percentile(samples, 90))
        out[name] = {"ttft_ms": [s * 1e3 for s in samples], "median_ms": median * 1e3, "ratio": median / base}
        print(f"{name:<24}{median * 1e3:>18.1f}{p90 * 1e3:>8.1f}{median / base:>10.2f}x")
    return {"prompt_tokens": tokens, "ttft": out}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(tiny.PRESETS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/family.json")
    args = parser.parse_args()
    save(asyncio.run(main(args)), args)
