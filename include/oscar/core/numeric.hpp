// SPDX-License-Identifier: Apache-2.0
/// \file
/// Storage types for 16- and 8-bit floats and their conversions, usable on host and device.
///
/// - `oscar::half`: IEEE 754 binary16 (1 sign, 5 exponent, 10 mantissa bits).
/// - `oscar::bfloat16`: the top half of a binary32 (1, 8, 7).
/// - `oscar::fp8_e4m3`: OCP FP8 E4M3 "FN" (1, 4, 3; bias 7; no infinities; 0x7F/0xFF are NaN;
///   largest finite value 448), the format of NVIDIA's and AMD's fp8 tensor cores.
///
/// Rounding from float is always round-to-nearest-even. Overflow: half and bfloat16 round to
/// +-Inf as IEEE does; fp8_e4m3 *saturates* to +-448 (Inf included), as `__NV_SATFINITE` does,
/// because a KV cache must never manufacture NaN from a large value. NaN stays NaN in every type.
///
/// The conversions are plain integer arithmetic (no intrinsics), so host and device give
/// bit-identical results, and they are `constexpr`.
#pragma once

#include <cstdint>

#include "oscar/core/macros.hpp"

namespace oscar {

namespace detail {

OSCAR_HD_INLINE constexpr std::uint32_t float_bits(float x) noexcept {
  return __builtin_bit_cast(std::uint32_t, x);
}
OSCAR_HD_INLINE constexpr float bits_float(std::uint32_t x) noexcept {
  return __builtin_bit_cast(float, x);
}

/// `value >> shift` rounded to nearest, ties to even; `shift` in [1, 31].
OSCAR_HD_INLINE constexpr std::uint32_t shift_right_rne(std::uint32_t value, int shift) noexcept {
  const std::uint32_t kept = value >> shift;
  const std::uint32_t rest = value & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1);
  return kept + ((rest > halfway || (rest == halfway && (kept & 1u))) ? 1u : 0u);
}

}  // namespace detail

// ---- binary16 ------------------------------------------------------------------------------

/// float -> binary16 bits, round to nearest even; overflow gives Inf; NaN stays (quiet) NaN.
OSCAR_HD_INLINE constexpr std::uint16_t float_to_half_bits(float f) noexcept {
  const std::uint32_t x = detail::float_bits(f);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t mag = x & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (mag >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: Inf
  if (mag >= 0x38800000u) {  // normal half: rebias the exponent from 127 to 15
    return static_cast<std::uint16_t>(sign | detail::shift_right_rne(mag - 0x38000000u, 13));
  }
  if (mag <= 0x33000000u) return sign;  // <= 2^-25 rounds to (signed) zero
  // Subnormal half: value = mantissa * 2^(exp - 150), in units of 2^-24.
  const std::uint32_t mantissa = (mag & 0x7fffffu) | 0x800000u;
  const int shift = 126 - static_cast<int>(mag >> 23);
  return static_cast<std::uint16_t>(sign | detail::shift_right_rne(mantissa, shift));
}

/// binary16 bits -> float (exact).
OSCAR_HD_INLINE constexpr float half_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // 2^-24
    return detail::bits_float(detail::float_bits(magnitude) | sign);
  }
  if (exponent == 31) return detail::bits_float(sign | 0x7f800000u | (mantissa << 13));
  return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/// The largest binary16 value <= x (round toward -Inf; NaN stays NaN). Bounds stored in fp16
/// with this and `float_to_half_bits_up` still bound the floats they were made from.
OSCAR_HD_INLINE constexpr std::uint16_t float_to_half_bits_down(float f) noexcept {
  const std::uint16_t h = float_to_half_bits(f);
  if ((h & 0x7fffu) > 0x7c00u || !(half_bits_to_float(h) > f)) return h;  // NaN, or already <= f
  if (h == 0x0000u) return 0x8001u;                                      // +0 -> -smallest
  return static_cast<std::uint16_t>((h & 0x8000u) ? h + 1u : h - 1u);
}

/// The smallest binary16 value >= x (round toward +Inf; NaN stays NaN).
OSCAR_HD_INLINE constexpr std::uint16_t float_to_half_bits_up(float f) noexcept {
  const std::uint16_t h = float_to_half_bits(f);
  if ((h & 0x7fffu) > 0x7c00u || !(half_bits_to_float(h) < f)) return h;
  if (h == 0x8000u) return 0x0001u;  // -0 -> +smallest
  return static_cast<std::uint16_t>((h & 0x8000u) ? h - 1u : h + 1u);
}

// ---- bfloat16 ------------------------------------------------------------------------------

