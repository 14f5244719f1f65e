// Storage types for the CPU kernels: float32, bfloat16 and float16 as raw bits.
//
// Torch-free on purpose: the kernel library builds and is
// unit-tested by CMake alone. Every kernel loads storage into double, computes
// in double, and rounds ONCE into the storage type:
//   - products of two float32 values are exact in double (24 + 24 < 53 bits),
//     so a*x + b*y has a single rounding and FMA contraction cannot change it;
//   - double -> float32 is IEEE round-to-nearest-even;
//   - double -> bf16/fp16 goes through float32 with round-to-odd and then RNE,
//     which equals a single RNE rounding of the double (round-to-odd needs two
//     spare bits; float32 has 16 over bf16 and 13 over fp16).
// The CUDA kernels use __double2bfloat16 / __double2half (single RNE rounding),
// so CPU and GPU produce the same bits.
// Exception: the element-wise multi-tensor ops on bfloat16/float16 storage with
// exact=False (their default) compute in float32 with one rounding per operation
// and then round once into the 16-bit type (csrc/common/multi_tensor_math.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace llmopt_ext {

// Element types the kernels support. Values are stable: the torch glue maps
// at::ScalarType onto them.
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
  }
  return "?";
}

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

namespace detail {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Branch-free (selects only) so the loops that call these vectorise.

// double -> float32 rounded to odd: truncate toward zero, and set the last bit
// when the conversion was inexact (the "sticky" bit). NaN stays NaN.
inline float round_to_odd_f32(double d) {
  const float f = static_cast<float>(d);  // RNE
  const double back = static_cast<double>(f);
  uint32_t u = f32_bits(f);
  u -= (std::fabs(back) > std::fabs(d)) ? 1u : 0u;  // step toward zero
  u |= (back != d) ? 1u : 0u;                        // sticky bit
  return f32_from_bits(u);
}

inline uint16_t f32_to_bf16_rne(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x0040u;  // quiet NaN, sign kept
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rne);
}

inline uint16_t f32_to_f16_rne(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Below 2^-14 (subnormal or zero): adding 0.5 puts the value's 2^-24 units in
  // the low mantissa bits and the FPU does the round-to-nearest-even.
  const uint32_t sub = f32_bits(f32_from_bits(a) + 0.5f) - 0x3f000000u;
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
  const uint32_t norm = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t r = a < 0x38800000u ? sub : norm;
  r = a >= 0x477ff000u ? 0x7c00u : r;  // >= 65520 rounds to inf
  r = a > 0x7f800000u ? 0x7e00u : r;   // NaN
  return static_cast<uint16_t>(sign | r);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);
  const uint32_t infnan = 0x7f800000u | ((em & 0x3ffu) << 13);
  const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);  // exact
  const uint32_t r = em >= 0x7c00u ? infnan : (em >= 0x0400u ? normal : sub);
  return f32_from_bits(sign | r);
}

}  // namespace detail

// load<T>: storage -> double (exact). store<T>: double -> storage, one RNE rounding.
template <class T> inline double load(const T& v);
template <> inline double load<float>(const float& v) { return v; }
template <> inline double load<bf16>(const bf16& v) {
  return detail::f32_from_bits(static_cast<uint32_t>(v.bits) << 16);
}
template <> inline double load<fp16>(const fp16& v) { return detail::f16_to_f32(v.bits); }

template <class T> inline T store(double d);
template <> inline float store<float>(double d) { return static_cast<float>(d); }
template <> inline bf16 store<bf16>(double d) {
  return bf16{detail::f32_to_bf16_rne(detail::round_to_odd_f32(d))};
}
template <> inline fp16 store<fp16>(double d) {
  return fp16{detail::f32_to_f16_rne(detail::round_to_odd_f32(d))};
}

}  // namespace llmopt_ext
