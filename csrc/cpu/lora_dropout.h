// The adapter-branch dropout mask of the fused LoRA Linear on CPU
// (llmopt_ext/ops/lora.py), regenerated from a Philox counter instead of
// stored. Torch-free (OpenMP).
//
//   dropout_mul:    T[M, K]   *= keep(first + m K + k) / (1 - p)   (in place)
//
// The rank-r products themselves are ATen sgemms on row blocks of x, each
// block upcast to float32 and masked here at its offset (first = row0 * K).
//
// Dropout contract: element (m, k) of an M x K activation is kept iff
// lane (i mod 4) of philox4x32(counter = (i / 4, offset = 0x10AA), key =
// seed) is >= floor(p * 2^32), with i = m * K + k; kept elements are scaled by
// 1.0f / (1.0f - p) in float32 (torch's dropout scale) and rounded once. The
// same (seed, p) gives the same mask in forward and backward, whatever the
// threading and the row blocking.
#pragma once

#include <cstdint>

#include "../common/float_types.h"

namespace llmopt_ext {
namespace cpu {

struct Dropout {
  uint64_t seed = 0;
  float p = 0.0f;  // 0: no dropout
};

// T (M x K, row stride rs) *= keep / (1 - p), same mask as X's of that shape;
// T[0, 0] is flat element `first` (a block of rows i.. of a larger M' x K
// activation: first = i * K), so a block gets its rows of the whole mask.
void dropout_mul(DType t_dtype, void* t, int64_t m, int64_t k, int64_t rs, uint64_t first, Dropout drop);

// Counter offset word of the LoRA dropout stream (distinct from philox_normal_'s
// caller-chosen offsets only by convention; the seed is drawn per call).
constexpr uint64_t kDropoutOffset = 0x10AA;

}  // namespace cpu
}  // namespace llmopt_ext
