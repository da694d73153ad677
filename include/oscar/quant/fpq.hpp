// SPDX-License-Identifier: Apache-2.0
/// \file
/// The FP2+/FP4+ format family: `fpq<config>`.
///
/// Each group of `config.group` elements is stored as one block of bytes, little-endian and
/// unpadded, in this order:
///
/// | field          | bytes                        | present when        |
/// |----------------|------------------------------|---------------------|
/// | scale          | 2 (fp16/bf16) or 1 (e4m3)    | always              |
/// | zero point     | same as scale                | `zero_point`        |
/// | outlier values | 2 per outlier (fp16)         | `outliers > 0`      |
/// | outlier index  | 1 per outlier (0..group-1)   | `outliers > 0`      |
/// | codes          | group * bits / 8             | always              |
///
/// An e4m3 scale is stored divided by `2^scale_exponent`, a per-head exponent chosen by
/// `calibrate` (`fpq_head_params`); fp16 and bf16 scales are stored as they are.
/// Codes are packed LSB first (`core/bitpack.hpp`). Element `i` of a group decodes to
/// `zero + scale * level(code_i)` (`codebook.hpp`), computed as one multiply then one add in
/// float; an outlier's fp16 value replaces its element. With `rotate`, each head vector is
/// multiplied by the randomized Hadamard rotation (`core/hadamard.hpp`) before grouping, and
/// decoding applies the inverse.
///
/// Encoding, per group: (1) the `outliers` largest-|x| elements (ties: lower index) are kept in
/// fp16 and left out of the fit; (2) the range of the rest gives a scale (and zero point), for
/// each clipping ratio in `codebook.hpp` when `search_scale` (else ratio 1: plain min/max or
/// absmax); (3) scale and zero are rounded to their storage type; (4) each element takes the
/// code whose level is nearest, by thresholds at midpoints (`x > (d_j + d_{j+1}) / 2` moves up
/// one code; an exact tie takes the lower code); (5) the candidate with the smallest squared
/// error over the fitted elements wins (ties: the earlier, less clipped one).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "oscar/core/bitpack.hpp"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/codebook.hpp"
#include "oscar/quant/config.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/scale.hpp"

namespace oscar::quant {

/// Tag of the FP2+/FP4+ format with parameters `Config` (see `fpq_config`).
template <fpq_config Config>
struct fpq {};

namespace detail {

/// A short, unique name for a config, e.g. "fp2-lm-g32h-fp16-rot".
struct name_buffer {
  std::array<char, 48> text{};
  int size = 0;
  constexpr void add(std::string_view s) {
    for (char c : s) text[static_cast<std::size_t>(size++)] = c;
  }
  constexpr void add(int v) {
    char digits[12]{};
    int n = 0;
    do {
      digits[n++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v > 0);
    while (n > 0) text[static_cast<std::size_t>(size++)] = digits[--n];
  }
};

constexpr name_buffer fpq_name(fpq_config c) {
  name_buffer b;
  b.add("fp");
  b.add(c.bits);
  b.add(c.levels == codebook::lloyd_max ? "-lm-g" : "-u-g");
  b.add(c.group);
  b.add(c.axis == group_axis::head_dim ? "h-" : "t-");
  b.add(to_string(c.scale));
  if (c.zero_point) b.add("-z");
  if (c.rotate) b.add("-rot");
  if (c.outliers > 0) {
    b.add("-o");
    b.add(c.outliers);
  }
  if (!c.search_scale) b.add("-minmax");
  return b;
}

}  // namespace detail

/// Per-head metadata of fpq formats with e4m3 scales: group scales are stored as
/// `e4m3(scale / 2^scale_exponent)`, so the 2^-9 .. 448 range of e4m3 follows the head's
/// magnitude. Chosen once per head by `calibrate`; clamped to [-100, 100].
struct fpq_head_params {
  std::int8_t scale_exponent = 0;
  friend constexpr bool operator==(fpq_head_params, fpq_head_params) = default;
};

template <fpq_config C>
struct format_traits<fpq<C>> {
  static_assert(C.bits == 2 || C.bits == 4,
                "fpq_config::bits must be 2 (FP2+) or 4 (FP4+)");
  static_assert(C.group == 16 || C.group == 32 || C.group == 64 || C.group == 128 ||
                    C.group == 256,
                "fpq_config::group must be 16, 32, 64, 128 or 256");
  static_assert(C.axis == group_axis::head_dim || C.group <= 128,
                "fpq_config::group along tokens must be 16, 32, 64 or 128");
  static_assert(C.outliers >= 0 && C.outliers <= 4,
                "fpq_config::outliers must be 0 to 4 per group");
  static_assert(!(C.zero_point && C.scale == scale_type::e4m3),
                "fpq_config: a zero point needs an fp16 or bf16 scale_type (e4m3 has 3 mantissa "
                "bits, too few to place a group's offset); use scale_type::fp16 or bf16, or "
                "zero_point = false");

