// Element loads of the CPU kernels: any floating input -> its accumulation type.
//
// Half is widened with branch-free bit arithmetic (the FP16 library's exact
// conversion, also c10's portable path) so loops over half rows vectorise;
// c10's own operator float() uses a scalar intrinsic when F16C is enabled.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace loft_kernels {
namespace cpu {

inline float bits_to_float(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers (and inf/nan): move the exponent/mantissa into place and rescale.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: use the float's mantissa as a fixed-point adder.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | bits);
}

template <typename acc_t, typename scalar_t>
inline acc_t load_acc(const scalar_t& v) {
  return static_cast<acc_t>(v);
}

template <>
inline float load_acc<float, c10::Half>(const c10::Half& v) {
  return half_bits_to_float(v.x);
}

template <>
inline float load_acc<float, c10::BFloat16>(const c10::BFloat16& v) {
  return bits_to_float(static_cast<uint32_t>(v.x) << 16);
}

}  // namespace cpu
}  // namespace loft_kernels
