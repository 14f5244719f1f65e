// Multi-tensor vector ops for Steihaug-CG, CPU implementation (OpenMP over chunks).
#include "multi_tensor.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common/multi_tensor_math.h"
#include "target_clones.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define LLMOPT_MT_FMV 1  // the condition of target_clones.h
#define LLMOPT_MT_AVX2 __attribute__((target("arch=x86-64-v3")))
#define LLMOPT_MT_AVX2_INLINE __attribute__((target("arch=x86-64-v3"), always_inline)) inline
#define LLMOPT_MT_BASE __attribute__((target("default")))
#endif

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

// ---- bf16 / fp16 stores, a block at a time ----------------------------------------
//
// The element-wise ops compute a block of kBlock double results into a stack
// buffer (a plain loop every clone vectorises), then round_block() rounds the
// buffer into bf16/fp16. The scalar store<T> (round-to-odd float, then RNE)
// mixes 4-wide double and 8-wide int32 lanes and does not vectorise well: the
// bf16 ops ran at 7-9 GB/s, behind a per-tensor PyTorch loop. The AVX2 version
// below rounds the double straight into the 16-bit format, which is the same
// single RNE rounding store<T> implements (float_types.h), so the bits agree;
// csrc/tests/test_multi_tensor_cpu.cpp checks it against store<T> on every
// exponent, ties, subnormal results, overflow, Inf and NaN payloads.
//
// For |d| in the format's normal range, with e = floor(log2 |d|) and
// M = 2^(e + 52 - kMant): |d| + M lies in [M, 2M), where a double's spacing is
// 2^(e - kMant), the format's spacing at |d|; so s = RN(|d| + M) =
// M + k 2^(e - kMant) with k = RNE(|d| / 2^(e - kMant)) in [2^kMant, 2^(kMant+1)]
// (ties to even: M's significand is even), and k is the low part of s's bits.
// The result's bits are ((E - Emin) << kMant) + k, E the biased double exponent
// and Emin = 1023 + kMinExp (k = 2^(kMant+1) carries into the exponent, as RNE
// must, up to Inf). Below 2^kMinExp, E clamped to Emin makes M = 2^(kMinExp +
// 52 - kMant) and k the subnormal count, RNE at the subnormal spacing (zero and
// double subnormals give k = 0). Lanes with |d| >= 2^kMaxExp (overflow beyond
// the rounding carry, Inf) or NaN take the scalar store<T> (16 lanes at a time).
constexpr int kBlock = 256;

template <class T> struct Fmt;
// kMant significand bits stored; results below 2^kMinExp are subnormal; |d| >= 2^kMaxExp
// (kMin, kMax as doubles) is past the rounding carry into Inf.
template <> struct Fmt<bf16> {
  static constexpr int kMant = 7, kMinExp = -126;
  static constexpr double kMin = 0x1p-126, kMax = 0x1p128;
};
template <> struct Fmt<fp16> {
  static constexpr int kMant = 10, kMinExp = -14;
  static constexpr double kMin = 0x1p-14, kMax = 0x1p16;
};

template <class T>
LLMOPT_INLINE void round_block_scalar(const double* in, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(in[i]);
}

#ifdef LLMOPT_MT_FMV
// 4 doubles -> 4 x 64-bit lanes whose low 32 bits are (E' << kMant) + k (the
// magnitude's bits plus Emin << kMant); `bad` flags |d| >= 2^kMaxExp and NaN.
template <class T>
LLMOPT_MT_AVX2_INLINE __m256i mag4(__m256d d, __m256d& bad) {
  using F = Fmt<T>;
  const __m256d a = _mm256_and_pd(d, _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffll)));
  const __m256d eb = _mm256_and_pd(d, _mm256_castsi256_pd(_mm256_set1_epi64x(0x7ff0000000000000ll)));
  const __m256d mx = _mm256_max_pd(eb, _mm256_set1_pd(F::kMin));
  const __m256d m = _mm256_castsi256_pd(
      _mm256_add_epi64(_mm256_castpd_si256(mx), _mm256_set1_epi64x((long long)(52 - F::kMant) << 52)));
  const __m256d s = _mm256_add_pd(a, m);
  const __m256i e = _mm256_srli_epi64(_mm256_castpd_si256(mx), 52 - F::kMant);
  bad = _mm256_or_pd(bad, _mm256_cmp_pd(a, _mm256_set1_pd(F::kMax), _CMP_NLT_UQ));
  return _mm256_add_epi64(e, _mm256_castpd_si256(s));
}

