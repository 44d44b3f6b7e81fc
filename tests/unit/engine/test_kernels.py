"""The engine's CPU step ops (`engine/kernels/step_ops.cpp`) against transformers' own modules
and functions, in both dtypes the CPU engine runs."""

import os
import subprocess
import sys

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from llava_serve.engine import kernels

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    built = kernels.load()
    assert built is not None, "the step ops must build on the machines CI runs on"
    return built


def _norm(width: int, dtype: torch.dtype, eps: float = 1e-5) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=eps)
    norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    return norm.to(dtype)


# Widths of whole vectors and with a remainder (the ops' scalar tail).
@pytest.mark.parametrize("width", [96, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_residual_add_and_rms_norm_compute_llama_s(ops, dtype, width):
    torch.manual_seed(0)
    norm = _norm(width, dtype)
    x, delta = torch.randn(37, width).to(dtype) * 3, torch.randn(37, width).to(dtype)
    total, normed = ops.add_rms_norm(x, delta, norm.weight.detach(), norm.variance_epsilon)
    assert torch.equal(total, x + delta)  # one rounding, as transformers' add
    with torch.inference_mode():
        expected = norm(x + delta)
    # The mean's sum is reduced in another order: float rounding, a unit in the last place of
    # bfloat16 at most.
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(normed, expected, **tolerance)
    torch.testing.assert_close(
        ops.rms_norm(x, norm.weight.detach(), norm.variance_epsilon), norm(x), **tolerance
    )


# Heads whose halves are and are not whole vectors (16 floats on AVX-512: the vector path from 32).
@pytest.mark.parametrize("dim", [16, 24, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_q_and_k_are_transformers_bits_and_k_and_v_land_in_their_slots(ops, dtype, dim):
    """q and k rotated exactly as `apply_rotary_pos_emb` rotates them; each token's key and value
    go to its slot at its position, and a token of slot -1 (a padding row) writes nothing."""
    torch.manual_seed(0)
    tokens, heads, kv_heads = 5, 4, 2
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    angles = torch.rand(tokens, dim // 2) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    keys = torch.zeros(3, kv_heads, 8, dim, dtype=dtype)
    values = torch.zeros_like(keys)
    slot = torch.tensor([2, -1, 0, 0, 1])
    position = torch.tensor([7, 0, 3, 4, 0])

    q = ops.rotate_write(qkv, cos, sin, heads, kv_heads, keys, values, slot, position)

    q_in = qkv[:, : heads * dim].view(1, tokens, heads, dim).transpose(1, 2)
    k_in = qkv[:, heads * dim : (heads + kv_heads) * dim].view(1, tokens, kv_heads, dim).transpose(1, 2)
    v_in = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    q_ref, k_ref = apply_rotary_pos_emb(q_in, k_in, cos[None], sin[None])
    assert torch.equal(q, q_ref[0].transpose(0, 1))
    k_ref = k_ref[0].transpose(0, 1)
    expected_keys, expected_values = torch.zeros_like(keys), torch.zeros_like(values)
    for t in (0, 2, 3, 4):
        expected_keys[slot[t], :, position[t]] = k_ref[t]
        expected_values[slot[t], :, position[t]] = v_in[t]
    assert torch.equal(keys, expected_keys)
    assert torch.equal(values, expected_values)


def test_a_slot_or_position_outside_the_storage_is_refused_before_anything_is_written(ops):
    keys = torch.zeros(2, 1, 4, 8)
    values = torch.zeros_like(keys)
    qkv, cos, sin = torch.randn(2, 3 * 8), torch.ones(2, 8), torch.zeros(2, 8)
    for slot, position in (([0, 2], [0, 0]), ([0, 1], [0, 4]), ([0, 1], [-1, 0])):
        with pytest.raises(RuntimeError, match="outside the KV storage"):
            ops.rotate_write(qkv, cos, sin, 1, 1, keys, values, torch.tensor(slot), torch.tensor(position))
    assert not keys.any() and not values.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_times_up_computes_llama_s_mlp_activation(ops, dtype):
    torch.manual_seed(0)
    gate_up = (torch.randn(9, 2 * 40) * 4).to(dtype)
    gate, up = gate_up.split(40, -1)
    got = ops.silu_mul(gate_up)
    expected = ACT2FN["silu"](gate) * up
    # libm's expf against torch's vectorized one: float rounding.
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_greedy_pick_is_argmax_s_and_rows_that_are_not_finite_are_flagged(ops, dtype):
    torch.manual_seed(0)
    logits = torch.randn(6, 1000).to(dtype)
    logits[1, 17] = logits[1, 400] = logits[1].max() + 1  # a tie: argmax's first index
    logits[2, 3] = float("inf")
    logits[3, 999] = float("-inf")
    logits[4, 500] = float("nan")
    best, finite = ops.argmax_finite(logits)
    assert finite.tolist() == [True, True, False, False, False, True]
    assert best[1] == 17
    for row in (0, 1, 5):
        assert best[row] == logits[row].argmax()


# Row counts on each side of the kernel's blocks (16 rows over two panels up to 32 rows, 14 above;
# 16 over a lone last panel), output widths that are and are not whole panels or pairs.
ROWS = [1, 3, 4, 5, 13, 16, 17, 25, 32, 33, 40]
WIDTHS = [(1000, 512), (64, 48), (40, 24), (7, 16)]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), WIDTHS)
def test_the_panel_products_compute_nn_linear_s(ops, rows, out_features, in_features):
    if ops.panel_width() == 0:
        pytest.skip("this CPU has no AVX-512: the engine keeps oneDNN's products")
    torch.manual_seed(rows)
    linear = torch.nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features)
    panels = ops.panel_pack(linear.weight.detach())
    assert panels.shape == (-(-out_features // 16), in_features, 16)
    with torch.inference_mode():
        expected = linear(x)
        got = ops.panel_linear(x, panels, linear.bias.detach(), out_features)
        # Summed in input order, not MKL's: float rounding of sums over `in_features` terms.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            ops.panel_linear(x, panels, None, out_features), x @ linear.weight.T, rtol=1e-5, atol=1e-5
        )


def test_the_panel_products_refuse_a_weight_of_another_width(ops):
    if ops.panel_width() == 0:
        pytest.skip("this CPU has no AVX-512")
    panels = ops.panel_pack(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match="as wide as x"):
        ops.panel_linear(torch.randn(2, 9), panels, None, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.panel_linear(torch.randn(2, 8), panels, None, 48)


# Row counts on each side of the tiles' 16- and 32-row blocks; widths that are and are not whole
# panels, pairs of panels or 32 inputs (padded).
TILE_ROWS = [1, 2, 15, 16, 17, 31, 32, 33, 64, 100]
TILE_WIDTHS = [(1000, 512), (64, 48), (40, 24), (7, 16), (50, 1376)]


@pytest.mark.parametrize("rows", TILE_ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), TILE_WIDTHS)
def test_the_tile_products_compute_torch_s_bfloat16_linear(ops, rows, out_features, in_features):
    if not ops.tile_ready():
        pytest.skip("this CPU has no AMX: the engine keeps oneDNN's bfloat16 products")
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features).bfloat16()
    bias = torch.randn(out_features).bfloat16()
    x = torch.randn(rows, in_features).bfloat16()
    tiles = ops.tile_pack(weight)
    assert tiles.shape == (-(-out_features // 16), -(-in_features // 32) * 16, 16, 2)
    for b in (bias, None):
        got = ops.tile_linear(x, tiles, b, out_features)
        # float32 sums of the bfloat16 products, the bias added, rounded once: torch's bfloat16
        # `linear` computes the same, its sums in another order, so a sum within float rounding of
        # a rounding boundary may land one bfloat16 step away (and a sum near zero is as exact as
        # float32 sums of terms of ~1 are: atol).
        exact = x.float() @ weight.float().T + (0 if b is None else b.float())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), exact.bfloat16().float(), rtol=2**-7, atol=1e-4)
        assert (got != exact.bfloat16()).float().mean() < 0.01
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), rtol=2**-7, atol=1e-4)


