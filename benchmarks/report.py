"""What every benchmark shares: percentiles, a median timer, a Markdown table, and at the end
keeping the run's arguments with its results in JSON. Imports nothing of `llava_serve`, so a
benchmark running another tree can use it."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# What the drivers ask: the questions of image requests, the words text prompts are made of, and
# the engine settings that make it schedule as engine v1 did (whole prompts in one step, nothing
# kept across requests, every stream on its own clock), laid over the defaults.
QUESTIONS = [
    "What is in this image?",
    "Describe the picture in detail.",
    "Is there an animal here?",
    "What colours dominate?",
]
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
V1_SETTINGS = {"max_step_tokens": 1 << 20, "prefix_cache_bytes": 0, "max_stream_messages_per_s": 0}


def rotated(sides: list, r: int) -> list:
    """The sides in turn, starting one later each round, so drift in the machine's speed lands on all."""
    k = r % len(sides)
    return sides[k:] + sides[:k]


def pct(values: list[float], q: float) -> float:
    """The q-quantile of `values` (the standard library's, inclusive); NaN when there are none."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table, as the README and docs/performance.md show results."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` calls of `fn`, after three untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def commit() -> str:
    """The commit the benchmark ran on (with `+dirty` when the tree had changes)."""
    root = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def save(results: dict, args: argparse.Namespace) -> None:
    results["args"] = vars(args)
    results["commit"] = commit()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
