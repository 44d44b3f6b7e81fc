// The decoder step's glue on CPU: what transformers' Llama-shaped layer does between its
// products, as one op per stage instead of ~35 small torch ops a layer; and the sampler's greedy
// pick with its finiteness check.
//
// Each op does the arithmetic transformers does, in its order and with its roundings: every
// product and sum of a float32 model is one float32 operation (built with -ffp-contract=off, so
// no fused multiply-add merges two of them), and a bfloat16 model's values are rounded to
// bfloat16 wherever transformers' ops return bfloat16 tensors. The RMS norm's mean and SiLU are
// the exceptions: a sum reduced in another order, and SiLU's vector form, equal to float rounding.
#include "vec.h"  // ATen's vectors

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace {

using c10::BFloat16;

// Tokens a thread takes at once: a decode step's few rows run on the calling thread.
constexpr int64_t GRAIN = 32;

inline float widen(float x) { return x; }
inline float widen(BFloat16 x) { return static_cast<float>(x); }
// A value as transformers' op would return it in the model's dtype.
template <typename T>
inline float narrow(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// The same over ATen's vectors, `V` values at a time (each rounding to bfloat16 is the scalar one's:
// to nearest, ties to even); a row's last `n % V` values take the scalar forms.
using Vec = at::vec::Vectorized<float>;
constexpr int64_t V = Vec::size();

inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const BFloat16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
inline void store(float* p, const Vec& v) { v.store(p); }
inline void store(BFloat16* p, const Vec& v) { at::vec::convert_float_bfloat16(v, v).store(p, V); }
template <typename T>
inline Vec narrow(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
  }
}

// LlamaRMSNorm: x in float32, x * rsqrt(mean(x^2) + eps), back to the model's dtype, times weight.
template <typename T>
void norm_row(const T* x, const T* weight, T* out, int64_t n, float eps) {
  Vec squares(0.f);
  int64_t i = 0;
  for (; i + V <= n; i += V) {
    const Vec v = load(x + i);
    squares = squares + v * v;
  }
  float sum = squares.reduce_add();
  for (; i < n; ++i) sum += widen(x[i]) * widen(x[i]);
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  i = 0;
  for (; i + V <= n; i += V) store(out + i, load(weight + i) * narrow<T>(load(x + i) * Vec(scale)));
  for (; i < n; ++i) out[i] = static_cast<T>(widen(weight[i]) * narrow<T>(widen(x[i]) * scale));
}

template <typename T>
void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out) {
  const int64_t n = x.size(1);
  const T* xd = x.data_ptr<T>();
  const T* wd = weight.data_ptr<T>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, x.size(0), GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(xd + t * n, wd, od + t * n, n, static_cast<float>(eps));
  });
}

template <typename T>
void add_rms_norm_impl(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight,
                       double eps, torch::Tensor& sum, torch::Tensor& out) {
  const int64_t n = x.size(1);
  const T* xd = x.data_ptr<T>();
  const T* dd = delta.data_ptr<T>();
  const T* wd = weight.data_ptr<T>();
  T* sd = sum.data_ptr<T>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, x.size(0), GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* a = xd + t * n;
      const T* b = dd + t * n;
      T* c = sd + t * n;
      int64_t i = 0;
      for (; i + V <= n; i += V) store(c + i, load(a + i) + load(b + i));
      for (; i < n; ++i) c[i] = static_cast<T>(widen(a[i]) + widen(b[i]));
      norm_row(c, wd, od + t * n, n, static_cast<float>(eps));
    }
  });
}

// apply_rotary_pos_emb for one head: (x * cos) + (rotate_half(x) * sin), rotate_half(x) being
// cat(-x[half:], x[:half]); each product and the sum rounded as transformers' three ops round them.
template <typename T>
inline void rotate_head(const T* x, const T* cos, const T* sin, T* out, int64_t dim) {
  const int64_t half = dim / 2;
  int64_t d = 0;
  if (half % V == 0) {
    for (; d < half; d += V) {
      const Vec a = narrow<T>(load(x + d) * load(cos + d));
      store(out + d, a + narrow<T>(load(x + d + half).neg() * load(sin + d)));
      const Vec c = narrow<T>(load(x + d + half) * load(cos + d + half));
      store(out + d + half, c + narrow<T>(load(x + d) * load(sin + d + half)));
    }
    return;
  }
  for (; d < dim; ++d) {
    const float turned = d < half ? -widen(x[d + half]) : widen(x[d - half]);
    const float a = narrow<T>(widen(x[d]) * widen(cos[d]));
    const float b = narrow<T>(turned * widen(sin[d]));
    out[d] = static_cast<T>(a + b);
  }
}

template <typename T>
void rotate_write_impl(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                       int64_t heads, int64_t kv_heads, torch::Tensor& keys, torch::Tensor& values,
                       const int64_t* slot, const int64_t* position, torch::Tensor& q) {
  const int64_t tokens = qkv.size(0), width = qkv.stride(0), dim = q.size(2);
  const T* in = qkv.data_ptr<T>();
  const T* cd = cos.data_ptr<T>();
  const T* sd = sin.data_ptr<T>();
  T* qd = q.data_ptr<T>();
  T* kd = keys.data_ptr<T>();
  T* vd = values.data_ptr<T>();
  const int64_t s0 = keys.stride(0), s1 = keys.stride(1), s2 = keys.stride(2);
  at::parallel_for(0, tokens, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = in + t * width;
      const T* c = cd + t * dim;
      const T* s = sd + t * dim;
      for (int64_t h = 0; h < heads; ++h) rotate_head(row + h * dim, c, s, qd + (t * heads + h) * dim, dim);
      if (slot[t] < 0) continue;  // a padding row: it writes nothing
      const int64_t base = slot[t] * s0 + position[t] * s2;
      const T* k = row + heads * dim;
      const T* v = k + kv_heads * dim;
      for (int64_t h = 0; h < kv_heads; ++h) {
        rotate_head(k + h * dim, c, s, kd + base + h * s1, dim);
        std::memcpy(vd + base + h * s1, v + h * dim, dim * sizeof(T));
      }
    }
  });
}

