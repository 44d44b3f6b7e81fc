// The decoder's bfloat16 products on AMX tiles (Sapphire Rapids and later), over weights laid out
// for them once.
//
// A tile multiply (`tdpbf16ps`) takes up to 16 rows x 32 inputs of x against 32 inputs x 16
// outputs of the weight, the weight's inputs in pairs (VNNI order), and adds 16 x 16 float32 sums.
// Here the weight [out, in] is stored as panels of 16 outputs, [out/16][in/2][16][2] with `in`
// padded to 32 (`tile_pack`), so each 1 KB of a panel is one whole weight tile, read front to back.
// One instruction covers 16 rows x 32 inputs x 16 outputs: at a decode step's 1-32 rows the products
// are bound by the memory alone, and a prompt chunk's hundreds of rows reuse each panel from the
// L2. oneDNN's AMX kernel on its own reordered weights reads them at ~17 GB/s at 16 rows on two
// cores, these tiles at ~24: 0.70-0.72x its time at 1-32 rows, 0.84x at 512 rows
// (`benchmarks/micro/step_kernels.py`, where the outputs are equal to oneDNN's).
//
// A thread takes two panels at a time (32 outputs) and 32 rows: two x tiles, two weight tiles and
// four sums, the eight tile registers. An odd last panel goes alone. Each output is float32 sums
// of bfloat16 products (the tile unit's own order, as oneDNN's is), with the bias added in float32
// and rounded to bfloat16 once, as torch's bfloat16 `linear` does. Without AMX in the build, or
// where the kernel does not grant a process the tile state, `tile_ready()` is false and the engine
// keeps oneDNN.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define LLAVA_SERVE_TILES 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t WIDTH = 16;  // outputs a panel holds: a tile's 16 float32 columns
constexpr int64_t DEPTH = 32;  // inputs one tile multiply takes: 16 pairs of bfloat16
constexpr int64_t TILE = WIDTH * DEPTH;  // bfloat16 a weight tile holds (1 KB)
constexpr int64_t BLOCK_ROWS = 32;  // two x tiles of 16
// How many weight tiles ahead in a panel a thread asks for lines (16 lines each): 2-16 measure
// alike at 1-16 rows; without, 32 rows take ~1.1x.
constexpr int64_t AHEAD = 4;

#if defined(LLAVA_SERVE_TILES)

// Linux hands a process the 8 KB tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); asking again is harmless (oneDNN asks too).
constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;

bool granted() {
  static const bool ok = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return ok;
}

struct alignas(64) Config {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-1: sums of the first 16 rows (panel 0, 1); 2-3: of the next `r1`; 4-5: x; 6-7: weights.
void configure(int r0, int r1) {
  Config c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64;
  c.rows[0] = c.rows[1] = c.rows[4] = r0;
  c.rows[2] = c.rows[3] = c.rows[5] = r1 > 0 ? r1 : r0;
  c.rows[6] = c.rows[7] = 16;
  _tile_loadconfig(&c);
}

// `rows` rows of float32 sums (16 a row) plus the bias, rounded to bfloat16: the first `cols`.
void store(const float* sums, int rows, const float* bias, int cols, at::BFloat16* out, int64_t ldo) {
  const __mmask16 mask = cols >= WIDTH ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int i = 0; i < rows; ++i) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(sums + i * WIDTH), b));
    _mm256_mask_storeu_epi16(out + i * ldo, mask, reinterpret_cast<__m256i>(v));
  }
}

