// Counter-based Gaussian generator shared by the CPU and CUDA kernels (and
// mirrored in pure PyTorch by llmopt_ext/ops/reference.py::philox_normal_).
//
// Philox-4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as
// 1, 2, 3") maps (key, counter) to 4 uniform 32-bit words with no state, so
// element i of a matrix is a pure function of (seed, offset, i): every thread,
// on any device, in any order, draws the same numbers.
//
// Normal variates come from Box-Muller evaluated in float32 with this file's
// own log, sin and cos: only integer ops and IEEE-754 float32 +, -, *, / and
// sqrt, each rounded to nearest, in one fixed order, no fused multiply-add
// (csrc/common/float_rn.h). So the CPU kernel, the CUDA kernel and the PyTorch
// reference agree to the last bit, by construction. Accuracy: |z - exact| <=
// 2.1 float32 ulps of rho against the exact Box-Muller of the same uniforms
// (measured over 2^21 pairs; tests/test_stiefel.py bounds it by 4).
//
// Layout contract: element i (row-major flat index) uses counter
//   (i / 4 low word, i / 4 high word, offset low word, offset high word)
// and key (seed low word, seed high word); lanes (0, 1) and (2, 3) are
// Box-Muller pairs (a, b): z0 = rho cos(theta), z1 = rho sin(theta) with
//   u     = (2 (a >> 9) + 1) 2^-24            in (0, 1), exact in float32
//   rho   = sqrt(-2 ln u)                     (|z| <= sqrt(48 ln 2) = 5.77)
//   theta = (b >> 30) pi/2 + pi/4 + x,  x = ((2 ((b >> 7) & (2^23 - 1)) + 1) 2^-24 - 1/2) pi/2
// ln u = e ln 2 + ln m with u = 2^e m, m in [sqrt(1/2), sqrt(2)), and
// ln m = 2 atanh(s), s = (m - 1) / (m + 1), by its odd series to s^11;
// sin x, cos x (|x| < pi/4) by their Taylor series to x^13 / x^12; then the
// rotation by pi/4 and by the quadrant b >> 30 (exact sign flips and swaps).
//
// Torch-free and header-only; LLMOPT_HD marks functions for nvcc.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_rn.h"  // LLMOPT_ADD / LLMOPT_MUL: IEEE-rounded, never an FMA

#if defined(__CUDACC__)
#define LLMOPT_HD __host__ __device__ __forceinline__
#else
#define LLMOPT_HD inline
#endif

namespace llmopt_ext {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;

struct U4 { uint32_t x[4]; };

LLMOPT_HD U4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                        uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) { k0 += kW0; k1 += kW1; }
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return U4{{c0, c1, c2, c3}};
}

// The bits of a float32 as int32 and back (memcpy: defined behaviour, and a
// register move on both host and device).
template <class To, class From>
LLMOPT_HD To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To t;
  memcpy(&t, &v, sizeof t);
  return t;
}

// The transform's constants: each a double rounded to nearest float32 (the
// reference rounds the same doubles the same way).
struct Consts {
  static constexpr float kTwoM24 = 5.9604644775390625e-08f;  // 2^-24, exact
  static constexpr int32_t kSqrtHalfBits = 0x3F3504F3;        // float32 sqrt(1/2)
  static constexpr float kLn2Hi = 0.693145751953125f;         // 12 bits: e * hi is exact
  static constexpr float kLn2Lo = static_cast<float>(1.4286068203094172321214581765680755e-06);
  static constexpr float kL3 = static_cast<float>(2.0 / 3.0);
  static constexpr float kL5 = static_cast<float>(2.0 / 5.0);
  static constexpr float kL7 = static_cast<float>(2.0 / 7.0);
  static constexpr float kL9 = static_cast<float>(2.0 / 9.0);
  static constexpr float kL11 = static_cast<float>(2.0 / 11.0);
  static constexpr float kHalfPi = static_cast<float>(1.5707963267948966192313216916397514);
  static constexpr float kSqrtHalf = static_cast<float>(0.70710678118654752440084436210484904);
  static constexpr float kS3 = static_cast<float>(-1.0 / 6.0);
  static constexpr float kS5 = static_cast<float>(1.0 / 120.0);
  static constexpr float kS7 = static_cast<float>(-1.0 / 5040.0);
  static constexpr float kS9 = static_cast<float>(1.0 / 362880.0);
  static constexpr float kS11 = static_cast<float>(-1.0 / 39916800.0);
  static constexpr float kS13 = static_cast<float>(1.0 / 6227020800.0);
  static constexpr float kC2 = -0.5f;
  static constexpr float kC4 = static_cast<float>(1.0 / 24.0);
  static constexpr float kC6 = static_cast<float>(-1.0 / 720.0);
  static constexpr float kC8 = static_cast<float>(1.0 / 40320.0);
  static constexpr float kC10 = static_cast<float>(-1.0 / 3628800.0);
  static constexpr float kC12 = static_cast<float>(1.0 / 479001600.0);
};

