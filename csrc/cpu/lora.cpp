// LoRA merge / unmerge, CPU implementation (OpenMP over row blocks).
#include "lora.h"

#include <algorithm>
#include <vector>

#include "target_clones.h"

namespace llmopt_ext {
namespace cpu {
namespace {

template <class T>
LLMOPT_INLINE float ldf(const void* base, int64_t i) {
  return static_cast<float>(load(static_cast<const T*>(base)[i]));
}

// acc[c] = sum_j p[j] * q[j * ld + c] for c < n, float32, j in order. The
// loop over c vectorises; -ffp-contract=off keeps mul and add separate (the
// CUDA kernel uses __fmul_rn/__fadd_rn for the same bits). Columns go in
// register blocks of kColBlock: the block's partial sums stay in vector
// registers across all r terms (one load of q per term), where a sweep of
// acc per term loaded and stored acc r times (merge ran at 13-39% of copy
// bandwidth). The order of the terms per element, and so every bit, is the same.
constexpr int64_t kColBlock = 64;

LLMOPT_INLINE void accumulate(float* __restrict acc, const float* __restrict p,
                              const float* __restrict q, int64_t ld, int64_t r, int64_t n) {
  int64_t c0 = 0;
  for (; c0 + kColBlock <= n; c0 += kColBlock) {
    float blk[kColBlock];
    for (int64_t c = 0; c < kColBlock; ++c) blk[c] = 0.0f;
    for (int64_t j = 0; j < r; ++j) {
      const float pj = p[j];
      const float* qj = q + j * ld + c0;
      for (int64_t c = 0; c < kColBlock; ++c) blk[c] = blk[c] + pj * qj[c];
    }
    for (int64_t c = 0; c < kColBlock; ++c) acc[c0 + c] = blk[c];
  }
  for (int64_t c = c0; c < n; ++c) acc[c] = 0.0f;
  for (int64_t j = 0; j < r; ++j) {
    const float pj = p[j];
    const float* qj = q + j * ld;
    for (int64_t c = c0; c < n; ++c) acc[c] = acc[c] + pj * qj[c];
  }
}

template <class T>
LLMOPT_INLINE void apply(T* __restrict w, const float* __restrict acc, int64_t n, float s,
                         double sign) {
  for (int64_t c = 0; c < n; ++c) {
    const float d = s * acc[c];
    w[c] = store<T>(load(w[c]) + sign * static_cast<double>(d));
  }
}

LLMOPT_CLONES void accumulate_c(float* acc, const float* p, const float* q, int64_t ld, int64_t r,
                                int64_t n) {
  accumulate(acc, p, q, ld, r, n);
}
LLMOPT_CLONES_AVX2 void apply_f32(float* w, const float* acc, int64_t n, float s, double sign) {
  apply(w, acc, n, s, sign);
}
LLMOPT_CLONES_AVX2 void apply_bf16(bf16* w, const float* acc, int64_t n, float s, double sign) {
  apply(w, acc, n, s, sign);
}
LLMOPT_CLONES_AVX2 void apply_f16(fp16* w, const float* acc, int64_t n, float s, double sign) {
  apply(w, acc, n, s, sign);
}

void apply_any(DType t, void* w, const float* acc, int64_t n, float s, double sign) {
  switch (t) {
    case DType::Float32: apply_f32(static_cast<float*>(w), acc, n, s, sign); break;
    case DType::BFloat16: apply_bf16(static_cast<bf16*>(w), acc, n, s, sign); break;
    case DType::Float16: apply_f16(static_cast<fp16*>(w), acc, n, s, sign); break;
  }
}

float load_any(DType t, const void* base, int64_t i) {
  switch (t) {
    case DType::BFloat16: return ldf<bf16>(base, i);
    case DType::Float16: return ldf<fp16>(base, i);
    case DType::Float32: break;
  }
  return ldf<float>(base, i);
}

size_t elem_size(DType t) { return t == DType::Float32 ? 4 : 2; }

}  // namespace

void lora_merge(const LoraMergeArgs& a, int sign) {
  const int64_t rows = a.rows, cols = a.cols, r = a.rank;
  if (rows == 0 || cols == 0) return;
  // Q and P as contiguous float32 (adapter-sized: r x (rows + cols), never
  // rows x cols), converted once so the inner loops are unit-stride.
  std::vector<float> q(static_cast<size_t>(r * cols)), p(static_cast<size_t>(rows * r));
  for (int64_t j = 0; j < r; ++j)
    for (int64_t c = 0; c < cols; ++c) q[j * cols + c] = load_any(a.ab_dtype, a.q, j * a.q_rs + c * a.q_cs);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < r; ++j) p[i * r + j] = load_any(a.ab_dtype, a.p, i * a.p_rs + j * a.p_cs);
  const double sgn = sign >= 0 ? 1.0 : -1.0;
  const int64_t row_blocks = (rows + kMergeRowBlock - 1) / kMergeRowBlock;
  const int64_t col_tiles = (cols + kMergeColTile - 1) / kMergeColTile;
  const int64_t items = row_blocks * col_tiles;
  char* w = static_cast<char*>(a.w);
  const size_t es = elem_size(a.w_dtype);
  // Below ~64K elements the fork/join costs more than the work.
#pragma omp parallel if (rows * cols >= 65536)
  {
    std::vector<float> acc(static_cast<size_t>(std::min(cols, kMergeColTile)));
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t ct = it % col_tiles, rb = it / col_tiles;
      const int64_t c0 = ct * kMergeColTile, n = std::min(kMergeColTile, cols - c0);
      const int64_t i1 = std::min(rows, (rb + 1) * kMergeRowBlock);
      for (int64_t i = rb * kMergeRowBlock; i < i1; ++i) {
        accumulate_c(acc.data(), p.data() + i * r, q.data() + c0, cols, r, n);
        apply_any(a.w_dtype, w + (i * a.w_row_stride + c0) * es, acc.data(), n, a.scaling, sgn);
      }
    }
  }
}

}  // namespace cpu
}  // namespace llmopt_ext
