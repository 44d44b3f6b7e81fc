"""The engine's own step kernels next to what they replace, in one process, the sides alternating.

    python benchmarks/micro/step_kernels.py                  # the small preset's shapes
    python benchmarks/micro/step_kernels.py --rows 1 16 --repeats 50

- **products**: every float32 product of a step of the small preset (8 layers of q/k/v, o,
  gate/up and down, and the output head: 158 MB of weights, each a distinct tensor, so they come
  from memory as in a step) on the engine's panels (`kernels/products.cpp`) on 2 MB pages as the
  engine keeps them (`engine/memory.py`), the same panels on torch's ordinary 4 KB pages, and
  oneDNN on weights reordered once (`torch.ops.mkldnn._linear_pointwise`, what `packed.py` ran
  before), at each row count (above 64 rows, prompt chunks: no head).
- **bfloat16 products**: the same products in bfloat16 (79 MB) on the engine's AMX tiles
  (`kernels/tiles.cpp`) on 2 MB pages, the same tiles on 4 KB pages, and oneDNN's bfloat16 kernel
  (AMX too) on weights reordered once, where this CPU has AMX.
- **decode attention**: one layer's decode rows (8 query heads on 4 key heads of 64, slots of
  336 positions, float32 and bfloat16) on the engine's decode attention (`kernels/attention.cpp`)
  against SDPA as `attention.attend` runs it (the heads sharing a key head as its queries; a
  boolean mask when the rows' lengths differ), with every row at 290 positions and with lengths
  spread over 40-300.

The figure is the median of `--repeats`; the largest difference between the sides' outputs says
they compute the same thing. Prints a table, writes JSON with the commit it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.report import save, table  # noqa: E402
from llava_serve.engine import kernels, memory  # noqa: E402

# The small preset: hidden 512, MLP 1376, 8 heads and 4 key heads of 64, vocabulary 32000.
LAYER = [(1024, 512), (512, 512), (2752, 512), (512, 1376)]
LAYERS, VOCAB, HIDDEN = 8, 32000, 512


def alternate(sides: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(repeats + 2):
        for name, fn in sides.items() if r % 2 else reversed(sides.items()):
            start = time.perf_counter()
            fn()
            if r >= 2:  # the first two are warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


# The engine's two product kernels: how each lays out a weight, computes, and in what dtype.
KERNELS = {
    "panels": (torch.float32, "panel_pack", "panel_linear"),
    "tiles": (torch.bfloat16, "tile_pack", "tile_linear"),
}


@torch.inference_mode()
def products(ops, rows: int, repeats: int, kernel: str) -> dict:
    """One step's products on `kernel` (on 2 MB pages as the engine keeps them, and on torch's own
    4 KB pages) against oneDNN on weights reordered once, in the kernel's dtype."""
    dtype, pack, linear = KERNELS[kernel]
    g = torch.Generator().manual_seed(rows)
    shapes = LAYER * LAYERS + ([(VOCAB, HIDDEN)] if rows <= 64 else [])
    weights = [(torch.randn(n, k, generator=g) / k**0.5).to(dtype) for n, k in shapes]
    plain = [getattr(ops, pack)(w) for w in weights]
    ours = [memory.copy(p) for p in plain]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    inputs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in {k for _, k in shapes}}
    out: dict[str, torch.Tensor] = {}

    def on(packed: list[torch.Tensor], key: str):
        def run():
            for w, p in zip(weights, packed, strict=True):
                out[key] = getattr(ops, linear)(inputs[w.shape[1]], p, None, w.shape[0])

        return run

    def theirs():
        for w, p in zip(weights, onednn, strict=True):
            out["onednn"] = torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")

    ms = alternate({"ours": on(ours, "ours"), "ours_4k": on(plain, "4k"), "onednn": theirs}, repeats)
    megabytes = sum(n * k for n, k in shapes) * dtype.itemsize / 1e6
    return {
        "kernel": kernel,
        "rows": rows,
        "weights_mb": round(megabytes),
        "ours_ms": ms["ours"],
        "ours_4k_ms": ms["ours_4k"],
        "onednn_ms": ms["onednn"],
        "gb_s": megabytes / ms["ours"],
        "max_abs_diff": (out["ours"].float() - out["onednn"].float()).abs().max().item(),
    }


