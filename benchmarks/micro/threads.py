"""Decode steps under the CPU threading choices a model replica can make, side by side in one run.

    python benchmarks/micro/threads.py                       # small preset, rows 1 4 16
    python benchmarks/micro/threads.py --rows 1 --seconds 5

Each case runs in fresh processes (OpenMP's thread teams are fixed per process), one after the
other, decoding a runner's rows for `--seconds` on the thread that steps it:
- `one team`: the model loaded on the stepping thread, as `Engine.load` does;
- `two teams`: the model loaded on the main thread and stepped on another (how the engine ran
  before): the process then holds more OpenMP threads than cores, and libgomp stops its idle
  threads spinning;
- each with 2 torch threads and with 1, alone and with a second identical process stepping at the
  same time on the same cores (what a replica sharing its cores with another busy process sees).
Reported: median and p90 milliseconds per decode step. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.report import pct, save

CASES = [  # (name, load on the stepping thread, torch threads)
    ("one team, 2 threads", True, 2),
    ("two teams, 2 threads", False, 2),
    ("1 thread", True, 1),
]


def child(preset: str, rows: int, seconds: float, same_thread: bool, threads: int) -> dict:
    """One process's measurement (run with --child)."""
    import torch

    from llava_serve.config import ModelConfig
    from llava_serve.models import checkpoint
    from tests.support.probes import WholeRunner

    torch.set_num_threads(threads)
    stepper = ThreadPoolExecutor(1)

    def build() -> WholeRunner:
        model = checkpoint.load_model(ModelConfig(name="tiny", tiny_preset=preset))
        runner = WholeRunner(model, 0, slots=rows, max_len=4096)
        ids = torch.randint(
            10, runner.vocab_size - 10, (rows, 200), generator=torch.Generator().manual_seed(0)
        )
        runner.commit(
            runner.prefill_whole(list(range(rows)), [(p, []) for p in ids.tolist()]).argmax(-1).tolist()
        )
        return runner

    runner = stepper.submit(build).result() if same_thread else build()

    def steps() -> list[float]:
        times, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            logits = runner.decode()
            runner.set_last_tokens(logits.argmax(-1).tolist())
            times.append(time.perf_counter() - t0)
        return times

    stepper.submit(steps).result()  # warm-up, and the partner process's start overlaps it
    times = stepper.submit(steps).result()
    return {"p50_ms": round(pct(times, 0.5) * 1000, 1), "p90_ms": round(pct(times, 0.9) * 1000, 1)}


def run_case(args, rows: int, same_thread: bool, threads: int, processes: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--seconds", str(args.seconds)]
    cmd += ["--rows", str(rows), "--same-thread", str(int(same_thread)), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"p50_ms": max(o["p50_ms"] for o in outs), "p90_ms": max(o["p90_ms"] for o in outs)}


def bench(args) -> dict:
    results: dict = {"preset": args.preset, "cases": []}
    for rows in args.rows:
        for name, same_thread, threads in CASES:
            for processes in (1, 2):
                got = run_case(args, rows, same_thread, threads, processes)
                row = {"rows": rows, "case": name, "processes": processes, **got}
                results["cases"].append(row)
                print(row, flush=True)
    return results


def table(results: dict) -> str:
    lines = [
        "| rows | case | alone: step p50 / p90 ms | two processes at once: p50 / p90 ms |",
        "|---|---|---|---|",
    ]
    by = {(r["rows"], r["case"], r["processes"]): r for r in results["cases"]}
    for rows in sorted({r["rows"] for r in results["cases"]}):
        for name, _, _ in CASES:
            one, two = by[(rows, name, 1)], by[(rows, name, 2)]
            lines.append(
                f"| {rows} | {name} | {one['p50_ms']} / {one['p90_ms']} | {two['p50_ms']} / {two['p90_ms']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", default="benchmarks/results/threads.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--same-thread", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(child(args.preset, args.rows[0], args.seconds, bool(args.same_thread), args.threads))
        )
        return
    results = bench(args)
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