  static constexpr fpq_config config = C;
  static constexpr auto name_storage = detail::fpq_name(C);
  static constexpr std::string_view name{name_storage.text.data(),
                                         static_cast<std::size_t>(name_storage.size)};
  static constexpr int bits = C.bits;
  static constexpr int group = C.group;
  static constexpr group_axis axis = C.axis;
  static constexpr bool rotated = C.rotate;

  // Byte layout of a block (see the table at the top of this file).
  static constexpr int scale_size = scale_bytes(C.scale);
  static constexpr int zero_offset = scale_size;
  static constexpr int outlier_value_offset = zero_offset + (C.zero_point ? scale_size : 0);
  static constexpr int outlier_index_offset = outlier_value_offset + 2 * C.outliers;
  static constexpr int code_offset = outlier_index_offset + C.outliers;
  static constexpr int block_bytes = code_offset + C.group * C.bits / 8;

  struct block {
    std::uint8_t bytes[block_bytes];
  };
  static_assert(sizeof(block) == static_cast<std::size_t>(block_bytes), "fpq block is unpadded");
  static constexpr std::size_t bytes_per_block = sizeof(block);
  static constexpr double bits_per_element = 8.0 * bytes_per_block / C.group;

  /// e4m3 scales carry a per-head power-of-two exponent (see `fpq_head_params`); fp16 and
  /// bf16 scales need no per-head metadata.
  using head_params =
      std::conditional_t<C.scale == scale_type::e4m3, fpq_head_params, no_head_params>;

  static constexpr bool supports_head_dim(int head_dim) noexcept {
    if (C.rotate && !is_rotation_dim(head_dim)) return false;
    if (C.axis == group_axis::head_dim) return head_dim > 0 && head_dim % C.group == 0;
    return head_dim > 0 && head_dim <= 256;
  }

  /// For e4m3 scales: picks the head's exponent so that a group spanning the head's absmax
  /// stores a scale near 2^4, leaving e4m3 about 2^4.8 of headroom above and 2^13 below.
  static head_params calibrate(const float* x, int tokens, int head_dim) noexcept {
    if constexpr (C.scale == scale_type::e4m3) {
      float amax = 0.0f;
      for (long i = 0; i < static_cast<long>(tokens) * head_dim; ++i) {
        const float m = x[i] < 0 ? -x[i] : x[i];
        amax = m > amax ? m : amax;
      }
      if (!(amax > 0.0f)) return {};
      const int e = std::ilogb(amax / level(levels - 1)) - 4;
      return {static_cast<std::int8_t>(e < -100 ? -100 : e > 100 ? 100 : e)};
    } else {
      return {};
    }
  }

