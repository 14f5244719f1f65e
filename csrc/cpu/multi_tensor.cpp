// Multi-tensor vector ops for Steihaug-CG, CPU implementation (OpenMP over chunks).
#include "multi_tensor.h"

#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "target_clones.h"

// GCC 12 at -march=x86-64-v4 once dropped the float rounding between
// mt_cg_step's store and its norm when both were in one loop (caught by
// csrc/tests/test_multi_tensor_cpu.cpp); cg_step is now two passes.

namespace llmopt_ext {
namespace cpu {
namespace {

// Independent double accumulators per range: the compiler vectorises the lane
// loop, and the fixed lane assignment makes the summation order (and thus the
// result) independent of the vector width a clone uses. 32 lanes are four
// AVX-512 (eight AVX2) accumulators, so several add chains are in flight: the
// isolated fp32 dot kernel went from 6.3 to 5.2 ms on 2 x 8.4M elements (one
// thread). It stays compute-bound on the two float -> double conversions per
// product: the same loop accumulating in float32 took 2.6 ms.
constexpr int kLanes = 32;

// Pairwise sum of the lanes, in a fixed tree.
LLMOPT_INLINE double lane_sum(const double* acc) {
  double s[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) s[j] = acc[j] + acc[j + kLanes / 2];
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] = s[j] + s[j + w];
  return s[0];
}

template <class T>
LLMOPT_INLINE double dot_range(const T* __restrict x, const T* __restrict y, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += load(x[i + j]) * load(y[i + j]);
  for (int j = 0; i < n; ++i, ++j) acc[j] += load(x[i]) * load(y[i]);
  return lane_sum(acc);
}

template <class T>
LLMOPT_INLINE double sumsq_range(const T* __restrict x, int64_t n) {
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) { const double v = load(x[i + j]); acc[j] += v * v; }
  for (int j = 0; i < n; ++i, ++j) { const double v = load(x[i]); acc[j] += v * v; }
  return lane_sum(acc);
}

template <class T>
LLMOPT_INLINE void axpby_range(T* y, const T* x, int64_t n, double a, double b) {
  // y and x may alias (axpby on the same list): element-wise, so that is safe.
  for (int64_t i = 0; i < n; ++i) y[i] = store<T>(a * load(x[i]) + b * load(y[i]));
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_step_loop(T* __restrict x, T* __restrict r, const T* __restrict p,
                                const T* __restrict hp, const T* __restrict minv, int64_t n,
                                double alpha, double* out) {
  // Pass 1 updates x and r (a pure streaming loop); pass 2 reduces the stored
  // values while they are still in L1/L2 (a chunk of 16K fp32 is 64 KiB per
  // vector). One fused loop would be one pass, but GCC does not vectorise the
  // store-then-reload of the rounded values (measured 6x slower than axpby).
  for (int64_t i = 0; i < n; ++i) {
    x[i] = store<T>(load(x[i]) + alpha * load(p[i]));
    r[i] = store<T>(load(r[i]) + alpha * load(hp[i]));
  }
  double ax[kLanes] = {}, ar[kLanes] = {}, az[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double xv = load(x[i + j]), rv = load(r[i + j]);
      ax[j] += xv * xv;
      ar[j] += rv * rv;
      if (kPre) az[j] += rv * (load(minv[i + j]) * rv);
    }
  for (int j = 0; i < n; ++i, ++j) {
    const double xv = load(x[i]), rv = load(r[i]);
    ax[j] += xv * xv;
    ar[j] += rv * rv;
    if (kPre) az[j] += rv * (load(minv[i]) * rv);
  }
  out[0] = lane_sum(ax);
  out[1] = lane_sum(ar);
  out[2] = kPre ? lane_sum(az) : out[1];
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_direction_loop(T* __restrict p, const T* __restrict r,
                                     const T* __restrict minv, int64_t n, double beta) {
  for (int64_t i = 0; i < n; ++i) {
    const double z = kPre ? load(minv[i]) * load(r[i]) : load(r[i]);
    p[i] = store<T>(beta * load(p[i]) - z);
  }
}

// One cloned entry point per (op, dtype): target_clones does not apply to
// templates, so the templates above are force-inlined into these.
#define LLMOPT_RANGE_KERNELS(T, S)                                                           \
  LLMOPT_CLONES double dot_##S(const T* x, const T* y, int64_t n) { return dot_range(x, y, n); } \
  LLMOPT_CLONES double sumsq_##S(const T* x, int64_t n) { return sumsq_range(x, n); }        \
  LLMOPT_CLONES void axpby_##S(T* y, const T* x, int64_t n, double a, double b) {            \
    axpby_range(y, x, n, a, b);                                                              \
  }                                                                                          \
  LLMOPT_CLONES void cg_step_##S(T* x, T* r, const T* p, const T* hp, const T* minv,        \
                                 int64_t n, double alpha, double* out) {                     \
    if (minv) cg_step_loop<T, true>(x, r, p, hp, minv, n, alpha, out);                       \
    else cg_step_loop<T, false>(x, r, p, hp, minv, n, alpha, out);                           \
  }                                                                                          \
  LLMOPT_CLONES void cg_direction_##S(T* p, const T* r, const T* minv, int64_t n, double beta) { \
    if (minv) cg_direction_loop<T, true>(p, r, minv, n, beta);                               \
    else cg_direction_loop<T, false>(p, r, minv, n, beta);                                   \
  }                                                                                          \
  struct Kernels_##S {                                                                       \
    static double dot(const T* x, const T* y, int64_t n) { return dot_##S(x, y, n); }        \
    static double sumsq(const T* x, int64_t n) { return sumsq_##S(x, n); }                   \
    static void axpby(T* y, const T* x, int64_t n, double a, double b) { axpby_##S(y, x, n, a, b); } \
    static void cg_step(T* x, T* r, const T* p, const T* hp, const T* m, int64_t n, double al, \
                        double* out) { cg_step_##S(x, r, p, hp, m, n, al, out); }           \
    static void cg_direction(T* p, const T* r, const T* m, int64_t n, double be) {           \
      cg_direction_##S(p, r, m, n, be);                                                      \
    }                                                                                        \
  };

LLMOPT_RANGE_KERNELS(float, f32)
LLMOPT_RANGE_KERNELS(bf16, bf16)
LLMOPT_RANGE_KERNELS(fp16, f16)

template <class T> struct KernelsFor;
template <> struct KernelsFor<float> : Kernels_f32 {};
template <> struct KernelsFor<bf16> : Kernels_bf16 {};
template <> struct KernelsFor<fp16> : Kernels_f16 {};

// ---------------------------------------------------------------------------
// Chunked driver: flatten all tensors into fixed-size chunks (independent of
// the thread count) and run them with a static OpenMP schedule.

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t len;
};

struct Work {
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

Work make_work(const ListShape& s) {
  Work w;
  for (int64_t t = 0; t < s.count; ++t) {
    const int64_t n = s.numels[t];
    w.total += n;
    for (int64_t b = 0; b < n; b += kChunkElems)
      w.chunks.push_back({t, b, n - b < kChunkElems ? n - b : kChunkElems});
  }
  return w;
}

// Dynamic schedule: on shared cores (CI runners; the 2-core development box
// runs at load average ~20) a static split makes every call wait for its most
// preempted thread, while a per-tensor loop of single-threaded calls does not;
// taking 16K-element chunks one at a time (~5 us of DRAM traffic each, ~0.1 us
// per grab) lets the running thread take over. Under that load the 512-tensor
// mt_dot/mt_norm_sq measured 3-19x the loop with either schedule (too noisy to
// separate them). Reductions stay independent of the schedule: per-chunk
// partials are summed in chunk order.
template <class F>
void for_each_chunk(const Work& w, F&& f) {
  const int64_t nc = static_cast<int64_t>(w.chunks.size());
#pragma omp parallel for schedule(dynamic, 1) if (w.total >= kParallelMinElems)
  for (int64_t c = 0; c < nc; ++c) f(c, w.chunks[c]);
}

template <class T> const T* at(ConstList l, const Chunk& c) {
  return static_cast<const T*>(l.ptrs[c.tensor]) + c.begin;
}
template <class T> T* at(MutList l, const Chunk& c) {
  return static_cast<T*>(l.ptrs[c.tensor]) + c.begin;
}

// Calls f.template operator()<T>() with the storage type of `dtype`.
template <class F>
auto dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::BFloat16: return f(bf16{});
    case DType::Float16: return f(fp16{});
    case DType::Float32: break;
  }
  return f(float{});
}

// Sum per-chunk partials [nc][k] in chunk order.
template <int K>
void ordered_sum(const std::vector<double>& partial, double* out) {
  for (int k = 0; k < K; ++k) out[k] = 0.0;
  const size_t nc = partial.size() / K;
  for (size_t c = 0; c < nc; ++c)
    for (int k = 0; k < K; ++k) out[k] += partial[c * K + k];
}

}  // namespace

