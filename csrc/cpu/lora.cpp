// LoRA merge / unmerge, CPU implementation (OpenMP over row blocks).
//
// One pass over W: a micro-kernel keeps the float32 sums of kRowGroup rows x
// one column block (two vectors) in registers over all r terms (each Q vector
// is loaded once for the kRowGroup rows), then rounds W +/- D for those
// elements straight from the registers, in float32 (no double, see "W +/- D
// rounded once" below). The r mul + r add per element are the floor (the
// contract rules out FMA): on a 2-core AVX2 machine they run near the FP
// units' peak (2 mul + 2 add vectors a cycle), which makes the op compute-bound
// at r = 64 for every dtype and at r = 16 for bf16/fp16 (half the bytes per
// element); float32 at r = 16 reaches the copy bandwidth.
//
// Bits: the same operations per element as the contract in lora.h, in the
// same order: acc = ((0 + p0 q0) + p1 q1) + ... in float32, mul and add kept
// apart (-ffp-contract=off; the vector types are GCC vector extensions: lane-
// wise IEEE float32 ops), then D = float32(s * acc).
//
// Vector width: 8 lanes (32-byte vectors) where the CPU has AVX2 (x86-64-v3),
// 4 lanes elsewhere (16-byte vectors: SSE2, NEON). Two versions of each entry
// point, picked at load time like target_clones (which cannot give the clones
// different bodies); GCC's lowering of 32-byte vectors to SSE2 went through
// memory, 5x slower than the old scalar code.
#include "lora.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

#include "target_clones.h"  // LLMOPT_INLINE

// The helpers below pass 32-byte vectors by value; all are force-inlined into
// the AVX2 versions, so no call crosses an ABI boundary.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace llmopt_ext {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMOPT_MERGE_FMV 1  // the condition of target_clones.h
#define LLMOPT_AVX2_VERSION __attribute__((target("arch=x86-64-v3")))
#define LLMOPT_BASE_VERSION __attribute__((target("default")))
#endif

// ---- vectors of L float32 lanes ------------------------------------------------
//
// A column block is 2L columns in two vectors. bf16/fp16 W is loaded as one
// vector of L 32-bit words, each holding two 16-bit values (columns 2k and
// 2k + 1), and split with a shift and a mask into the even columns (vector lo)
// and the odd ones (hi): perm. Q is packed in the same order; the store joins
// the two halves back with a shift, a mask and an or. (Same speed as
// punpcklwd / pshufb shuffles, and portable: no shuffle builtins, either byte
// order.)

constexpr bool kLittle = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

template <int L> struct V;

template <> struct V<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef int32_t i __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
  typedef uint16_t h __attribute__((vector_size(32)));  // 2L halves
  static constexpr int perm[16] = {0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15};
  static LLMOPT_INLINE bool any(i m) {  // vextracti128 + vpor + 2 moves
    typedef int64_t l2 __attribute__((vector_size(16)));
    l2 x[2];
    std::memcpy(x, &m, sizeof m);
    const l2 y = x[0] | x[1];
    return (y[0] | y[1]) != 0;
  }
};

template <> struct V<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef int32_t i __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(16)));
  typedef uint16_t h __attribute__((vector_size(16)));
  static constexpr int perm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  static LLMOPT_INLINE bool any(i m) {
    typedef int64_t l2 __attribute__((vector_size(16)));
    const l2 x = (l2)m;
    return (x[0] | x[1]) != 0;
  }
};

// kHigh: each 16-bit value into the upper half of its 32-bit lane (bf16 ->
// float32 bits), else into the lower half, zero-extended. Column 2k is the
// first 16-bit element of word k: its lower half on a little-endian machine.
template <bool kHigh, class U>
LLMOPT_INLINE void widen(U x, U& lo, U& hi) {
  const U from_lower = kHigh ? x << 16 : x & 0xffffu;
  const U from_upper = kHigh ? x & 0xffff0000u : x >> 16;
  lo = kLittle ? from_lower : from_upper;
  hi = kLittle ? from_upper : from_lower;
}
// The inverse: lo and hi hold their 16-bit results in the upper half (kHigh;
// the lower half is discarded) or in the lower half (below 2^16).
template <bool kHigh, class U>
LLMOPT_INLINE U narrow(U lo, U hi) {
  const U to_lower = kLittle ? lo : hi, to_upper = kLittle ? hi : lo;
  return kHigh ? (to_lower >> 16) | (to_upper & 0xffff0000u) : to_lower | (to_upper << 16);
}

