// Fused optimizer updates, CPU implementation: OpenMP over fixed-size chunks
// of all tensors, one vectorised pass per chunk reading each stream once.

// AdaHessian's loop calls sqrtf, which may set errno; without -fno-math-errno
// (GCC 12 ignores it in `#pragma GCC optimize`) GCC keeps that loop scalar
// ("control flow in loop"). Sophia's loop vectorises.
#include "optim_update.h"

#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "target_clones.h"  // AVX2 clone only: these loops are memory-bound

namespace llmopt_ext {
namespace cpu {
namespace {

// storage <-> float32 (float32 math; one rounding on store)
LLMOPT_INLINE float to_f32(float v) { return v; }
LLMOPT_INLINE float to_f32(bf16 v) {
  return detail::f32_from_bits(static_cast<uint32_t>(v.bits) << 16);
}
LLMOPT_INLINE float to_f32(fp16 v) { return detail::f16_to_f32(v.bits); }

template <class T> LLMOPT_INLINE T from_f32(float f);
template <> LLMOPT_INLINE float from_f32<float>(float f) { return f; }
template <> LLMOPT_INLINE bf16 from_f32<bf16>(float f) { return bf16{detail::f32_to_bf16_rne(f)}; }
template <> LLMOPT_INLINE fp16 from_f32<fp16>(float f) { return fp16{detail::f32_to_f16_rne(f)}; }

// One loop per value of c.clip, with clip a constant in each: GCC 12 unswitched the runtime
// branch for float32 params but left the bf16/fp16 loops scalar (SophiaG bf16 ran at 0.57x
// the per-byte speed of torch's fused AdamW).
template <class T, bool kClip>
LLMOPT_INLINE void sophia_loop(T* __restrict p, const T* __restrict g, float* __restrict m,
                               const float* __restrict h, int64_t n, optim::SophiaCoefs c,
                               float scale) {
  c.clip = kClip;
  for (int64_t i = 0; i < n; ++i) {
    float pv = to_f32(p[i]), mv = m[i];
    optim::sophia_elem(c, pv, mv, to_f32(g[i]) / scale, h[i]);
    m[i] = mv;
    p[i] = from_f32<T>(pv);
  }
}

template <class T>
LLMOPT_INLINE void sophia_range(T* __restrict p, const T* __restrict g, float* __restrict m,
                                    const float* __restrict h, int64_t n,
                                    const optim::SophiaCoefs& c, float scale) {
  if (c.clip) {
    sophia_loop<T, true>(p, g, m, h, n, c, scale);
  } else {
    sophia_loop<T, false>(p, g, m, h, n, c, scale);
  }
}

template <class T, bool kSqrt>
LLMOPT_INLINE void adahessian_range(T* __restrict p, const T* __restrict g,
                                        float* __restrict m, float* __restrict v,
                                        const float* __restrict d, int64_t n,
                                        const optim::AdaHessianCoefs& c, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    float pv = to_f32(p[i]), mv = m[i], vv = v[i];
    optim::adahessian_elem<kSqrt>(c, pv, mv, vv, to_f32(g[i]) / scale, d[i] / scale);
    m[i] = mv;
    v[i] = vv;
    p[i] = from_f32<T>(pv);
  }
}

// target_clones does not apply to templates: one cloned entry point per dtype.
#define LLMOPT_OPTIM_KERNELS(T, S)                                                          \
  LLMOPT_CLONES_AVX2 void sophia_##S(T* p, const T* g, float* m, const float* h, int64_t n,  \
                                    const optim::SophiaCoefs& c, float scale) {             \
    sophia_range(p, g, m, h, n, c, scale);                                                  \
  }                                                                                         \
  LLMOPT_CLONES_AVX2 void adahessian_##S(T* p, const T* g, float* m, float* v, const float* d, \
                                        int64_t n, const optim::AdaHessianCoefs& c,         \
                                        float scale) {                                      \
    if (c.sqrt_power) adahessian_range<T, true>(p, g, m, v, d, n, c, scale);                \
    else adahessian_range<T, false>(p, g, m, v, d, n, c, scale);                            \
  }                                                                                         \
  void sophia_call(T* p, const T* g, float* m, const float* h, int64_t n,                   \
                   const optim::SophiaCoefs& c, float scale) {                              \
    sophia_##S(p, g, m, h, n, c, scale);                                                    \
  }                                                                                         \
  void adahessian_call(T* p, const T* g, float* m, float* v, const float* d, int64_t n,     \
                       const optim::AdaHessianCoefs& c, float scale) {                      \
    adahessian_##S(p, g, m, v, d, n, c, scale);                                             \
  }

LLMOPT_OPTIM_KERNELS(float, f32)
LLMOPT_OPTIM_KERNELS(bf16, bf16)
LLMOPT_OPTIM_KERNELS(fp16, f16)

struct Chunk {
  int64_t tensor, begin, len;
};

// Chunks are fixed-size (independent of the thread count) and taken one at a
// time (dynamic schedule: a preempted thread on shared cores does not hold the
// whole update back, see multi_tensor.cpp); element-wise results do not depend
// on threading anyway.
template <class F>
void for_each_chunk(const OptimLists& s, F&& f) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < s.count; ++t) {
    const int64_t n = s.numels[t];
    total += n;
    for (int64_t b = 0; b < n; b += kOptimChunkElems)
      chunks.push_back({t, b, n - b < kOptimChunkElems ? n - b : kOptimChunkElems});
  }
  const int64_t nc = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 1) if (total >= kOptimParallelMinElems)
  for (int64_t i = 0; i < nc; ++i) f(chunks[i]);
}

template <class F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::BFloat16: f(bf16{}); return;
    case DType::Float16: f(fp16{}); return;
    case DType::Float32: break;
  }
  f(float{});
}

}  // namespace

void sophia_update(const OptimLists& s, void* const* params, const void* const* grads,
                   float* const* exp_avgs, const float* const* hessians,
                   const optim::SophiaCoefs& c, float grad_scale) {
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(s, [&](const Chunk& ch) {
      sophia_call(static_cast<T*>(params[ch.tensor]) + ch.begin,
                  static_cast<const T*>(grads[ch.tensor]) + ch.begin,
                  exp_avgs[ch.tensor] + ch.begin, hessians[ch.tensor] + ch.begin, ch.len, c,
                  grad_scale);
    });
  });
}

void adahessian_update(const OptimLists& s, void* const* params, const void* const* grads,
                       float* const* exp_avgs, float* const* exp_hessian_diag_sqs,
                       const float* const* hessians, const optim::AdaHessianCoefs& c,
                       float grad_scale) {
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(s, [&](const Chunk& ch) {
      adahessian_call(static_cast<T*>(params[ch.tensor]) + ch.begin,
                      static_cast<const T*>(grads[ch.tensor]) + ch.begin,
                      exp_avgs[ch.tensor] + ch.begin, exp_hessian_diag_sqs[ch.tensor] + ch.begin,
                      hessians[ch.tensor] + ch.begin, ch.len, c, grad_scale);
    });
  });
}

}  // namespace cpu
}  // namespace llmopt_ext