def test_the_tile_products_refuse_a_weight_of_another_width(ops):
    if not ops.tile_ready():
        pytest.skip("this CPU has no AMX")
    tiles = ops.tile_pack(torch.randn(32, 40).bfloat16())
    with pytest.raises(RuntimeError, match="as wide as x"):
        ops.tile_linear(torch.randn(2, 8).bfloat16(), tiles, None, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        ops.tile_linear(torch.randn(2, 40).bfloat16(), tiles, None, 48)


# Head sizes and groups that take each of the kernel's paths: sums in registers for 2, 4 or 1
# queries at a time (160 floats: some spilled), and (288 floats) any size, on the stack.
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(8, 4, 64), (4, 4, 32), (8, 1, 128), (16, 4, 64), (6, 2, 48), (2, 1, 160), (2, 1, 288)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_is_sdpa_s_over_each_row_s_own_length(ops, heads, kv_heads, dim, dtype):
    """Each row's query heads against its own slot's first `lengths[row]` keys and values (the
    query heads sharing a key head as transformers' `repeat_kv` pairs them), as SDPA computes it,
    in the slots' dtype."""
    torch.manual_seed(heads + dim)
    rows, slots, max_len = 5, 7, 48
    query = torch.randn(rows, heads, dim).to(dtype)
    keys = torch.randn(slots, kv_heads, max_len, dim).to(dtype)
    values = torch.randn(slots, kv_heads, max_len, dim).to(dtype)
    lengths = torch.tensor([1, 17, 48, 33, 16])
    got = ops.decode_attention(query, keys, values, lengths, dim**-0.5)
    assert got.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    for row, n in enumerate(lengths.tolist()):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[row][None, :, None], keys[row, :, :n][None], values[row, :, :n][None], enable_gqa=True
        )[0, :, 0]
        torch.testing.assert_close(got[row], expected, **tolerance)


def test_decode_attention_refuses_a_length_outside_the_slot(ops):
    keys = torch.randn(2, 1, 8, 16)
    with pytest.raises(RuntimeError, match="outside its slot"):
        ops.decode_attention(torch.randn(2, 1, 16), keys, keys.clone(), torch.tensor([3, 9]), 0.25)
    with pytest.raises(RuntimeError, match="outside its slot"):
        ops.decode_attention(torch.randn(2, 1, 16), keys, keys.clone(), torch.tensor([0, 2]), 0.25)


LOAD = "from llava_serve.engine import kernels; print(kernels.load() is not None)"


def _load_in(cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLAVA_SERVE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)


def test_the_ops_are_built_once_into_the_cache_and_loaded_from_it_after(tmp_path):
    """A first process builds the library and renames it into place, leaving no build directory or
    lock behind; the next loads that file."""
    first = _load_in(tmp_path)
    assert first.stdout.strip() == "True", first.stderr[-2000:]
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("step_ops-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert _load_in(tmp_path).stdout.strip() == "True"
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [stamp]


def test_where_the_ops_cannot_be_built_the_engine_is_told_none_and_why(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    done = _load_in(blocked)
    assert done.stdout.strip() == "False"
    assert "could not be built" in done.stderr
