// Random Stiefel matrices, CUDA host API. Torch-free: the glue in
// csrc/torch/stiefel_cuda.cpp checks tensors and passes raw pointers and the
// current stream; the small r x r Cholesky and the GEMMs of CholeskyQR2 are
// ATen calls there (cuBLAS / cuSOLVER).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace llmopt_ext {
namespace cuda {

// out[i] = N(0, 1) variate i of the Philox stream (seed, offset), i < n: the
// same numbers as cpu::philox_normal (csrc/common/philox.h), on device memory.
cudaError_t philox_normal(uint64_t seed, uint64_t offset, int64_t n, float* out,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace llmopt_ext
