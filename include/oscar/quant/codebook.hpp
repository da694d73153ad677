// SPDX-License-Identifier: Apache-2.0
/// \file
/// Codebook levels of the FP2+/FP4+ family, before a group's scale and zero point.
///
/// A code `q` decodes to `zero + scale * level(q)` (or `scale * level(q)` without a zero point).
/// Levels increase with `q`, which is what lets the encoder pick codes by thresholds.
#pragma once

#include "oscar/core/macros.hpp"
#include "oscar/quant/config.hpp"

namespace oscar::quant {

namespace detail {

/// Lloyd-Max levels for a unit Gaussian, positive half, computed by Lloyd iteration to 1e-6.
OSCAR_HD_INLINE constexpr float lloyd_max_positive(int bits, int i) noexcept {
  if (bits == 2) return i == 0 ? 0.452780f : 1.510418f;
  switch (i) {
    case 0: return 0.128395f;
    case 1: return 0.388048f;
    case 2: return 0.656759f;
    case 3: return 0.942340f;
    case 4: return 1.256231f;
    case 5: return 1.618046f;
    case 6: return 2.069017f;
    default: return 2.732590f;
  }
}

}  // namespace detail

/// Level of code `q` in a `bits`-wide codebook of kind `kind`.
OSCAR_HD_INLINE constexpr float codebook_level(codebook kind, int bits, bool zero_point,
                                               int q) noexcept {
  const int n = 1 << bits;
  if (kind == codebook::uniform) {
    // With a zero point: 0 .. n-1 (zero = group minimum). Without: symmetric half-steps.
    return zero_point ? static_cast<float>(q) : static_cast<float>(2 * q - (n - 1)) * 0.5f;
  }
  const int half = n / 2;
  return q >= half ? detail::lloyd_max_positive(bits, q - half)
                   : -detail::lloyd_max_positive(bits, half - 1 - q);
}

/// Candidate clipping ratios tried by the MSE scale search, largest first (1.0 = no clipping).
inline constexpr int clip_candidates = 11;

OSCAR_HD_INLINE constexpr float clip_ratio(int i) noexcept {
  switch (i) {
    case 0: return 1.0f;
    case 1: return 0.95f;
    case 2: return 0.9f;
    case 3: return 0.85f;
    case 4: return 0.8f;
    case 5: return 0.75f;
    case 6: return 0.7f;
    case 7: return 0.65f;
    case 8: return 0.6f;
    case 9: return 0.55f;
    default: return 0.5f;
  }
}

}  // namespace oscar::quant
