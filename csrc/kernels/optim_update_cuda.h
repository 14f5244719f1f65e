// Fused optimizer updates, CUDA host API. Torch-free: the glue in
// csrc/torch/optim_update_cuda.cpp checks tensors and passes raw pointers and
// the current stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/float_types.h"         // DType (host-only enum)
#include "../common/optim_update_math.h"   // SophiaCoefs, AdaHessianCoefs

namespace llmopt_ext {
namespace cuda {

struct OptimLists {
  DType dtype;            // of params and grads
  int64_t count;
  const int64_t* numels;  // host array
};

// Device scalars read by the kernels (nullptr: absent). found_inf != 0 makes
// every block return before touching memory (GradScaler's skipped step, no
// host sync); grads (and AdaHessian's hessians) are divided by *grad_scale.
struct AmpScalars {
  const float* grad_scale;
  const float* found_inf;
};

cudaError_t sophia_update(const OptimLists& s, void* const* params, const void* const* grads,
                          float* const* exp_avgs, const float* const* hessians,
                          const optim::SophiaCoefs& c, AmpScalars amp, cudaStream_t stream);

// The step count is read on the host (`step_value`) or, when step_ptr is set,
// by the kernel from device memory; the bias corrections are derived from it
// by optim::adahessian_coefs on the device.
struct AdaHessianHyper {
  double lr, beta1, beta2, weight_decay, eps, hessian_power;
  float step_value;
  const float* step_ptr;
};
cudaError_t adahessian_update(const OptimLists& s, void* const* params, const void* const* grads,
                              float* const* exp_avgs, float* const* exp_hessian_diag_sqs,
                              const float* const* hessians, const AdaHessianHyper& h,
                              AmpScalars amp, cudaStream_t stream);

}  // namespace cuda
}  // namespace llmopt_ext
