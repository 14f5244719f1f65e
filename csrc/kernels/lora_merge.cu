// LoRA merge / unmerge on the GPU: W (rows x cols) +/- s * P (rows x r) * Q (r x cols)
// in place, blocked over rows, with no rows x cols temporary. Torch-free.
//
// One thread block owns a tile of kTileRows rows x (kThreads * kVec) columns.
// The tile's P rows (kTileRows x r) and its Q columns (r x kThreads*kVec) are
// staged in shared memory as float32 in chunks of kRankChunk ranks, so each W
// element is read once and written once: at r <= 64 the op is memory-bound on
// W (2 x 2 bytes per bf16 element) and the r multiply-adds per element hide
// under the loads.
//
// Numerics: acc = sum_j P[i,j] Q[j,c] in float32 in j order with __fmul_rn /
// __fadd_rn (no FMA contraction), D = __fmul_rn(s, acc), W = round_once(W +/- D)
// computed in double and rounded with __double2float_rn / __double2bfloat16 /
// __double2half: exactly the CPU kernel's bits (csrc/cpu/lora.cpp).

#include "lora_cuda.h"
#include "storage_types.cuh"

namespace llmopt_ext {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 4;          // columns per thread: 512 columns per tile
constexpr int kTileRows = 16;    // W rows per block; Q chunk reused 16 times
constexpr int kRankChunk = 16;   // ranks staged per shared-memory round
constexpr int kTileCols = kThreads * kVec;

template <class TW, class TA>
__global__ void __launch_bounds__(kThreads)
lora_merge_kernel(TW* __restrict__ w, int64_t rows, int64_t cols, int64_t w_rs,
                  const TA* __restrict__ p, int64_t p_rs, int64_t p_cs,
                  const TA* __restrict__ q, int64_t q_rs, int64_t q_cs, int64_t rank,
                  float scaling, const float* __restrict__ scaling_ptr, double sign) {
  __shared__ float sp[kTileRows][kRankChunk];
  __shared__ float sq[kRankChunk][kTileCols];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const float s = scaling_ptr != nullptr ? __ldg(scaling_ptr) : scaling;

  float acc[kTileRows][kVec];
#pragma unroll
  for (int i = 0; i < kTileRows; ++i)
#pragma unroll
    for (int v = 0; v < kVec; ++v) acc[i][v] = 0.0f;

  for (int64_t j0 = 0; j0 < rank; j0 += kRankChunk) {
    const int jn = static_cast<int>(rank - j0 < kRankChunk ? rank - j0 : kRankChunk);
    __syncthreads();
    for (int e = threadIdx.x; e < kTileRows * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk, j = e % kRankChunk;
      const int64_t gi = row0 + i;
      sp[i][j] = (gi < rows && j < jn) ? to_f32(p[gi * p_rs + (j0 + j) * p_cs]) : 0.0f;
    }
    for (int e = threadIdx.x; e < kRankChunk * kTileCols; e += kThreads) {
      const int j = e / kTileCols, c = e % kTileCols;
      const int64_t gc = col0 + c;
      sq[j][c] = (gc < cols && j < jn) ? to_f32(q[(j0 + j) * q_rs + gc * q_cs]) : 0.0f;
    }
    __syncthreads();
    for (int j = 0; j < jn; ++j) {
      float qv[kVec];
#pragma unroll
      for (int v = 0; v < kVec; ++v) qv[v] = sq[j][threadIdx.x + v * kThreads];
#pragma unroll
      for (int i = 0; i < kTileRows; ++i) {
        const float pv = sp[i][j];
#pragma unroll
        for (int v = 0; v < kVec; ++v) acc[i][v] = __fadd_rn(acc[i][v], __fmul_rn(pv, qv[v]));
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kTileRows; ++i) {
    const int64_t gi = row0 + i;
    if (gi >= rows) break;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      // threadIdx.x + v * kThreads: consecutive threads touch consecutive columns (coalesced).
      const int64_t gc = col0 + threadIdx.x + v * kThreads;
      if (gc < cols) {
        TW* e = w + gi * w_rs + gc;
        const double d = static_cast<double>(__fmul_rn(s, acc[i][v]));
        *e = from_f64<TW>(static_cast<double>(to_f32(*e)) + sign * d);
      }
    }
  }
}

template <class TW, class TA>
cudaError_t launch(const LoraMergeArgs& a, int sign, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.cols + kTileCols - 1) / kTileCols),
                  static_cast<unsigned>((a.rows + kTileRows - 1) / kTileRows));
  if (grid.y > 65535u) return cudaErrorInvalidConfiguration;  // > 1M rows: not a Linear weight
  lora_merge_kernel<TW, TA><<<grid, kThreads, 0, stream>>>(
      static_cast<TW*>(a.w), a.rows, a.cols, a.w_row_stride, static_cast<const TA*>(a.p), a.p_rs,
      a.p_cs, static_cast<const TA*>(a.q), a.q_rs, a.q_cs, a.rank, a.scaling, a.scaling_ptr,
      sign >= 0 ? 1.0 : -1.0);
  return cudaGetLastError();
}

template <class TW>
cudaError_t dispatch_ab(const LoraMergeArgs& a, int sign, cudaStream_t stream) {
  switch (a.ab_dtype) {
    case DType::BFloat16: return launch<TW, __nv_bfloat16>(a, sign, stream);
    case DType::Float16: return launch<TW, __half>(a, sign, stream);
    case DType::Float32: break;
  }
  return launch<TW, float>(a, sign, stream);
}

}  // namespace

cudaError_t lora_merge(const LoraMergeArgs& a, int sign, cudaStream_t stream) {
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  switch (a.w_dtype) {
    case DType::BFloat16: return dispatch_ab<__nv_bfloat16>(a, sign, stream);
    case DType::Float16: return dispatch_ab<__half>(a, sign, stream);
    case DType::Float32: break;
  }
  return dispatch_ab<float>(a, sign, stream);
}

}  // namespace cuda
}  // namespace llmopt_ext
