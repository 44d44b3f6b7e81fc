"""The engine on a GPU: random fp16 weights shaped like llava-1.5-7b, built on the device (nothing
downloads), measured against what the hardware allows.

    python benchmarks/gpu.py                            # needs CUDA; otherwise prints why it skipped
    python benchmarks/gpu.py --allow-cpu --shape small  # the same code path on CPU, small shapes

Reported, side by side in one run:
- batch-1 time per output token (a 600-token prompt, then decode steps) next to the HBM floor:
  the bytes of the language model's weights (read once per step) over the device's copy
  bandwidth, measured here with a large device-to-device copy;
- tokens/s of 32 rows decoding together (256-token prompts);
- the same two with the v1 runner (left-padded `DynamicCache`, loaded from git `--v1-commit`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.micro.kv_cache import v1_runner_class
from benchmarks.report import save
from tests.support.probes import WholeRunner
from tests.support.shapes import SHAPES, build


def bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write), best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_weight_bytes(model) -> int:
    """What one decode step must read: the language model and its output head."""
    lm = model.model.language_model
    params = [*lm.parameters(), model.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in params)


@torch.inference_mode()
def decode_time(runner, rows: int, prompt_len: int, steps: int, device: torch.device) -> float:
    """Median seconds per decode step of `rows` rows after their prompts."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 32000, (prompt_len,), generator=gen).tolist() for _ in range(rows)]
    prefill = getattr(runner, "prefill_whole", None) or runner.prefill  # v2 (WholeRunner) or v1
    logits = prefill(list(range(rows)), [(p, []) for p in prompts])
    runner.commit(logits.argmax(-1).tolist())
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        tokens = runner.decode().argmax(-1)
        runner.set_last_tokens(tokens.tolist())  # the engine's one copy to the host per step
        times.append(time.perf_counter() - start)
    runner.keep(set())
    return statistics.median(times[2:])


def main(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(
            json.dumps(
                {"skipped": "no CUDA device here; this benchmark measures a GPU's memory bandwidth use"}
            )
        )
        sys.exit(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build(args.shape, device, dtype)
    weights = text_weight_bytes(model)
    bw = bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 26)
    floor_ms = weights / bw * 1e3
    sides = {
        "v1 DynamicCache": lambda: v1_runner_class(args.v1_commit)(model, 0),
        "v2 slot KV": lambda: WholeRunner(model, 0, slots=32, max_len=1024),
    }
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "weight_bytes": weights,
        "bandwidth_gb_s": round(bw / 1e9, 1),
        "floor_ms": round(floor_ms, 3),
        "sides": {},
    }
    for name, make in sides.items():
        runner = make()
        one = decode_time(runner, 1, 600, args.steps, device)
        many = decode_time(runner, 32, 256, args.steps, device)
        out["sides"][name] = {
            "tpot_b1_ms": round(one * 1e3, 3),
            "vs_floor": round(one * 1e3 / floor_ms, 2),
            "tok_s_b32": round(32 / many, 1),
        }
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        f"\n{out['device']}, {args.shape} shapes, weights {weights / 2**30:.2f} GiB, "
        f"copy bandwidth {out['bandwidth_gb_s']} GB/s, HBM floor {floor_ms:.2f} ms/token"
    )
    print("| runner | batch-1 ms/token | x floor | tok/s at 32 rows |\n|---|---|---|---|")
    for name, r in out["sides"].items():
        print(f"| {name} | {r['tpot_b1_ms']} | {r['vs_floor']}x | {r['tok_s_b32']} |")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--v1-commit", default="86f0b57")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU (a check of the code path)")
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    save(main(args), args)
