// LoRA merge / unmerge, CUDA host API. Torch-free: the glue in
// csrc/torch/lora_cuda.cpp checks tensors and passes raw pointers, strides and
// the current stream. Same arithmetic contract as csrc/cpu/lora.h (float32
// accumulation in j order without FMA, one rounding into W's dtype), so CPU
// and GPU produce the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/float_types.h"  // DType (host-only enum)

namespace llmopt_ext {
namespace cuda {

struct LoraMergeArgs {
  DType w_dtype;
  void* w;
  int64_t rows, cols, w_row_stride;
  DType ab_dtype;
  const void* p;
  int64_t p_rs, p_cs;
  const void* q;
  int64_t q_rs, q_cs;
  int64_t rank;
  float scaling;               // used when scaling_ptr is null
  const float* scaling_ptr;    // device float32 scalar (no host sync), or nullptr
};

// sign = +1 merge, -1 unmerge.
cudaError_t lora_merge(const LoraMergeArgs& a, int sign, cudaStream_t stream);

}  // namespace cuda
}  // namespace llmopt_ext