// LlamaMLP's act_fn(gate) * up, from the gate and up projections' one product: SiLU as
// x / (1 + exp(-x)) over ATen's vectors (torch's own SiLU differs in the last place at most),
// rounded to the model's dtype, times up.
template <typename T>
void silu_mul_impl(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t n = out.size(1), width = gate_up.stride(0);
  const T* in = gate_up.data_ptr<T>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, out.size(0), GRAIN, [&](int64_t begin, int64_t end) {
    const Vec one(1.f);
    for (int64_t t = begin; t < end; ++t) {
      const T* g = in + t * width;
      const T* u = g + n;
      T* o = od + t * n;
      int64_t i = 0;
      for (; i + V <= n; i += V) {
        const Vec x = load(g + i);
        store(o + i, narrow<T>(x / (one + x.neg().exp())) * load(u + i));
      }
      for (; i < n; ++i) {
        const float x = widen(g[i]);
        o[i] = static_cast<T>(narrow<T>(x / (1.f + std::exp(-x))) * widen(u[i]));
      }
    }
  });
}

// The greedy token of each row of logits and whether the row is finite, in one pass a row where
// torch's argmax and isfinite().all() take two and a mask: the first index of the row's maximum,
// as argmax picks it (a row that is not finite fails, whatever its index).
template <typename T>
void argmax_finite_impl(const torch::Tensor& logits, int64_t* best, bool* finite) {
  const int64_t vocab = logits.size(1);
  const T* in = logits.data_ptr<T>();
  at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = in + r * vocab;
      float top = -INFINITY, spread = 0.f;  // spread: x - x is 0 for a finite x, NaN otherwise
#pragma omp simd reduction(max : top) reduction(+ : spread)
      for (int64_t i = 0; i < vocab; ++i) {
        const float v = widen(x[i]);
        top = std::max(top, v);
        spread += v - v;
      }
      finite[r] = spread == 0.f;
      int64_t index = 0;
      while (index < vocab - 1 && widen(x[index]) != top) ++index;
      best[r] = index;
    }
  });
}

void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": [tokens, width], rows contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, name,
              ": float32 or bfloat16");
}

#define DISPATCH(dtype, CALL)                  \
  if ((dtype) == torch::kFloat) {              \
    using scalar = float;                      \
    CALL;                                      \
  } else {                                     \
    using scalar = BFloat16;                   \
    CALL;                                      \
  }

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dtype() == x.dtype());
  auto out = torch::empty_like(x);
  DISPATCH(x.scalar_type(), rms_norm_impl<scalar>(x, weight, eps, out));
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& delta,
                                                      const torch::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(x.is_contiguous() && delta.is_contiguous() && weight.is_contiguous());
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.dtype() == x.dtype() && weight.dtype() == x.dtype());
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  DISPATCH(x.scalar_type(), add_rms_norm_impl<scalar>(x, delta, weight, eps, sum, out));
  return {sum, out};
}

torch::Tensor rotate_write(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                           int64_t heads, int64_t kv_heads, torch::Tensor keys, torch::Tensor values,
                           const torch::Tensor& slot, const torch::Tensor& position) {
  check_rows(qkv, "qkv");
  const int64_t dim = cos.size(1);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * dim, "qkv: q, k and v of every head");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == qkv.size(0) && dim % 2 == 0);
  TORCH_CHECK(keys.stride(3) == 1 && values.strides() == keys.strides() && keys.size(1) == kv_heads);
  TORCH_CHECK(slot.scalar_type() == torch::kLong && position.scalar_type() == torch::kLong);
  TORCH_CHECK(slot.is_contiguous() && position.is_contiguous() && slot.numel() == qkv.size(0));
  for (const auto& t : {cos, sin, keys, values}) TORCH_CHECK(t.dtype() == qkv.dtype());
  const int64_t* slots = slot.data_ptr<int64_t>();
  const int64_t* positions = position.data_ptr<int64_t>();
  for (int64_t t = 0; t < qkv.size(0); ++t) {
    TORCH_CHECK(slots[t] < keys.size(0) && positions[t] >= 0 && positions[t] < keys.size(2),
                "a token's slot or position lies outside the KV storage");
  }
  auto q = torch::empty({qkv.size(0), heads, dim}, qkv.options());
  DISPATCH(qkv.scalar_type(), rotate_write_impl<scalar>(qkv, cos, sin, heads, kv_heads, keys, values,
                                                        slots, positions, q));
  return q;
}

torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0);
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  DISPATCH(gate_up.scalar_type(), silu_mul_impl<scalar>(gate_up, out));
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> argmax_finite(const torch::Tensor& logits) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.is_contiguous() && logits.size(1) > 0);
  auto best = torch::empty({logits.size(0)}, logits.options().dtype(torch::kLong));
  auto finite = torch::empty({logits.size(0)}, logits.options().dtype(torch::kBool));
  DISPATCH(logits.scalar_type(),
           argmax_finite_impl<scalar>(logits, best.data_ptr<int64_t>(), finite.data_ptr<bool>()));
  return {best, finite};
}

}  // namespace

TORCH_LIBRARY(llava_serve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def(
      "rotate_write(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads, Tensor(a!) keys, "
      "Tensor(b!) values, Tensor slot, Tensor position) -> Tensor",
      &rotate_write);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("argmax_finite(Tensor logits) -> (Tensor, Tensor)", &argmax_finite);
}
