// SPDX-License-Identifier: Apache-2.0
/// \file
/// Storing group scales and zero points as fp16, bf16 or fp8 e4m3.
///
/// Stores always saturate to the type's largest finite value, so a huge group can lose range
/// (values clip) but never decodes to Inf or NaN.
#pragma once

#include <cstdint>
#include <cstring>

#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/config.hpp"

namespace oscar::quant {

/// Largest finite value of a storage type.
OSCAR_HD_INLINE constexpr float max_finite(scale_type s) noexcept {
  return s == scale_type::fp16 ? 65504.0f : s == scale_type::bf16 ? 3.3895313892515355e38f
                                                                  : fp8_e4m3_max;
}

OSCAR_HD_INLINE constexpr float clamp_finite(float x, float limit) noexcept {
  return x > limit ? limit : x < -limit ? -limit : x;
}

/// Rounds `x` to what type `S` stores (saturating), returned as float.
template <scale_type S>
OSCAR_HD_INLINE constexpr float round_to_scale(float x) noexcept {
  const float c = clamp_finite(x, max_finite(S));
  if constexpr (S == scale_type::fp16) return half_bits_to_float(float_to_half_bits(c));
  else if constexpr (S == scale_type::bf16) return bf16_bits_to_float(float_to_bf16_bits(c));
  else return e4m3_bits_to_float(float_to_e4m3_bits(c));
}

/// Writes `x` (already representable, e.g. from `round_to_scale`) as type `S` at `dst`
/// (little-endian, unaligned).
template <scale_type S>
OSCAR_HD_INLINE void store_scale(std::uint8_t* dst, float x) noexcept {
  const float c = clamp_finite(x, max_finite(S));
  if constexpr (S == scale_type::e4m3) {
    dst[0] = float_to_e4m3_bits(c);
  } else {
    const std::uint16_t b =
        S == scale_type::fp16 ? float_to_half_bits(c) : float_to_bf16_bits(c);
    dst[0] = static_cast<std::uint8_t>(b & 0xffu);
    dst[1] = static_cast<std::uint8_t>(b >> 8);
  }
}

/// Reads a value of type `S` stored by `store_scale`.
template <scale_type S>
OSCAR_HD_INLINE float load_scale(const std::uint8_t* src) noexcept {
  if constexpr (S == scale_type::e4m3) {
    return e4m3_bits_to_float(src[0]);
  } else {
    const auto b = static_cast<std::uint16_t>(src[0] | (src[1] << 8));
    return S == scale_type::fp16 ? half_bits_to_float(b) : bf16_bits_to_float(b);
  }
}

}  // namespace oscar::quant
