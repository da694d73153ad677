// SPDX-License-Identifier: Apache-2.0
/// \file
/// Vocabulary shared by all formats: group axes, codebooks, scale types, and `fpq_config`, the
/// structural template parameter of the FP2+/FP4+ family (`oscar::quant::fpq<config>`).
#pragma once

#include <cstdint>
#include <string_view>

namespace oscar::quant {

/// Which elements share one scale (a *group*).
enum class group_axis : std::uint8_t {
  /// `group` consecutive channels of one token's head vector ("per-token" quantization).
  head_dim,
  /// `group` consecutive tokens of one channel ("per-channel" quantization, as KIVI keys).
  tokens,
};

/// The levels a code indexes, before the group's scale and zero point are applied.
enum class codebook : std::uint8_t {
  /// Evenly spaced levels. With a zero point: `0 .. 2^bits-1` (min + code * step, as KIVI);
  /// without: `code - (2^bits-1)/2`, symmetric around zero.
  uniform,
  /// Lloyd-Max levels for a unit Gaussian (2-bit: +-0.4528, +-1.5104), symmetric around zero;
  /// MSE-optimal for the roughly Gaussian coordinates of rotated head vectors.
  lloyd_max,
};

/// How a group's scale (and zero point) is stored.
enum class scale_type : std::uint8_t {
  fp16,  ///< IEEE binary16, 2 bytes
  bf16,  ///< bfloat16, 2 bytes
  e4m3,  ///< fp8 e4m3 (FN), 1 byte; covers 2^-9 .. 448, saturating
};

constexpr std::string_view to_string(group_axis a) noexcept {
  return a == group_axis::head_dim ? "head_dim" : "tokens";
}
constexpr std::string_view to_string(codebook c) noexcept {
  return c == codebook::uniform ? "uniform" : "lloyd_max";
}
constexpr std::string_view to_string(scale_type s) noexcept {
  return s == scale_type::fp16 ? "fp16" : s == scale_type::bf16 ? "bf16" : "e4m3";
}

/// Bytes one stored scale (or zero point) takes.
constexpr int scale_bytes(scale_type s) noexcept { return s == scale_type::e4m3 ? 1 : 2; }

/// The parameters of an FP2+/FP4+ format. Used as a class-type template parameter:
///
///     using my_key_format = oscar::quant::fpq<oscar::quant::fpq_config{
///         .bits = 2, .levels = codebook::lloyd_max, .group = 32, .rotate = true}>;
///
/// Combinations that are not allowed fail to compile with a message saying what is allowed.
struct fpq_config {
  int bits = 2;                          ///< code width: 2 (FP2+) or 4 (FP4+)
  codebook levels = codebook::lloyd_max; ///< the levels codes index
  int group = 32;                        ///< elements per scale: 16, 32, 64, 128 or 256
  group_axis axis = group_axis::head_dim;///< along which axis groups run
  scale_type scale = scale_type::fp16;   ///< storage of the group scale (and zero point)
  bool zero_point = false;               ///< store a per-group offset (asymmetric range)
  bool rotate = false;                   ///< Hadamard-rotate each head vector before quantizing
  int outliers = 0;                      ///< largest-|x| elements per group kept in fp16 (0..4)
  bool search_scale = true;              ///< pick the scale among clipped candidates by MSE

  friend constexpr bool operator==(const fpq_config&, const fpq_config&) = default;
};

}  // namespace oscar::quant
