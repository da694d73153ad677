// SPDX-License-Identifier: Apache-2.0
/// \file
/// Packing of 2-bit and 4-bit codes into bytes.
///
/// Layout (the same on every backend and in serialized pages): code `i` lives in byte
/// `i / (8 / Bits)` at bit offset `Bits * (i % (8 / Bits))`, least significant bits first.
/// For 2-bit codes c0..c3 the byte is `c0 | c1 << 2 | c2 << 4 | c3 << 6`; for 4-bit codes
/// c0, c1 it is `c0 | c1 << 4`.
#pragma once

#include <cstdint>

#include "oscar/core/macros.hpp"

namespace oscar {

/// Code widths that pack evenly into bytes.
template <int Bits>
inline constexpr bool is_packable_width_v = Bits == 1 || Bits == 2 || Bits == 4 || Bits == 8;

/// Number of codes per byte.
template <int Bits>
inline constexpr int codes_per_byte = 8 / Bits;

/// Bytes needed for `n` codes of `Bits` bits.
template <int Bits>
OSCAR_HD_INLINE constexpr int packed_bytes(int n) noexcept {
  return (n * Bits + 7) / 8;
}

/// Reads code `i` from packed bytes.
template <int Bits>
OSCAR_HD_INLINE constexpr std::uint8_t get_code(const std::uint8_t* packed, int i) noexcept {
  static_assert(is_packable_width_v<Bits>, "code width must be 1, 2, 4 or 8 bits");
  constexpr int per_byte = codes_per_byte<Bits>;
  constexpr unsigned mask = (1u << Bits) - 1u;
  return static_cast<std::uint8_t>((packed[i / per_byte] >> (Bits * (i % per_byte))) & mask);
}

/// Packs `n` codes (each `< 2^Bits`; higher bits are ignored) into `packed_bytes<Bits>(n)`
/// bytes. A final partial byte is zero-padded.
template <int Bits>
OSCAR_HD_INLINE constexpr void pack_codes(const std::uint8_t* codes, int n,
                                          std::uint8_t* packed) noexcept {
  static_assert(is_packable_width_v<Bits>, "code width must be 1, 2, 4 or 8 bits");
  constexpr int per_byte = codes_per_byte<Bits>;
  constexpr unsigned mask = (1u << Bits) - 1u;
  for (int byte = 0; byte < packed_bytes<Bits>(n); ++byte) {
    unsigned value = 0;
    for (int j = 0; j < per_byte && byte * per_byte + j < n; ++j) {
      value |= (codes[byte * per_byte + j] & mask) << (Bits * j);
    }
    packed[byte] = static_cast<std::uint8_t>(value);
  }
}

/// Unpacks `n` codes of `Bits` bits.
template <int Bits>
OSCAR_HD_INLINE constexpr void unpack_codes(const std::uint8_t* packed, int n,
                                            std::uint8_t* codes) noexcept {
  for (int i = 0; i < n; ++i) codes[i] = get_code<Bits>(packed, i);
}

}  // namespace oscar
