// Storage types of the CUDA kernels (float32, bfloat16, float16): exact loads,
// single-rounding stores, and the DType -> element type dispatch. Shared by
// every .cu file; torch-free. Uses the conversion intrinsics only, so it also
// compiles with torch's -D__CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/float_types.h"  // DType

namespace llmopt_ext {
namespace cuda {

// Loads are exact in float (and so in double).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ double to_f64(T v) { return to_f32(v); }

// Stores round once, to nearest even.
template <class T> __device__ __forceinline__ T from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float f) {
  return __float2bfloat16_rn(f);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float f) { return __float2half_rn(f); }

template <class T> __device__ __forceinline__ T from_f64(double d);
template <> __device__ __forceinline__ float from_f64<float>(double d) { return __double2float_rn(d); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f64<__nv_bfloat16>(double d) {
  return __double2bfloat16(d);
}
template <> __device__ __forceinline__ __half from_f64<__half>(double d) { return __double2half(d); }

// Calls f(T{}) with the element type of `dtype`; f returns a cudaError_t.
template <class F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace llmopt_ext