// The low (high) 32 bits of the 64-bit lanes of u and v: [u0 u1 v0 v1 | u2 u3 v2 v3].
LLMOPT_MT_AVX2_INLINE __m256i lo32(__m256i u, __m256i v) {
  return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(u), _mm256_castsi256_ps(v), 0x88));
}
LLMOPT_MT_AVX2_INLINE __m256i hi32(__m256d u, __m256d v) {
  return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castpd_ps(u), _mm256_castpd_ps(v), 0xDD));
}

template <class T>
LLMOPT_MT_AVX2_INLINE void round_block_avx2(const double* in, T* out, int64_t n) {
  const __m256i emin = _mm256_set1_epi32((1023 + Fmt<T>::kMinExp) << Fmt<T>::kMant);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256d d0 = _mm256_loadu_pd(in + i), d1 = _mm256_loadu_pd(in + i + 4);
    const __m256d d2 = _mm256_loadu_pd(in + i + 8), d3 = _mm256_loadu_pd(in + i + 12);
    __m256d bad = _mm256_setzero_pd();
    const __m256i m01 = _mm256_sub_epi32(lo32(mag4<T>(d0, bad), mag4<T>(d1, bad)), emin);
    const __m256i m23 = _mm256_sub_epi32(lo32(mag4<T>(d2, bad), mag4<T>(d3, bad)), emin);
    if (_mm256_movemask_pd(bad)) {
      round_block_scalar(in + i, out + i, 16);
      continue;
    }
    // sign: the high 32 bits, saturated to int16 (negative -> 0x8000 or below)
    const __m256i sign = _mm256_and_si256(_mm256_packs_epi32(hi32(d0, d1), hi32(d2, d3)),
                                          _mm256_set1_epi16(static_cast<short>(0x8000)));
    // [0..1 4..5 8..9 12..13 | 2..3 6..7 10..11 14..15] -> in order
    const __m256i h = _mm256_or_si256(_mm256_packus_epi32(m01, m23), sign);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  round_block_scalar(in + i, out + i, n - i);
}

LLMOPT_MT_AVX2 void round_block_bf16(const double* in, bf16* out, int64_t n) {
  round_block_avx2(in, out, n);
}
LLMOPT_MT_BASE void round_block_bf16(const double* in, bf16* out, int64_t n) {
  round_block_scalar(in, out, n);
}
LLMOPT_MT_AVX2 void round_block_f16(const double* in, fp16* out, int64_t n) {
  round_block_avx2(in, out, n);
}
LLMOPT_MT_BASE void round_block_f16(const double* in, fp16* out, int64_t n) {
  round_block_scalar(in, out, n);
}
#else
void round_block_bf16(const double* in, bf16* out, int64_t n) { round_block_scalar(in, out, n); }
void round_block_f16(const double* in, fp16* out, int64_t n) { round_block_scalar(in, out, n); }
#endif

