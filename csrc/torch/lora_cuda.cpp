// CUDA implementations of lora_merge_ / lora_unmerge_: checks in lora_args.h,
// kernel in csrc/kernels/lora_merge.cu. Only c10's stream and guard headers
// (compile-checks against the CPU wheel, see multi_tensor_cuda.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels/lora_cuda.h"
#include "lora_args.h"
#include "tensor_lists.h"

namespace llmopt_ext {
namespace {

void merge_cuda(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                const at::Tensor& lora_B, const at::Tensor& scaling, bool fan_in_fan_out,
                int sign) {
  LoraMergePlan p = prepare_lora_merge(op, weight, lora_A, lora_B, fan_in_fan_out);
  const ScalarValue s = scalar_value(op, "scaling", scaling, weight.device());
  const c10::cuda::CUDAGuard guard(weight.device());
  cuda::LoraMergeArgs a{p.w_dtype, p.w.data_ptr(), p.rows, p.cols, p.w_row_stride, p.ab_dtype,
                        p.p.data_ptr(), p.p_rs, p.p_cs, p.q.data_ptr(), p.q_rs, p.q_cs,
                        p.rank, s.value, s.device_ptr};
  const cudaError_t err = cuda::lora_merge(a, sign, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
  if (p.copy_back) weight.copy_(p.w);
}

void lora_merge_cuda(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     const at::Tensor& scaling, bool fan_in_fan_out) {
  merge_cuda("lora_merge_", weight, lora_A, lora_B, scaling, fan_in_fan_out, +1);
}

void lora_unmerge_cuda(const at::Tensor& weight, const at::Tensor& lora_A,
                       const at::Tensor& lora_B, const at::Tensor& scaling, bool fan_in_fan_out) {
  merge_cuda("lora_unmerge_", weight, lora_A, lora_B, scaling, fan_in_fan_out, -1);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmopt_ext, CUDA, m) {
  m.impl("lora_merge_", &lora_merge_cuda);
  m.impl("lora_unmerge_", &lora_unmerge_cuda);
}

}  // namespace llmopt_ext
