// SPDX-License-Identifier: Apache-2.0
/// \file
/// `format_traits<F>`: what every K/V tensor format tells generic code, and the concepts that
/// check a format provides it.
///
/// A *tensor format* quantizes either keys or values. It is an empty tag type `F`; its traits
/// give its name, code width, group size and axis, the block type and size, the all-in bits per
/// element, and host reference `encode_tile`/`decode_tile`. A *tile* is the unit a format
/// encodes at once: one token's head vector for groups along head_dim, `group` tokens for
/// groups along tokens. A *KV format* (`kv_format<K, V>`) pairs a key and a value format.
#pragma once

#include <concepts>
#include <cstddef>
#include <string_view>
#include <type_traits>

#include "oscar/core/macros.hpp"
#include "oscar/quant/config.hpp"

namespace oscar::quant {

template <class>
inline constexpr bool dependent_false_v = false;

/// Primary template: only formats OSCAR knows specialize it.
template <class Format>
struct format_traits {
  static_assert(dependent_false_v<Format>,
                "oscar::quant::format_traits<F>: F is not a known format. Allowed: fp16, bf16, "
                "e4m3, q8_0, q4_0, fpq<config> (FP2+/FP4+, KIVI), or a format you specialize "
                "format_traits for; did you include <oscar/quant/formats.hpp>?");
};

/// What generic code relies on. `head_params` is per-(head) metadata a format may need (the
/// fp8 per-head scale); most formats use an empty struct.
template <class F>
concept tensor_format = requires(const float* x, float* y, int head_dim,
                                 const typename format_traits<F>::head_params& params,
                                 typename format_traits<F>::block* out,
                                 const typename format_traits<F>::block* in) {
  { format_traits<F>::name } -> std::convertible_to<std::string_view>;
  { format_traits<F>::bits } -> std::convertible_to<int>;
  { format_traits<F>::group } -> std::convertible_to<int>;
  { format_traits<F>::axis } -> std::convertible_to<group_axis>;
  { format_traits<F>::bytes_per_block } -> std::convertible_to<std::size_t>;
  { format_traits<F>::bits_per_element } -> std::convertible_to<double>;
  { format_traits<F>::rotated } -> std::convertible_to<bool>;
  { format_traits<F>::supports_head_dim(head_dim) } -> std::same_as<bool>;
  { format_traits<F>::calibrate(x, head_dim, head_dim) } -> std::same_as<typename format_traits<F>::head_params>;
  format_traits<F>::encode_tile(x, head_dim, params, out);
  format_traits<F>::decode_tile(in, head_dim, params, y);
};

/// Tokens encoded together in one tile.
template <tensor_format F>
OSCAR_HD_INLINE constexpr int tokens_per_tile() noexcept {
  return format_traits<F>::axis == group_axis::tokens ? format_traits<F>::group : 1;
}

/// Blocks in one tile for a given head_dim (the tile holds `tokens_per_tile * head_dim`
/// elements, `group` per block).
template <tensor_format F>
OSCAR_HD_INLINE constexpr int blocks_per_tile(int head_dim) noexcept {
  return tokens_per_tile<F>() * head_dim / format_traits<F>::group;
}

/// A key format and a value format used together for one cache.
template <tensor_format Key, tensor_format Value>
struct kv_format {
  using key = Key;
  using value = Value;
  /// All-in bits per element, averaged over keys and values.
  static constexpr double bits_per_element =
      (format_traits<Key>::bits_per_element + format_traits<Value>::bits_per_element) / 2.0;
};

/// Empty per-head metadata, for formats that need none.
struct no_head_params {
  friend constexpr bool operator==(no_head_params, no_head_params) = default;
};

}  // namespace oscar::quant