  /// Encodes one tile: `tokens_per_tile` rows of `head_dim` floats (contiguous) into
  /// `blocks_per_tile(head_dim)` blocks. Input must be finite; `head_dim` supported.
  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params& p,
                                            block* out) noexcept {
    constexpr int tile_tokens = C.axis == group_axis::tokens ? C.group : 1;
    float rotated_tile[C.rotate ? tile_tokens * 256 : 1];
    const float* src = x;
    if constexpr (C.rotate) {
      for (int i = 0; i < tile_tokens * head_dim; ++i) rotated_tile[i] = x[i];
      for (int t = 0; t < tile_tokens; ++t) rotate_unchecked(rotated_tile + t * head_dim, head_dim);
      src = rotated_tile;
    }
    float values[C.group];
    if constexpr (C.axis == group_axis::head_dim) {
      for (int g = 0; g < head_dim / C.group; ++g) {
        for (int i = 0; i < C.group; ++i) values[i] = src[g * C.group + i];
        encode_group(values, p, out[g]);
      }
    } else {
      for (int c = 0; c < head_dim; ++c) {
        for (int t = 0; t < C.group; ++t) values[t] = src[t * head_dim + c];
        encode_group(values, p, out[c]);
      }
    }
  }

  /// Decodes one tile written by `encode_tile` into `tokens_per_tile * head_dim` floats.
  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params& p,
                                            float* y) noexcept {
    constexpr int tile_tokens = C.axis == group_axis::tokens ? C.group : 1;
    float values[C.group];
    if constexpr (C.axis == group_axis::head_dim) {
      for (int g = 0; g < head_dim / C.group; ++g) {
        decode_group(in[g], p, values);
        for (int i = 0; i < C.group; ++i) y[g * C.group + i] = values[i];
      }
    } else {
      for (int c = 0; c < head_dim; ++c) {
        decode_group(in[c], p, values);
        for (int t = 0; t < C.group; ++t) y[t * head_dim + c] = values[t];
      }
    }
    if constexpr (C.rotate) {
      for (int t = 0; t < tile_tokens; ++t) unrotate_unchecked(y + t * head_dim, head_dim);
    }
  }

  // ---- one group ---------------------------------------------------------------------------

  OSCAR_HD_INLINE static constexpr float level(int q) noexcept {
    return codebook_level(C.levels, C.bits, C.zero_point, q);
  }

  /// Value of code `q` for a stored scale and zero point: one multiply, then one add.
  OSCAR_HD_INLINE static float dequant(float scale, float zero, int q) noexcept {
    const float scaled = scale * level(q);
    return C.zero_point ? zero + scaled : scaled;
  }

  static constexpr int levels = 1 << C.bits;

  /// Midpoints between consecutive decoded levels for a stored scale and zero point.
  OSCAR_HD_INLINE static void thresholds(float scale, float zero, float* t) noexcept {
    for (int j = 0; j + 1 < levels; ++j) {
      t[j] = (dequant(scale, zero, j) + dequant(scale, zero, j + 1)) * 0.5f;
    }
  }

  /// Nearest code: the number of thresholds `v` is strictly above (ties take the lower code).
  OSCAR_HD_INLINE static int nearest_code(float v, const float* t) noexcept {
    int q = 0;
    for (int j = 0; j + 1 < levels; ++j) q += v > t[j] ? 1 : 0;
    return q;
  }

  /// 2^e for the head's scale exponent (1 for fp16/bf16 scales).
  OSCAR_HD_INLINE static float exponent_factor(const head_params& p, bool inverse) noexcept {
    if constexpr (C.scale == scale_type::e4m3) {
      const int e = inverse ? -p.scale_exponent : p.scale_exponent;
      return oscar::detail::bits_float(static_cast<std::uint32_t>(127 + e) << 23);
    } else {
      (void)p;
      (void)inverse;
      return 1.0f;
    }
  }

  /// Rounds a scale to what the block stores (including the head exponent), as float.
  OSCAR_HD_INLINE static float round_scale(float s, const head_params& p) noexcept {
    return round_to_scale<C.scale>(s * exponent_factor(p, true)) * exponent_factor(p, false);
  }

