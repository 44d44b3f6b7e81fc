"""The engine in this process, without Serve around it: each side a config overlay, in one run.

    python benchmarks/engine.py decode        # image requests at concurrency 1 4 16 32: v1 settings vs v2
    python benchmarks/engine.py text          # ~600-token text prompts at concurrency 16
    python benchmarks/engine.py followup --preset small-336   # a follow-up turn about the same image
    python benchmarks/engine.py structured    # 16 rows decoding, 0 vs 8 of them under a JSON schema
    python benchmarks/engine.py tiles --model tiny-next       # TTFT of a 1-tile vs a 5-tile image
    python benchmarks/engine.py decode --side "v2=" --side 'budget 100={"max_stream_messages_per_s": 100}'

A side is `NAME=JSON`: `engine.*` settings laid over the defaults (`v1 settings` is the engine as
v1 scheduled: whole prompts in one step, no prefix cache, every stream on its own clock). Every
side's engine is loaded once, in this process, on the same weights; the sides take turns on the
same requests, the order rotated each round, so drift in the machine's speed lands on all. TTFT
is the first output with a token at the consumer of `Engine.stream`; TPOT is (last - first) /
(tokens - 1); loop lag is how late a 10 ms timer on this process's event loop (the one the engine
steps from) woke while the side ran. Prints a table, writes JSON with the commit it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from benchmarks.report import QUESTIONS, V1_SETTINGS, WORDS, pct, rotated, save, table
from llava_serve.api.messages import to_template_messages
from llava_serve.api.protocol import ChatMessage
from llava_serve.config import EngineConfig, ImageConfig, ModelConfig
from llava_serve.engine import Engine
from llava_serve.engine.sampling import SamplingParams
from llava_serve.inputs import images
from llava_serve.inputs.prompts import PromptBuilder
from llava_serve.models import checkpoint, tiny
from llava_serve.structured.spec import OutputFormat

DEFAULT_SIDES = {"v1 settings": V1_SETTINGS, "v2": {}}
FIRST = ChatMessage(
    role="user",
    content=[{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Describe it."}],
)
AGAIN = ChatMessage(role="user", content="What colour is the largest thing in it?")


class LoopLag:
    """A ticker that sleeps 10 ms and records how much later than asked it woke."""

    def __init__(self):
        self.samples: deque[float] = deque(maxlen=100_000)
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            self.samples.append(max(0.0, time.perf_counter() - t0 - 0.01) * 1000)

    def take_p99(self) -> float:
        p99 = round(pct(list(self.samples), 0.99), 1)
        self.samples.clear()
        return p99


def image_prompt(
    builder, adapter, rng: np.random.RandomState, question: str, max_tokens: int, base_only=False
):
    """(prompt ids, [image]) of a question about a fresh random picture, prepared as the serving
    path prepares it."""
    pixels = rng.randint(0, 256, (rng.randint(60, 300), rng.randint(60, 300), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    image = images.prepare(buf.getvalue(), adapter, ImageConfig(), None, base_only)
    msg = ChatMessage(
        role="user",
        content=[{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": question}],
    )
    return builder.build(to_template_messages([msg]), max_tokens, [image.num_tokens]).input_ids, [image]


class Bench:
    """The checkpoint's prompt builder and adapter, and one engine per side on its weights."""

    def __init__(self, args):
        arch = "llava_next" if args.model == "tiny-next" else "llava"
        self.model = ModelConfig(name=str(tiny.ensure(args.preset, arch=arch)))
        self.adapter = checkpoint.load_adapter(self.model)
        self.builder = PromptBuilder(self.adapter, checkpoint.context_length(self.model))
        base = {"max_batch_size": args.batch, "max_queue": 4096}
        self.engines = {
            name: Engine.load(self.model, EngineConfig(**base, **overlay))
            for name, overlay in args.sides.items()
        }

    def image_request(self, rng: np.random.RandomState, question: str, max_tokens: int, base_only=False):
        return image_prompt(self.builder, self.adapter, rng, question, max_tokens, base_only)

    def text_request(self, rng: np.random.RandomState, words: int, max_tokens: int):
        text = " ".join(rng.choice(WORDS, words)) + ". Summarize."
        msgs = to_template_messages([ChatMessage(role="user", content=text)])
        return self.builder.build(msgs, max_tokens, []).input_ids, []

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.shutdown()