inline void round_block(const double* in, bf16* out, int64_t n) { round_block_bf16(in, out, n); }
inline void round_block(const double* in, fp16* out, int64_t n) { round_block_f16(in, out, n); }

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
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) y[i] = store<T>(a * load(x[i]) + b * load(y[i]));
  } else {
    alignas(32) double buf[kBlock];
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t m = std::min<int64_t>(kBlock, n - i0);
      for (int64_t j = 0; j < m; ++j) buf[j] = a * load(x[i0 + j]) + b * load(y[i0 + j]);
      round_block(buf, y + i0, m);
    }
  }
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_norm_lanes(double* __restrict ax, double* __restrict ar,
                                 double* __restrict az, const T* __restrict x,
                                 const T* __restrict r, const T* __restrict minv, int64_t n) {
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
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_step_loop(T* __restrict x, T* __restrict r, const T* __restrict p,
                                const T* __restrict hp, const T* __restrict minv, int64_t n,
                                double alpha, double* out) {
  // Pass 1 updates x and r (a pure streaming loop); pass 2 reduces the stored
  // values while they are still in L1/L2 (a chunk of 16K fp32 is 64 KiB per
  // vector). One fused loop would be one pass, but GCC does not vectorise the
  // store-then-reload of the rounded values (measured 6x slower than axpby).
  double ax[kLanes] = {}, ar[kLanes] = {}, az[kLanes] = {};
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) {
      x[i] = store<T>(load(x[i]) + alpha * load(p[i]));
      r[i] = store<T>(load(r[i]) + alpha * load(hp[i]));
    }
    cg_norm_lanes<T, kPre>(ax, ar, az, x, r, minv, n);
  } else {
    alignas(32) double bx[kBlock], br[kBlock];
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t m = std::min<int64_t>(kBlock, n - i0);
      for (int64_t j = 0; j < m; ++j) {
        bx[j] = load(x[i0 + j]) + alpha * load(p[i0 + j]);
        br[j] = load(r[i0 + j]) + alpha * load(hp[i0 + j]);
      }
      round_block(bx, x + i0, m);
      round_block(br, r + i0, m);
    }
    cg_norm_lanes<T, kPre>(ax, ar, az, x, r, minv, n);
  }
  out[0] = lane_sum(ax);
  out[1] = lane_sum(ar);
  out[2] = kPre ? lane_sum(az) : out[1];
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_direction_loop(T* __restrict p, const T* __restrict r,
                                     const T* __restrict minv, int64_t n, double beta) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t i = 0; i < n; ++i) {
      const double z = kPre ? load(minv[i]) * load(r[i]) : load(r[i]);
      p[i] = store<T>(beta * load(p[i]) - z);
    }
  } else {
    alignas(32) double buf[kBlock];
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t m = std::min<int64_t>(kBlock, n - i0);
      for (int64_t j = 0; j < m; ++j) {
        const double z = kPre ? load(minv[i0 + j]) * load(r[i0 + j]) : load(r[i0 + j]);
        buf[j] = beta * load(p[i0 + j]) - z;
      }
      round_block(buf, p + i0, m);
    }
  }
}

// ---- bf16 / fp16 with exact == false: float32 math ---------------------------------
//
// Contract (csrc/common/multi_tensor_math.h, shared with the CUDA kernels): the 16-bit
// values are loaded exactly into float32 (bf16: a shift; fp16: the branch-free
// detail::f16_to_f32), the scalars are float32, each product and sum is rounded to
// float32 in the written order (-ffp-contract=off: no FMA), and the float32 result is
// rounded once, to nearest even, into the storage (the branch-free
// detail::f32_to_bf16_rne / f32_to_f16_rne). The plain loops below are the portable
// versions; x86-64-v3 CPUs run the AVX2/F16C versions after them (same operations,
// 8 elements a step). This path is memory-bound where the float64 one (~13 GB/s on
// bf16) was compute-bound. cg_step's norms are the float64 lanes of the exact path,
// over the stored values.

LLMOPT_INLINE float ld32(bf16 v) { return detail::f32_from_bits(static_cast<uint32_t>(v.bits) << 16); }
LLMOPT_INLINE float ld32(fp16 v) { return detail::f16_to_f32(v.bits); }

template <class T> LLMOPT_INLINE T st16(float f);
template <> LLMOPT_INLINE bf16 st16<bf16>(float f) { return bf16{detail::f32_to_bf16_rne(f)}; }
template <> LLMOPT_INLINE fp16 st16<fp16>(float f) { return fp16{detail::f32_to_f16_rne(f)}; }

template <class T>
LLMOPT_INLINE void axpby_f32_range(T* __restrict y, const T* __restrict x, int64_t n, float a,
                                   float b) {
  for (int64_t i = 0; i < n; ++i) y[i] = st16<T>(mt::axpby_f32(a, ld32(x[i]), b, ld32(y[i])));
}

