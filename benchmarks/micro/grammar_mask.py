"""Per-step cost of grammar-constrained sampling: xgrammar vs llguidance, side by side in one run.

    pip install --no-deps xgrammar apache-tvm-ffi llguidance   # not project dependencies (yet)
    python benchmarks/micro/grammar_mask.py

The choice for structured outputs (issue: response_format / forced tool calls) rests on this:
a 32 000-token byte-level BPE vocabulary (the small preset's), a batch of 16 rows of random
logits, and for each library the time per decode step to fill the token bitmask of each
constrained row, apply it to the logits, pick a token and advance the matcher, with 0, 8 and 16
of the 16 rows constrained by the same nested JSON schema. The unconstrained step (argmax over
the batch) is the baseline both are measured against.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.report import pct, save

SCHEMA = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 40},
        "total": {"type": "number"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 8,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["name", "qty"],
            },
        },
        "paid": {"type": "boolean"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
    },
    "required": ["merchant", "total", "items"],
}


def tokenizer(vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    from llava_serve.models import tiny

    raw = tiny.build_tokenizer(vocab_size, 0)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab: int, rows: int):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        start = time.perf_counter()
        self.compiled = xgr.GrammarCompiler(info).compile_json_schema(SCHEMA)
        self.compile_s = time.perf_counter() - start
        self.matchers = [xgr.GrammarMatcher(self.compiled) for _ in range(rows)]
        self.bitmask = xgr.allocate_token_bitmask(rows, vocab)

    def step(self, logits: torch.Tensor) -> None:
        for i, m in enumerate(self.matchers):
            m.fill_next_token_bitmask(self.bitmask, i)
        rows = logits[: len(self.matchers)]
        self.xgr.apply_token_bitmask_inplace(rows, self.bitmask)
        for m, token in zip(self.matchers, rows.argmax(-1).tolist(), strict=True):
            if m.is_terminated() or not m.accept_token(token):
                m.reset()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab: int, rows: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llt = llguidance.torch
        ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
        self.matchers = [llguidance.LLMatcher(ll_tok, grammar) for _ in range(rows)]
        self.compile_s = time.perf_counter() - start
        self.make = lambda: llguidance.LLMatcher(ll_tok, grammar)
        self.bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab)

    def step(self, logits: torch.Tensor) -> None:
        for i, m in enumerate(self.matchers):
            self.llt.fill_next_token_bitmask(m, self.bitmask, i)
        rows = logits[: len(self.matchers)]
        self.llt.apply_token_bitmask_inplace(rows, self.bitmask)
        for i, token in enumerate(rows.argmax(-1).tolist()):
            m = self.matchers[i]
            if m.is_stopped() or not m.consume_token(token):
                self.matchers[i] = self.make()


def timed(step, vocab: int, batch: int, steps: int) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, generator=generator)
        start = time.perf_counter()
        step(logits)
        logits.argmax(-1).tolist()  # what every step does, constrained or not
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/grammar_mask.json")
    args = parser.parse_args()
    tok = tokenizer(args.vocab)
    vocab = len(tok)
    base = statistics.median(timed(lambda logits: None, vocab, args.batch, args.steps))
    results = {"vocab": vocab, "batch": args.batch, "unconstrained_ms": base * 1000, "libraries": {}}
    print(f"vocabulary {vocab}, batch {args.batch}, unconstrained step (argmax) {base * 1000:.3f} ms\n")
    print("| library | schema compile ms | constrained rows | step p50 ms | step p99 ms | mask per row ms |")
    print("|---|---|---|---|---|---|")
    for kind in (XGrammar, LLGuidance):
        for rows in (0, args.batch // 2, args.batch):
            lib = kind(tok, vocab, rows) if rows else None
            step = lib.step if lib else (lambda logits: None)
            times = sorted(timed(step, vocab, args.batch, args.steps))
            p50, p99 = statistics.median(times), pct(times, 0.99)
            per_row = (p50 - base) / rows if rows else 0.0
            compile_ms = lib.compile_s * 1000 if lib else 0.0
            results["libraries"].setdefault(kind.name, []).append(
                {"rows": rows, "p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "compile_ms": compile_ms}
            )
            print(
                f"| {kind.name} | {compile_ms:.1f} | {rows} | {p50 * 1000:.3f} | {p99 * 1000:.3f} "
                f"| {per_row * 1000:.3f} |"
            )
    save(results, args)


if __name__ == "__main__":
    main()
