// CPU implementations of the fused optimizer updates: checks in
// optim_update_args.h, kernels in csrc/cpu/optim_update.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/optim_update.h"
#include "optim_update_args.h"

namespace llmopt_ext {
namespace {

cpu::OptimLists shape_of(const PreparedLists& p) {
  return {p.dtype, static_cast<int64_t>(p.numels.size()), p.numels.data()};
}

float* const* f32_out(const PreparedLists& p, size_t list) {
  return reinterpret_cast<float* const*>(p.out(list));
}
const float* const* f32_in(const PreparedLists& p, size_t list) {
  return reinterpret_cast<const float* const*>(p.in(list));
}

// Host-side scale / skip flag (CPU tensors are read for free).
bool skip_and_scale(const char* op, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const at::Device& device,
                    float* scale) {
  const auto gs = optional_scalar(op, "grad_scale", grad_scale, device);
  const auto fi = optional_scalar(op, "found_inf", found_inf, device);
  *scale = gs ? gs->value : 1.0f;
  return fi && fi->value != 0.0f;
}

void sophia_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList hessians, double lr, double beta1, double rho,
                       double weight_decay, double eps, bool clip,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  const char* op = "sophia_update_";
  const optim::SophiaCoefs c = sophia_coefs(lr, beta1, rho, weight_decay, eps, clip);
  auto p = prepare_sophia(params, grads, exp_avgs, hessians);
  float scale;
  if (skip_and_scale(op, grad_scale, found_inf, p.params.device, &scale)) return;
  cpu::sophia_update(shape_of(p.params), p.params.out(0), p.params.in(1), f32_out(p.state, 0),
                     f32_in(p.state, 1), c, scale);
  p.finish();
}

void adahessian_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_hessian_diag_sqs, at::TensorList hessians,
                           const at::Tensor& step, double lr, double beta1, double beta2,
                           double weight_decay, double eps, double hessian_power,
                           const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  const char* op = "adahessian_update_";
  check_adahessian_hyper(lr, beta1, beta2, weight_decay, eps, hessian_power);
  auto p = prepare_adahessian(params, grads, exp_avgs, exp_hessian_diag_sqs, hessians);
  const ScalarValue sv = scalar_value(op, "step", step, p.params.device);
  TORCH_CHECK_VALUE(sv.value >= 1.0f, op, ": step = ", sv.value, "; expected >= 1");
  float scale;
  if (skip_and_scale(op, grad_scale, found_inf, p.params.device, &scale)) return;
  const optim::AdaHessianCoefs c =
      optim::adahessian_coefs(lr, beta1, beta2, weight_decay, eps, hessian_power, sv.value);
  cpu::adahessian_update(shape_of(p.params), p.params.out(0), p.params.in(1), f32_out(p.state, 0),
                         f32_out(p.state, 1), f32_in(p.state, 2), c, scale);
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CPU, m) {
  m.impl("sophia_update_", &sophia_update_cpu);
  m.impl("adahessian_update_", &adahessian_update_cpu);
}

}  // namespace llmopt_ext