// Up to 32 rows of `x` (row stride `ldx`, `chunks` x 32 inputs) times one or two panels (`w0`,
// `w1`), into `out` (row stride `ldo`): the last panel's first `cols` outputs.
template <bool TWO_X, bool TWO_W>
void block(const at::BFloat16* x, int64_t ldx, int64_t chunks, const at::BFloat16* w0,
           const at::BFloat16* w1, int r0, int r1, const float* bias, int cols, at::BFloat16* out,
           int64_t ldo) {
  alignas(64) float sums[WIDTH * WIDTH];
  _tile_zero(0);
  if (TWO_W) _tile_zero(1);
  if (TWO_X) _tile_zero(2);
  if (TWO_X && TWO_W) _tile_zero(3);
  const int64_t stride = ldx * 2;
  for (int64_t c = 0; c < chunks; ++c) {
    if (c + AHEAD < chunks) {
      for (int line = 0; line < 16; ++line) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (c + AHEAD) * TILE) + 64 * line, _MM_HINT_T0);
        if (TWO_W) _mm_prefetch(reinterpret_cast<const char*>(w1 + (c + AHEAD) * TILE) + 64 * line, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, x + c * DEPTH, stride);
    _tile_loadd(6, w0 + c * TILE, 64);
    if (TWO_W) _tile_loadd(7, w1 + c * TILE, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (TWO_W) _tile_dpbf16ps(1, 4, 7);
    if (TWO_X) {
      _tile_loadd(5, x + WIDTH * ldx + c * DEPTH, stride);
      _tile_dpbf16ps(2, 5, 6);
      if (TWO_W) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int first = TWO_W ? WIDTH : cols;
  const float* bias1 = bias != nullptr ? bias + WIDTH : nullptr;
  _tile_stored(0, sums, 64);
  store(sums, r0, bias, first, out, ldo);
  if (TWO_W) {
    _tile_stored(1, sums, 64);
    store(sums, r0, bias1, cols, out + WIDTH, ldo);
  }
  if (TWO_X) {
    _tile_stored(2, sums, 64);
    store(sums, r1, bias, first, out + WIDTH * ldo, ldo);
  }
  if (TWO_X && TWO_W) {
    _tile_stored(3, sums, 64);
    store(sums, r1, bias1, cols, out + WIDTH * ldo + WIDTH, ldo);
  }
}

using Block = void (*)(const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, const at::BFloat16*,
                       int, int, const float*, int, at::BFloat16*, int64_t);

void products(const at::BFloat16* x, int64_t M, int64_t K, const at::BFloat16* tiles, int64_t N,
              const float* bias, at::BFloat16* out) {
  const int64_t count = (N + WIDTH - 1) / WIDTH, pairs = count / 2, chunks = K / DEPTH;
  at::parallel_for(0, pairs + count % 2, 1, [&](int64_t begin, int64_t end) {
    int r0 = -1, r1 = -1;  // the rows this thread's tiles are configured for
    for (int64_t u = begin; u < end; ++u) {
      const bool pair = u < pairs;
      const int64_t p = pair ? 2 * u : count - 1, last = pair ? p + 1 : p;
      const int cols = static_cast<int>(std::min<int64_t>(WIDTH, N - last * WIDTH));
      const at::BFloat16* w0 = tiles + p * K * WIDTH;
      for (int64_t m = 0; m < M; m += BLOCK_ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(BLOCK_ROWS, M - m));
        if (std::min<int>(rows, WIDTH) != r0 || std::max<int>(rows - WIDTH, 0) != r1) {
          r0 = std::min<int>(rows, WIDTH), r1 = std::max<int>(rows - WIDTH, 0);
          configure(r0, r1);
        }
        const Block kernel = pair ? (r1 > 0 ? block<true, true> : block<false, true>)
                                  : (r1 > 0 ? block<true, false> : block<false, false>);
        kernel(x + m * K, K, chunks, w0, w0 + K * WIDTH, r0, r1, bias == nullptr ? nullptr : bias + p * WIDTH,
               cols, out + m * N + p * WIDTH, N);
      }
    }
    if (r0 >= 0) _tile_release();  // no tile state held between calls: context switches stay light
  });
}

#endif

bool tile_ready() {
#if defined(LLAVA_SERVE_TILES)
  return granted();
#else
  return false;
#endif
}

// [out, in] -> [ceil(out / 16), in' / 2, 16, 2], `in'` padded to 32, every padding zero.
torch::Tensor tile_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "weight: bfloat16 [out, in]");
  const int64_t N = weight.size(0), K = weight.size(1), count = (N + WIDTH - 1) / WIDTH;
  const int64_t depth = (K + DEPTH - 1) / DEPTH * DEPTH;
  auto padded = torch::zeros({count * WIDTH, depth}, weight.options());
  padded.slice(0, 0, N).slice(1, 0, K).copy_(weight);
  return padded.view({count, WIDTH, depth / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor tile_linear(const torch::Tensor& x, const torch::Tensor& tiles, const std::optional<torch::Tensor>& bias,
                          int64_t out_features) {
  TORCH_CHECK(tile_ready(), "tile_linear: this build or process has no AMX tiles");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x: bfloat16 [rows, in]");
  TORCH_CHECK(tiles.dim() == 4 && tiles.is_contiguous() && tiles.scalar_type() == torch::kBFloat16 &&
                  tiles.size(2) == WIDTH && tiles.size(3) == 2 && tiles.size(1) * 2 % DEPTH == 0 &&
                  x.size(1) <= tiles.size(1) * 2 && x.size(1) > tiles.size(1) * 2 - DEPTH,
              "tiles: `tile_pack` of a weight as wide as x");
  TORCH_CHECK(out_features > 0 && out_features <= tiles.size(0) * WIDTH && out_features > (tiles.size(0) - 1) * WIDTH,
              "out_features: the packed weight's");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->numel() == out_features), "bias: [out_features]");
  const int64_t rows = x.size(0), depth = tiles.size(1) * 2;
  auto out = torch::empty({rows, out_features}, x.options());
#if defined(LLAVA_SERVE_TILES)
  if (rows > 0) {
    // The x tiles read 32 inputs at a time: a width short of that is padded with zeros.
    auto input = x.size(1) == depth ? x.contiguous() : torch::zeros({rows, depth}, x.options());
    if (x.size(1) != depth) input.slice(1, 0, x.size(1)).copy_(x);
    torch::Tensor wide;  // the bias in float32, padded to whole panels
    if (bias.has_value()) {
      wide = torch::zeros({tiles.size(0) * WIDTH}, x.options().dtype(torch::kFloat));
      wide.slice(0, 0, out_features).copy_(*bias);
    }
    products(input.data_ptr<at::BFloat16>(), rows, depth, tiles.data_ptr<at::BFloat16>(), out_features,
             wide.defined() ? wide.data_ptr<float>() : nullptr, out.data_ptr<at::BFloat16>());
  }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llava_serve, m) {
  m.def("tile_ready() -> bool", &tile_ready);
  m.def("tile_pack(Tensor weight) -> Tensor", &tile_pack);
  m.def("tile_linear(Tensor x, Tensor tiles, Tensor? bias, int out_features) -> Tensor", &tile_linear);
}