// xs is ys (the one aliasing the op allows): one pointer, so the loop stays restrict.
template <class T>
LLMOPT_INLINE void axpby_f32_self(T* __restrict y, int64_t n, float a, float b) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = ld32(y[i]);
    y[i] = st16<T>(mt::axpby_f32(a, v, b, v));
  }
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_step_f32_loop(T* __restrict x, T* __restrict r, const T* __restrict p,
                                    const T* __restrict hp, const T* __restrict minv, int64_t n,
                                    float alpha, double* out) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = st16<T>(mt::cg_update_f32(ld32(x[i]), alpha, ld32(p[i])));
    r[i] = st16<T>(mt::cg_update_f32(ld32(r[i]), alpha, ld32(hp[i])));
  }
  double ax[kLanes] = {}, ar[kLanes] = {}, az[kLanes] = {};
  cg_norm_lanes<T, kPre>(ax, ar, az, x, r, minv, n);
  out[0] = lane_sum(ax);
  out[1] = lane_sum(ar);
  out[2] = kPre ? lane_sum(az) : out[1];
}

template <class T, bool kPre>
LLMOPT_INLINE void cg_direction_f32_loop(T* __restrict p, const T* __restrict r,
                                         const T* __restrict minv, int64_t n, float beta) {
  for (int64_t i = 0; i < n; ++i) {
    const float rv = ld32(r[i]);
    const float z = kPre ? mt::precond_f32(ld32(minv[i]), rv) : rv;
    p[i] = st16<T>(mt::cg_direction_f32(beta, ld32(p[i]), z));
  }
}

#ifdef LLMOPT_MT_FMV
// AVX2 (+F16C) versions, 8 elements a step, with the same per-element operations as the
// loops above: GCC did not vectorise the fp16 conversions well (the fp16 loops ran slower
// than the float64 path), and the loops cannot fuse cg_step's norms (the store-then-reload
// does not vectorise). Here cg_step rounds, stores, and accumulates the stored values'
// squares in one pass, in the double lanes of cg_norm_lanes (lane j = element i mod 32,
// kLanes = 4 groups of 8 floats = 8 __m256d), so its norms keep the exact path's bits.
// fp16 rounding is vcvtps2ph (RNE, = f32_to_f16_rne except for NaN payloads, which
// keep their top bits instead of becoming 0x7e00). 16 elements a step: bf16 packs two
// vectors of rounded bits into one 256-bit store.
template <class T> LLMOPT_MT_AVX2_INLINE __m256 from8(__m128i h);
template <> LLMOPT_MT_AVX2_INLINE __m256 from8<bf16>(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <> LLMOPT_MT_AVX2_INLINE __m256 from8<fp16>(__m128i h) { return _mm256_cvtph_ps(h); }

template <class T> LLMOPT_MT_AVX2_INLINE __m256 ld8(const T* p) {
  return from8<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Rounds 2 x 8 floats into T (RNE), stores the 16 elements at p, and returns the stored
// values as floats in f0, f1.
template <class T>
LLMOPT_MT_AVX2_INLINE void round_store16(T* p, __m256 v0, __m256 v1, __m256& f0, __m256& f1);

LLMOPT_MT_AVX2_INLINE __m256i bf16_bits(__m256 v) {  // = f32_to_bf16_rne, in 32-bit lanes, no NaN
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
}
template <>
LLMOPT_MT_AVX2_INLINE void round_store16<bf16>(bf16* p, __m256 v0, __m256 v1, __m256& f0, __m256& f1) {
  if (_mm256_movemask_ps(_mm256_cmp_ps(v0, v1, _CMP_UNORD_Q))) {  // a NaN: the scalar rounding
    alignas(32) float t[16];
    _mm256_store_ps(t, v0);
    _mm256_store_ps(t + 8, v1);
    for (int e = 0; e < 16; ++e) p[e] = st16<bf16>(t[e]);
    f0 = ld8(p);
    f1 = ld8(p + 8);
    return;
  }
  const __m256i b0 = bf16_bits(v0), b1 = bf16_bits(v1);
  // packus: [b0 0..3, b1 0..3 | b0 4..7, b1 4..7] -> quads 0, 2, 1, 3
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_permute4x64_epi64(_mm256_packus_epi32(b0, b1), 0xD8));
  f0 = _mm256_castsi256_ps(_mm256_slli_epi32(b0, 16));
  f1 = _mm256_castsi256_ps(_mm256_slli_epi32(b1, 16));
}
template <>
LLMOPT_MT_AVX2_INLINE void round_store16<fp16>(fp16* p, __m256 v0, __m256 v1, __m256& f0, __m256& f1) {
  const __m128i h0 = _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i h1 = _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h0);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), h1);
  f0 = _mm256_cvtph_ps(h0);
  f1 = _mm256_cvtph_ps(h1);
}