def product_table(results: list[dict]) -> str:
    kernel = results[0]["kernel"]
    dtype = "" if kernel == "panels" else "bf16 "
    header = ["rows", f"{dtype}weights MB", f"{kernel} ms", "4 KB pages ms", f"oneDNN {dtype}ms"]
    header += [f"{kernel}/oneDNN", f"{kernel} GB/s", "max |diff|"]
    return table(
        header,
        [
            [
                r["rows"],
                r["weights_mb"],
                f"{r['ours_ms']:.2f}",
                f"{r['ours_4k_ms']:.2f}",
                f"{r['onednn_ms']:.2f}",
                f"{r['ours_ms'] / r['onednn_ms']:.2f}x",
                f"{r['gb_s']:.1f}",
                f"{r['max_abs_diff']:.1e}",
            ]
            for r in results
        ],
    )


@torch.inference_mode()
def attention(ops, rows: int, ragged: bool, dtype: torch.dtype, repeats: int) -> dict:
    heads, kv_heads, dim, slot_len = 8, 4, 64, 336
    g = torch.Generator().manual_seed(rows)
    query = torch.randn(rows, heads, dim, generator=g).to(dtype)
    keys = torch.randn(rows, kv_heads, slot_len, dim, generator=g).to(dtype)
    values = torch.randn(rows, kv_heads, slot_len, dim, generator=g).to(dtype)
    lengths = torch.linspace(40, 300, rows).long() if ragged else torch.full((rows,), 290)
    kv_len = int(lengths.max())
    mask = (torch.arange(kv_len)[None] < lengths[:, None])[:, None, None] if ragged else None
    out: dict[str, torch.Tensor] = {}

    def ours():
        out["ours"] = ops.decode_attention(query, keys, values, lengths, dim**-0.5)

    def sdpa():
        q = query.reshape(rows, kv_heads, heads // kv_heads, dim)
        k, v = keys[:, :, :kv_len], values[:, :, :kv_len]
        out["sdpa"] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(rows, heads, dim)

    ms = alternate({"ours": ours, "sdpa": sdpa}, repeats)
    return {
        "rows": rows,
        "lengths": "40-300" if ragged else "290",
        "dtype": str(dtype).removeprefix("torch."),
        "ours_ms": ms["ours"],
        "sdpa_ms": ms["sdpa"],
        "max_abs_diff": (out["ours"].float() - out["sdpa"].float()).abs().max().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 512])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/step_kernels.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops = kernels.load()
    if ops is None or ops.panel_width() == 0:
        sys.exit("the engine's kernels are not built for this CPU (no compiler, or no AVX-512)")
    prods = [products(ops, rows, args.repeats, "panels") for rows in args.rows]
    print(product_table(prods))
    tiled = [products(ops, rows, args.repeats, "tiles") for rows in args.rows] if ops.tile_ready() else []
    if tiled:
        print()
        print(product_table(tiled))
    attn = [
        attention(ops, rows, ragged, dtype, args.repeats)
        for dtype in (torch.float32, torch.bfloat16)
        for rows in (4, 16, 32)
        for ragged in (False, True)
    ]
    print()
    print(
        table(
            ["slots", "decode rows", "lengths", "ours ms", "SDPA ms", "ours/SDPA", "max |diff|"],
            [
                [
                    r["dtype"],
                    r["rows"],
                    r["lengths"],
                    f"{r['ours_ms']:.3f}",
                    f"{r['sdpa_ms']:.3f}",
                    f"{r['ours_ms'] / r['sdpa_ms']:.2f}x",
                    f"{r['max_abs_diff']:.1e}",
                ]
                for r in attn
            ],
        )
    )
    save({"products": prods, "tiles": tiled, "attention": attn}, args)


if __name__ == "__main__":
    main()
