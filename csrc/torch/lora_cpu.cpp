// CPU implementations of lora_merge_ / lora_unmerge_: checks in lora_args.h,
// kernel in csrc/cpu/lora.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cpu/lora.h"
#include "lora_args.h"
#include "tensor_lists.h"

namespace llmopt_ext {
namespace {

void merge_cpu(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
               const at::Tensor& lora_B, const at::Tensor& scaling, bool fan_in_fan_out,
               int sign) {
  LoraMergePlan p = prepare_lora_merge(op, weight, lora_A, lora_B, fan_in_fan_out);
  TORCH_CHECK_VALUE(scaling.device().is_cpu() || scaling.device() == weight.device(), op,
                    ": scaling is on ", scaling.device(), " but weight is on ", weight.device());
  const ScalarValue s = scalar_value(op, "scaling", scaling, weight.device());
  cpu::LoraMergeArgs a{p.w_dtype, p.w.data_ptr(), p.rows, p.cols, p.w_row_stride, p.ab_dtype,
                       p.p.data_ptr(), p.p_rs, p.p_cs, p.q.data_ptr(), p.q_rs, p.q_cs,
                       p.rank, s.value};
  cpu::lora_merge(a, sign);
  if (p.copy_back) weight.copy_(p.w);
}

void lora_merge_cpu(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                    const at::Tensor& scaling, bool fan_in_fan_out) {
  merge_cpu("lora_merge_", weight, lora_A, lora_B, scaling, fan_in_fan_out, +1);
}

void lora_unmerge_cpu(const at::Tensor& weight, const at::Tensor& lora_A,
                      const at::Tensor& lora_B, const at::Tensor& scaling, bool fan_in_fan_out) {
  merge_cpu("lora_unmerge_", weight, lora_A, lora_B, scaling, fan_in_fan_out, -1);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CPU, m) {
  m.impl("lora_merge_", &lora_merge_cpu);
  m.impl("lora_unmerge_", &lora_unmerge_cpu);
}

}  // namespace llmopt_ext
