// CPU implementations of the multi-tensor ops: checks in tensor_lists.cpp,
// kernels in csrc/cpu/multi_tensor.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/multi_tensor.h"
#include "multi_tensor_args.h"

namespace llmopt_ext {
namespace {

cpu::ListShape shape_of(const PreparedLists& p) {
  return {p.dtype, static_cast<int64_t>(p.numels.size()), p.numels.data()};
}

at::Tensor scalar_out(double v) { return at::scalar_tensor(v, at::kFloat); }

at::Tensor mt_dot_cpu(at::TensorList xs, at::TensorList ys) {
  auto p = prepare_lists("mt_dot", {{"xs", xs, false}, {"ys", ys, false}});
  return scalar_out(cpu::mt_dot(shape_of(p), {p.in(0)}, {p.in(1)}));
}

at::Tensor mt_norm_sq_cpu(at::TensorList xs) {
  auto p = prepare_lists("mt_norm_sq", {{"xs", xs, false}});
  return scalar_out(cpu::mt_norm_sq(shape_of(p), {p.in(0)}));
}

void mt_axpby_cpu(at::TensorList ys, at::TensorList xs, const at::Tensor& a, const at::Tensor& b,
                  bool exact) {
  auto p = prepare_lists("mt_axpby_", {{"ys", ys, true}, {"xs", xs, false, "ys"}});
  const ScalarValue av = scalar_value("mt_axpby_", "a", a, p.device);
  const ScalarValue bv = scalar_value("mt_axpby_", "b", b, p.device);
  cpu::mt_axpby(shape_of(p), {p.out(0)}, {p.in(1)}, av.value, bv.value, exact);
  p.finish();
}

at::Tensor mt_cg_step_cpu(at::TensorList xs, at::TensorList rs, at::TensorList ps,
                          at::TensorList hps, const at::Tensor& alpha,
                          OptionalTensorList minv, bool exact) {
  const char* op = "mt_cg_step_";
  auto p = prepare_cg_step(xs, rs, ps, hps, minv);
  const ScalarValue av = scalar_value(op, "alpha", alpha, p.device);
  const cpu::ConstList m{minv.has_value() ? p.in(4) : nullptr};
  const cpu::CgStepNorms n =
      cpu::mt_cg_step(shape_of(p), {p.out(0)}, {p.out(1)}, {p.in(2)}, {p.in(3)}, m, av.value,
                      exact);
  p.finish();
  return at::tensor({static_cast<float>(n.x_norm_sq), static_cast<float>(n.r_norm_sq),
                     static_cast<float>(n.r_dot_z)},
                    at::kFloat);
}

void mt_cg_direction_cpu(at::TensorList ps, at::TensorList rs, const at::Tensor& beta,
                         OptionalTensorList minv, bool exact) {
  const char* op = "mt_cg_direction_";
  auto p = prepare_cg_direction(ps, rs, minv);
  const ScalarValue bv = scalar_value(op, "beta", beta, p.device);
  const cpu::ConstList m{minv.has_value() ? p.in(2) : nullptr};
  cpu::mt_cg_direction(shape_of(p), {p.out(0)}, {p.in(1)}, m, bv.value, exact);
  p.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CPU, m) {
  m.impl("mt_dot", &mt_dot_cpu);
  m.impl("mt_norm_sq", &mt_norm_sq_cpu);
  m.impl("mt_axpby_", &mt_axpby_cpu);
  m.impl("mt_cg_step_", &mt_cg_step_cpu);
  m.impl("mt_cg_direction_", &mt_cg_direction_cpu);
}

}  // namespace llmopt_ext