template <class X> LLMOPT_INLINE X loadv(const void* p) { X v; std::memcpy(&v, p, sizeof v); return v; }
template <class X> LLMOPT_INLINE void storev(void* p, X v) { std::memcpy(p, &v, sizeof v); }
// Runtime scalars enter the vector ops as scalar operands (GCC broadcasts them
// with one vbroadcastss; a brace-initialised vector became 8 inserts).

// Rows of one micro-kernel: with two vectors per row, 4 rows are 8 vector
// accumulators, plus two Q vectors and a broadcast P value: 11 of AVX2's 16
// registers. Per term that issues 8 mul + 8 add for 2 Q loads and 4
// broadcasts, so it runs at the FP units' rate; 5 or 6 rows, 3 rows x 4
// vectors, or unrolling the terms by 2 measured no faster.
constexpr int kRowGroup = 4;
static_assert(kMergeColTile % 16 == 0, "a tile holds whole column blocks");

// ---- W in and out of float32 (vector forms of float_types.h) -----------------
//
// load: a row's block as two float32 vectors (exact). store: RNE into W's
// dtype (exact for any float32). flag_fast / store_fast: a cheaper store that
// is valid only when flag_fast(sums of the micro-kernel) is false.

template <class T, int L> struct Lanes;

template <int L> struct Lanes<float, L> {
  using f = typename V<L>::f;
  static LLMOPT_INLINE void load(const float* w, f& lo, f& hi) { lo = loadv<f>(w); hi = loadv<f>(w + L); }
  static LLMOPT_INLINE void store(float* w, f lo, f hi) { storev(w, lo); storev(w + L, hi); }
};

template <int L> struct Lanes<bf16, L> {
  using f = typename V<L>::f;
  using i = typename V<L>::i;
  using u = typename V<L>::u;
  using h = typename V<L>::h;
  static LLMOPT_INLINE void load(const bf16* w, f& lo, f& hi) {
    u a, b;
    widen<true>(loadv<u>(w), a, b);
    lo = (f)a;
    hi = (f)b;
  }
  // detail::f32_to_bf16_rne, the result in each lane's upper half
  static LLMOPT_INLINE u rne(f x) {
    const u b = (u)x;
    const u rne = b + 0x7fffu + ((b >> 16) & 1u);
    const u nan = b | 0x00400000u;  // quiet NaN, sign kept
    return (u)((i)(b & 0x7fffffffu) > 0x7f800000 ? (i)nan : (i)rne);
  }
  static LLMOPT_INLINE void store(bf16* w, f lo, f hi) { storev(w, narrow<true>(rne(lo), rne(hi))); }
  // Without ties (low 16 bits 0x8000) and NaN, round-to-nearest is adding
  // half an ulp and truncating (inf and overflow to inf included). flag_fast
  // tests each 32-bit lane with one 16-bit and + compare: its low half equal
  // to 0x8000 (a midpoint), or its high half's exponent bits all ones (NaN;
  // inf is a harmless false alarm). Integer ops only: the FP adders are busy
  // with the terms (a NaN probe by float sums cost 10% at r = 16).
  static LLMOPT_INLINE u half_up(f x) { return (u)x + 0x8000u; }
  template <int R>
  static LLMOPT_INLINE bool flag_fast(const f (&sum)[R][2]) {
    constexpr uint32_t kMask = kLittle ? 0x7f80ffffu : 0xffff7f80u;  // per 16-bit half
    constexpr uint32_t kHit = kLittle ? 0x7f808000u : 0x80007f80u;
    h hit = (h)((u)sum[0][0] & kMask) == (h)(u{} + kHit);
    for (int ri = 0; ri < R; ++ri)
      for (int v = 0; v < 2; ++v)
        if (ri || v) hit |= (h)((u)sum[ri][v] & kMask) == (h)(u{} + kHit);
    return V<L>::any((i)hit);
  }
  static LLMOPT_INLINE void store_fast(bf16* w, f lo, f hi) {
    storev(w, narrow<true>(half_up(lo), half_up(hi)));
  }
};

