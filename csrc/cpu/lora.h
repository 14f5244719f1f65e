// LoRA merge / unmerge, CPU (OpenMP). Torch-free.
//
// W (rows x cols) <- W +/- s * P * Q, where P is rows x r and Q is r x cols.
// peft's layout is P = lora_B (out x r), Q = lora_A (r x in); for a
// fan_in_fan_out weight (stored in x out) the glue passes P = lora_A^T and
// Q = lora_B^T as strided views, so the kernel has no special case.
//
// Arithmetic (the contract the reference and the CUDA kernel share):
//   acc = sum_j P[i,j] * Q[j,c]   float32, j = 0..r-1 in order, no FMA
//   D   = float32(s * acc)
//   W   = round_once(double(W) +/- double(D))  into W's dtype
// D is the same float32 value in merge and unmerge, so unmerge(merge(W))
// differs from W by at most half an ulp of the merged value plus half an ulp
// of the result (the merge's rounding is the only information lost).
#pragma once

#include <cstdint>

#include "../common/float_types.h"

namespace llmopt_ext {
namespace cpu {

struct LoraMergeArgs {
  DType w_dtype;
  void* w;               // rows x cols, column stride 1
  int64_t rows, cols;
  int64_t w_row_stride;  // elements between rows (>= cols)
  DType ab_dtype;        // dtype of P and Q
  const void* p;         // P[i,j] = p[i * p_rs + j * p_cs]
  int64_t p_rs, p_cs;
  const void* q;         // Q[j,c] = q[j * q_rs + c * q_cs]
  int64_t q_rs, q_cs;
  int64_t rank;
  float scaling;
};

// sign = +1: merge (W += s P Q); sign = -1: unmerge (W -= s P Q).
void lora_merge(const LoraMergeArgs& a, int sign);

// Columns per tile: the tile's packed Q (r x 2048 fp32 = 128 KiB at r = 16,
// 512 KiB at r = 64) stays in L2 while a thread sweeps its rows (512 to 4096
// measured the same). Must be a multiple of the kernel's column block (16).
constexpr int64_t kMergeColTile = 2048;
// Rows per OpenMP work item: 4096 x 4096 has 256 items, enough to balance
// two to a few dozen threads, while the Q tile is reused 16 times.
constexpr int64_t kMergeRowBlock = 16;

}  // namespace cpu
}  // namespace llmopt_ext
