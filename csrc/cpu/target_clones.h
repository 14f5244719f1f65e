// Function multi-versioning for the CPU kernels, shared by every csrc/cpu file.
//
// Hot loops are compiled for several ISA levels and the dynamic loader picks
// the best one at load time, so a source build vectorises without
// -march=native (which would make a built wheel non-portable). Kernels keep
// the same operations in the same order in every clone, so results agree
// bit for bit across machines. target_clones does not apply to templates:
// force-inline the templates (LLMOPT_INLINE) into one cloned, non-template
// entry point per (op, dtype).
//
//   LLMOPT_CLONES       AVX-512 (x86-64-v4), AVX2+FMA+F16C (v3), baseline.
//   LLMOPT_CLONES_AVX2  v3 and baseline only, for loops where the AVX-512
//                       clone measured no faster (memory-bound) or where
//                       GCC 12's v4 code generation was not trusted.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LLMOPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define LLMOPT_CLONES_AVX2 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LLMOPT_CLONES
#define LLMOPT_CLONES_AVX2
#endif

#define LLMOPT_INLINE inline __attribute__((always_inline))