/// float -> bfloat16 bits, round to nearest even; NaN stays (quiet) NaN.
OSCAR_HD_INLINE constexpr std::uint16_t float_to_bf16_bits(float f) noexcept {
  const std::uint32_t x = detail::float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

/// bfloat16 bits -> float (exact).
OSCAR_HD_INLINE constexpr float bf16_bits_to_float(std::uint16_t b) noexcept {
  return detail::bits_float(static_cast<std::uint32_t>(b) << 16);
}

// ---- fp8 e4m3 (FN) -------------------------------------------------------------------------

/// Largest finite fp8 e4m3 value.
inline constexpr float fp8_e4m3_max = 448.0f;

/// float -> fp8 e4m3 bits, round to nearest even, saturating to +-448 (Inf included);
/// NaN gives NaN (0x7F with the sign).
OSCAR_HD_INLINE constexpr std::uint8_t float_to_e4m3_bits(float f) noexcept {
  const std::uint32_t x = detail::float_bits(f);
  const auto sign = static_cast<std::uint8_t>((x >> 24) & 0x80u);
  const std::uint32_t mag = x & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);  // NaN
  if (mag >= 0x43e00000u) return static_cast<std::uint8_t>(sign | 0x7eu);  // >= 448: saturate
  if (mag >= 0x3c800000u) {  // normal (>= 2^-6): rebias the exponent from 127 to 7
    return static_cast<std::uint8_t>(sign | detail::shift_right_rne(mag - 0x3c000000u, 20));
  }
  if (mag <= 0x3a800000u) return sign;  // <= 2^-10 rounds to (signed) zero
  // Subnormal e4m3: units of 2^-9.
  const std::uint32_t mantissa = (mag & 0x7fffffu) | 0x800000u;
  const int shift = 141 - static_cast<int>(mag >> 23);
  return static_cast<std::uint8_t>(sign | detail::shift_right_rne(mantissa, shift));
}

/// fp8 e4m3 bits -> float (exact).
OSCAR_HD_INLINE constexpr float e4m3_bits_to_float(std::uint8_t b) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
  const std::uint32_t exponent = (b >> 3) & 0xfu;
  const std::uint32_t mantissa = b & 0x7u;
  if (exponent == 15 && mantissa == 7) return detail::bits_float(sign | 0x7fc00000u);  // NaN
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;  // 2^-9
    return detail::bits_float(detail::float_bits(magnitude) | sign);
  }
  return detail::bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// ---- storage types -------------------------------------------------------------------------

/// IEEE binary16 storage. Trivial, 2 bytes; converts explicitly to and from float.
struct half {
  std::uint16_t bits;
  half() = default;
  OSCAR_HD_INLINE constexpr explicit half(float f) noexcept : bits(float_to_half_bits(f)) {}
  OSCAR_HD_INLINE static constexpr half from_bits(std::uint16_t b) noexcept {
    half h{};
    h.bits = b;
    return h;
  }
  OSCAR_HD_INLINE constexpr explicit operator float() const noexcept {
    return half_bits_to_float(bits);
  }
  friend constexpr bool operator==(half, half) = default;
};

/// bfloat16 storage. Trivial, 2 bytes; converts explicitly to and from float.
struct bfloat16 {
  std::uint16_t bits;
  bfloat16() = default;
  OSCAR_HD_INLINE constexpr explicit bfloat16(float f) noexcept : bits(float_to_bf16_bits(f)) {}
  OSCAR_HD_INLINE static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 h{};
    h.bits = b;
    return h;
  }
  OSCAR_HD_INLINE constexpr explicit operator float() const noexcept {
    return bf16_bits_to_float(bits);
  }
  friend constexpr bool operator==(bfloat16, bfloat16) = default;
};

/// fp8 e4m3 (FN) storage. Trivial, 1 byte; converts explicitly to and from float (saturating).
struct fp8_e4m3 {
  std::uint8_t bits;
  fp8_e4m3() = default;
  OSCAR_HD_INLINE constexpr explicit fp8_e4m3(float f) noexcept : bits(float_to_e4m3_bits(f)) {}
  OSCAR_HD_INLINE static constexpr fp8_e4m3 from_bits(std::uint8_t b) noexcept {
    fp8_e4m3 h{};
    h.bits = b;
    return h;
  }
  OSCAR_HD_INLINE constexpr explicit operator float() const noexcept {
    return e4m3_bits_to_float(bits);
  }
  friend constexpr bool operator==(fp8_e4m3, fp8_e4m3) = default;
};

static_assert(sizeof(half) == 2 && alignof(half) == 2);
static_assert(sizeof(bfloat16) == 2 && alignof(bfloat16) == 2);
static_assert(sizeof(fp8_e4m3) == 1);

/// Converts any of OSCAR's element types (or float) to float.
template <class T>
OSCAR_HD_INLINE constexpr float to_float(T x) noexcept {
  return static_cast<float>(x);
}

/// Rounds a float to type `T` (float, half, bfloat16 or fp8_e4m3).
template <class T>
OSCAR_HD_INLINE constexpr T from_float(float x) noexcept {
  return T(x);
}

}  // namespace oscar