template <int L> struct Lanes<fp16, L> {
  using f = typename V<L>::f;
  using i = typename V<L>::i;
  using u = typename V<L>::u;
  using h = typename V<L>::h;
  // detail::f16_to_f32
  static LLMOPT_INLINE f f32(u x) {
    const u sign = (x & 0x8000u) << 16;
    const i em = (i)(x & 0x7fffu);
    const u o = (u)em << 13;
    const u normal = o + ((em >= 0x7c00) ? 0x70000000u : 0x38000000u);  // inf/NaN: exponent 255
    const i sub = (i)(__builtin_convertvector(em, f) * 0x1p-24f);       // exact
    return (f)(sign | (u)(em >= 0x0400 ? (i)normal : sub));
  }
  static LLMOPT_INLINE void load(const fp16* w, f& lo, f& hi) {
    u a, b;
    widen<false>(loadv<u>(w), a, b);
    lo = f32(a);
    hi = f32(b);
  }
  // detail::f32_to_f16_rne (>= 65520 -> inf as a min: below it the result is < 0x7c00)
  static LLMOPT_INLINE u rne(f x) {
    const u b = (u)x;
    const u sign = (b >> 16) & 0x8000u;
    const i a = (i)(b & 0x7fffffffu);
    const i sub = (i)((u)((f)a + 0.5f) - 0x3f000000u);
    const i norm = (i)(((u)a - (112u << 23) + 0xfffu + (((u)a >> 13) & 1u)) >> 13);
    i r = a < 0x38800000 ? sub : norm;
    r = r < 0x7c00 ? r : i{} + 0x7c00;
    r = a > 0x7f800000 ? i{} + 0x7e00 : r;
    return sign | (u)r;
  }
  static LLMOPT_INLINE void store(fp16* w, f lo, f hi) { storev(w, narrow<false>(rne(lo), rne(hi))); }
  // Without lanes in [2^-25, 2^-14) (fp16 subnormals and the midpoint below
  // the smallest one) or normal-range midpoints (low 13 bits 0x1000),
  // round-to-nearest is adding half an ulp and truncating; below 2^-25 that
  // gives a negative value, clamped to 0, and from 65520 up one >= 0x7c00,
  // clamped to inf.
  // With 16-bit ops per 32-bit lane, y = (half & mask) - base <= limit
  // (unsigned, as min(y, limit) == y): the low half's 13 bits equal to 0x1000,
  // or the high half (sign dropped) in [0x3300, 0x3880).
  template <int R>
  static LLMOPT_INLINE bool flag_fast(const f (&sum)[R][2]) {
    constexpr uint32_t kMask = kLittle ? 0x7fff1fffu : 0x1fff7fffu;
    constexpr uint32_t kBase = kLittle ? 0x33001000u : 0x10003300u;
    constexpr uint32_t kLimit = kLittle ? 0x057f0000u : 0x0000057fu;
    const h mask = (h)(u{} + kMask), base = (h)(u{} + kBase), limit = (h)(u{} + kLimit);
    h hit{};
    for (int ri = 0; ri < R; ++ri)
      for (int v = 0; v < 2; ++v) {
        const h y = ((h)sum[ri][v] & mask) - base;
        hit |= (h)((y < limit ? y : limit) == y);  // vpminuw, vpcmpeqw
      }
    return V<L>::any((i)hit);
  }
  static LLMOPT_INLINE u rne_fast(f x) {
    const u b = (u)x;
    const u sign = (b >> 16) & 0x8000u;
    const i a = (i)(b & 0x7fffffffu);
    i r = (a + (0x1000 - (112 << 23))) >> 13;  // arithmetic shift
    r = r < 0x7c00 ? r : i{} + 0x7c00;
    r = r > 0 ? r : i{};
    r = a > 0x7f800000 ? i{} + 0x7e00 : r;
    return sign | (u)r;
  }
  static LLMOPT_INLINE void store_fast(fp16* w, f lo, f hi) {
    storev(w, narrow<false>(rne_fast(lo), rne_fast(hi)));
  }
};

