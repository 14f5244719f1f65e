// Rank-r products of the fused LoRA Linear, CPU (OpenMP). See lora_lowrank.h.
#include "lora_lowrank.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/philox.h"
#include "target_clones.h"

namespace llmopt_ext {
namespace cpu {
namespace {

// Output columns per register tile of lowrank_down: one AVX-512 vector (two
// AVX2 ones); Q is zero-padded to a multiple so the inner loop has a fixed trip.
constexpr int64_t kR = 16;
// Rows of X per down work item: 4 rows share each Q load, and the 4 x K float
// rows (224 KiB at K = 14336) stay in L2.
constexpr int64_t kRows = 4;
// Columns per reduce work item: the R x 256 float accumulator (16 KiB at
// r = 16) stays in L1; K = 1024 still gives 4 items for 2+ threads.
constexpr int64_t kCols = 256;

LLMOPT_INLINE float to_f32(float v) { return v; }
LLMOPT_INLINE float to_f32(bf16 v) { return detail::f32_from_bits(static_cast<uint32_t>(v.bits) << 16); }
LLMOPT_INLINE float to_f32(fp16 v) { return detail::f16_to_f32(v.bits); }

uint32_t keep_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;  // floor(p 2^32) < 2^32 for p < 1
  return static_cast<uint32_t>(std::min(t, 4294967295.0));
}

// mult[j] = keep(i0 + j) / (1 - p) for j < n (flat element indices i0 ..).
void keep_mult(const Dropout& d, uint64_t i0, int64_t n, float* mult) {
  const uint32_t thr = keep_threshold(d.p);
  const float inv = 1.0f / (1.0f - d.p);
  const uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  int64_t j = 0;
  while (j < n) {
    const uint64_t i = i0 + static_cast<uint64_t>(j), blk = i >> 2;
    const philox::U4 u = philox::philox4x32(static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                                            static_cast<uint32_t>(kDropoutOffset), 0u, k0, k1);
    for (uint64_t lane = i & 3; lane < 4 && j < n; ++lane, ++j) mult[j] = u.x[lane] >= thr ? inv : 0.0f;
  }
}

// dst[j] = float(src[j]) (* mult[j]) for j < n.
template <class T>
LLMOPT_INLINE void load_row(const T* __restrict src, const float* __restrict mult, int64_t n,
                            float* __restrict dst) {
  if (mult == nullptr) {
    for (int64_t j = 0; j < n; ++j) dst[j] = to_f32(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = to_f32(src[j]) * mult[j];
  }
}

// acc[i][c] = sum_k xs[i][k] * q[k][c] for kRows rows and kR columns (q row stride ld).
LLMOPT_INLINE void down_tile(const float* __restrict xs, int64_t k, const float* __restrict q, int64_t ld,
                             float* __restrict acc) {
  for (int64_t i = 0; i < kRows * kR; ++i) acc[i] = 0.0f;
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* qk = q + kk * ld;
    for (int64_t i = 0; i < kRows; ++i) {
      const float xv = xs[i * k + kk];
      for (int64_t c = 0; c < kR; ++c) acc[i * kR + c] += xv * qk[c];
    }
  }
}

// acc[j][c] += g[j] * xb[c] for j < r, c < kCols.
LLMOPT_INLINE void reduce_row(const float* __restrict g, int64_t r, const float* __restrict xb,
                              float* __restrict acc) {
  for (int64_t j = 0; j < r; ++j) {
    const float gj = g[j];
    float* aj = acc + j * kCols;
    for (int64_t c = 0; c < kCols; ++c) aj[c] += gj * xb[c];
  }
}

template <class T>
LLMOPT_INLINE void down_impl(const LowrankArgs& a) {
  const int64_t m = a.m, k = a.k, r = a.r, rp = (r + kR - 1) / kR * kR;
  std::vector<float> qp(static_cast<size_t>(k * rp), 0.0f);  // Q zero-padded to rp columns
  for (int64_t kk = 0; kk < k; ++kk) std::memcpy(&qp[kk * rp], a.q + kk * r, sizeof(float) * r);
  const T* x = static_cast<const T*>(a.x);
  const bool drop = a.drop.p > 0.0f;
  const int64_t items = (m + kRows - 1) / kRows;
#pragma omp parallel if (m * k * r >= (1 << 18))
  {
    std::vector<float> xs(static_cast<size_t>(kRows * k)), mult(drop ? k : 0), acc(kRows * kR);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t m0 = it * kRows, rows = std::min(kRows, m - m0);
      for (int64_t i = 0; i < kRows; ++i) {
        float* dst = xs.data() + i * k;
        if (i >= rows) { std::fill(dst, dst + k, 0.0f); continue; }
        if (drop) keep_mult(a.drop, static_cast<uint64_t>((m0 + i) * k), k, mult.data());
        load_row(x + (m0 + i) * a.x_rs, drop ? mult.data() : nullptr, k, dst);
      }
      for (int64_t c0 = 0; c0 < rp; c0 += kR) {
        down_tile(xs.data(), k, qp.data() + c0, rp, acc.data());
        const int64_t nc = std::min(kR, r - c0);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < nc; ++c) a.out[(m0 + i) * r + c0 + c] = a.scale * acc[i * kR + c];
      }
    }
  }
}