template <class T>
LLMOPT_MT_AVX2_INLINE void axpby_f32_avx2(T* y, const T* x, int64_t n, float a, float b) {
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  int64_t i = 0;
  __m256 f0, f1;
  for (; i + 16 <= n; i += 16)  // x may be y: both loaded before the store
    round_store16(y + i,
                  _mm256_add_ps(_mm256_mul_ps(va, ld8(x + i)), _mm256_mul_ps(vb, ld8(y + i))),
                  _mm256_add_ps(_mm256_mul_ps(va, ld8(x + i + 8)), _mm256_mul_ps(vb, ld8(y + i + 8))),
                  f0, f1);
  for (; i < n; ++i) y[i] = st16<T>(mt::axpby_f32(a, ld32(x[i]), b, ld32(y[i])));
}

template <class T, bool kPre>
LLMOPT_MT_AVX2_INLINE __m256 direction8(__m256 vb, const T* p, const T* r, const T* minv) {
  const __m256 rv = ld8(r);
  const __m256 z = kPre ? _mm256_mul_ps(ld8(minv), rv) : rv;
  return _mm256_sub_ps(_mm256_mul_ps(vb, ld8(p)), z);
}

template <class T, bool kPre>
LLMOPT_MT_AVX2_INLINE void cg_direction_f32_avx2(T* p, const T* r, const T* minv, int64_t n,
                                                 float beta) {
  const __m256 vb = _mm256_set1_ps(beta);
  int64_t i = 0;
  __m256 f0, f1;
  for (; i + 16 <= n; i += 16)
    round_store16(p + i, direction8<T, kPre>(vb, p + i, r + i, minv + i),
                  direction8<T, kPre>(vb, p + i + 8, r + i + 8, minv + i + 8), f0, f1);
  for (; i < n; ++i) {
    const float rv = ld32(r[i]);
    const float z = kPre ? mt::precond_f32(ld32(minv[i]), rv) : rv;
    p[i] = st16<T>(mt::cg_direction_f32(beta, ld32(p[i]), z));
  }
}

// acc[h] += d(v_h)^2 and so on for the two halves of 8 floats (no FMA: -ffp-contract=off).
LLMOPT_MT_AVX2_INLINE __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
LLMOPT_MT_AVX2_INLINE __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