// ---- W +/- D rounded once, in float32 ---------------------------------------
//
// The contract rounds x = double(w) +/- double(d) into W's dtype (csrc/cpu/lora.h):
// RN64 of the exact sum, then float32 (RNE) for a float32 W, or round-to-odd
// float32 then RNE for bf16/fp16 (float_types.h). Both are reproduced here in
// float32 arithmetic only, lane-wise in the vectors:
//
// float32 W: RN32(RN64(w + d)) = RN32(w + d), the plain float32 sum. Rounding a
// sum of two p-bit numbers first to a format with >= 2p + 2 bits and then to p
// bits gives the same as rounding once (Figueroa; 53 >= 2 * 24 + 2), including
// overflow and subnormal results (those are exact).
//
// bf16/fp16 W (w exact in float32): s = RN32(w + d). The contract's float32
// intermediate, RO32(RN64(w + d)), is s itself or a float32 neighbour of s,
// and then an odd one; an odd float32 is never a bf16/fp16 rounding midpoint
// (midpoints end in 0x8000, resp. 0x1000 or are multiples of 2^-25), and no
// midpoint lies strictly between neighbours, so RNE of the intermediate equals
// RNE of s unless s itself is a midpoint. The fast path stores RNE(s)
// (store_fast); a micro-kernel where some lane may be a midpoint or NaN
// (flag_fast: about 1 in 1000 bf16 micro-kernels of random data) takes
// round_sum_ro32, which rebuilds the intermediate exactly:
//
// e = w + d - s exactly (TwoSum: 6 float32 ops, no FMA, valid when s is
// finite). RN64(s + e) collapses to s (an exact float32: no sticky bit) iff
// |e| <= half the double spacing next to s on e's side (the tie goes to s,
// whose double mantissa ends in 29 zeros): 2^(E-53) for 2^E <= |s|, or
// 2^(E-54) when |s| = 2^E and e points toward zero. Otherwise RN64(s + e) lies
// strictly between s and its float32 neighbour on e's side (never on it: |e|
// is at most half that gap), and round-to-odd picks whichever of the two is
// odd; as truncate-then-set-the-last-bit in float_types.h: bits(s) minus 1 if e
// points toward zero, | 1. s = 0 has e = 0 (float sums that round to 0 are
// exact), subnormal s likewise; inf and NaN s keep s (e is NaN: the compare is
// false). RNE of this float32 into bf16/fp16 (>= 13 spare bits, round-to-odd
// then round-to-nearest, Boldo-Melquiond) equals the rounding of the double.
// The RN64 step matters: for w = 2^-70 and d = 1 + 2^-8 the double is exactly
// the bf16 midpoint 1 + 2^-8 and rounds to even (1.0), while the exact w + d
// rounds up; csrc/tests/test_lora_cpu.cpp builds such cases. When s
// overflows, the double path gets FLT_MAX|1 where this keeps inf: both round
// to inf in bf16 and fp16.
//
// NaN: a NaN W or D gives NaN, quieted, sign and payload kept, as before; when
// both are NaN, which one's payload survives is up to the compiler's operand
// order (the double path gave D's; the CUDA kernel gives a canonical NaN).
template <bool kSub, class F>
LLMOPT_INLINE F add(F w, F d) {
  return kSub ? w - d : w + d;
}

template <bool kSub, int L, class F = typename V<L>::f>
LLMOPT_INLINE F round_sum_ro32(F w, F d) {
  using I = typename V<L>::i;
  using U = typename V<L>::u;
  const F s = add<kSub>(w, d);
  const F b = kSub ? -d : d;
  const F bb = s - w;
  const F e = (w - (s - bb)) + (b - bb);
  const U us = (U)s, ue = (U)e;
  const I toward_zero = (I)(us ^ ue) < 0;              // signs differ: -1 / 0
  const I pow2 = (I)(us & 0x007fffffu) == 0;           // |s| = 2^E (or 0/inf)
  const F gap53 = (F)(us & 0x7f800000u) * 0x1p-53f;    // 2^(E-53); 0 for subnormal s
  const F half_gap = (toward_zero & pow2) ? gap53 * 0.5f : gap53;
  const I sticky = (F)(ue & 0x7fffffffu) > half_gap;   // false for NaN e
  const U ro = (us + (U)toward_zero) | 1u;
  return (F)(sticky ? (I)ro : (I)us);
}

