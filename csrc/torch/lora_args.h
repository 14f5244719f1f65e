// Argument checks of lora_merge_ / lora_unmerge_, shared by the CPU and CUDA
// glue so both reject the same inputs with the same words, before anything
// is written.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>

#include "../common/float_types.h"

namespace llmopt_ext {

inline std::optional<DType> lora_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: return std::nullopt;
  }
}

// The merge as the kernels see it: W (rows x cols, unit column stride) and
// the strided factors P (rows x r) and Q (r x cols), see csrc/cpu/lora.h.
struct LoraMergePlan {
  DType w_dtype, ab_dtype;
  at::Tensor w;  // the tensor the kernel writes (the user's, or a contiguous temporary)
  bool copy_back = false;
  int64_t rows = 0, cols = 0, w_row_stride = 0, rank = 0;
  at::Tensor p, q;  // views of lora_A / lora_B (kept alive)
  int64_t p_rs = 0, p_cs = 0, q_rs = 0, q_cs = 0;
};

inline LoraMergePlan prepare_lora_merge(const char* op, const at::Tensor& weight,
                                        const at::Tensor& lora_A, const at::Tensor& lora_B,
                                        bool fan_in_fan_out) {
  TORCH_CHECK_VALUE(weight.defined() && lora_A.defined() && lora_B.defined(), op,
                    ": weight, lora_A and lora_B must be tensors");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK_VALUE(lora_A.dim() == 2, op, ": lora_A must be 2-D (r, in_features), got ",
                    lora_A.dim(), "-D");
  TORCH_CHECK_VALUE(lora_B.dim() == 2, op, ": lora_B must be 2-D (out_features, r), got ",
                    lora_B.dim(), "-D");
  const auto wdt = lora_kernel_dtype(weight.scalar_type());
  TORCH_CHECK_TYPE(wdt.has_value(), op, ": weight has dtype ", weight.scalar_type(),
                   "; expected torch.float32, torch.bfloat16 or torch.float16");
  const auto adt = lora_kernel_dtype(lora_A.scalar_type());
  TORCH_CHECK_TYPE(adt.has_value(), op, ": lora_A has dtype ", lora_A.scalar_type(),
                   "; expected torch.float32, torch.bfloat16 or torch.float16");
  TORCH_CHECK_TYPE(lora_B.scalar_type() == lora_A.scalar_type(), op, ": lora_B has dtype ",
                   lora_B.scalar_type(), " but lora_A has ", lora_A.scalar_type());
  TORCH_CHECK_VALUE(lora_A.device() == weight.device(), op, ": lora_A is on ", lora_A.device(),
                    " but weight is on ", weight.device());
  TORCH_CHECK_VALUE(lora_B.device() == weight.device(), op, ": lora_B is on ", lora_B.device(),
                    " but weight is on ", weight.device());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.size(1) == r, op, ": rank mismatch: lora_A has r=", r,
                    " rows but lora_B has ", lora_B.size(1), " columns");
  const int64_t out = lora_B.size(0), in = lora_A.size(1);
  const int64_t want0 = fan_in_fan_out ? in : out, want1 = fan_in_fan_out ? out : in;
  TORCH_CHECK_VALUE(weight.size(0) == want0 && weight.size(1) == want1, op, ": weight has shape (",
                    weight.size(0), ", ", weight.size(1), ") but lora_B x lora_A is (", out, ", ",
                    in, ")", fan_in_fan_out ? " and fan_in_fan_out=True expects (in, out)" : "");
  TORCH_CHECK_VALUE(at::has_internal_overlap(weight) != at::MemOverlap::Yes, op,
                    ": weight has overlapping memory (e.g. an expanded tensor) and cannot be ",
                    "written in place");

  LoraMergePlan p;
  p.w_dtype = *wdt;
  p.ab_dtype = *adt;
  p.rows = weight.size(0);
  p.cols = weight.size(1);
  p.rank = r;
  if (weight.stride(1) == 1 && weight.stride(0) >= p.cols) {
    p.w = weight;
  } else {
    p.w = weight.contiguous();  // rare layouts only (e.g. a transposed view)
    p.copy_back = true;
  }
  p.w_row_stride = p.w.stride(0);
  if (p.rows == 1 && !p.copy_back) p.w_row_stride = p.cols;
  if (fan_in_fan_out) {  // W (in x out) += s * A^T B^T
    p.p = lora_A;
    p.p_rs = lora_A.stride(1);
    p.p_cs = lora_A.stride(0);
    p.q = lora_B;
    p.q_rs = lora_B.stride(1);
    p.q_cs = lora_B.stride(0);
  } else {  // W (out x in) += s * B A
    p.p = lora_B;
    p.p_rs = lora_B.stride(0);
    p.p_cs = lora_B.stride(1);
    p.q = lora_A;
    p.q_rs = lora_A.stride(0);
    p.q_cs = lora_A.stride(1);
  }
  return p;
}

}  // namespace llmopt_ext