double mt_dot(const ListShape& s, ConstList xs, ConstList ys) {
  const Work w = make_work(s);
  std::vector<double> partial(w.chunks.size());
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(w, [&](int64_t c, const Chunk& ch) {
      partial[c] = KernelsFor<T>::dot(at<T>(xs, ch), at<T>(ys, ch), ch.len);
    });
  });
  double out;
  ordered_sum<1>(partial, &out);
  return out;
}

double mt_norm_sq(const ListShape& s, ConstList xs) {
  const Work w = make_work(s);
  std::vector<double> partial(w.chunks.size());
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(w, [&](int64_t c, const Chunk& ch) {
      partial[c] = KernelsFor<T>::sumsq(at<T>(xs, ch), ch.len);
    });
  });
  double out;
  ordered_sum<1>(partial, &out);
  return out;
}

void mt_axpby(const ListShape& s, MutList ys, ConstList xs, float a, float b) {
  const Work w = make_work(s);
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(w, [&](int64_t, const Chunk& ch) {
      KernelsFor<T>::axpby(at<T>(ys, ch), at<T>(xs, ch), ch.len, a, b);
    });
  });
}

CgStepNorms mt_cg_step(const ListShape& s, MutList xs, MutList rs, ConstList ps, ConstList hps,
                       ConstList minv, float alpha) {
  const Work w = make_work(s);
  std::vector<double> partial(w.chunks.size() * 3);
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(w, [&](int64_t c, const Chunk& ch) {
      const T* m = minv.ptrs ? at<T>(minv, ch) : nullptr;
      KernelsFor<T>::cg_step(at<T>(xs, ch), at<T>(rs, ch), at<T>(ps, ch), at<T>(hps, ch), m,
                             ch.len, alpha, &partial[3 * c]);
    });
  });
  double out[3];
  ordered_sum<3>(partial, out);
  return {out[0], out[1], out[2]};
}

void mt_cg_direction(const ListShape& s, MutList ps, ConstList rs, ConstList minv, float beta) {
  const Work w = make_work(s);
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(w, [&](int64_t, const Chunk& ch) {
      const T* m = minv.ptrs ? at<T>(minv, ch) : nullptr;
      KernelsFor<T>::cg_direction(at<T>(ps, ch), at<T>(rs, ch), m, ch.len, beta);
    });
  });
}

}  // namespace cpu
}  // namespace llmopt_ext
