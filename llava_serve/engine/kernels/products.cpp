// The decoder's float32 products on AVX-512 cores, over weights laid out for them once.
//
// A decode step's products are skinny: 1-32 rows against every weight of the model, read once
// from memory. oneDNN's blocked kernel reads the weights at ~13 GB/s at 16 rows on two cores, where
// the memory gives ~23: it loads a block and then computes on it, and its per-call plumbing is paid
// ~33 times a step. Here the weight [out, in] is stored as panels of 16 outputs, [out/16][in][16]
// (`panel_pack`), so a thread streams each panel front to back, asking for the lines ahead, and
// every 64-byte load of it feeds one fused multiply-add per row.
//
// A thread takes two panels at a time (32 outputs) and up to 16 rows: it has two streams in
// flight, and each input it broadcasts feeds two multiply-adds (against one panel at a time with
// 16 rows: 0.65-0.72x its time at 6-16 rows, `benchmarks/micro/step_kernels.py`). At 13-16 rows
// the 32 accumulators leave no register for the weights, and the compiler keeps two or three of
// them on the stack; that one pass over the pair still beat 12 rows and then 4 (0.90x at 16 rows,
// where the second block had read the pair again). Above 32 rows (prompt chunks) the spills cost
// more than the second read (1.15x 12-row blocks' time at 512 rows), so blocks there take 14. An
// odd or partial last panel goes alone.
//
// Each output is one float32 dot product summed in input order with fused multiply-adds: not
// transformers' (MKL's) order, equal to float rounding, as oneDNN's is. Where the build has no
// AVX-512, `panel_width()` is 0 and the engine keeps oneDNN.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t WIDTH = 16;  // outputs a panel holds: one 512-bit vector of float32
constexpr int64_t PAIR_ROWS = 16;
// Above decode row counts the products are bound by arithmetic, not memory: blocks of 14 rows
// keep every accumulator in a register (28, the two weights and a broadcast: 31 of 32).
constexpr int64_t WIDE_ROWS = 32, WIDE_BLOCK = 14;
// How far ahead in a panel a thread asks for lines (in rows of 16 floats, one line each): the
// hardware prefetcher alone leaves a core waiting on memory at a few rows.
constexpr int64_t AHEAD = 64;

#if defined(__AVX512F__)

// Rows `0..R-1` of `x` (row stride `ldx`) times `P` panels side by side from `w` (each [K][16],
// one after another), into `out` (row stride `ldo`): the last panel's first `cols` columns.
template <int R, int P>
void block(const float* x, int64_t ldx, const float* w, int64_t K, float* out, int64_t ldo, int cols) {
  __m512 acc[P][R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
    for (int p = 0; p < P; ++p) acc[p][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 wk[P];
    for (int p = 0; p < P; ++p) {
      const float* panel = w + p * K * WIDTH;
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + AHEAD) * WIDTH), _MM_HINT_T0);
      wk[p] = _mm512_loadu_ps(panel + k * WIDTH);
    }
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 xi = _mm512_set1_ps(x[i * ldx + k]);
      for (int p = 0; p < P; ++p) acc[p][i] = _mm512_fmadd_ps(xi, wk[p], acc[p][i]);
    }
  }
  const __mmask16 last = cols >= WIDTH ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    for (int p = 0; p < P; ++p) {
      _mm512_mask_storeu_ps(out + i * ldo + p * WIDTH, p == P - 1 ? last : __mmask16(0xFFFF), acc[p][i]);
    }
  }
}

using Block = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int);

// `block<rows, P>` by row count, 1..sizeof...(R).
template <int P, int... R>
constexpr std::array<Block, sizeof...(R) + 1> blocks(std::integer_sequence<int, R...>) {
  return {nullptr, block<R + 1, P>...};
}

constexpr auto ONE = blocks<1>(std::make_integer_sequence<int, WIDTH>{});
constexpr auto TWO = blocks<2>(std::make_integer_sequence<int, PAIR_ROWS>{});

void products(const float* x, int64_t M, int64_t K, const float* panels, int64_t N, float* out) {
  const int64_t count = (N + WIDTH - 1) / WIDTH, pairs = N / (2 * WIDTH), rest = count - 2 * pairs;
  const int64_t pair_rows = M <= WIDE_ROWS ? PAIR_ROWS : WIDE_BLOCK;
  at::parallel_for(0, pairs + rest, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      // A pair of panels, or (past the pairs) a last panel alone, maybe partial.
      const bool pair = u < pairs;
      const int64_t p = pair ? 2 * u : 2 * pairs + (u - pairs), step = pair ? pair_rows : WIDTH;
      const int64_t last = pair ? p + 1 : p;  // the panel whose `cols` first outputs are stored
      const int cols = static_cast<int>(std::min<int64_t>(WIDTH, N - last * WIDTH));
      const Block* kernels = pair ? TWO.data() : ONE.data();
      for (int64_t m = 0; m < M; m += step) {
        const int rows = static_cast<int>(std::min<int64_t>(step, M - m));
        kernels[rows](x + m * K, K, panels + p * K * WIDTH, K, out + m * N + p * WIDTH, N, cols);
      }
    }
  });
}

#endif

int64_t panel_width() {
#if defined(__AVX512F__)
  return WIDTH;
#else
  return 0;
#endif
}

// [out, in] -> [ceil(out / 16), in, 16], the last panel's missing outputs zero.
torch::Tensor panel_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat, "weight: float32 [out, in]");
  const int64_t N = weight.size(0), K = weight.size(1), count = (N + WIDTH - 1) / WIDTH;
  auto padded = torch::zeros({count * WIDTH, K}, weight.options());
  padded.slice(0, 0, N).copy_(weight);
  return padded.view({count, WIDTH, K}).transpose(1, 2).contiguous();
}

torch::Tensor panel_linear(const torch::Tensor& x, const torch::Tensor& panels,
                           const std::optional<torch::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(panel_width() > 0, "panel_linear: this build has no AVX-512");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat, "x: float32 [rows, in]");
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() && panels.scalar_type() == torch::kFloat &&
                  panels.size(2) == WIDTH && panels.size(1) == x.size(1),
              "panels: `panel_pack` of a weight as wide as x");
  TORCH_CHECK(out_features > 0 && out_features <= panels.size(0) * WIDTH && out_features > (panels.size(0) - 1) * WIDTH,
              "out_features: the packed weight's");
  auto out = torch::empty({x.size(0), out_features}, x.options());
#if defined(__AVX512F__)
  if (x.size(0) > 0) {
    products(x.data_ptr<float>(), x.size(0), x.size(1), panels.data_ptr<float>(), out_features,
             out.data_ptr<float>());
  }
#endif
  if (bias.has_value()) out.add_(*bias);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llava_serve, m) {
  m.def("panel_width() -> int", &panel_width);
  m.def("panel_pack(Tensor weight) -> Tensor", &panel_pack);
  m.def("panel_linear(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor", &panel_linear);
}