async def one(engine: Engine, ids: list[int], imgs: list, params: SamplingParams) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens, text = 0, ""
    async for out in engine.generate(ids, imgs, params):
        if out.completion_tokens > tokens:
            last = time.perf_counter()
            first = first or last
        tokens, text = out.completion_tokens, text + out.text
    return {"ttft": first - t0, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens, "text": text}


async def closed(engine: Engine, reqs: list, concurrency: int, params: SamplingParams) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def bounded(req):
        async with sem:
            return await one(engine, *req, params)

    t0 = time.perf_counter()
    results = await asyncio.gather(*[bounded(r) for r in reqs])
    wall = time.perf_counter() - t0
    ttft, tpot = [r["ttft"] * 1000 for r in results], [r["tpot"] * 1000 for r in results]
    return {
        "concurrency": concurrency,
        "requests": len(reqs),
        "tok_s": round(sum(r["tokens"] for r in results) / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5)),
        "ttft_p99_ms": round(pct(ttft, 0.99)),
        "tpot_p50_ms": round(pct(tpot, 0.5), 1),
        "tpot_p99_ms": round(pct(tpot, 0.99), 1),
    }


def ratio_rows(results: dict, key: str, cells) -> list[list]:
    """Each side's runs in order, with `key` against the first side's."""
    names = list(results["sides"])
    rows = []
    for i in range(len(results["sides"][names[0]])):
        base = results["sides"][names[0]][i][key]
        for name in names:
            x = results["sides"][name][i]
            rows.append([name, *cells(x), f"{x[key] / base:.2f}x"])
    return rows


# -- workloads --------------------------------------------------------------------------------