// ---- the micro-kernel ---------------------------------------------------------

// acc[ri][v] = sum_j p[ri * r + j] * q[j * 2L + v * L + lane], j in order.
template <int L, int R>
LLMOPT_INLINE void accumulate(typename V<L>::f (&acc)[R][2], const float* __restrict p,
                              const float* __restrict q, int64_t r) {
  using f = typename V<L>::f;
  for (int ri = 0; ri < R; ++ri) acc[ri][0] = acc[ri][1] = f{};
  for (int64_t j = 0; j < r; ++j) {
    const f q0 = loadv<f>(q + j * 2 * L), q1 = loadv<f>(q + j * 2 * L + L);
    for (int ri = 0; ri < R; ++ri) {
      const float pj = p[ri * r + j];
      acc[ri][0] = acc[ri][0] + pj * q0;
      acc[ri][1] = acc[ri][1] + pj * q1;
    }
  }
}

// The exact bf16/fp16 path for a micro-kernel flag_fast flagged (rare): the
// sums are accumulated again (same operations, same bits) so the fast path
// need not keep them live.
template <class T, int L, int R, bool kSub>
LLMOPT_INLINE void micro_exact(T* w, int64_t w_rs, const float* p, const float* q, int64_t r,
                               float s) {
  typename V<L>::f acc[R][2];
  accumulate<L, R>(acc, p, q, r);
  for (int ri = 0; ri < R; ++ri) {
    typename V<L>::f w0, w1;
    Lanes<T, L>::load(w + ri * w_rs, w0, w1);
    Lanes<T, L>::store(w + ri * w_rs, round_sum_ro32<kSub, L>(w0, s * acc[ri][0]),
                       round_sum_ro32<kSub, L>(w1, s * acc[ri][1]));
  }
}

// W[ri, c] (row stride w_rs) for ri < R, c < 2L, with P rows p + ri * r and
// the block's packed Q values (zero-padded: a partial block still reads
// whole vectors).
template <class T, int L, int R, bool kSub>
LLMOPT_INLINE void micro(T* w, int64_t w_rs, const float* __restrict p, const float* __restrict q,
                         int64_t r, float s) {
  typename V<L>::f acc[R][2], sum[R][2];
  accumulate<L, R>(acc, p, q, r);
  for (int ri = 0; ri < R; ++ri) {
    typename V<L>::f w0, w1;
    Lanes<T, L>::load(w + ri * w_rs, w0, w1);
    sum[ri][0] = add<kSub>(w0, s * acc[ri][0]);
    sum[ri][1] = add<kSub>(w1, s * acc[ri][1]);
  }
  if constexpr (std::is_same_v<T, float>) {
    for (int ri = 0; ri < R; ++ri) Lanes<T, L>::store(w + ri * w_rs, sum[ri][0], sum[ri][1]);
  } else if (__builtin_expect(!Lanes<T, L>::flag_fast(sum), 1)) {
    for (int ri = 0; ri < R; ++ri) Lanes<T, L>::store_fast(w + ri * w_rs, sum[ri][0], sum[ri][1]);
  } else {
    micro_exact<T, L, R, kSub>(w, w_rs, p, q, r, s);
  }
}

// A row group's last, partial block (nw < 2L columns): through a zero-padded
// copy, with the same lane arithmetic.
template <class T, int L, int R, bool kSub>
LLMOPT_INLINE void micro_partial(T* w, int64_t w_rs, const float* p, const float* q, int64_t r,
                                 float s, int64_t nw) {
  T tmp[R][2 * L];
  std::memset(tmp, 0, sizeof tmp);
  for (int ri = 0; ri < R; ++ri) std::memcpy(tmp[ri], w + ri * w_rs, nw * sizeof(T));
  micro<T, L, R, kSub>(&tmp[0][0], 2 * L, p, q, r, s);
  for (int ri = 0; ri < R; ++ri) std::memcpy(w + ri * w_rs, tmp[ri], nw * sizeof(T));
}

