// Per-element float32 math of the multi-tensor CG ops' fast path (exact=False
// on bfloat16/float16 storage), shared by the CPU kernels
// (csrc/cpu/multi_tensor.cpp) and the CUDA kernels (csrc/kernels/multi_tensor.cu)
// so both evaluate the same float32 expressions in the same order. Torch-free.
//
// Contract (also llmopt_ext/ops/multi_tensor.py and reference.py): the 16-bit
// inputs are loaded exactly into float32, the scalars (a, b, alpha, beta) are
// float32, every product and sum below is rounded to float32 separately in the
// order written (no FMA contraction: -ffp-contract=off on the host, the
// __f*_rn intrinsics behind LLMOPT_MUL/ADD/SUB on the device), and the caller
// rounds the float32 result once, to nearest even, into the 16-bit storage:
//   axpby:        y = R16( fl(fl(a*x) + fl(b*y)) )
//   cg_step:      x = R16( fl(x + fl(alpha*p)) ),  r = R16( fl(r + fl(alpha*hp)) )
//   cg_direction: z = minv ? fl(minv*r) : r,      p = R16( fl(fl(beta*p) - z) )
// float32 storage, and exact=True, keep the float64 path (float_types.h).
#pragma once

#include "float_rn.h"  // LLMOPT_MUL / LLMOPT_ADD / LLMOPT_SUB

#if defined(__CUDACC__)
#define LLMOPT_MT_ELEM __device__ __forceinline__  // uses the __f*_rn intrinsics
#else
#define LLMOPT_MT_ELEM inline __attribute__((always_inline))
#endif

namespace llmopt_ext {
namespace mt {

// fl(fl(a*x) + fl(b*y))
LLMOPT_MT_ELEM float axpby_f32(float a, float x, float b, float y) {
  return LLMOPT_ADD(LLMOPT_MUL(a, x), LLMOPT_MUL(b, y));
}

// fl(v + fl(alpha*d)): x += alpha p and r += alpha hp of cg_step.
LLMOPT_MT_ELEM float cg_update_f32(float v, float alpha, float d) {
  return LLMOPT_ADD(v, LLMOPT_MUL(alpha, d));
}

// z = fl(minv*r), the preconditioned residual of cg_direction.
LLMOPT_MT_ELEM float precond_f32(float minv, float r) { return LLMOPT_MUL(minv, r); }

// fl(fl(beta*p) - z)
LLMOPT_MT_ELEM float cg_direction_f32(float beta, float p, float z) {
  return LLMOPT_SUB(LLMOPT_MUL(beta, p), z);
}

}  // namespace mt
}  // namespace llmopt_ext
