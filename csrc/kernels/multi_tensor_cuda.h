// Multi-tensor vector ops for Steihaug-CG, CUDA host API. Torch-free: the glue
// in csrc/torch/ checks tensors, allocates outputs and the workspace, and
// passes raw pointers and the current stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/float_types.h"  // DType (host-only enum; no kernel code there)

namespace llmopt_ext {
namespace cuda {

// A scalar coefficient: read from device memory when `ptr` is set (no host
// sync), otherwise `value`.
struct Scalar {
  float value;
  const float* ptr;
};

struct ListShape {
  DType dtype;
  int64_t count;
  const int64_t* numels;  // host array
};

// Elements handled by one thread block. 8192 = 256 threads x 4 loads in
// flight x 8 iterations; 128 LoRA tensors of 16x4096 give 1024 blocks.
constexpr int64_t kChunkElems = 8192;
constexpr int kBlockThreads = 256;

// Doubles of workspace a reduction op needs: one partial per block per output.
int64_t reduction_workspace(const ListShape& s, int outputs);

// out: device float[1]; workspace: device double[reduction_workspace(s, 1)].
cudaError_t mt_dot(const ListShape& s, const void* const* xs, const void* const* ys, float* out,
                   double* workspace, cudaStream_t stream);
cudaError_t mt_norm_sq(const ListShape& s, const void* const* xs, float* out, double* workspace,
                       cudaStream_t stream);
// exact: float64 math for bfloat16/float16 storage; false: the float32 math of
// csrc/common/multi_tensor_math.h. float32 storage always takes the float64 path.
cudaError_t mt_axpby(const ListShape& s, void* const* ys, const void* const* xs, Scalar a,
                     Scalar b, bool exact, cudaStream_t stream);
// out: device float[3] = {||x||^2, ||r||^2, r^T M^-1 r}; workspace: reduction_workspace(s, 3).
// minv == nullptr means no preconditioner.
cudaError_t mt_cg_step(const ListShape& s, void* const* xs, void* const* rs,
                       const void* const* ps, const void* const* hps, const void* const* minv,
                       Scalar alpha, bool exact, float* out, double* workspace,
                       cudaStream_t stream);
cudaError_t mt_cg_direction(const ListShape& s, void* const* ps, const void* const* rs,
                            const void* const* minv, Scalar beta, bool exact,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace llmopt_ext