async def decode(args, bench: Bench, lag: LoopLag) -> dict:
    """Image requests (each a fresh image) at each concurrency, greedy, `--max-tokens` each."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rng = np.random.RandomState(args.seed)
    results: dict = {"sides": {name: [] for name in bench.engines}}
    for engine in bench.engines.values():
        await closed(engine, [bench.image_request(rng, "Hi", 4) for _ in range(2)], 2, params)
    for r in range(args.rounds):
        for c in args.concurrency:
            n = max(10, 2 * c)
            reqs = [bench.image_request(rng, QUESTIONS[i % 4], args.max_tokens) for i in range(n)]
            for name in rotated(list(bench.engines), r):
                lag.take_p99()
                level = await closed(bench.engines[name], reqs, c, params) | {"round": r + 1}
                level["loop_lag_p99_ms"] = lag.take_p99()
                results["sides"][name].append(level)
                print(f"  round {r + 1} {name}: {level}", flush=True)
    rows = ratio_rows(
        results,
        "tok_s",
        lambda x: [
            x["round"],
            f"{x['concurrency']} ({x['requests']})",
            x["tok_s"],
            f"{x['ttft_p50_ms']} / {x['ttft_p99_ms']}",
            f"{x['tpot_p50_ms']} / {x['tpot_p99_ms']}",
            x["loop_lag_p99_ms"],
        ],
    )
    headers = ["side", "round", "concurrency (requests)", "tok/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms"]
    results["table"] = table([*headers, "loop lag p99 ms", "tok/s vs first side"], rows)
    return results


async def text(args, bench: Bench, lag: LoopLag) -> dict:
    """32 distinct text prompts of `--words` words (~2 tokens each) at concurrency 16, 64 tokens."""
    params = SamplingParams(max_tokens=64, temperature=0.0)
    rng = np.random.RandomState(args.seed)
    results: dict = {"sides": {name: [] for name in bench.engines}}
    for engine in bench.engines.values():
        await closed(engine, [bench.text_request(rng, 8, 4)], 1, params)
    for r in range(args.rounds):
        reqs = [bench.text_request(rng, args.words, 64) for _ in range(32)]
        for name in rotated(list(bench.engines), r):
            level = await closed(bench.engines[name], reqs, 16, params) | {"round": r + 1}
            level["prompt_tokens"] = len(reqs[0][0])
            results["sides"][name].append(level)
            print(f"  round {r + 1} {name}: {level}", flush=True)
    rows = ratio_rows(
        results,
        "ttft_p50_ms",
        lambda x: [
            x["round"],
            x["prompt_tokens"],
            x["tok_s"],
            f"{x['ttft_p50_ms']} / {x['ttft_p99_ms']}",
            x["tpot_p50_ms"],
        ],
    )
    headers = ["side", "round", "prompt tokens", "tok/s", "TTFT p50 / p99 ms", "TPOT p50 ms"]
    results["table"] = table([*headers, "TTFT p50 vs first side"], rows)
    return results


async def followup(args, bench: Bench, lag: LoopLag) -> dict:
    """A first turn about a fresh image, then, once it has finished, the follow-up a chat client
    sends (the first message, the answer it got, a new question), one at a time: TTFT of each."""
    params = SamplingParams(max_tokens=48, temperature=0.0)
    rng = np.random.RandomState(args.seed)
    results: dict = {"sides": {name: [] for name in bench.engines}}
    for r in range(args.rounds):
        for name in rotated(list(bench.engines), r):
            engine, first, second, reused, positions = bench.engines[name], [], [], 0, 0
            for _ in range(args.turns):  # each side sees images it has not seen
                ids, imgs = bench.image_request(rng, "Describe it.", 48)
                answer = await one(engine, ids, imgs, params)
                first.append(answer["ttft"] * 1000)
                history = [FIRST, ChatMessage(role="assistant", content=answer["text"]), AGAIN]
                again = bench.builder.build(to_template_messages(history), 48, [i.num_tokens for i in imgs])
                hits = engine.stats()["prefix_cache_hit_tokens"]
                second.append((await one(engine, again.input_ids, imgs, params))["ttft"] * 1000)
                reused += engine.stats()["prefix_cache_hit_tokens"] - hits
                positions += len(again.input_ids)
            level = {
                "round": r + 1,
                "first_turn_ttft_ms": round(statistics.median(first), 1),
                "follow_up_ttft_ms": round(statistics.median(second), 1),
                "ratio": round(statistics.median(second) / statistics.median(first), 2),
                "reused": f"{reused} / {positions}",  # follow-up positions whose KV came from the cache
            }
            results["sides"][name].append(level)
            print(f"  round {r + 1} {name}: {level}", flush=True)
    rows = [
        [name, x["round"], x["first_turn_ttft_ms"], x["follow_up_ttft_ms"], f"{x['ratio']}x", x["reused"]]
        for name, levels in results["sides"].items()
        for x in levels
    ]
    headers = ["side", "round", "first turn TTFT ms", "follow-up TTFT ms", "follow-up / first"]
    results["table"] = table([*headers, "follow-up positions reused"], rows)
    return results


def receipt(items: int) -> dict:
    """A receipt whose item list cannot close before `items` items (each takes several tokens)."""
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
            "items": {"type": "array", "items": item, "minItems": items},
        },
        "required": ["currency", "items"],
    }


async def structured(args, bench: Bench, lag: LoopLag) -> dict:
    """`--batch` rows decoding `--max-tokens` each (end-of-sequence biased away), 0 and then
    `--constrained` of them under a schema that cannot end sooner: the decode step's time."""

    async def step_ms(engine: Engine, params: list[SamplingParams]) -> float:
        runs = await asyncio.gather(
            *[one(engine, ids, [], p) for (ids, _), p in zip(prompts, params, strict=True)]
        )
        assert all(r["tokens"] == args.max_tokens for r in runs), "a row ended early"
        return statistics.median(r["tpot"] for r in runs) * 1000

    rng = np.random.RandomState(args.seed)
    prompts = [bench.text_request(rng, 6, args.max_tokens) for _ in range(args.batch)]
    results: dict = {"sides": {}}
    rows = []
    for name, engine in bench.engines.items():
        no_eos = tuple((eos, -100.0) for eos in engine.eos_ids)
        fmt = OutputFormat.from_schema(receipt(args.max_tokens), "response_format")
        free = SamplingParams(args.max_tokens, temperature=1.0, seed=0, logit_bias=no_eos)
        bound = SamplingParams(args.max_tokens, temperature=1.0, seed=0, logit_bias=no_eos, output=fmt)
        mixes = {
            "0 constrained": [free] * args.batch,
            f"{args.constrained} constrained": [bound] * args.constrained
            + [free] * (args.batch - args.constrained),
        }
        await step_ms(engine, mixes[f"{args.constrained} constrained"])  # warm up, compile the schema
        times: dict[str, list[float]] = {mix: [] for mix in mixes}
        for r in range(args.rounds):
            for mix in rotated(list(mixes), r):
                times[mix].append(await step_ms(engine, mixes[mix]))
        base = statistics.median(times["0 constrained"])
        results["sides"][name] = times
        for mix, samples in times.items():
            median = statistics.median(samples)
            rows.append(
                [
                    name,
                    mix,
                    f"{median:.1f}",
                    f"{min(samples):.1f} / {max(samples):.1f}",
                    f"{median / base:.3f}x",
                ]
            )
    results["table"] = table(["side", "rows", "step ms (median)", "min / max", "vs free"], rows)
    return results


