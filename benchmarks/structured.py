"""Decode step time at batch 16 with 0 vs 8 constrained rows, side by side in one run.

    python benchmarks/structured.py                  # small preset (32k vocabulary), 5 rounds
    python benchmarks/structured.py --preset tiny --rounds 2 --tokens 32   # a quick look

The engine (the model replica's, without Serve around it) decodes 16 requests at once, every one
for exactly `--tokens` tokens: end-of-sequence is biased away (`logit_bias` -100) and the
constrained rows follow a schema that cannot end sooner (an array with at least as many items as
there are tokens). One side runs 16 free rows, the other 8 rows under that JSON schema and 8
free; the sides alternate, round after round, so drift on a noisy machine hits both alike. A
step's time is read at the client: from the batch's first token to its last, over the steps
between. The goal: constrained rows cost the batch < 10% more per step.
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

import torch

from benchmarks.report import save
from llava_serve import checkpoint, tiny
from llava_serve.config import EngineConfig, ModelConfig
from llava_serve.engine import Engine
from llava_serve.engine.sampling import SamplingParams
from llava_serve.prompts import PromptBuilder, to_template_messages
from llava_serve.protocol import ChatMessage
from llava_serve.structured.spec import OutputFormat


def schema(tokens: int) -> dict:
    """A receipt whose item list cannot close before `tokens` tokens (each item takes several)."""
    item = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "qty": {"type": "integer", "minimum": 1, "maximum": 99},
            "taxed": {"type": "boolean"},
        },
        "required": ["name", "qty", "taxed"],
    }
    return {
        "type": "object",
        "properties": {
            "currency": {"enum": ["EUR", "USD"]},
            "items": {"type": "array", "items": item, "minItems": tokens},
        },
        "required": ["currency", "items"],
    }


async def one(engine: Engine, input_ids: list[int], params: SamplingParams) -> tuple[float, float, int]:
    """(first token time, last token time, tokens) of one request, at the client."""
    first = last = None
    tokens = 0
    async for out in engine.generate(input_ids, [], params):
        last = time.perf_counter()
        first = first or last
        tokens = out.completion_tokens
    return first, last, tokens


async def step_time(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    results = await asyncio.gather(*[one(engine, ids, p) for ids, p in zip(prompts, params, strict=True)])
    assert all(tokens == params[0].max_tokens for *_, tokens in results), "a row ended early"
    first, last = max(r[0] for r in results), max(r[1] for r in results)
    return (last - first) / (params[0].max_tokens - 1)


async def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    path = tiny.ensure(args.preset)
    model = ModelConfig(name=str(path))
    engine = Engine.load(model, EngineConfig(max_batch_size=args.batch, stream_interval_s=0))
    builder = PromptBuilder(checkpoint.load_processor(model), 4096)
    prompts = [
        builder.build(
            to_template_messages([ChatMessage(role="user", content=f"Receipt {i} as JSON, please.")]), 8
        ).input_ids
        for i in range(args.batch)
    ]
    no_eos = tuple((eos, -100.0) for eos in engine.eos_ids)
    fmt = OutputFormat.from_schema(schema(args.tokens), "response_format")
    free = SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=0, logit_bias=no_eos)
    constrained = SamplingParams(
        max_tokens=args.tokens, temperature=1.0, seed=0, logit_bias=no_eos, output=fmt
    )
    sides = {
        "0 constrained": [free] * args.batch,
        f"{args.constrained} constrained": [constrained] * args.constrained
        + [free] * (args.batch - args.constrained),
    }
    await step_time(engine, prompts, sides[f"{args.constrained} constrained"])  # warm up, compile the schema
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, params in sides.items():
            times[name].append(await step_time(engine, prompts, params))
    await engine.shutdown()

    base = statistics.median(times["0 constrained"])
    print(f"\nbatch {args.batch}, {args.tokens} tokens per row, {args.rounds} rounds, preset {args.preset}")
    print(f"{'side':<16}{'step ms (median)':>18}{'min':>8}{'max':>8}{'vs free':>10}")
    rows = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        rows[name] = {
            "step_ms": [s * 1e3 for s in samples],
            "median_ms": median * 1e3,
            "ratio": median / base,
        }
        low, high = min(samples) * 1e3, max(samples) * 1e3
        print(f"{name:<16}{median * 1e3:>18.1f}{low:>8.1f}{high:>8.1f}{median / base:>9.3f}x")
    return {"sides": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--constrained", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    save(asyncio.run(main(args)), args)
