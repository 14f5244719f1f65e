// Per-element math of the fused optimizer updates (sophia_update_,
// adahessian_update_), shared by the CPU kernels (csrc/cpu/optim_update.cpp)
// and the CUDA kernels (csrc/kernels/optim_update.cu) so both evaluate the
// same float32 expressions in the same order. Torch-free.
//
// Numerics: float32 math (as torch's fused AdamW), state in float32, params
// loaded into float32 and rounded once on store. Every expression is written
// as separate products and sums; the builds use -ffp-contract=off (CPU), and
// the CUDA kernels use __fmul_rn/__fadd_rn via the LLMOPT_MUL/ADD macros so
// nvcc cannot contract them into FMAs either: CPU, GPU and the PyTorch
// reference (llmopt_ext/ops/reference.py, one rounding per op) agree to the
// last bit on the +, -, *, /, sqrt paths. Only powf (hessian_power != 1)
// may differ by an ulp between libm, CUDA and torch.
#pragma once

#include <cmath>

#include "float_rn.h"  // LLMOPT_MUL / LLMOPT_ADD / LLMOPT_SUB

#if defined(__CUDACC__)
#define LLMOPT_HD __host__ __device__ __forceinline__
#define LLMOPT_ELEM __device__ __forceinline__  // uses the __f*_rn intrinsics
#else
#define LLMOPT_HD inline __attribute__((always_inline))
#define LLMOPT_ELEM LLMOPT_HD
#endif

namespace llmopt_ext {
namespace optim {

// ---- Sophia -----------------------------------------------------------------
// SophiaG (clip = false), Liu et al. 2023, official rule:
//   m <- beta1 m + (1 - beta1) g
//   p <- p (1 - lr wd)
//   p <- p - lr sign(m) min(|m| / (rho h + eps), 1)      (rho here is rho * bs)
// SophiaH (clip = true), the clamp rule of the Hutchinson variant:
//   p <- p - lr clamp(m / max(h, eps), -rho, rho)
struct SophiaCoefs {
  float lr, beta1, one_minus_beta1, rho, eps, decay;
  bool clip;
};

// NaN-propagating selects (as torch.clamp): a comparison with NaN is false.
LLMOPT_HD float clamp_min(float x, float lo) { return x < lo ? lo : x; }
LLMOPT_HD float clamp_max(float x, float hi) { return x > hi ? hi : x; }

LLMOPT_ELEM void sophia_elem(const SophiaCoefs& c, float& p, float& m, float g, float h) {
  m = LLMOPT_ADD(LLMOPT_MUL(m, c.beta1), LLMOPT_MUL(g, c.one_minus_beta1));
  p = LLMOPT_MUL(p, c.decay);
  float u;
  if (c.clip) {
    u = clamp_min(clamp_max(m / clamp_min(h, c.eps), c.rho), -c.rho);
  } else {
    // |m| / den in [0, 1] after the clamp; copysign gives sign(m) * ratio
    // (m == 0 gives ratio 0, the same no-op as torch.sign(0) * ratio).
    const float ratio = clamp_max(fabsf(m) / LLMOPT_ADD(LLMOPT_MUL(h, c.rho), c.eps), 1.0f);
    u = copysignf(ratio, m);
  }
  p = LLMOPT_SUB(p, LLMOPT_MUL(u, c.lr));
}

// ---- AdaHessian ---------------------------------------------------------------
// Yao et al. 2021 (the rule of torch-optimizer's Adahessian and
// pytorch-optimizer's AdaHessian, decoupled weight decay):
//   m <- beta1 m + (1 - beta1) g
//   v <- beta2 v + (1 - beta2) d^2            (d: Hutchinson estimate of diag H)
//   den = (v / bc2)^(k/2) + eps,  bc_i = 1 - beta_i^step
//   p <- p (1 - lr wd) - (lr / bc1) m / den
struct AdaHessianCoefs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, bias_correction2, eps, step_size, decay,
      half_power;
  bool sqrt_power;  // hessian_power == 1: sqrtf (correctly rounded) instead of powf
};

// Host and device compute the step-dependent coefficients with this one
// function (double, then rounded to float once), so a step count read by the
// kernel from device memory gives the same floats as one read on the host.
LLMOPT_HD AdaHessianCoefs adahessian_coefs(double lr, double beta1, double beta2,
                                           double weight_decay, double eps, double hessian_power,
                                           double step) {
  AdaHessianCoefs c;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bias_correction2 = static_cast<float>(1.0 - pow(beta2, step));
  c.eps = static_cast<float>(eps);
  c.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.half_power = static_cast<float>(hessian_power / 2.0);
  c.sqrt_power = hessian_power == 1.0;
  return c;
}

// kSqrt: hessian_power == 1 (sqrtf); a template flag so the CPU loop holds no
// call to powf and vectorises.
template <bool kSqrt>
LLMOPT_ELEM void adahessian_elem(const AdaHessianCoefs& c, float& p, float& m, float& v, float g,
                               float d) {
  m = LLMOPT_ADD(LLMOPT_MUL(m, c.beta1), LLMOPT_MUL(g, c.one_minus_beta1));
  v = LLMOPT_ADD(LLMOPT_MUL(v, c.beta2), LLMOPT_MUL(LLMOPT_MUL(d, d), c.one_minus_beta2));
  const float q = v / c.bias_correction2;
  const float den = LLMOPT_ADD(kSqrt ? sqrtf(q) : powf(q, c.half_power), c.eps);
  p = LLMOPT_SUB(LLMOPT_MUL(p, c.decay), LLMOPT_MUL(m / den, c.step_size));
}

}  // namespace optim
}  // namespace llmopt_ext