async def tiles(args, bench: Bench, lag: LoopLag) -> dict:
    """On an anyres checkpoint (`--model tiny-next`): the prompt tokens an image becomes at each
    detail, and TTFT of the same-sized image as 1 tile (detail low) and as 5 (base + 2x2)."""
    params = SamplingParams(max_tokens=4, temperature=0.0)
    rng = np.random.RandomState(args.seed)

    async def ttft(engine: Engine, base_only: bool) -> float:
        start = time.perf_counter()  # the image's preprocessing is part of what more tiles cost
        ids, imgs = bench.image_request(rng, "Hi", 4, base_only)
        await one(engine, ids, imgs, params)
        return (time.perf_counter() - start) * 1000

    results: dict = {"sides": {}}
    rows = []
    for name, engine in bench.engines.items():
        await ttft(engine, False)
        times: dict[str, list[float]] = {"1 tile (detail low)": [], "5 tiles (detail high)": []}
        for _ in range(args.rounds):
            times["1 tile (detail low)"].append(await ttft(engine, True))
            times["5 tiles (detail high)"].append(await ttft(engine, False))
        base = statistics.median(times["1 tile (detail low)"])
        results["sides"][name] = times
        for label, samples in times.items():
            median = statistics.median(samples)
            rows.append([name, label, f"{median:.1f}", f"{pct(samples, 0.9):.1f}", f"{median / base:.2f}x"])
    results["table"] = table(["side", "image", "TTFT ms (median)", "p90", "vs 1 tile"], rows)
    return results


WORKLOADS = {"decode": decode, "text": text, "followup": followup, "structured": structured, "tiles": tiles}
ONE_SIDE = {"structured", "tiles"}  # sides differ within the workload


def sides(specs: list[str] | None, workload: str) -> dict[str, dict]:
    if not specs:
        return {"v2": {}} if workload in ONE_SIDE else dict(DEFAULT_SIDES)
    out = {}
    for spec in specs:
        name, _, overlay = spec.partition("=")
        out[name] = V1_SETTINGS if name == "v1 settings" and not overlay else json.loads(overlay or "{}")
    return out


async def run(args) -> dict:
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    lag = LoopLag()
    try:
        return await WORKLOADS[args.workload](args, bench, lag)
    finally:
        await bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument(
        "--side", action="append", help='NAME=JSON of engine.* settings ("v1 settings" alone: v1)'
    )
    parser.add_argument("--preset", default="small", choices=sorted(tiny.PRESETS))
    parser.add_argument(
        "--model", default="tiny", choices=["tiny", "tiny-next"], help="tiny-next: LLaVA-NeXT"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32], help="decode")
    parser.add_argument("--max-tokens", type=int, default=64, help="decode, structured")
    parser.add_argument("--words", type=int, default=280, help="text: words per prompt (~2 tokens each)")
    parser.add_argument("--turns", type=int, default=4, help="followup: conversations per side a round")
    parser.add_argument("--constrained", type=int, default=8, help="structured: rows under the schema")
    parser.add_argument("--batch", type=int, default=16, help="engine.max_batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/engine-WORKLOAD.json")
    args = parser.parse_args()
    args.out = args.out or f"benchmarks/results/engine-{args.workload}.json"
    args.sides = sides(args.side, args.workload)
    if args.workload == "tiles" and args.model == "tiny":
        args.model = "tiny-next"  # the tiling is what it measures
    results = asyncio.run(run(args))
    print(results["table"])
    save(results, args)


if __name__ == "__main__":
    main()