template <class T, int L, int R, bool kSub>
LLMOPT_INLINE void rows_span(T* w, int64_t w_rs, const float* p, const float* q, int64_t r,
                             float s, int64_t n) {
  int64_t c = 0;
  for (; c + 2 * L <= n; c += 2 * L, q += r * 2 * L) micro<T, L, R, kSub>(w + c, w_rs, p, q, r, s);
  if (c < n) micro_partial<T, L, R, kSub>(w + c, w_rs, p, q, r, s, n - c);
}

// Rows [i0, i1) x columns [0, n) of one work item (w, q already offset to the
// tile's first column block).
template <class T, int L, bool kSub>
LLMOPT_INLINE void tile(T* w, int64_t w_rs, const float* p, const float* q, int64_t r, float s,
                        int64_t i0, int64_t i1, int64_t n) {
  int64_t i = i0;
  for (; i + kRowGroup <= i1; i += kRowGroup)
    rows_span<T, L, kRowGroup, kSub>(w + i * w_rs, w_rs, p + i * r, q, r, s, n);
  for (; i < i1; ++i) rows_span<T, L, 1, kSub>(w + i * w_rs, w_rs, p + i * r, q, r, s, n);
}

// One entry point per (dtype, sign), in an AVX2 and a baseline version.
#ifdef LLMOPT_MERGE_FMV
LLMOPT_AVX2_VERSION int merge_lanes() { return 8; }
LLMOPT_BASE_VERSION int merge_lanes() { return 4; }
#define LLMOPT_MERGE_TILE(name, T_, sub)                                                      \
  using name##_t = T_;                                                                      \
  LLMOPT_AVX2_VERSION void name(name##_t* w, int64_t w_rs, const float* p, const float* q,  \
                                int64_t r, float s, int64_t i0, int64_t i1, int64_t n) {    \
    tile<name##_t, 8, sub>(w, w_rs, p, q, r, s, i0, i1, n);                                 \
  }                                                                                         \
  LLMOPT_BASE_VERSION void name(name##_t* w, int64_t w_rs, const float* p, const float* q,  \
                                int64_t r, float s, int64_t i0, int64_t i1, int64_t n) {    \
    tile<name##_t, 4, sub>(w, w_rs, p, q, r, s, i0, i1, n);                                 \
  }
#else
int merge_lanes() { return 4; }
#define LLMOPT_MERGE_TILE(name, T_, sub)                                                      \
  using name##_t = T_;                                                                      \
  void name(name##_t* w, int64_t w_rs, const float* p, const float* q, int64_t r, float s,   \
            int64_t i0, int64_t i1, int64_t n) {                                            \
    tile<name##_t, 4, sub>(w, w_rs, p, q, r, s, i0, i1, n);                                 \
  }
#endif
LLMOPT_MERGE_TILE(tile_f32_add, float, false)
LLMOPT_MERGE_TILE(tile_f32_sub, float, true)
LLMOPT_MERGE_TILE(tile_bf16_add, bf16, false)
LLMOPT_MERGE_TILE(tile_bf16_sub, bf16, true)
LLMOPT_MERGE_TILE(tile_f16_add, fp16, false)
LLMOPT_MERGE_TILE(tile_f16_sub, fp16, true)
#undef LLMOPT_MERGE_TILE

void tile_any(DType t, bool sub, void* w, int64_t w_rs, const float* p, const float* q, int64_t r,
              float s, int64_t i0, int64_t i1, int64_t n) {
  // (direct calls: the multi-versioned names are overload sets, not pointers)
  switch (t) {
    case DType::Float32:
      if (sub) tile_f32_sub(static_cast<float*>(w), w_rs, p, q, r, s, i0, i1, n);
      else tile_f32_add(static_cast<float*>(w), w_rs, p, q, r, s, i0, i1, n);
      break;
    case DType::BFloat16:
      if (sub) tile_bf16_sub(static_cast<bf16*>(w), w_rs, p, q, r, s, i0, i1, n);
      else tile_bf16_add(static_cast<bf16*>(w), w_rs, p, q, r, s, i0, i1, n);
      break;
    case DType::Float16:
      if (sub) tile_f16_sub(static_cast<fp16*>(w), w_rs, p, q, r, s, i0, i1, n);
      else tile_f16_add(static_cast<fp16*>(w), w_rs, p, q, r, s, i0, i1, n);
      break;
  }
}

