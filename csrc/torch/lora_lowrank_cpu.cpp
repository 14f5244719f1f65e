// Rank-r helpers of the fused LoRA Linear's CPU path (llmopt_ext/ops/lora.py):
// schemas and CPU implementations; kernels in csrc/cpu/lora_lowrank.cpp.
// They are internal building blocks of the lora_linear custom op (which has
// the fake and the autograd formula), so they register no autograd of their own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/lora_lowrank.h"
#include "lora_args.h"

namespace llmopt_ext {
namespace {

DType checked_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; expected cpu");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": ", name, " must have unit column stride");
  const auto dt = lora_kernel_dtype(t.scalar_type());
  TORCH_CHECK_TYPE(dt.has_value(), op, ": ", name, " has dtype ", t.scalar_type(),
                   "; expected torch.float32, torch.bfloat16 or torch.float16");
  return *dt;
}

void check_factor(const char* op, const char* name, const at::Tensor& q, int64_t rows) {
  TORCH_CHECK_VALUE(q.defined() && q.device().is_cpu() && q.dim() == 2, op, ": ", name,
                    " must be a 2-D cpu tensor");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat, op, ": ", name, " has dtype ", q.scalar_type(),
                   "; expected torch.float32");
  TORCH_CHECK_VALUE(q.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK_VALUE(q.size(0) == rows, op, ": ", name, " has ", q.size(0), " rows, expected ", rows);
}

cpu::Dropout dropout_arg(const char* op, int64_t seed, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  return cpu::Dropout{static_cast<uint64_t>(seed), static_cast<float>(p)};
}

cpu::LowrankArgs args(DType dt, const at::Tensor& x, const at::Tensor& q, double scale, cpu::Dropout d,
                      at::Tensor& out) {
  return cpu::LowrankArgs{dt, x.data_ptr(), x.size(0), x.size(1), x.size(0) > 1 ? x.stride(0) : x.size(1),
                          q.data_ptr<float>(), q.size(1), static_cast<float>(scale), d,
                          out.data_ptr<float>()};
}

// s * dropout(x) @ q: (M, K) x (K, R) -> (M, R) float32.
at::Tensor lowrank_down(const at::Tensor& x, const at::Tensor& q, double scale, int64_t seed, double p) {
  const char* op = "lora_lowrank_down";
  const DType dt = checked_dtype(op, "x", x);
  check_factor(op, "q", q, x.size(1));
  const cpu::Dropout d = dropout_arg(op, seed, p);
  at::Tensor out = at::empty({x.size(0), q.size(1)}, x.options().dtype(at::kFloat));
  cpu::lowrank_down(args(dt, x, q, scale, d, out));
  return out;
}

// s * g^T @ dropout(x): (M, R)^T x (M, K) -> (R, K) float32.
at::Tensor lowrank_reduce(const at::Tensor& g, const at::Tensor& x, double scale, int64_t seed, double p) {
  const char* op = "lora_lowrank_reduce";
  const DType dt = checked_dtype(op, "x", x);
  check_factor(op, "g", g, x.size(0));
  const cpu::Dropout d = dropout_arg(op, seed, p);
  at::Tensor out = at::empty({g.size(1), x.size(1)}, x.options().dtype(at::kFloat));
  cpu::lowrank_reduce(args(dt, x, g, scale, d, out));
  return out;
}

void dropout_mul_(const at::Tensor& t, int64_t seed, double p) {
  const char* op = "lora_dropout_mul_";
  const DType dt = checked_dtype(op, "t", t);
  const cpu::Dropout d = dropout_arg(op, seed, p);
  cpu::dropout_mul(dt, t.data_ptr(), t.size(0), t.size(1), t.size(0) > 1 ? t.stride(0) : t.size(1), d);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmopt_ext, m) {
  m.def("lora_lowrank_down(Tensor x, Tensor q, float scale, int seed, float dropout_p) -> Tensor");
  m.def("lora_lowrank_reduce(Tensor g, Tensor x, float scale, int seed, float dropout_p) -> Tensor");
  m.def("lora_dropout_mul_(Tensor(a!) t, int seed, float dropout_p) -> ()");
}

TORCH_LIBRARY_IMPL(llmopt_ext, CPU, m) {
  m.impl("lora_lowrank_down", &lowrank_down);
  m.impl("lora_lowrank_reduce", &lowrank_reduce);
  m.impl("lora_dropout_mul_", &dropout_mul_);
}

}  // namespace llmopt_ext
