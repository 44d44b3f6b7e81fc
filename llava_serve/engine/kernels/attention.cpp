// Decode attention on CPU: each decode row's one query per head against its own slot's keys and
// values, over that row's own length (no mask); slots in float32 or bfloat16, arithmetic in float32.
//
// A decode step's attention reads every running row's keys and values once and does ~1 flop per
// byte: its speed is the speed it streams the slots. SDPA's CPU kernel does it as small matrix
// products per block of keys with a mask the width of the longest row; here a thread takes one
// (row, key head) at a time and reads that row's `lengths[row]` positions front to back, each key
// and value once, with the next lines requested ahead: 16 keys (scores for every query head
// sharing the key head), then the same 16 values, so the memory serves two streams at once.
//
// The arithmetic is SDPA's: scores q.k times the scale, softmax with its maximum subtracted,
// the weighted sum of values. As in SDPA's CPU kernel the maximum is a running one, block by
// block, the sums so far scaled down when it grows; sums run in another order and the
// exponential is ATen's vector one, so the result is SDPA's to float rounding. bfloat16 slots
// are widened to float32 as they are read and the result rounded to bfloat16 once, as SDPA's CPU
// kernel does for that type.
#include "vec.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

namespace {

using Vec = at::vec::Vectorized<float>;

// Keys (or values) ahead of the one being read that a thread asks the memory for.
constexpr int64_t AHEAD = 4;

template <typename T>
inline void prefetch_row(const T* row, int64_t dim) {
  for (int64_t j = 0; j < dim; j += 64 / sizeof(T)) __builtin_prefetch(row + j);
}

// `Vec::size()` elements of a slot as float32.
inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const at::BFloat16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}

// Head sizes the kernel takes, in floats: up to 512 (`attention.py` sends wider heads to SDPA).
constexpr int64_t MAX_DIM = 512;
constexpr int MAX_VECTORS = MAX_DIM / Vec::size();

// One row's queries of one key head (`group` of them, [group][dim], `Q` at a time) against
// `length` keys and values (position stride `dim`) in blocks of 16 positions, into `out`
// [group][dim]. A head of `D` vectors (1-16: up to 256 floats on AVX-512) keeps the queries, a key
// or value row and the weighted sums in registers (past 8 vectors, some of them spilled); `D = 0`
// is any head up to `MAX_DIM`, `vectors` wide, with them on the stack (1.46x the time at 256
// floats). In registers a (row, key head, position) costs 28 cycles on slots in the core's L2,
// against 52 when the sums were reloaded and stored at every position, and keys and values
// streaming together take 0.83x the time of a pass over the keys and then one over the values on
// slots coming from memory.
template <typename T, int D, int Q>
void attend_head(const float* q, const T* k, const T* v, int64_t length, int64_t group, int64_t vectors,
                 float scale, float* out) {
  constexpr int N = D > 0 ? D : MAX_VECTORS;
  constexpr int64_t B = Vec::size();
  const int64_t width = D > 0 ? D : vectors, dim = width * Vec::size();
  for (int64_t g0 = 0; g0 < group; g0 += Q) {
    Vec query[Q][N], sums[Q][N];
    float peak[Q], total[Q];
    for (int g = 0; g < Q; ++g) {
      for (int j = 0; j < width; ++j) {
        query[g][j] = Vec::loadu(q + (g0 + g) * dim + j * Vec::size());
        sums[g][j] = Vec(0.0f);
      }
      peak[g] = -std::numeric_limits<float>::infinity();
      total[g] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < length; t0 += B) {
      const int64_t n = std::min(B, length - t0);
      float s[Q][B];
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row(k + (t0 + t + AHEAD) * dim, dim);
        Vec key[N];
        for (int j = 0; j < width; ++j) key[j] = load(k + (t0 + t) * dim + j * Vec::size());
        for (int g = 0; g < Q; ++g) {
          Vec acc = query[g][0] * key[0];
          for (int j = 1; j < width; ++j) acc = at::vec::fmadd(query[g][j], key[j], acc);
          s[g][t] = acc.reduce_add() * scale;
        }
      }
      for (int g = 0; g < Q; ++g) {
        const Vec block = Vec::loadu(s[g], n);
        const float top = n == B ? block.reduce_max() : *std::max_element(s[g], s[g] + n);
        if (top > peak[g]) {
          const float shrink = std::exp(peak[g] - top);
          for (int j = 0; j < width; ++j) sums[g][j] = sums[g][j] * Vec(shrink);
          total[g] *= shrink;
          peak[g] = top;
        }
        const Vec e = (block - Vec(peak[g])).exp();
        e.store(s[g], n);
        for (int64_t t = 0; t < n; ++t) total[g] += s[g][t];
      }
      for (int64_t t = 0; t < n; ++t) {
        prefetch_row(v + (t0 + t + AHEAD) * dim, dim);
        Vec value[N];
        for (int j = 0; j < width; ++j) value[j] = load(v + (t0 + t) * dim + j * Vec::size());
        for (int g = 0; g < Q; ++g) {
          const Vec p(s[g][t]);
          for (int j = 0; j < width; ++j) sums[g][j] = at::vec::fmadd(p, value[j], sums[g][j]);
        }
      }
    }
    for (int g = 0; g < Q; ++g) {
      const Vec inverse(1.0f / total[g]);
      for (int j = 0; j < width; ++j) (sums[g][j] * inverse).store(out + (g0 + g) * dim + j * Vec::size());
    }
  }
}