template <class T>
LLMOPT_INLINE void reduce_impl(const LowrankArgs& a) {
  const int64_t m = a.m, k = a.k, r = a.r;
  const T* x = static_cast<const T*>(a.x);
  const bool drop = a.drop.p > 0.0f;
  const int64_t items = (k + kCols - 1) / kCols;
#pragma omp parallel if (m * k * r >= (1 << 18))
  {
    std::vector<float> acc(static_cast<size_t>(r * kCols)), xb(kCols), mult(drop ? kCols : 0);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t c0 = it * kCols, n = std::min(kCols, k - c0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(xb.begin(), xb.end(), 0.0f);  // columns >= n stay zero
      for (int64_t mm = 0; mm < m; ++mm) {
        if (drop) keep_mult(a.drop, static_cast<uint64_t>(mm * k + c0), n, mult.data());
        load_row(x + mm * a.x_rs + c0, drop ? mult.data() : nullptr, n, xb.data());
        reduce_row(a.q + mm * r, r, xb.data(), acc.data());
      }
      for (int64_t j = 0; j < r; ++j)
        for (int64_t c = 0; c < n; ++c) a.out[j * k + c0 + c] = a.scale * acc[j * kCols + c];
    }
  }
}

template <class T>
LLMOPT_INLINE void dropout_impl(T* t, int64_t m, int64_t k, int64_t rs, const Dropout& d) {
#pragma omp parallel if (m * k >= (1 << 16))
  {
    std::vector<float> mult(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      keep_mult(d, static_cast<uint64_t>(i * k), k, mult.data());
      T* row = t + i * rs;
      for (int64_t j = 0; j < k; ++j) row[j] = store<T>(static_cast<double>(to_f32(row[j])) * mult[j]);  // exact product, one rounding
    }
  }
}

LLMOPT_CLONES void down_f32(const LowrankArgs& a) { down_impl<float>(a); }
LLMOPT_CLONES void down_bf16(const LowrankArgs& a) { down_impl<bf16>(a); }
LLMOPT_CLONES void down_f16(const LowrankArgs& a) { down_impl<fp16>(a); }
LLMOPT_CLONES void reduce_f32(const LowrankArgs& a) { reduce_impl<float>(a); }
LLMOPT_CLONES void reduce_bf16(const LowrankArgs& a) { reduce_impl<bf16>(a); }
LLMOPT_CLONES void reduce_f16(const LowrankArgs& a) { reduce_impl<fp16>(a); }
LLMOPT_CLONES_AVX2 void dropout_f32(void* t, int64_t m, int64_t k, int64_t rs, Dropout d) {
  dropout_impl(static_cast<float*>(t), m, k, rs, d);
}
LLMOPT_CLONES_AVX2 void dropout_bf16(void* t, int64_t m, int64_t k, int64_t rs, Dropout d) {
  dropout_impl(static_cast<bf16*>(t), m, k, rs, d);
}
LLMOPT_CLONES_AVX2 void dropout_f16(void* t, int64_t m, int64_t k, int64_t rs, Dropout d) {
  dropout_impl(static_cast<fp16*>(t), m, k, rs, d);
}

}  // namespace

void lowrank_down(const LowrankArgs& a) {
  if (a.m == 0 || a.r == 0) return;
  switch (a.x_dtype) {
    case DType::Float32: down_f32(a); break;
    case DType::BFloat16: down_bf16(a); break;
    case DType::Float16: down_f16(a); break;
  }
}

void lowrank_reduce(const LowrankArgs& a) {
  if (a.k == 0 || a.r == 0) return;
  switch (a.x_dtype) {
    case DType::Float32: reduce_f32(a); break;
    case DType::BFloat16: reduce_bf16(a); break;
    case DType::Float16: reduce_f16(a); break;
  }
}

void dropout_mul(DType t_dtype, void* t, int64_t m, int64_t k, int64_t rs, Dropout drop) {
  if (m == 0 || k == 0 || drop.p <= 0.0f) return;
  switch (t_dtype) {
    case DType::Float32: dropout_f32(t, m, k, rs, drop); break;
    case DType::BFloat16: dropout_bf16(t, m, k, rs, drop); break;
    case DType::Float16: dropout_f16(t, m, k, rs, drop); break;
  }
}

}  // namespace cpu
}  // namespace llmopt_ext
