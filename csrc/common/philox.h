// Counter-based Gaussian generator shared by the CPU and CUDA kernels (and
// mirrored in pure PyTorch by llmopt_ext/ops/reference.py::philox_normal_).
//
// Philox-4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as
// 1, 2, 3") maps (key, counter) to 4 uniform 32-bit words with no state, so
// element i of a matrix is a pure function of (seed, offset, i): every thread,
// on any device, in any order, draws the same numbers. Normal variates come
// from Box-Muller evaluated in double and rounded once to float32, so CPU and
// GPU agree to the last bit except when two libm implementations (each within
// 1-2 double ulps) straddle a float32 rounding boundary (probability ~1e-8 per
// element).
//
// Layout contract: element i (row-major flat index) uses counter
//   (i / 4 low word, i / 4 high word, offset low word, offset high word)
// and key (seed low word, seed high word); lanes 0,1 and 2,3 are Box-Muller
// pairs: z0 = rho cos(theta), z1 = rho sin(theta) with
//   rho = sqrt(-2 ln((u0 + 0.5) 2^-32)), theta = 2 pi (u1 + 0.5) 2^-32.
// (+0.5 keeps the uniform strictly inside (0, 1): no log(0).)
//
// Torch-free and header-only; LLMOPT_HD marks functions for nvcc.
#pragma once

#include <cmath>
#include <cstdint>

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

// Box-Muller in double: 2^-32 is exact, so the uniforms are exact doubles.
LLMOPT_HD void box_muller(uint32_t a, uint32_t b, double* z0, double* z1) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  constexpr double kInv32 = 2.3283064365386962890625e-10;  // 2^-32
  const double u = (static_cast<double>(a) + 0.5) * kInv32;
  const double v = (static_cast<double>(b) + 0.5) * kInv32;
  const double rho = sqrt(-2.0 * log(u));
  const double theta = kTwoPi * v;
  *z0 = rho * cos(theta);
  *z1 = rho * sin(theta);
}

// The four normals of counter block `block` (elements 4*block .. 4*block+3).
LLMOPT_HD void normal4(uint64_t seed, uint64_t offset, uint64_t block, float out[4]) {
  const U4 u = philox4x32(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                          static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  double z[4];
  box_muller(u.x[0], u.x[1], &z[0], &z[1]);
  box_muller(u.x[2], u.x[3], &z[2], &z[3]);
  for (int j = 0; j < 4; ++j) out[j] = static_cast<float>(z[j]);
}

}  // namespace philox
}  // namespace llmopt_ext