  OSCAR_HOST_DEVICE static void encode_group(const float* v, const head_params& p,
                                             block& out) noexcept {
    std::uint8_t* bytes = out.bytes;
    bool is_outlier[C.group] = {};
    for (int k = 0; k < C.outliers; ++k) {
      int best = -1;
      float best_mag = -1.0f;
      for (int i = 0; i < C.group; ++i) {
        const float mag = v[i] < 0 ? -v[i] : v[i];
        if (!is_outlier[i] && mag > best_mag) {
          best = i;
          best_mag = mag;
        }
      }
      is_outlier[best] = true;
      const std::uint16_t h = float_to_half_bits(clamp_finite(v[best], 65504.0f));
      bytes[outlier_value_offset + 2 * k] = static_cast<std::uint8_t>(h & 0xffu);
      bytes[outlier_value_offset + 2 * k + 1] = static_cast<std::uint8_t>(h >> 8);
      bytes[outlier_index_offset + k] = static_cast<std::uint8_t>(best);
    }

    float lo = 0.0f, hi = 0.0f, amax = 0.0f;
    bool first = true;
    for (int i = 0; i < C.group; ++i) {
      if (is_outlier[i]) continue;
      lo = first || v[i] < lo ? v[i] : lo;
      hi = first || v[i] > hi ? v[i] : hi;
      const float mag = v[i] < 0 ? -v[i] : v[i];
      amax = mag > amax ? mag : amax;
      first = false;
    }

    constexpr float level_min = level(0);
    constexpr float level_max = level(levels - 1);
    float t[levels - 1];
    float best_scale = 0.0f, best_zero = 0.0f, best_error = 0.0f;
    const int candidates = C.search_scale ? clip_candidates : 1;
    for (int k = 0; k < candidates; ++k) {
      const float ratio = clip_ratio(k);
      float scale = 0.0f, zero = 0.0f;
      if constexpr (C.zero_point) {
        const float half_range = (hi - lo) * 0.5f * ratio;
        const float mid = (hi + lo) * 0.5f;
        scale = round_scale((half_range + half_range) / (level_max - level_min), p);
        zero = round_to_scale<C.scale>((mid - half_range) - scale * level_min);
      } else {
        scale = round_scale(amax * ratio / level_max, p);
      }
      thresholds(scale, zero, t);
      float decoded[levels];
      for (int j = 0; j < levels; ++j) decoded[j] = dequant(scale, zero, j);
      float error = 0.0f;
      for (int i = 0; i < C.group; ++i) {  // branch-free so the compiler can vectorize it
        const float d = v[i] - decoded[nearest_code(v[i], t)];
        error += is_outlier[i] ? 0.0f : d * d;
      }
      if (k == 0 || error < best_error) {
        best_scale = scale;
        best_zero = zero;
        best_error = error;
      }
    }

    store_scale<C.scale>(bytes, best_scale * exponent_factor(p, true));
    if constexpr (C.zero_point) store_scale<C.scale>(bytes + zero_offset, best_zero);
    thresholds(best_scale, best_zero, t);
    std::uint8_t codes[C.group];
    for (int i = 0; i < C.group; ++i) codes[i] = static_cast<std::uint8_t>(nearest_code(v[i], t));
    pack_codes<C.bits>(codes, C.group, bytes + code_offset);
  }

  OSCAR_HOST_DEVICE static void decode_group(const block& in, const head_params& p,
                                             float* v) noexcept {
    const std::uint8_t* bytes = in.bytes;
    const float scale = load_scale<C.scale>(bytes) * exponent_factor(p, false);
    const float zero = C.zero_point ? load_scale<C.scale>(bytes + zero_offset) : 0.0f;
    for (int i = 0; i < C.group; ++i) {
      v[i] = dequant(scale, zero, get_code<C.bits>(bytes + code_offset, i));
    }
    for (int k = 0; k < C.outliers; ++k) {
      const int index = bytes[outlier_index_offset + k];
      const auto h = static_cast<std::uint16_t>(bytes[outlier_value_offset + 2 * k] |
                                                (bytes[outlier_value_offset + 2 * k + 1] << 8));
      if (index < C.group) v[index] = half_bits_to_float(h);  // bytes may be untrusted
    }
  }
};

}  // namespace oscar::quant