template <typename T>
using Head = void (*)(const float*, const T*, const T*, int64_t, int64_t, int64_t, float, float*);

// By head size in vectors (1-16), the tile: the most queries of a group (4, 2 or 1, dividing it)
// whose sums fit in 16 registers.
template <typename T, int... D>
constexpr std::array<std::array<Head<T>, 3>, sizeof...(D) + 1> heads_by_size(std::integer_sequence<int, D...>) {
  return {std::array<Head<T>, 3>{nullptr, nullptr, nullptr},
          std::array<Head<T>, 3>{attend_head<T, D + 1, 1>, attend_head<T, D + 1, 2>, attend_head<T, D + 1, 4>}...};
}

template <typename T>
Head<T> head_kernel(int64_t dim, int64_t group) {
  static constexpr auto regs = heads_by_size<T>(std::make_integer_sequence<int, 16>{});
  const int64_t vectors = dim / Vec::size();
  if (vectors >= static_cast<int64_t>(regs.size())) return attend_head<T, 0, 1>;
  for (int tile : {4, 2}) {
    if (group % tile == 0 && tile * vectors <= 16) return regs[vectors][tile / 2];
  }
  return regs[vectors][0];
}

// Rows 0..rows-1 of `q` (float32 [rows, heads, dim]) against their slots, into `o` (the same).
template <typename T>
void attend_rows(const float* q, const torch::Tensor& keys, const torch::Tensor& values, const int64_t* length,
                 int64_t rows, int64_t heads, float scale, float* o) {
  const int64_t kv_heads = keys.size(1), dim = keys.size(3), group = heads / kv_heads;
  const Head<T> attend = head_kernel<T>(dim, group);
  const T* K = keys.data_ptr<T>();
  const T* V = values.data_ptr<T>();
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t r = u / kv_heads, h = u % kv_heads, offset = r * keys.stride(0) + h * keys.stride(1);
      attend(q + (r * heads + h * group) * dim, K + offset, V + offset, length[r], group, dim / Vec::size(), scale,
             o + (r * heads + h * group) * dim);
    }
  });
}

// `query` [rows, heads, dim] of decode rows 0..rows-1, each attending to slot `row` of `keys` and
// `values` [slots, kv_heads, max_len, dim] over its first `lengths[row]` positions.
torch::Tensor decode_attention(const torch::Tensor& query, const torch::Tensor& keys, const torch::Tensor& values,
                               const torch::Tensor& lengths, double scale) {
  const auto dtype = keys.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "keys, values: float32 or bfloat16");
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == dtype, "query: [rows, heads, dim] in the slots' dtype");
  TORCH_CHECK(keys.dim() == 4 && values.scalar_type() == dtype && values.sizes() == keys.sizes() &&
                  values.strides() == keys.strides() && keys.stride(3) == 1 && keys.stride(2) == keys.size(3),
              "keys, values: [slots, kv_heads, max_len, dim], positions contiguous");
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(keys.size(3) == dim && heads % kv_heads == 0 && dim % Vec::size() == 0 && dim <= MAX_DIM,
              "head sizes");
  TORCH_CHECK(lengths.scalar_type() == torch::kLong && lengths.is_contiguous() && lengths.numel() == rows &&
                  rows <= keys.size(0),
              "lengths: one per row, each row a slot");
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(length[r] >= 1 && length[r] <= keys.size(2), "a row's length lies outside its slot");
  }
  const auto q = query.to(torch::kFloat).contiguous();
  auto out = torch::empty(query.sizes(), q.options());
  if (dtype == torch::kFloat) {
    attend_rows<float>(q.data_ptr<float>(), keys, values, length, rows, heads, scale, out.data_ptr<float>());
  } else {
    attend_rows<at::BFloat16>(q.data_ptr<float>(), keys, values, length, rows, heads, scale, out.data_ptr<float>());
  }
  return out.to(dtype);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llava_serve, m) {
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor lengths, float scale) -> Tensor",
        &decode_attention);
}
