// SPDX-License-Identifier: Apache-2.0
/// \file
/// llama.cpp-style baselines: `q8_0` and `q4_0`, 32-element blocks with one fp16 scale.
///
/// The arithmetic follows ggml's reference quantizers (`quantize_row_q8_0_ref`,
/// `quantize_row_q4_0_ref`): q8_0 stores `round(x / d)` with `d = amax / 127`; q4_0 takes the
/// element of largest magnitude `m` (first on ties), `d = m / -8`, and stores
/// `min(15, trunc(x / d + 8.5))`, decoding `(q - 8) * d`. One difference: q4_0 nibbles use
/// OSCAR's packing (element `2j` low nibble, `2j + 1` high nibble), not ggml's split halves.
/// Like every OSCAR format, a scale beyond fp16's range saturates to 65504 instead of Inf.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "oscar/core/bitpack.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/scale.hpp"

namespace oscar::quant {

struct q8_0 {};  ///< 8-bit signed codes, fp16 scale per 32 elements (8.5 bits per element).
struct q4_0 {};  ///< 4-bit codes with offset 8, fp16 scale per 32 elements (4.5 bits).

struct block_q8_0 {
  half d;             ///< scale
  std::int8_t qs[32]; ///< codes, x = qs * d
};
struct block_q4_0 {
  half d;              ///< scale (negative when the largest-magnitude element is positive)
  std::uint8_t qs[16]; ///< 4-bit codes, x = (q - 8) * d
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0: fp16 scale + 32 int8 codes");
static_assert(sizeof(block_q4_0) == 18, "block_q4_0: fp16 scale + 32 4-bit codes");

namespace detail {

/// Rounds half away from zero, like `roundf`, for |x| < 2^23 (exact, no FMA involved).
OSCAR_HD_INLINE constexpr int round_half_away(float x) noexcept {
  int i = static_cast<int>(x);
  const float frac = x - static_cast<float>(i);
  if (frac >= 0.5f) ++i;
  else if (frac <= -0.5f) --i;
  return i;
}

template <class Block>
struct llama_traits_base {
  static constexpr int group = 32;
  static constexpr group_axis axis = group_axis::head_dim;
  static constexpr bool rotated = false;
  using block = Block;
  static constexpr std::size_t bytes_per_block = sizeof(Block);
  static constexpr double bits_per_element = 8.0 * bytes_per_block / group;
  using head_params = no_head_params;
  static constexpr bool supports_head_dim(int head_dim) noexcept {
    return head_dim > 0 && head_dim % group == 0;
  }
  static constexpr head_params calibrate(const float*, int, int) noexcept { return {}; }
};

}  // namespace detail

template <>
struct format_traits<q8_0> : detail::llama_traits_base<block_q8_0> {
  static constexpr std::string_view name = "q8_0";
  static constexpr int bits = 8;

  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params&,
                                            block* out) noexcept {
    for (int b = 0; b < head_dim / group; ++b) {
      const float* v = x + b * group;
      float amax = 0.0f;
      for (int i = 0; i < group; ++i) {
        const float m = v[i] < 0 ? -v[i] : v[i];
        amax = m > amax ? m : amax;
      }
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      out[b].d = half(clamp_finite(d, 65504.0f));  // saturate, never Inf
      for (int i = 0; i < group; ++i) {
        out[b].qs[i] = static_cast<std::int8_t>(detail::round_half_away(v[i] * id));
      }
    }
  }

  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params&,
                                            float* y) noexcept {
    for (int b = 0; b < head_dim / group; ++b) {
      const float d = static_cast<float>(in[b].d);
      for (int i = 0; i < group; ++i) y[b * group + i] = static_cast<float>(in[b].qs[i]) * d;
    }
  }
};

template <>
struct format_traits<q4_0> : detail::llama_traits_base<block_q4_0> {
  static constexpr std::string_view name = "q4_0";
  static constexpr int bits = 4;

  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params&,
                                            block* out) noexcept {
    for (int b = 0; b < head_dim / group; ++b) {
      const float* v = x + b * group;
      float amax = 0.0f, max = 0.0f;
      for (int i = 0; i < group; ++i) {
        const float m = v[i] < 0 ? -v[i] : v[i];
        if (amax < m) {
          amax = m;
          max = v[i];
        }
      }
      const float d = max / -8.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      out[b].d = half(clamp_finite(d, 65504.0f));  // saturate, never Inf
      std::uint8_t codes[32];
      for (int i = 0; i < group; ++i) {
        const int q = static_cast<int>(v[i] * id + 8.5f);
        codes[i] = static_cast<std::uint8_t>(q < 15 ? q : 15);
      }
      pack_codes<4>(codes, group, out[b].qs);
    }
  }

  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params&,
                                            float* y) noexcept {
    for (int b = 0; b < head_dim / group; ++b) {
      const float d = static_cast<float>(in[b].d);
      for (int i = 0; i < group; ++i) {
        y[b * group + i] = static_cast<float>(get_code<4>(in[b].qs, i) - 8) * d;
      }
    }
  }
};

}  // namespace oscar::quant
