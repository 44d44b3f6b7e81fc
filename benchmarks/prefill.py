"""Prefill-heavy workloads: long text prompts at concurrency 16, and a follow-up turn about the
same image. Engine v2 (prompts join in chunks under `engine.max_step_tokens`, KV of finished
requests reused through the prefix cache) against the same engine configured as v1 behaved
(every admitted prompt whole in one step, no prefix cache), side by side in one run.

    python benchmarks/prefill.py                 # small preset; writes benchmarks/results/prefill.json

Both sides are deployed together as the same model deployment (one replica, the same CPUs),
driven through `handle.options(stream=True).generate.remote(...)`, and take turns workload by
workload. TTFT is the arrival of the first streamed token at the caller.

- `text600`: 32 text-only requests of ~600 prompt tokens (distinct prompts), concurrency 16, 64
  tokens: TTFT p50/p99, TPOT p50, tok/s.
- `followup`: a first turn about a fresh image, then the follow-up turn (the first turn's
  message, the answer it got, a new question) once it has finished, one at a time: TTFT of each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from benchmarks.engine import _png, one_request
from benchmarks.report import pct, save
from llava_serve import checkpoint, images
from llava_serve.config import AppConfig
from llava_serve.engine.sampling import SamplingParams
from llava_serve.prompts import PromptBuilder, to_template_messages
from llava_serve.protocol import ChatMessage

WORDS = [
    "the",
    "a",
    "river",
    "mountain",
    "city",
    "light",
    "blue",
    "green",
    "small",
    "large",
    "over",
    "under",
    "near",
    "far",
    "old",
    "new",
]
# The engine as v1 behaved: every admitted prompt whole in one step, nothing kept for reuse.
# The engine as v1 scheduled: whole prompts in one step, nothing kept across requests, every
# stream on its own 50 ms clock.
V1_SETTINGS = {"max_step_tokens": 1 << 20, "prefix_cache_bytes": 0, "max_stream_messages_per_s": 0}
SIDES = {
    "v1 (whole prompts, no prefix cache)": V1_SETTINGS,
    "v2 (chunks of 512, prefix cache)": {},
}


def text_prompts(builder, n: int, words: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS, words)) + ". Summarize."
        msgs = to_template_messages([ChatMessage(role="user", content=text)])
        out.append((builder.build(msgs, 64, []), []))
    return out


FIRST = ChatMessage(
    role="user",
    content=[{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Describe it."}],
)
AGAIN = ChatMessage(role="user", content="What colour is the largest thing in it?")


def first_turns(config, builder, adapter, n: int, seed: int = 3):
    """First turns about fresh images: (prompt, [image])."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        pic = Image.fromarray(rng.randint(0, 256, (200, 240, 3), dtype=np.uint8))
        image = images.prepare(_png(pic), adapter, config.images)
        out.append((builder.build(to_template_messages([FIRST]), 48, [image.num_tokens]), [image]))
    return out


async def text600(handle, prompts, concurrency: int) -> dict:
    params = SamplingParams(max_tokens=64, temperature=0.0)
    sem = asyncio.Semaphore(concurrency)

    async def bounded(prompt):
        async with sem:
            return await one_request(handle, prompt[0], prompt[1], params)

    t0 = time.perf_counter()
    results = await asyncio.gather(*[bounded(p) for p in prompts])
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] * 1000 for r in results]
    tpot = [r["tpot"] * 1000 for r in results]
    return {
        "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5)),
        "ttft_p99_ms": round(pct(ttft, 0.99)),
        "tpot_p50_ms": round(pct(tpot, 0.5), 1),
        "wall_s": round(wall, 2),
    }


async def followup(handle, builder, turns) -> dict:
    """Each first turn, then its follow-up: the first turn's messages, the answer it got, a new
    question (what a chat client sends)."""
    params = SamplingParams(max_tokens=48, temperature=0.0)
    first, second = [], []
    reused = prompt_tokens = 0
    for prompt, imgs in turns:
        answer = await one_request(handle, prompt, imgs, params)
        first.append(answer["ttft"] * 1000)
        history = [FIRST, ChatMessage(role="assistant", content=answer["text"]), AGAIN]
        again = builder.build(to_template_messages(history), 48, [im.num_tokens for im in imgs])
        hits = (await handle.stats.remote())["prefix_cache_hit_tokens"]
        second.append((await one_request(handle, again, imgs, params))["ttft"] * 1000)
        reused += (await handle.stats.remote())["prefix_cache_hit_tokens"] - hits
        prompt_tokens += len(again.input_ids)
    return {
        "first_turn_ttft_ms": round(statistics.median(first), 1),
        "follow_up_ttft_ms": round(statistics.median(second), 1),
        "ratio": round(statistics.median(second) / statistics.median(first), 2),
        # Positions of the follow-ups' prompts whose KV came from the prefix cache.
        "reused": f"{reused} / {prompt_tokens}",
    }


