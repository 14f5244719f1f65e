// Multi-tensor vector ops for Steihaug-CG, CPU (OpenMP). Torch-free.
//
// A "tensor list" is `count` contiguous buffers: ptrs[i] points at numels[i]
// elements of one DType. All lists passed to one call have the same count,
// the same numels and the same DType (the torch glue checks this).
//
// Arithmetic: reductions accumulate in double with a fixed summation order, so
// results do not depend on the number of threads. Element-wise outputs:
//   - float32 storage, or exact == true: every element is loaded exactly into
//     double, and each output is rounded once into its storage type
//     (csrc/common/float_types.h);
//   - bfloat16/float16 storage with exact == false (the default of the Python
//     ops): float32 math, each product and sum rounded to float32 in a written
//     order, then one RNE rounding into the 16-bit storage
//     (csrc/common/multi_tensor_math.h).
#pragma once

#include <cstdint>

#include "../common/float_types.h"

namespace llmopt_ext {
namespace cpu {

struct ConstList { const void* const* ptrs; };
struct MutList { void* const* ptrs; };

struct ListShape {
  DType dtype;
  int64_t count;           // number of tensors
  const int64_t* numels;   // numels[i] of tensor i
};

// Scalars are float32 (as in torch's fp32 math for these dtypes).

// sum_i <xs[i], ys[i]>
double mt_dot(const ListShape& s, ConstList xs, ConstList ys);
// sum_i ||xs[i]||^2
double mt_norm_sq(const ListShape& s, ConstList xs);
// ys[i] = a * xs[i] + b * ys[i]
void mt_axpby(const ListShape& s, MutList ys, ConstList xs, float a, float b, bool exact);

struct CgStepNorms {
  double x_norm_sq;  // ||x||^2 of the updated x
  double r_norm_sq;  // ||r||^2 of the updated r
  double r_dot_z;    // r^T M^-1 r of the updated r (== r_norm_sq without a preconditioner)
};
// x += alpha * p; r += alpha * hp; returns the norms of the updated vectors.
// minv (M^-1 as a diagonal, same shapes) may have ptrs == nullptr.
CgStepNorms mt_cg_step(const ListShape& s, MutList xs, MutList rs, ConstList ps, ConstList hps,
                       ConstList minv, float alpha, bool exact);
// p = -(M^-1 r) + beta * p   (M^-1 = identity when minv.ptrs == nullptr)
void mt_cg_direction(const ListShape& s, MutList ps, ConstList rs, ConstList minv, float beta,
                     bool exact);

// Rounds n doubles into n elements of `dtype` at out, bit for bit as store<T>
// (float_types.h): the block converter the bf16/fp16 kernels use (AVX2 where the
// CPU has it). Exposed for the unit tests.
void round_doubles(DType dtype, const double* in, void* out, int64_t n);

// Elements per work item. 16K elements (64 KiB of fp32) keeps a chunk's
// streams inside L2 and gives 512 chunks at 128 LoRA tensors of 16x4096:
// enough to balance two to a few dozen OpenMP threads.
constexpr int64_t kChunkElems = 16384;
// Below this many elements in total a call runs on one thread: the OpenMP
// fork/join (~2-5 us) costs more than it saves.
constexpr int64_t kParallelMinElems = 65536;

}  // namespace cpu
}  // namespace llmopt_ext
