// CUDA implementations of the multi-tensor ops: checks in tensor_lists.cpp,
// kernels in csrc/kernels/multi_tensor.cu. Compiled by the host compiler with
// the CUDA include path; only c10's stream and guard headers are used (no
// cuBLAS headers), so this file also compile-checks against the CPU wheel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/multi_tensor_cuda.h"
#include "multi_tensor_args.h"

namespace llmopt_ext {
namespace {

cuda::ListShape shape_of(const PreparedLists& p) {
  return {p.dtype, static_cast<int64_t>(p.numels.size()), p.numels.data()};
}

cuda::Scalar to_kernel(const ScalarValue& s) { return {s.value, s.device_ptr}; }

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

at::Tensor workspace(const PreparedLists& p, int outputs) {
  return at::empty({cuda::reduction_workspace(shape_of(p), outputs)},
                   at::TensorOptions().dtype(at::kDouble).device(p.device));
}

at::Tensor mt_dot_cuda(at::TensorList xs, at::TensorList ys) {
  auto p = prepare_lists("mt_dot", {{"xs", xs, false}, {"ys", ys, false}});
  const c10::cuda::CUDAGuard guard(p.device);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(p.device));
  at::Tensor ws = workspace(p, 1);
  check(cuda::mt_dot(shape_of(p), p.in(0), p.in(1), out.data_ptr<float>(), ws.data_ptr<double>(),
                     c10::cuda::getCurrentCUDAStream()),
        "mt_dot");
  return out;
}

at::Tensor mt_norm_sq_cuda(at::TensorList xs) {
  auto p = prepare_lists("mt_norm_sq", {{"xs", xs, false}});
  const c10::cuda::CUDAGuard guard(p.device);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(p.device));
  at::Tensor ws = workspace(p, 1);
  check(cuda::mt_norm_sq(shape_of(p), p.in(0), out.data_ptr<float>(), ws.data_ptr<double>(),
                         c10::cuda::getCurrentCUDAStream()),
        "mt_norm_sq");
  return out;
}

void mt_axpby_cuda(at::TensorList ys, at::TensorList xs, const at::Tensor& a,
                   const at::Tensor& b, bool exact) {
  auto p = prepare_lists("mt_axpby_", {{"ys", ys, true}, {"xs", xs, false, "ys"}});
  const ScalarValue av = scalar_value("mt_axpby_", "a", a, p.device);
  const ScalarValue bv = scalar_value("mt_axpby_", "b", b, p.device);
  const c10::cuda::CUDAGuard guard(p.device);
  check(cuda::mt_axpby(shape_of(p), p.out(0), p.in(1), to_kernel(av), to_kernel(bv), exact,
                       c10::cuda::getCurrentCUDAStream()),
        "mt_axpby_");
  p.finish();
}

at::Tensor mt_cg_step_cuda(at::TensorList xs, at::TensorList rs, at::TensorList ps,
                           at::TensorList hps, const at::Tensor& alpha,
                           OptionalTensorList minv, bool exact) {
  const char* op = "mt_cg_step_";
  auto p = prepare_cg_step(xs, rs, ps, hps, minv);
  const ScalarValue av = scalar_value(op, "alpha", alpha, p.device);
  const c10::cuda::CUDAGuard guard(p.device);
  at::Tensor out = at::empty({3}, at::TensorOptions().dtype(at::kFloat).device(p.device));
  at::Tensor ws = workspace(p, 3);
  check(cuda::mt_cg_step(shape_of(p), p.out(0), p.out(1), p.in(2), p.in(3),
                         minv.has_value() ? p.in(4) : nullptr, to_kernel(av), exact,
                         out.data_ptr<float>(), ws.data_ptr<double>(),
                         c10::cuda::getCurrentCUDAStream()),
        op);
  p.finish();
  return out;
}

void mt_cg_direction_cuda(at::TensorList ps, at::TensorList rs, const at::Tensor& beta,
                          OptionalTensorList minv, bool exact) {
  const char* op = "mt_cg_direction_";
  auto p = prepare_cg_direction(ps, rs, minv);
  const ScalarValue bv = scalar_value(op, "beta", beta, p.device);
  const c10::cuda::CUDAGuard guard(p.device);
  check(cuda::mt_cg_direction(shape_of(p), p.out(0), p.in(1), minv.has_value() ? p.in(2) : nullptr,
                              to_kernel(bv), exact, c10::cuda::getCurrentCUDAStream()),
        op);
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CUDA, m) {
  m.impl("mt_dot", &mt_dot_cuda);
  m.impl("mt_norm_sq", &mt_norm_sq_cuda);
  m.impl("mt_axpby_", &mt_axpby_cuda);
  m.impl("mt_cg_step_", &mt_cg_step_cuda);
  m.impl("mt_cg_direction_", &mt_cg_direction_cuda);
}

}  // namespace llmopt_ext
