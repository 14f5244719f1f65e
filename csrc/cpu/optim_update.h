// Fused multi-tensor optimizer updates, CPU (OpenMP). Torch-free.
//
// Lists: params and grads are `count` contiguous buffers of one DType
// (float32, bfloat16 or float16); the optimizer state lists are float32
// buffers of the same numels. Math is float32 (csrc/common/optim_update_math.h); each
// stored parameter is rounded once from its float32 value.
#pragma once

#include <cstdint>

#include "../common/float_types.h"
#include "../common/optim_update_math.h"

namespace llmopt_ext {
namespace cpu {

struct OptimLists {
  DType dtype;            // of params and grads
  int64_t count;          // number of tensors
  const int64_t* numels;  // numels[i] of tensor i
};

// Gradients (and AdaHessian's Hessian estimate) are divided by grad_scale
// (1 when not given: x / 1 is exact).
void sophia_update(const OptimLists& s, void* const* params, const void* const* grads,
                   float* const* exp_avgs, const float* const* hessians,
                   const optim::SophiaCoefs& c, float grad_scale);

void adahessian_update(const OptimLists& s, void* const* params, const void* const* grads,
                       float* const* exp_avgs, float* const* exp_hessian_diag_sqs,
                       const float* const* hessians, const optim::AdaHessianCoefs& c,
                       float grad_scale);

// Elements per work item: 16K elements keeps the 4-5 streams of a chunk
// (<= 320 KiB) in L2 and gives 512 items for 128 LoRA tensors of 16x4096.
constexpr int64_t kOptimChunkElems = 16384;
// Below this many elements a call runs on one thread (fork/join ~2-5 us).
constexpr int64_t kOptimParallelMinElems = 65536;

}  // namespace cpu
}  // namespace llmopt_ext
