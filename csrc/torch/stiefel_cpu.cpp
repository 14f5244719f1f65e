// CPU implementations of the Stiefel ops: kernels in csrc/cpu/stiefel.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/stiefel.h"
#include "stiefel_args.h"

namespace llmopt_ext {
namespace {

void philox_normal_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  check_philox_normal_args(out, seed, offset);
  cpu::philox_normal(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.numel(),
                     out.data_ptr<float>());
}

at::Tensor orthonormalize_cpu(const at::Tensor& x) {
  const DType dt = check_orthonormalize_args(x);
  const int64_t m = x.size(0), r = x.size(1);
  at::Tensor out = at::empty({m, r}, x.options());
  const cpu::QrStatus s =
      cpu::cholesky_qr2(dt, x.const_data_ptr(), m, r, x.stride(0), x.stride(1), out.data_ptr());
  TORCH_CHECK_VALUE(s != cpu::QrStatus::kNonFinite, "orthonormalize: X contains NaN or Inf");
  if (s == cpu::QrStatus::kIllConditioned) return householder_orthonormalize(x);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CPU, m) {
  m.impl("philox_normal_", &philox_normal_cpu);
  m.impl("orthonormalize", &orthonormalize_cpu);
}

}  // namespace llmopt_ext