// Box-Muller on one pair of Philox words, as specified at the top of this file.
LLMOPT_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  using C = Consts;
  // rho = sqrt(-2 ln u)
  const float u = LLMOPT_MUL(static_cast<float>(static_cast<int32_t>(2 * (a >> 9) + 1)), C::kTwoM24);
  const int32_t bits = bit_cast<int32_t>(u);
  const int32_t e = (bits - C::kSqrtHalfBits) >> 23;  // arithmetic shift: floor
  const float m = bit_cast<float>(bits - e * (1 << 23));
  const float f = LLMOPT_ADD(m, -1.0f);                   // exact (Sterbenz)
  const float s = f / LLMOPT_ADD(f, 2.0f);
  const float s2 = LLMOPT_MUL(s, s);
  float p = LLMOPT_ADD(C::kL9, LLMOPT_MUL(s2, C::kL11));
  p = LLMOPT_ADD(C::kL7, LLMOPT_MUL(s2, p));
  p = LLMOPT_ADD(C::kL5, LLMOPT_MUL(s2, p));
  p = LLMOPT_ADD(C::kL3, LLMOPT_MUL(s2, p));
  const float ln_m = LLMOPT_ADD(LLMOPT_ADD(s, s), LLMOPT_MUL(s, LLMOPT_MUL(s2, p)));
  const float ef = static_cast<float>(e);
  const float ln_u = LLMOPT_ADD(LLMOPT_MUL(ef, C::kLn2Hi), LLMOPT_ADD(ln_m, LLMOPT_MUL(ef, C::kLn2Lo)));
  const float rho = sqrtf(LLMOPT_MUL(-2.0f, ln_u));
  // sin and cos of x in (-pi/4, pi/4)
  const int32_t q = static_cast<int32_t>(b >> 30);
  const float t = LLMOPT_MUL(static_cast<float>(static_cast<int32_t>(2 * ((b >> 7) & 0x7FFFFFu) + 1)),
                         C::kTwoM24);
  const float x = LLMOPT_MUL(LLMOPT_ADD(t, -0.5f), C::kHalfPi);  // t - 1/2 is exact
  const float x2 = LLMOPT_MUL(x, x);
  float ps = LLMOPT_ADD(C::kS11, LLMOPT_MUL(x2, C::kS13));
  ps = LLMOPT_ADD(C::kS9, LLMOPT_MUL(x2, ps));
  ps = LLMOPT_ADD(C::kS7, LLMOPT_MUL(x2, ps));
  ps = LLMOPT_ADD(C::kS5, LLMOPT_MUL(x2, ps));
  ps = LLMOPT_ADD(C::kS3, LLMOPT_MUL(x2, ps));
  const float sn = LLMOPT_ADD(x, LLMOPT_MUL(x, LLMOPT_MUL(x2, ps)));
  float pc = LLMOPT_ADD(C::kC10, LLMOPT_MUL(x2, C::kC12));
  pc = LLMOPT_ADD(C::kC8, LLMOPT_MUL(x2, pc));
  pc = LLMOPT_ADD(C::kC6, LLMOPT_MUL(x2, pc));
  pc = LLMOPT_ADD(C::kC4, LLMOPT_MUL(x2, pc));
  pc = LLMOPT_ADD(C::kC2, LLMOPT_MUL(x2, pc));
  const float cs = LLMOPT_ADD(1.0f, LLMOPT_MUL(x2, pc));
  // cos, sin of pi/4 + x, then of the quadrant
  const float c1 = LLMOPT_MUL(LLMOPT_ADD(cs, -sn), C::kSqrtHalf);
  const float s1 = LLMOPT_MUL(LLMOPT_ADD(cs, sn), C::kSqrtHalf);
  const float cq = (q & 1) ? s1 : c1;
  const float sq = (q & 1) ? c1 : s1;
  const float cos_t = (q == 1 || q == 2) ? -cq : cq;
  const float sin_t = (q >= 2) ? -sq : sq;
  *z0 = LLMOPT_MUL(rho, cos_t);
  *z1 = LLMOPT_MUL(rho, sin_t);
}

LLMOPT_HD U4 block_words(uint64_t seed, uint64_t offset, uint64_t block) {
  return philox4x32(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                    static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The four normals of counter block `block` (elements 4*block .. 4*block+3).
LLMOPT_HD void normal4(uint64_t seed, uint64_t offset, uint64_t block, float out[4]) {
  const U4 u = block_words(seed, offset, block);
  box_muller(u.x[0], u.x[1], &out[0], &out[1]);
  box_muller(u.x[2], u.x[3], &out[2], &out[3]);
}

}  // namespace philox
}  // namespace llmopt_ext
