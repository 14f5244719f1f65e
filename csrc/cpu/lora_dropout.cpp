// The LoRA dropout mask, CPU (OpenMP). See lora_dropout.h.
#include "lora_dropout.h"

#include <algorithm>
#include <vector>

#include "../common/philox.h"
#include "target_clones.h"

namespace llmopt_ext {
namespace cpu {
namespace {

LLMOPT_INLINE float to_f32(float v) { return v; }
LLMOPT_INLINE float to_f32(bf16 v) { return detail::f32_from_bits(static_cast<uint32_t>(v.bits) << 16); }
LLMOPT_INLINE float to_f32(fp16 v) { return detail::f16_to_f32(v.bits); }

uint32_t keep_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;  // floor(p 2^32) < 2^32 for p < 1
  return static_cast<uint32_t>(std::min(t, 4294967295.0));
}

// Counter blocks per chunk of keep_mult: the chunk's Philox words (4 x 1 KiB
// by lane, then 4 KiB interleaved) stay in L1.
constexpr int64_t kMaskChunk = 256;

// mult[j] = keep(i0 + j) / (1 - p) for j < n (flat element indices i0 ..).
// Structure of arrays, so each loop vectorises across counter blocks (as
// philox_normal's chunks): the Philox words of a chunk of blocks lane by lane,
// then interleaved into element order, then compared with the threshold. One
// Philox call per element block as before; the scalar loop over lanes it
// replaces did not vectorise and made dropout 2-3x the cost of the products.
LLMOPT_CLONES void keep_mult(const Dropout& d, uint64_t i0, int64_t n, float* mult) {
  const uint32_t thr = keep_threshold(d.p);
  const float inv = 1.0f / (1.0f - d.p);
  uint32_t w[4][kMaskChunk];
  uint32_t flat[4 * kMaskChunk];
  uint64_t i = i0;
  const uint64_t end = i0 + static_cast<uint64_t>(n);
  while (i < end) {
    const uint64_t b0 = i >> 2;
    const int64_t blocks = static_cast<int64_t>(std::min<uint64_t>(kMaskChunk, ((end + 3) >> 2) - b0));
    for (int64_t b = 0; b < blocks; ++b) {
      const philox::U4 u = philox::block_words(d.seed, kDropoutOffset, b0 + static_cast<uint64_t>(b));
      for (int l = 0; l < 4; ++l) w[l][b] = u.x[l];
    }
    for (int64_t b = 0; b < blocks; ++b)
      for (int l = 0; l < 4; ++l) flat[4 * b + l] = w[l][b];
    // elements i .. stop of this chunk; flat[0] is element 4 * b0
    const uint64_t stop = std::min(end, (b0 + static_cast<uint64_t>(blocks)) << 2);
    const int64_t lo = static_cast<int64_t>(i - (b0 << 2)), cnt = static_cast<int64_t>(stop - i);
    float* out = mult + (i - i0);
    for (int64_t j = 0; j < cnt; ++j) out[j] = flat[lo + j] >= thr ? inv : 0.0f;
    i = stop;
  }
}

template <class T>
LLMOPT_INLINE void dropout_impl(T* t, int64_t m, int64_t k, int64_t rs, uint64_t first, const Dropout& d) {
#pragma omp parallel if (m * k >= (1 << 16))
  {
    std::vector<float> mult(static_cast<size_t>(k));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      keep_mult(d, first + static_cast<uint64_t>(i * k), k, mult.data());
      T* row = t + i * rs;
      for (int64_t j = 0; j < k; ++j) row[j] = store<T>(static_cast<double>(to_f32(row[j])) * mult[j]);  // exact product, one rounding
    }
  }
}

LLMOPT_CLONES_AVX2 void dropout_f32(void* t, int64_t m, int64_t k, int64_t rs, uint64_t first, Dropout d) {
  dropout_impl(static_cast<float*>(t), m, k, rs, first, d);
}
LLMOPT_CLONES_AVX2 void dropout_bf16(void* t, int64_t m, int64_t k, int64_t rs, uint64_t first, Dropout d) {
  dropout_impl(static_cast<bf16*>(t), m, k, rs, first, d);
}
LLMOPT_CLONES_AVX2 void dropout_f16(void* t, int64_t m, int64_t k, int64_t rs, uint64_t first, Dropout d) {
  dropout_impl(static_cast<fp16*>(t), m, k, rs, first, d);
}

}  // namespace

void dropout_mul(DType t_dtype, void* t, int64_t m, int64_t k, int64_t rs, uint64_t first, Dropout drop) {
  if (m == 0 || k == 0 || drop.p <= 0.0f) return;
  switch (t_dtype) {
    case DType::Float32: dropout_f32(t, m, k, rs, first, drop); break;
    case DType::BFloat16: dropout_bf16(t, m, k, rs, first, drop); break;
    case DType::Float16: dropout_f16(t, m, k, rs, first, drop); break;
  }
}

}  // namespace cpu
}  // namespace llmopt_ext