// P (row-major, rows x r) and Q (packed, see lora_merge) as float32 from the
// adapters' dtype and strides; typed so the loops carry no per-element switch.
template <class A>
void convert_pq(const LoraMergeArgs& a, const int* perm, int64_t blk, float* p, float* q) {
  const A* qa = static_cast<const A*>(a.q);
  const A* pa = static_cast<const A*>(a.p);
  const int64_t r = a.rank, cols = a.cols, col_blocks = (cols + blk - 1) / blk;
#pragma omp for schedule(static) nowait
  for (int64_t cb = 0; cb < col_blocks; ++cb)
    for (int64_t j = 0; j < r; ++j) {
      float* dst = q + (cb * r + j) * blk;
      for (int64_t k = 0; k < blk; ++k) {
        const int64_t c = cb * blk + perm[k];
        dst[k] = c < cols ? static_cast<float>(load(qa[j * a.q_rs + c * a.q_cs])) : 0.0f;
      }
    }
#pragma omp for schedule(static)
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < r; ++j) p[i * r + j] = static_cast<float>(load(pa[i * a.p_rs + j * a.p_cs]));
}

size_t elem_size(DType t) { return t == DType::Float32 ? 4 : 2; }

}  // namespace

void lora_merge(const LoraMergeArgs& a, int sign) {
  const int64_t rows = a.rows, cols = a.cols, r = a.rank;
  if (rows == 0 || cols == 0) return;
  // P and Q as float32 (adapter-sized: r x (rows + cols), never rows x cols),
  // converted once. P row-major (rows x r). Q packed per column block of blk
  // = 2L columns: q[(cb * r + j) * blk + lane] = Q[j, cb * blk + perm[lane]],
  // zero past the last column, so a micro-kernel reads its r x blk values as
  // one contiguous run (row-major, the r rows of a block sat a multiple of
  // 4 KiB apart and fought over one L1 set); perm is the lane order of W's
  // vectors (V<L>::perm for bf16/fp16, the identity for float32).
  const int lanes = merge_lanes();
  const int64_t blk = 2 * lanes;
  static constexpr int kIdentity[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const int* perm = a.w_dtype == DType::Float32 ? kIdentity : lanes == 8 ? V<8>::perm : V<4>::perm;
  const int64_t col_blocks = (cols + blk - 1) / blk;
  // (written in full below: no zero-fill pass)
  std::unique_ptr<float[]> q(new float[static_cast<size_t>(col_blocks * r * blk)]);
  std::unique_ptr<float[]> p(new float[static_cast<size_t>(rows * r)]);
  const int64_t row_blocks = (rows + kMergeRowBlock - 1) / kMergeRowBlock;
  const int64_t col_tiles = (cols + kMergeColTile - 1) / kMergeColTile;
  const int64_t items = row_blocks * col_tiles;
  char* w = static_cast<char*>(a.w);
  const size_t es = elem_size(a.w_dtype);
  const bool sub = sign < 0;
  // Below ~64K elements the fork/join costs more than the work. Items are
  // handed out dynamically: on a shared machine a thread that loses its core
  // for a scheduler tick no longer holds up the others.
#pragma omp parallel if (rows * cols >= 65536)
  {
    switch (a.ab_dtype) {
      case DType::Float32: convert_pq<float>(a, perm, blk, p.get(), q.get()); break;
      case DType::BFloat16: convert_pq<bf16>(a, perm, blk, p.get(), q.get()); break;
      case DType::Float16: convert_pq<fp16>(a, perm, blk, p.get(), q.get()); break;
    }
#pragma omp for schedule(dynamic)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t ct = it % col_tiles, rb = it / col_tiles;
      const int64_t c0 = ct * kMergeColTile, n = std::min(kMergeColTile, cols - c0);
      const int64_t i0 = rb * kMergeRowBlock, i1 = std::min(rows, i0 + kMergeRowBlock);
      tile_any(a.w_dtype, sub, w + c0 * es, a.w_row_stride, p.get(), q.get() + c0 * r, r,
               a.scaling, i0, i1, n);
    }
  }
}

}  // namespace cpu
}  // namespace llmopt_ext
