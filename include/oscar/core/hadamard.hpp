// SPDX-License-Identifier: Apache-2.0
/// \file
/// Randomized fast Walsh-Hadamard rotation of head vectors.
///
/// `rotate(x)` computes `x <- H D x / sqrt(n)`, where `H` is the n x n Sylvester-Hadamard matrix
/// and `D` a fixed diagonal of signs; `unrotate` applies the inverse `D H x / sqrt(n)`. The
/// rotation is orthogonal, so `<rotate(q), rotate(k)> = <q, k>`: attention can run in the rotated
/// space when queries are rotated too. It spreads an outlier channel evenly over all channels,
/// which is what lets 2-bit codes survive keys with outlier channels. The signs break up the
/// structure a plain Hadamard keeps (a constant vector would otherwise land in one channel).
///
/// Sign `i` is `-1` when bit 0 of `rotation_sign_hash(i)` is set. The butterfly order and the
/// final scale are fixed, so every backend produces the same floats.
#pragma once

#include <cstdint>

#include "oscar/core/error.hpp"
#include "oscar/core/macros.hpp"

namespace oscar {

/// True for the head dimensions the rotation supports: 64, 128 and 256.
OSCAR_HD_INLINE constexpr bool is_rotation_dim(int n) noexcept {
  return n == 64 || n == 128 || n == 256;
}

/// The 32-bit mix (from MurmurHash3's finalizer) that fixes the rotation's sign pattern.
OSCAR_HD_INLINE constexpr std::uint32_t rotation_sign_hash(std::uint32_t i) noexcept {
  std::uint32_t h = i + 0x9e3779b9u;
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

/// +1.0f or -1.0f: the `i`-th entry of the rotation's sign diagonal `D`.
OSCAR_HD_INLINE constexpr float rotation_sign(int i) noexcept {
  return (rotation_sign_hash(static_cast<std::uint32_t>(i)) & 1u) ? -1.0f : 1.0f;
}

/// `1 / sqrt(n)` for the supported sizes, as exact float constants.
OSCAR_HD_INLINE constexpr float rotation_scale(int n) noexcept {
  return n == 64 ? 0.125f : n == 256 ? 0.0625f : 0.08838834764831845f;  // 1/sqrt(128)
}

/// Unnormalized in-place Walsh-Hadamard transform (`x <- H x`) for a power-of-two `n`.
OSCAR_HD_INLINE constexpr void fwht(float* x, int n) noexcept {
  for (int len = 1; len < n; len <<= 1) {
    for (int i = 0; i < n; i += len << 1) {
      for (int j = i; j < i + len; ++j) {
        const float a = x[j];
        const float b = x[j + len];
        x[j] = a + b;
        x[j + len] = a - b;
      }
    }
  }
}

namespace detail {
OSCAR_HD_INLINE constexpr void apply_signs(float* x, int n) noexcept {
  for (int i = 0; i < n; ++i) x[i] *= rotation_sign(i);
}
OSCAR_HD_INLINE constexpr void scale_by(float* x, int n, float s) noexcept {
  for (int i = 0; i < n; ++i) x[i] *= s;
}
}  // namespace detail

/// `x <- H D x / sqrt(n)` in place; `n` must satisfy `is_rotation_dim` (unchecked here).
OSCAR_HD_INLINE constexpr void rotate_unchecked(float* x, int n) noexcept {
  detail::apply_signs(x, n);
  fwht(x, n);
  detail::scale_by(x, n, rotation_scale(n));
}

/// `x <- D H x / sqrt(n)` in place, the inverse of `rotate_unchecked`.
OSCAR_HD_INLINE constexpr void unrotate_unchecked(float* x, int n) noexcept {
  fwht(x, n);
  detail::scale_by(x, n, rotation_scale(n));
  detail::apply_signs(x, n);
}

/// Host entry point: rotates the head vector `x` of length `n` (64, 128 or 256) in place.
inline void rotate(float* x, int n) {
  OSCAR_CHECK_ARG(is_rotation_dim(n), n, "64, 128 or 256");
  rotate_unchecked(x, n);
}

/// Host entry point: undoes `rotate` in place.
inline void unrotate(float* x, int n) {
  OSCAR_CHECK_ARG(is_rotation_dim(n), n, "64, 128 or 256");
  unrotate_unchecked(x, n);
}

}  // namespace oscar
