// Argument checks of the fused optimizer updates, shared by the CPU and CUDA
// glue so both reject the same inputs with the same words, before anything
// is written. List indices: params group {0: params, 1: grads}; state group
// sophia {0: exp_avgs, 1: hessians}, adahessian {0: exp_avgs,
// 1: exp_hessian_diag_sqs, 2: hessians}.
#pragma once

#include <cmath>
#include <optional>

#include "../common/optim_update_math.h"
#include "tensor_lists.h"

namespace llmopt_ext {

struct OptimPrepared {
  PreparedLists params;  // params (written), grads: one dtype
  PreparedLists state;   // float32 state lists
  void finish() {
    params.finish();
    state.finish();
  }
};

inline void check_layouts(const char* op, std::initializer_list<ListArg> lists) {
  for (const ListArg& l : lists)
    for (size_t i = 0; i < l.tensors.size(); ++i)
      TORCH_CHECK_VALUE(!l.tensors[i].defined() || l.tensors[i].layout() == at::kStrided, op, ": ",
                        l.name, "[", i, "] is sparse; only dense (strided) tensors are supported");
}

// params/grads share the params' dtype; state lists are float32 with the
// params' shapes, on the params' device.
inline OptimPrepared prepare_optim(const char* op, std::initializer_list<ListArg> param_lists,
                                   std::initializer_list<ListArg> state_lists) {
  check_layouts(op, param_lists);
  check_layouts(op, state_lists);
  const ListArg& p0 = *param_lists.begin();
  for (const ListArg& l : state_lists) {
    TORCH_CHECK_VALUE(l.tensors.size() == p0.tensors.size(), op, ": ", l.name, " has ",
                      l.tensors.size(), " tensors but ", p0.name, " has ", p0.tensors.size());
    for (size_t i = 0; i < l.tensors.size(); ++i) {
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK_VALUE(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
      TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", l.name, "[", i, "] has dtype ",
                       t.scalar_type(), "; optimizer state must be torch.float32");
      const at::Tensor& p = p0.tensors[i];
      TORCH_CHECK_VALUE(!p.defined() || t.sizes().equals(p.sizes()), op, ": ", l.name, "[", i,
                        "] has shape ", t.sizes(), " but ", p0.name, "[", i, "] has shape ",
                        p.sizes());
      TORCH_CHECK_VALUE(!p.defined() || t.device() == p.device(), op, ": ", l.name, "[", i,
                        "] is on ", t.device(), " but ", p0.name, "[", i, "] is on ", p.device());
    }
  }
  // prepare_lists validates everything of its group before returning; the
  // state group is validated before any kernel runs, so nothing is written
  // on error.
  OptimPrepared out{prepare_lists(op, param_lists, /*alias_check=*/false),
                    prepare_lists(op, state_lists, /*alias_check=*/false)};
  std::vector<ListArg> all(param_lists);
  all.insert(all.end(), state_lists.begin(), state_lists.end());
  check_no_alias(op, all);  // once over both groups: the pair reported is the first of all
  return out;
}

inline void check_hyper(const char* op, const char* name, double v, bool ok, const char* want) {
  TORCH_CHECK_VALUE(std::isfinite(v) && ok, op, ": ", name, " = ", v, "; expected ", want);
  // The kernels use float32 coefficients: 1e300 would silently become inf.
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(v)), op, ": ", name, " = ", v,
                    " overflows torch.float32 (scalars are rounded to float32)");
}

inline void check_betas(const char* op, const char* name, double b) {
  check_hyper(op, name, b, b >= 0.0 && b < 1.0, "a value in [0, 1)");
}

inline optim::SophiaCoefs sophia_coefs(double lr, double beta1, double rho, double weight_decay,
                                       double eps, bool clip) {
  const char* op = "sophia_update_";
  check_hyper(op, "lr", lr, lr >= 0.0, "a finite value >= 0");
  check_betas(op, "beta1", beta1);
  check_hyper(op, "rho", rho, rho > 0.0, "a finite value > 0");
  check_hyper(op, "weight_decay", weight_decay, weight_decay >= 0.0, "a finite value >= 0");
  check_hyper(op, "eps", eps, eps >= 0.0, "a finite value >= 0");
  optim::SophiaCoefs c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.rho = static_cast<float>(rho);
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.clip = clip;
  return c;
}

inline void check_adahessian_hyper(double lr, double beta1, double beta2, double weight_decay,
                                   double eps, double hessian_power) {
  const char* op = "adahessian_update_";
  check_hyper(op, "lr", lr, lr >= 0.0, "a finite value >= 0");
  check_betas(op, "beta1", beta1);
  check_betas(op, "beta2", beta2);
  check_hyper(op, "weight_decay", weight_decay, weight_decay >= 0.0, "a finite value >= 0");
  check_hyper(op, "eps", eps, eps >= 0.0, "a finite value >= 0");
  check_hyper(op, "hessian_power", hessian_power, hessian_power > 0.0 && hessian_power <= 1.0,
              "a value in (0, 1]");
}

// grad_scale / found_inf: one-element float32 tensors (torch's GradScaler
// hands over exactly these); a CPU tensor is read on the host.
inline std::optional<ScalarValue> optional_scalar(const char* op, const char* name,
                                                  const std::optional<at::Tensor>& t,
                                                  const at::Device& device) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return scalar_value(op, name, *t, device);
}

// The argument lists of the two ops, shared by the CPU and CUDA glue so both
// check the same things in the same order.
inline OptimPrepared prepare_sophia(at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList hessians) {
  return prepare_optim("sophia_update_", {{"params", params, true}, {"grads", grads, false}},
                       {{"exp_avgs", exp_avgs, true}, {"hessians", hessians, false}});
}

inline OptimPrepared prepare_adahessian(at::TensorList params, at::TensorList grads,
                                        at::TensorList exp_avgs,
                                        at::TensorList exp_hessian_diag_sqs,
                                        at::TensorList hessians) {
  return prepare_optim("adahessian_update_", {{"params", params, true}, {"grads", grads, false}},
                       {{"exp_avgs", exp_avgs, true},
                        {"exp_hessian_diag_sqs", exp_hessian_diag_sqs, true},
                        {"hessians", hessians, false}});
}

}  // namespace llmopt_ext