template <class T, bool kPre>
LLMOPT_MT_AVX2_INLINE void cg_step_f32_avx2(T* x, T* r, const T* p, const T* hp, const T* minv,
                                            int64_t n, float alpha, double* out) {
  static_assert(kLanes == 32, "4 groups of 8 floats = 8 vectors of 4 doubles");
  __m256d ax[8], ar[8], az[8];
  for (int v = 0; v < 8; ++v) ax[v] = ar[v] = az[v] = _mm256_setzero_pd();
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 2
    for (int g = 0; g < 4; g += 2) {
      const int64_t k = i + 8 * g;
      __m256 xv[2], rv[2];  // the stored values of elements k .. k + 15
      round_store16(x + k, _mm256_add_ps(ld8(x + k), _mm256_mul_ps(va, ld8(p + k))),
                    _mm256_add_ps(ld8(x + k + 8), _mm256_mul_ps(va, ld8(p + k + 8))), xv[0], xv[1]);
      round_store16(r + k, _mm256_add_ps(ld8(r + k), _mm256_mul_ps(va, ld8(hp + k))),
                    _mm256_add_ps(ld8(r + k + 8), _mm256_mul_ps(va, ld8(hp + k + 8))), rv[0], rv[1]);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int v = 2 * (g + h);  // lanes 4v .. 4v + 7
        const __m256d x0 = lo_pd(xv[h]), x1 = hi_pd(xv[h]), r0 = lo_pd(rv[h]), r1 = hi_pd(rv[h]);
        ax[v] = _mm256_add_pd(ax[v], _mm256_mul_pd(x0, x0));
        ax[v + 1] = _mm256_add_pd(ax[v + 1], _mm256_mul_pd(x1, x1));
        ar[v] = _mm256_add_pd(ar[v], _mm256_mul_pd(r0, r0));
        ar[v + 1] = _mm256_add_pd(ar[v + 1], _mm256_mul_pd(r1, r1));
        if (kPre) {
          const __m256 mv = ld8(minv + k + 8 * h);
          az[v] = _mm256_add_pd(az[v], _mm256_mul_pd(r0, _mm256_mul_pd(lo_pd(mv), r0)));
          az[v + 1] = _mm256_add_pd(az[v + 1], _mm256_mul_pd(r1, _mm256_mul_pd(hi_pd(mv), r1)));
        }
      }
    }
  }
  alignas(32) double sx[kLanes], sr[kLanes], sz[kLanes];
  for (int v = 0; v < 8; ++v) {
    _mm256_store_pd(sx + 4 * v, ax[v]);
    _mm256_store_pd(sr + 4 * v, ar[v]);
    _mm256_store_pd(sz + 4 * v, az[v]);
  }
  for (int j = 0; i < n; ++i, ++j) {  // the tail, in lanes 0.. as cg_norm_lanes
    x[i] = st16<T>(mt::cg_update_f32(ld32(x[i]), alpha, ld32(p[i])));
    r[i] = st16<T>(mt::cg_update_f32(ld32(r[i]), alpha, ld32(hp[i])));
    const double xv = ld32(x[i]), rv = ld32(r[i]);
    sx[j] += xv * xv;
    sr[j] += rv * rv;
    if (kPre) sz[j] += rv * (static_cast<double>(ld32(minv[i])) * rv);
  }
  out[0] = lane_sum(sx);
  out[1] = lane_sum(sr);
  out[2] = kPre ? lane_sum(sz) : out[1];
}

#define LLMOPT_F32_KERNELS_AVX2(T, S)                                                        \
  LLMOPT_MT_AVX2 void axpby_f32_##S(T* y, const T* x, int64_t n, float a, float b) {         \
    axpby_f32_avx2(y, x, n, a, b);                                                           \
  }                                                                                          \
  LLMOPT_MT_AVX2 void cg_step_f32_##S(T* x, T* r, const T* p, const T* hp, const T* minv,   \
                                      int64_t n, float alpha, double* out) {                 \
    if (minv) cg_step_f32_avx2<T, true>(x, r, p, hp, minv, n, alpha, out);                   \
    else cg_step_f32_avx2<T, false>(x, r, p, hp, minv, n, alpha, out);                       \
  }                                                                                          \
  LLMOPT_MT_AVX2 void cg_direction_f32_##S(T* p, const T* r, const T* minv, int64_t n,       \
                                           float beta) {                                     \
    if (minv) cg_direction_f32_avx2<T, true>(p, r, minv, n, beta);                           \
    else cg_direction_f32_avx2<T, false>(p, r, minv, n, beta);                               \
  }
LLMOPT_F32_KERNELS_AVX2(bf16, bf16)
LLMOPT_F32_KERNELS_AVX2(fp16, f16)
#define LLMOPT_F32_PORTABLE LLMOPT_MT_BASE
#else
#define LLMOPT_F32_PORTABLE
#endif