async def bench(args) -> dict:
    import ray
    from ray import serve

    from deployments.model import LlavaModel

    base = {
        "model": {"name": args.model, "tiny_preset": args.preset},
        "engine": {"max_batch_size": 16, "max_queue": 1024},
        "llava_model": {"num_cpus": args.model_cpus, "max_ongoing_requests": 1024},
    }
    config = AppConfig.model_validate(base)
    adapter = checkpoint.load_adapter(config.model)
    builder = PromptBuilder(adapter, checkpoint.context_length(config.model))
    prompts = text_prompts(builder, 32 * args.rounds + 2, args.words)
    pairs = first_turns(config, builder, adapter, args.turns * args.rounds * len(SIDES))
    print(f"text prompts: {len(prompts[0][0].input_ids)} tokens; first turn {len(pairs[0][0].input_ids)}")
    ray.init(num_cpus=len(SIDES) * args.model_cpus + 1, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8299})
    handles = {}
    for i, (side, engine) in enumerate(SIDES.items()):
        cfg = AppConfig.model_validate({**base, "engine": {**base["engine"], **engine}})
        app = LlavaModel.options(**cfg.llava_model.to_serve_options()).bind(cfg)
        handles[side] = serve.run(app, name=f"prefill-{i}", route_prefix=None)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for handle in handles.values():  # warm-up
        await one_request(handle, prompts[-1][0], [], params)
    results: dict = {"preset": args.preset, "sides": {s: {"text600": [], "followup": []} for s in SIDES}}
    fresh = iter(pairs)  # each side sees images it has not seen
    for r in range(args.rounds):
        # The sides take turns, so drift in the machine's speed lands on both.
        for side, handle in handles.items():
            if "text600" in args.workloads:
                level = await text600(handle, prompts[32 * r : 32 * (r + 1)], 16)
                results["sides"][side]["text600"].append(level)
                print(f"  text600  {side}: {level}", flush=True)
            if "followup" not in args.workloads:
                continue
            fu = await followup(handle, builder, [next(fresh) for _ in range(args.turns)])
            results["sides"][side]["followup"].append(fu)
            print(f"  followup {side}: {fu}", flush=True)
    for i in range(len(SIDES)):
        serve.delete(f"prefill-{i}")
    serve.shutdown()
    ray.shutdown()
    return results


def table(results: dict) -> str:
    rows = [
        "| side | round | text600 tok/s | TTFT p50 / p99 ms | TPOT p50 ms | first turn TTFT ms | "
        "follow-up TTFT ms | follow-up / first | follow-up positions reused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for side, data in results["sides"].items():
        for r in range(max(len(data["text600"]), len(data["followup"]))):
            t = data["text600"][r] if data["text600"] else {}
            f = data["followup"][r] if data["followup"] else {}
            rows.append(
                f"| {side} | {r + 1} | {t.get('tok_s', '')} | {t.get('ttft_p50_ms', '')} / "
                f"{t.get('ttft_p99_ms', '')} | {t.get('tpot_p50_ms', '')} | "
                f"{f.get('first_turn_ttft_ms', '')} | {f.get('follow_up_ttft_ms', '')} | "
                f"{f.get('ratio', '')}x | {f.get('reused', '')} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small", "small-336"],
        help="small-336: the small model with LLaVA-1.5's 576-token images",
    )
    parser.add_argument(
        "--model", default="tiny", choices=["tiny", "tiny-next"], help="tiny-next: LLaVA-NeXT (tiled images)"
    )
    workloads = ["text600", "followup"]
    parser.add_argument("--workloads", nargs="+", default=workloads, choices=workloads)
    parser.add_argument("--words", type=int, default=280, help="words per text prompt (~2 tokens each)")
    parser.add_argument("--turns", type=int, default=4, help="conversations per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-cpus", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/prefill.json")
    args = parser.parse_args()
    results = asyncio.run(bench(args))
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
