// The rank-r products of the fused LoRA Linear on CPU (llmopt_ext/ops/lora.py),
// float32 accumulation from bf16/fp16/fp32 activations read in place, with
// the adapter-branch dropout mask regenerated from a Philox counter instead
// of stored. Torch-free (OpenMP).
//
//   lowrank_down:   out[M, R]  = s * dropout(X)[M, K] @ Q[K, R]
//   lowrank_reduce: out[R, K]  = s * G[M, R]^T @ dropout(X)[M, K]
//   dropout_mul:    T[M, K]   *= keep(m, k) / (1 - p)       (in place)
//
// X and T have unit column stride and any row stride; Q and G are contiguous
// float32. The base GEMMs (x W^T, dY W) stay in ATen: these are the skinny
// products that ATen could only run in float32 after an upcast copy of X.
//
// Dropout contract: element (m, k) of an M x K activation is kept iff
// lane (i mod 4) of philox4x32(counter = (i / 4, offset = 0x10AA), key =
// seed) is >= floor(p * 2^32), with i = m * K + k; kept elements are scaled by
// 1.0f / (1.0f - p) in float32 (torch's dropout scale). The same (seed, p) gives
// the same mask in forward and backward, whatever the threading.
#pragma once

#include <cstdint>

#include "../common/float_types.h"

namespace llmopt_ext {
namespace cpu {

struct Dropout {
  uint64_t seed = 0;
  float p = 0.0f;  // 0: no dropout
};

struct LowrankArgs {
  DType x_dtype;
  const void* x;     // M x K, row stride x_rs, column stride 1
  int64_t m, k, x_rs;
  const float* q;    // down: Q (K x R); reduce: G (M x R); contiguous
  int64_t r;
  float scale;
  Dropout drop;
  float* out;        // down: M x R; reduce: R x K; contiguous
};

void lowrank_down(const LowrankArgs& a);
void lowrank_reduce(const LowrankArgs& a);

// T (M x K, row stride rs) *= keep / (1 - p), same mask as X's of that shape.
void dropout_mul(DType t_dtype, void* t, int64_t m, int64_t k, int64_t rs, Dropout drop);

// Counter offset word of the LoRA dropout stream (distinct from philox_normal_'s
// caller-chosen offsets only by convention; the seed is drawn per call).
constexpr uint64_t kDropoutOffset = 0x10AA;

}  // namespace cpu
}  // namespace llmopt_ext
