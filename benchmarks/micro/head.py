"""Linear layers as `nn.Linear` computes them against the turned-round product
(`llava_serve/engine/linear.py`), side by side in one run: the output projection alone, then a
whole decode step of the runner three ways: nothing turned, the output head turned, and the head
and the decoder's linears turned (what the runner does on CPU).

    python benchmarks/micro/head.py                    # small preset, rows 1 2 4 8 16 32
    python benchmarks/micro/head.py --rows 1 16 --repeats 50

The sides take turns row count by row count, on the same weights and hidden states, with the
runner's own torch threads (2 unless `--threads`), all on one thread as in the engine. Reported:
median milliseconds per call and the ratios (linear / turned; above 1 means turned is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from benchmarks.report import median_ms, save
from llava_serve.config import ModelConfig
from llava_serve.engine.head import OutputHead
from llava_serve.models import checkpoint
from tests.support.probes import WholeRunner


def fill(runner: WholeRunner, rows: int, prompt_len: int) -> None:
    runner.keep([])
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(10, runner.vocab_size - 10, (rows, prompt_len), generator=g).tolist()
    prompts = [(p, []) for p in ids]
    runner.prefill_whole(list(range(rows)), prompts)
    runner.commit([5] * rows)


@torch.inference_mode()
def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    model = checkpoint.load_model(ModelConfig(name="tiny", tiny_preset=args.preset))
    linear = model.get_output_embeddings()
    head = OutputHead(linear)
    runner = WholeRunner(model, 0, slots=max(args.rows), max_len=args.prompt_len + 4 * args.repeats + 16)
    hidden_size = linear.weight.shape[1]
    out = {"preset": args.preset, "vocab": head.vocab_size, "hidden": hidden_size, "rows": []}
    for rows in args.rows:
        hidden = torch.randn(rows, hidden_size, dtype=linear.weight.dtype)
        fill(runner, rows, args.prompt_len)
        row = {
            "rows": rows,
            "projection_linear_ms": median_ms(lambda: linear(hidden), args.repeats),  # noqa: B023
            "projection_head_ms": median_ms(lambda: head(hidden), args.repeats),  # noqa: B023
        }
        for side, head_turned, linears_turned in (
            ("linear", False, False),
            ("head", True, False),
            ("all", True, True),
        ):
            runner.head.turned, runner.turn_linears = head_turned, linears_turned
            row[f"decode_{side}_ms"] = median_ms(runner.decode, args.repeats)
        out["rows"].append(row)
        print(row, flush=True)
    return out


def table(results: dict) -> str:
    lines = [
        f"output projection {results['vocab']} x {results['hidden']} ({results['preset']} preset)",
        "| rows | projection: linear ms | turned ms | ratio | decode step: nothing turned ms "
        "| head turned ms | head + decoder turned ms | ratio (nothing / all) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['rows']} | {r['projection_linear_ms']} | {r['projection_head_ms']} | "
            f"{r['projection_linear_ms'] / r['projection_head_ms']:.2f}x | {r['decode_linear_ms']} | "
            f"{r['decode_head_ms']} | {r['decode_all_ms']} | "
            f"{r['decode_linear_ms'] / r['decode_all_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/head.json")
    args = parser.parse_args()
    results = bench(args)
    print(table(results))
    save(results, args)


if __name__ == "__main__":
    main()
