// Philox Gaussian generator for random Stiefel matrices (CUDA).
//
// One thread per Philox counter block (4 normals, one 16-byte store). The
// float32 Box-Muller transform uses only round-to-nearest intrinsics
// (__fadd_rn/__fmul_rn, IEEE / and sqrtf), so the result matches the CPU kernel
// and the PyTorch reference bit for bit (csrc/common/philox.h). Compile-checked
// only on this machine.
#include "stiefel_cuda.h"

#include <algorithm>

#include "../common/philox.h"

namespace llmopt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void philox_normal_kernel(uint64_t seed, uint64_t offset, int64_t n, float* out) {
  const int64_t blocks = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks;
       b += stride) {
    float z[4];
    philox::normal4(seed, offset, static_cast<uint64_t>(b), z);
    const int64_t base = 4 * b;
    if (base + 4 <= n && (reinterpret_cast<uintptr_t>(out + base) & 15) == 0) {
      *reinterpret_cast<float4*>(out + base) = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      for (int j = 0; j < 4 && base + j < n; ++j) out[base + j] = z[j];
    }
  }
}

}  // namespace

cudaError_t philox_normal(uint64_t seed, uint64_t offset, int64_t n, float* out,
                          cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + 3) / 4;
  // Grid-stride loop; 65535 x 256 threads cover 67M counter blocks per sweep.
  const int64_t grid = std::min<int64_t>((blocks + kThreads - 1) / kThreads, 65535);
  philox_normal_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(seed, offset, n, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace llmopt_ext
