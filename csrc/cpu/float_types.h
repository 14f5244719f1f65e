// Storage types for the CPU kernels: float32, bfloat16 and float16 as raw bits.
//
// Torch-free on purpose (see ARCHITECTURE.md): the kernel library builds and is
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

// double -> float32 rounded to odd: truncate toward zero, and set the last bit
// when the conversion was inexact (the "sticky" bit).
inline float round_to_odd_f32(double d) {
  float f = static_cast<float>(d);  // RNE
  if (static_cast<double>(f) == d || std::isnan(d)) return f;
  uint32_t u = f32_bits(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) u -= 1;  // step toward zero
  return f32_from_bits(u | 1u);
}

inline uint16_t f32_to_bf16_rne(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t f32_to_f16_rne(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;              // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;             // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                   // below 2^-14: subnormal or zero
    // Adding 0.5 puts the value's 2^-24 units in the low mantissa bits; the FPU
    // does the round-to-nearest-even.
    const float t = f32_from_bits(a) + 0.5f;
    return sign | static_cast<uint16_t>(f32_bits(t) - 0x3f000000u);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t r = a - (112u << 23) + 0xfffu + odd;
  return sign | static_cast<uint16_t>(r >> 13);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return f32_from_bits(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
  if (em >= 0x0400u) return f32_from_bits(sign | ((em << 13) + (112u << 23)));
  const float v = static_cast<float>(em) * 0x1p-24f;  // subnormal: exact
  return f32_from_bits(sign | f32_bits(v));
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
