// CUDA implementations of the Stiefel ops. The Gaussian generator is our
// kernel (csrc/kernels/stiefel.cu); CholeskyQR2 is composed from ATen calls
// (cuBLAS GEMM and TRSM, cuSOLVER Cholesky of the small r x r Gram matrix),
// which is where the FLOPs are and where cuBLAS is hard to beat. Only c10's
// stream and guard headers are used, so this file compile-checks against the
// CPU wheel. Compile-checked only: no GPU on the development machine.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/stiefel_cuda.h"
#include "stiefel_args.h"

namespace llmopt_ext {
namespace {

// float32 CholeskyQR squares cond(X): one pass leaves ||Q^T Q - I|| ~ cond^2 *
// 6e-8, which the second pass removes while that is << 1. A diag(R) spread
// beyond 100 (cond >~ 1e2..1e3) goes to Householder QR instead. Gaussian tall
// matrices (the random projectors) have cond ~ (sqrt(m)+sqrt(r))/(sqrt(m)-sqrt(r)),
// 1.4 at 4096 x 128, so they always take the fast path.
constexpr double kMaxDiagRatioF32 = 1e2;

void philox_normal_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  check_philox_normal_args(out, seed, offset);
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t err =
      cuda::philox_normal(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), out.numel(),
                          out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "philox_normal_: CUDA error: ", cudaGetErrorString(err));
}

at::Tensor orthonormalize_cuda(const at::Tensor& x) {
  check_orthonormalize_args(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor w = x.to(at::kFloat).contiguous();
  // One host sync per call (the breakdown / conditioning decision); projector
  // refreshes are rare (every update_proj_gap steps), so it is not on a hot path.
  for (int pass = 0; pass < 2; ++pass) {
    const at::Tensor g = at::mm(w.t(), w);
    auto chol = at::linalg_cholesky_ex(g, /*upper=*/false, /*check_errors=*/false);
    const at::Tensor& l = std::get<0>(chol);
    const at::Tensor d = l.diagonal();
    if (pass == 0) {
      const at::Tensor gd = g.diagonal();
      TORCH_CHECK_VALUE(at::isfinite(gd).all().item<bool>(), "orthonormalize: X contains NaN or Inf");
    }
    const bool ok = std::get<1>(chol).item<int>() == 0 &&
                    (d.max() <= kMaxDiagRatioF32 * d.min()).item<bool>();
    if (!ok) return householder_orthonormalize(x);
    // W <- W L^-T: solve Q L^T = W from the right.
    w = at::linalg_solve_triangular(l.t(), w, /*upper=*/true, /*left=*/false);
  }
  return w.to(x.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CUDA, m) {
  m.impl("philox_normal_", &philox_normal_cuda);
  m.impl("orthonormalize", &orthonormalize_cuda);
}

}  // namespace llmopt_ext
