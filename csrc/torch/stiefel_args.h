// Argument checks and the Householder fallback shared by the CPU and CUDA glue
// of the Stiefel ops (random_stiefel's generator and orthonormalize).
#pragma once

#include <ATen/ATen.h>

#include "../common/float_types.h"

namespace llmopt_ext {

inline DType stiefel_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(),
                       "; expected torch.float32, torch.bfloat16 or torch.float16");
  }
  return DType::Float32;
}

inline void check_philox_normal_args(const at::Tensor& out, int64_t seed, int64_t offset) {
  const char* op = "philox_normal_";
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, op, ": out has dtype ", out.scalar_type(),
                   "; expected torch.float32");
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
}

// m x r with m >= r >= 1; returns the kernel dtype.
inline DType check_orthonormalize_args(const at::Tensor& x) {
  const char* op = "orthonormalize";
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": X must be a 2-D matrix, got shape ", x.sizes());
  const DType dt = stiefel_dtype(op, "X", x);
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": X must have at least one column, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) >= x.size(1), op, ": X must be tall (rows >= columns), got shape ",
              x.sizes(), "; orthonormalize the transpose for a wide matrix");
  return dt;
}

// Householder QR in double with the signs fixed so diag(R) >= 0: the same Q as
// CholeskyQR where both are defined. Used when CholeskyQR2 reports the matrix
// ill-conditioned (rank-deficient inputs included: Q stays orthonormal).
inline at::Tensor householder_orthonormalize(const at::Tensor& x) {
  auto qr = at::linalg_qr(x.to(at::kDouble), "reduced");
  const at::Tensor& q = std::get<0>(qr);
  const at::Tensor d = std::get<1>(qr).diagonal();
  const at::Tensor sign = at::where(d < 0, at::full({}, -1.0, d.options()), at::ones({}, d.options()));
  return (q * sign).to(x.scalar_type()).contiguous();
}

}  // namespace llmopt_ext
