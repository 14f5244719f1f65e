// The fused LoRA Linear's CPU dropout mask (llmopt_ext/ops/lora.py): schema and
// CPU implementation of lora_dropout_mul_; kernel in csrc/cpu/lora_dropout.cpp.
// An internal building block of the lora_linear custom op (which has the fake
// and the autograd formula), so it registers no autograd of its own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/lora_dropout.h"
#include "lora_args.h"

namespace llmopt_ext {
namespace {

// t *= keep / (1 - p) in place, t[0, 0] being flat element `offset` of the mask.
void dropout_mul_(const at::Tensor& t, int64_t seed, double p, int64_t offset) {
  const char* op = "lora_dropout_mul_";
  TORCH_CHECK_VALUE(t.defined(), op, ": t must be a tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": t is on ", t.device(), "; expected cpu");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": t must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, op, ": t must have unit column stride");
  const auto dt = lora_kernel_dtype(t.scalar_type());
  TORCH_CHECK_TYPE(dt.has_value(), op, ": t has dtype ", t.scalar_type(),
                   "; expected torch.float32, torch.bfloat16 or torch.float16");
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset must be >= 0, got ", offset);
  cpu::dropout_mul(*dt, t.data_ptr(), t.size(0), t.size(1), t.size(0) > 1 ? t.stride(0) : t.size(1),
                   static_cast<uint64_t>(offset), cpu::Dropout{static_cast<uint64_t>(seed), static_cast<float>(p)});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmopt_ext, m) {
  m.def("lora_dropout_mul_(Tensor(a!) t, int seed, float dropout_p, int offset=0) -> ()");
}

TORCH_LIBRARY_IMPL(llmopt_ext, CPU, m) {
  m.impl("lora_dropout_mul_", &dropout_mul_);
}

}  // namespace llmopt_ext
