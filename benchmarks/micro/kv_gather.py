"""What attention over a paged KV cache costs on CPU through torch, against the slot views the
engine reads, side by side in one run: the deciding figure for slots over pages here.

    python benchmarks/micro/kv_gather.py   # the small preset's KV shape, 16 rows of 160 and 660 positions

A slot cache hands attention each layer's keys and values as a view, `[:rows, :, :length]`: no
bytes move before SDPA reads them. A paged cache keeps them in blocks scattered over a pool, and
without a paged-attention kernel each row's blocks must first be gathered into one tensor per
layer. Both sides then run the same decode-shaped SDPA (one query a row, grouped heads), so the
difference is the gather. Reported per row length: milliseconds per decode step over all layers
for each side, and the ratio. Compare it with a whole decode step of the small model at 16 rows
(~40-50 ms on this machine then; `benchmarks/decode_step.py` measures it now).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F

from benchmarks.report import median_ms, save

# The small preset's attention: 8 layers, 8 query heads over 4 KV heads of 64.
LAYERS, HEADS, KV_HEADS, DIM = 8, 8, 4, 64


def measure(rows: int, length: int, block: int, repeats: int) -> dict:
    blocks = -(-length // block)
    queries = torch.randn(rows, HEADS, 1, DIM)
    # Slots: one [slots, kv_heads, max_len, dim] tensor a layer, rows read as a view.
    slot_k = [torch.randn(rows, KV_HEADS, blocks * block, DIM) for _ in range(LAYERS)]
    slot_v = [torch.randn_like(k) for k in slot_k]
    # Pages: a pool of blocks twice what the rows need, each row's blocks scattered over it.
    pool_k = [torch.randn(2 * rows * blocks, KV_HEADS, block, DIM) for _ in range(LAYERS)]
    pool_v = [torch.randn_like(k) for k in pool_k]
    table = torch.randperm(2 * rows * blocks)[: rows * blocks].view(rows, blocks)

    def slots():
        for k, v in zip(slot_k, slot_v, strict=True):
            F.scaled_dot_product_attention(queries, k[:, :, :length], v[:, :, :length], enable_gqa=True)

    def pages():
        for k, v in zip(pool_k, pool_v, strict=True):
            k = k[table].transpose(1, 2).reshape(rows, KV_HEADS, blocks * block, DIM)[:, :, :length]
            v = v[table].transpose(1, 2).reshape(rows, KV_HEADS, blocks * block, DIM)[:, :, :length]
            F.scaled_dot_product_attention(queries, k, v, enable_gqa=True)

    slot_ms, page_ms = median_ms(slots, repeats), median_ms(pages, repeats)
    return {
        "rows": rows,
        "length": length,
        "block": block,
        "slots_ms": round(slot_ms, 2),
        "pages_ms": round(page_ms, 2),
        "ratio": round(page_ms / slot_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[160, 660])
    parser.add_argument("--block", type=int, default=16, help="positions a page")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/kv_gather.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [measure(args.rows, n, args.block, args.repeats) for n in args.lengths]
    print("| rows | positions a row | slot views ms | gathered pages ms | pages / slots |")
    print("|---|---|---|---|---|")
    for lv in levels:
        print(f"| {lv['rows']} | {lv['length']} | {lv['slots_ms']} | {lv['pages_ms']} | {lv['ratio']}x |")
    save({"levels": levels}, args)


if __name__ == "__main__":
    main()