// The portable versions (CPUs without AVX2, other compilers).
#define LLMOPT_F32_KERNELS(T, S)                                                             \
  LLMOPT_F32_PORTABLE void axpby_f32_##S(T* y, const T* x, int64_t n, float a, float b) {    \
    if (x == y) axpby_f32_self(y, n, a, b);                                                  \
    else axpby_f32_range(y, x, n, a, b);                                                     \
  }                                                                                          \
  LLMOPT_F32_PORTABLE void cg_step_f32_##S(T* x, T* r, const T* p, const T* hp,              \
                                           const T* minv, int64_t n, float alpha,            \
                                           double* out) {                                    \
    if (minv) cg_step_f32_loop<T, true>(x, r, p, hp, minv, n, alpha, out);                   \
    else cg_step_f32_loop<T, false>(x, r, p, hp, minv, n, alpha, out);                       \
  }                                                                                          \
  LLMOPT_F32_PORTABLE void cg_direction_f32_##S(T* p, const T* r, const T* minv, int64_t n,  \
                                                float beta) {                                \
    if (minv) cg_direction_f32_loop<T, true>(p, r, minv, n, beta);                           \
    else cg_direction_f32_loop<T, false>(p, r, minv, n, beta);                               \
  }                                                                                          \
  struct F32Kernels_##S {                                                                    \
    static void axpby(T* y, const T* x, int64_t n, float a, float b) {                       \
      axpby_f32_##S(y, x, n, a, b);                                                          \
    }                                                                                        \
    static void cg_step(T* x, T* r, const T* p, const T* hp, const T* m, int64_t n, float al, \
                        double* out) { cg_step_f32_##S(x, r, p, hp, m, n, al, out); }       \
    static void cg_direction(T* p, const T* r, const T* m, int64_t n, float be) {            \
      cg_direction_f32_##S(p, r, m, n, be);                                                  \
    }                                                                                        \
  };

LLMOPT_F32_KERNELS(bf16, bf16)
LLMOPT_F32_KERNELS(fp16, f16)

template <class T> struct F32KernelsFor;
template <> struct F32KernelsFor<bf16> : F32Kernels_bf16 {};
template <> struct F32KernelsFor<fp16> : F32Kernels_f16 {};

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

void round_doubles(DType dtype, const double* in, void* out, int64_t n) {
  switch (dtype) {
    case DType::BFloat16: round_block(in, static_cast<bf16*>(out), n); return;
    case DType::Float16: round_block(in, static_cast<fp16*>(out), n); return;
    case DType::Float32: break;
  }
  round_block_scalar(in, static_cast<float*>(out), n);
}

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

void mt_axpby(const ListShape& s, MutList ys, ConstList xs, float a, float b, bool exact) {
  const Work w = make_work(s);
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (!exact) {
        for_each_chunk(w, [&](int64_t, const Chunk& ch) {
          F32KernelsFor<T>::axpby(at<T>(ys, ch), at<T>(xs, ch), ch.len, a, b);
        });
        return;
      }
    }
    for_each_chunk(w, [&](int64_t, const Chunk& ch) {
      KernelsFor<T>::axpby(at<T>(ys, ch), at<T>(xs, ch), ch.len, a, b);
    });
  });
}

CgStepNorms mt_cg_step(const ListShape& s, MutList xs, MutList rs, ConstList ps, ConstList hps,
                       ConstList minv, float alpha, bool exact) {
  const Work w = make_work(s);
  std::vector<double> partial(w.chunks.size() * 3);
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (!exact) {
        for_each_chunk(w, [&](int64_t c, const Chunk& ch) {
          const T* m = minv.ptrs ? at<T>(minv, ch) : nullptr;
          F32KernelsFor<T>::cg_step(at<T>(xs, ch), at<T>(rs, ch), at<T>(ps, ch), at<T>(hps, ch), m,
                                    ch.len, alpha, &partial[3 * c]);
        });
        return;
      }
    }
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

void mt_cg_direction(const ListShape& s, MutList ps, ConstList rs, ConstList minv, float beta,
                     bool exact) {
  const Work w = make_work(s);
  dispatch(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      if (!exact) {
        for_each_chunk(w, [&](int64_t, const Chunk& ch) {
          const T* m = minv.ptrs ? at<T>(minv, ch) : nullptr;
          F32KernelsFor<T>::cg_direction(at<T>(ps, ch), at<T>(rs, ch), m, ch.len, beta);
        });
        return;
      }
    }
    for_each_chunk(w, [&](int64_t, const Chunk& ch) {
      const T* m = minv.ptrs ? at<T>(minv, ch) : nullptr;
      KernelsFor<T>::cg_direction(at<T>(ps, ch), at<T>(rs, ch), m, ch.len, beta);
    });
  });
}

}  // namespace cpu
}  // namespace llmopt_ext
