// Generic chunked multi-tensor launcher over pointer tables (the idea of
// apex's multi_tensor_apply and ATen's foreach kernels), factored from the
// launcher of multi_tensor.cu so other kernel families reuse it. Torch-free,
// header-only (templates), included by .cu files only.
//
// Every tensor is cut into chunks of kChunk elements; each chunk is one
// thread block. The table of pointers goes in the kernel parameters
// (__grid_constant__; CUDA >= 12.1 allows 32 KiB of parameters on sm_70+), and
// a block finds its tensor by binary search over the chunk prefix sums, so one
// launch covers up to kMaxTensors tensors of any size. Lists may hold
// different element types (params bf16, state fp32): the table stores void*.
//
// An Op provides:
//   static constexpr int kDepth;                      // number of lists
//   __device__ bool init();                           // false: block does nothing
//   __device__ void chunk(void* const* p, int64_t begin, int len, int64_t block);
// `block` is the global index of the block over all launches of one
// multi_tensor_apply call: reductions write one partial per block there.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace llmopt_ext {
namespace cuda {
namespace mta {

template <int kDepth, int kMaxTensors>
struct TensorTable {
  void* ptrs[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];  // prefix sums of chunks per tensor
  int32_t count;
  int64_t block_offset;  // global index of this launch's first block
};

template <class Op, int kMaxTensors, int64_t kChunk, int kThreads>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const __grid_constant__ TensorTable<Op::kDepth, kMaxTensors> tab, Op op) {
  if (!op.init()) return;
  const int b = blockIdx.x;
  int lo = 0, hi = tab.count - 1;  // last t with chunk_begin[t] <= b
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tab.chunk_begin[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const int64_t begin = static_cast<int64_t>(b - tab.chunk_begin[lo]) * kChunk;
  const int64_t rest = tab.numel[lo] - begin;
  const int len = static_cast<int>(rest < kChunk ? rest : kChunk);
  void* p[Op::kDepth];
#pragma unroll
  for (int d = 0; d < Op::kDepth; ++d) p[d] = tab.ptrs[d][lo];
  op.chunk(p, begin, len, tab.block_offset + b);
}

// Number of blocks (chunks) multi_tensor_apply launches for these tensors.
template <int64_t kChunk>
int64_t num_blocks(int64_t count, const int64_t* numels) {
  int64_t blocks = 0;
  for (int64_t t = 0; t < count; ++t) blocks += (numels[t] + kChunk - 1) / kChunk;
  return blocks;
}

// Fills the tables and launches apply_kernel once per kMaxTensors tensors
// (empty tensors are skipped). lists[d][t]: pointer of tensor t in list d.
template <int kMaxTensors, int64_t kChunk, int kThreads, class Op>
cudaError_t multi_tensor_apply(int64_t count, const int64_t* numels, void* const* const* lists,
                               const Op& op, cudaStream_t stream) {
  TensorTable<Op::kDepth, kMaxTensors> tab;
  tab.count = 0;
  tab.block_offset = 0;
  tab.chunk_begin[0] = 0;
  cudaError_t err = cudaSuccess;
  auto flush = [&]() {
    if (tab.count == 0) return;
    apply_kernel<Op, kMaxTensors, kChunk, kThreads>
        <<<tab.chunk_begin[tab.count], kThreads, 0, stream>>>(tab, op);
    if (err == cudaSuccess) err = cudaGetLastError();
    tab.block_offset += tab.chunk_begin[tab.count];
    tab.count = 0;
  };
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = numels[t];
    if (n == 0) continue;
    const int64_t c = (n + kChunk - 1) / kChunk;
    if (tab.count == kMaxTensors || tab.chunk_begin[tab.count] + c > INT32_MAX / 2) flush();
    const int i = tab.count;
    for (int d = 0; d < Op::kDepth; ++d) tab.ptrs[d][i] = lists[d][t];
    tab.numel[i] = n;
    tab.chunk_begin[i + 1] = tab.chunk_begin[i] + static_cast<int32_t>(c);
    ++tab.count;
  }
  flush();
  return err;
}

}  // namespace mta
}  // namespace cuda
}  // namespace llmopt_ext
