// CUDA implementations of the fused optimizer updates: checks in
// optim_update_args.h, kernels in csrc/kernels/optim_update.cu. Only c10's
// stream and guard headers (no cuBLAS), so this compile-checks against the
// CPU wheel. grad_scale, found_inf and step stay on the device: no host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/optim_update_cuda.h"
#include "optim_update_args.h"

namespace llmopt_ext {
namespace {

cuda::OptimLists shape_of(const PreparedLists& p) {
  return {p.dtype, static_cast<int64_t>(p.numels.size()), p.numels.data()};
}

float* const* f32_out(const PreparedLists& p, size_t list) {
  return reinterpret_cast<float* const*>(p.out(list));
}
const float* const* f32_in(const PreparedLists& p, size_t list) {
  return reinterpret_cast<const float* const*>(p.in(list));
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// A CPU scalar is read on the host; a device one is read by the kernel.
// Returns false when a host-read found_inf says to skip the step.
bool amp_scalars(const char* op, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, const at::Device& device,
                 cuda::AmpScalars* amp, at::Tensor* keep) {
  amp->grad_scale = nullptr;
  amp->found_inf = nullptr;
  if (const auto gs = optional_scalar(op, "grad_scale", grad_scale, device)) {
    if (gs->device_ptr != nullptr) {
      amp->grad_scale = gs->device_ptr;
    } else {
      keep[0] = at::full({1}, gs->value, at::TensorOptions().dtype(at::kFloat).device(device));
      amp->grad_scale = keep[0].data_ptr<float>();
    }
  }
  if (const auto fi = optional_scalar(op, "found_inf", found_inf, device)) {
    if (fi->device_ptr == nullptr) return fi->value == 0.0f;
    amp->found_inf = fi->device_ptr;
  }
  return true;
}

void sophia_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList hessians, double lr, double beta1, double rho,
                        double weight_decay, double eps, bool clip,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  const char* op = "sophia_update_";
  const optim::SophiaCoefs c = sophia_coefs(lr, beta1, rho, weight_decay, eps, clip);
  auto p = prepare_sophia(params, grads, exp_avgs, hessians);
  const c10::cuda::CUDAGuard guard(p.params.device);
  cuda::AmpScalars amp;
  at::Tensor keep[1];
  if (!amp_scalars(op, grad_scale, found_inf, p.params.device, &amp, keep)) return;
  check(cuda::sophia_update(shape_of(p.params), p.params.out(0), p.params.in(1),
                            f32_out(p.state, 0), f32_in(p.state, 1), c, amp,
                            c10::cuda::getCurrentCUDAStream()),
        op);
  p.finish();
}

void adahessian_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_hessian_diag_sqs, at::TensorList hessians,
                            const at::Tensor& step, double lr, double beta1, double beta2,
                            double weight_decay, double eps, double hessian_power,
                            const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  const char* op = "adahessian_update_";
  check_adahessian_hyper(lr, beta1, beta2, weight_decay, eps, hessian_power);
  auto p = prepare_adahessian(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians);
  const ScalarValue sv = scalar_value(op, "step", step, p.params.device);
  if (sv.device_ptr == nullptr)
    TORCH_CHECK_VALUE(sv.value >= 1.0f, op, ": step = ", sv.value, "; expected >= 1");
  const c10::cuda::CUDAGuard guard(p.params.device);
  cuda::AmpScalars amp;
  at::Tensor keep[1];
  if (!amp_scalars(op, grad_scale, found_inf, p.params.device, &amp, keep)) return;
  const cuda::AdaHessianHyper h{lr, beta1, beta2, weight_decay, eps, hessian_power, sv.value,
                                sv.device_ptr};
  check(cuda::adahessian_update(shape_of(p.params), p.params.out(0), p.params.in(1),
                                f32_out(p.state, 0), f32_out(p.state, 1), f32_in(p.state, 2), h,
                                amp, c10::cuda::getCurrentCUDAStream()),
        op);
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CUDA, m) {
  m.impl("sophia_update_", &sophia_update_cuda);
  m.impl("adahessian_update_", &adahessian_update_cuda);
}

}  // namespace llmopt_ext
