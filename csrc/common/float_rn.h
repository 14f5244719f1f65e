// float32 +, -, * rounded to nearest and never fused into an FMA, for the
// kernels whose CPU, CUDA and PyTorch-reference results must agree to the bit
// (csrc/common/philox.h, csrc/common/optim_update_math.h). The host builds use
// -ffp-contract=off; on the device nvcc would contract a * b + c, so the
// device pass uses the __f*_rn intrinsics, which it never contracts.
// Torch-free.
#pragma once

#if defined(__CUDA_ARCH__)
#define LLMOPT_MUL(a, b) __fmul_rn((a), (b))
#define LLMOPT_ADD(a, b) __fadd_rn((a), (b))
#define LLMOPT_SUB(a, b) __fsub_rn((a), (b))
#else
#define LLMOPT_MUL(a, b) ((a) * (b))
#define LLMOPT_ADD(a, b) ((a) + (b))
#define LLMOPT_SUB(a, b) ((a) - (b))
#endif
