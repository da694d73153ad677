// SPDX-License-Identifier: Apache-2.0
/// \file
/// `quantized_tensor<F>`: a whole `[tokens, kv_heads, head_dim]` K or V tensor in format `F`,
/// and the validated host entry points `quantize` and `dequantize`.
///
/// Storage is per head, then per tile, then per block (`[heads][tiles][blocks_per_tile]`), so
/// each head's stream is contiguous as in the paged cache. This is the host reference path; the
/// cache (`oscar/cache/`) uses the same `encode_tile`/`decode_tile` on its pages.
#pragma once

#include <cmath>
#include <cstddef>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"
#include "oscar/quant/format_traits.hpp"

namespace oscar::quant {

/// What head_dim values format `F` accepts, in words (for error messages).
template <tensor_format F>
std::string allowed_head_dims() {
  using traits = format_traits<F>;
  const std::string multiple =
      oscar::detail::concat("a positive multiple of the group size ", traits::group);
  if (traits::rotated) {
    return traits::axis == group_axis::head_dim
               ? "64, 128 or 256 (rotated format) and " + multiple
               : std::string("64, 128 or 256 (rotated format)");
  }
  return traits::axis == group_axis::head_dim ? multiple : std::string("1 to 256");
}

/// Checks that `head_dim` suits format `F`; throws `oscar::error` naming it otherwise.
template <tensor_format F>
void check_head_dim(index_t head_dim) {
  OSCAR_CHECK_ARG(head_dim > 0 && head_dim <= 1024 &&
                      format_traits<F>::supports_head_dim(static_cast<int>(head_dim)),
                  head_dim,
                  oscar::detail::concat(allowed_head_dims<F>(), " for format ", format_traits<F>::name));
}

/// Checks that every element of `x` is finite. OSCAR's rule for NaN/Inf in K/V: reject the
/// whole call with `errc::non_finite`, naming the first bad element, before any state changes.
template <class T>
void check_finite(kv_view<const T> x) {
  for (index_t t = 0; t < x.tokens; ++t) {
    for (index_t h = 0; h < x.heads; ++h) {
      const T* row = x.row(t, h);
      for (index_t d = 0; d < x.head_dim; ++d) {
        const float v = static_cast<float>(row[d]);
        OSCAR_CHECK(std::isfinite(v), errc::non_finite, "K/V input holds ", v, " at token ", t,
                    ", head ", h, ", channel ", d,
                    "; OSCAR rejects NaN and Inf instead of storing them (allowed: finite values)");
      }
    }
  }
}

/// A K or V tensor `[tokens, heads, head_dim]` stored in format `F`.
template <tensor_format F>
class quantized_tensor {
 public:
  using format = F;
  using traits = format_traits<F>;
  using block = typename traits::block;
  using head_params = typename traits::head_params;

  /// Allocates storage for the given shape; throws `oscar::error` when the shape does not suit
  /// the format (head_dim, or tokens not a multiple of the tile for token-grouped formats).
  quantized_tensor(index_t tokens, index_t heads, index_t head_dim)
      : tokens_(tokens), heads_(heads), head_dim_(static_cast<int>(head_dim)) {
    OSCAR_CHECK_ARG(heads >= 1, heads, ">= 1");
    check_head_dim<F>(head_dim);
    OSCAR_CHECK_ARG(tokens >= 0 && tokens % tokens_per_tile<F>() == 0, tokens,
                    oscar::detail::concat("a multiple of ", tokens_per_tile<F>(), " for format ",
                                   traits::name, ", which groups along tokens; keep the rest in "
                                   "full precision until a group is complete"));
    blocks_.resize(static_cast<std::size_t>(heads * blocks_per_head()));
    params_.resize(static_cast<std::size_t>(heads));
  }

  [[nodiscard]] index_t tokens() const noexcept { return tokens_; }
  [[nodiscard]] index_t heads() const noexcept { return heads_; }
  [[nodiscard]] int head_dim() const noexcept { return head_dim_; }
  [[nodiscard]] index_t tiles_per_head() const noexcept { return tokens_ / tokens_per_tile<F>(); }
  [[nodiscard]] index_t blocks_per_head() const noexcept {
    return tiles_per_head() * blocks_per_tile<F>(head_dim_);
  }

  /// The blocks of head `h`, tile after tile.
  [[nodiscard]] std::span<block> head_blocks(index_t h) noexcept {
    return {blocks_.data() + h * blocks_per_head(), static_cast<std::size_t>(blocks_per_head())};
  }
  [[nodiscard]] std::span<const block> head_blocks(index_t h) const noexcept {
    return {blocks_.data() + h * blocks_per_head(), static_cast<std::size_t>(blocks_per_head())};
  }
  [[nodiscard]] head_params& params(index_t h) noexcept { return params_[static_cast<std::size_t>(h)]; }
  [[nodiscard]] const head_params& params(index_t h) const noexcept {
    return params_[static_cast<std::size_t>(h)];
  }

  /// Bytes of storage: blocks plus per-head metadata (formats without it add nothing).
  [[nodiscard]] std::size_t bytes() const noexcept {
    constexpr std::size_t per_head = std::is_empty_v<head_params> ? 0 : sizeof(head_params);
    return blocks_.size() * sizeof(block) + params_.size() * per_head;
  }

 private:
  index_t tokens_;
  index_t heads_;
  int head_dim_;
  std::vector<block> blocks_;
  std::vector<head_params> params_;
};

namespace detail {

/// Copies head `h` of `x` into a contiguous `[tokens, head_dim]` float buffer.
template <class T>
void gather_head(kv_view<const T> x, index_t h, std::vector<float>& out) {
  out.resize(static_cast<std::size_t>(x.tokens * x.head_dim));
  for (index_t t = 0; t < x.tokens; ++t) {
    const T* row = x.row(t, h);
    for (index_t d = 0; d < x.head_dim; ++d) out[t * x.head_dim + d] = static_cast<float>(row[d]);
  }
}

}  // namespace detail

/// Quantizes `x` (float, half or bfloat16) into format `F`. Throws `oscar::error` on a shape
/// the format does not accept or on NaN/Inf input.
template <tensor_format F, class T>
quantized_tensor<F> quantize(kv_view<const T> x) {
  using traits = format_traits<F>;
  quantized_tensor<F> q(x.tokens, x.heads, x.head_dim);
  check_finite(x);
  const int head_dim = q.head_dim();
  const index_t tile_floats = tokens_per_tile<F>() * head_dim;
  std::vector<float> head;
  for (index_t h = 0; h < x.heads; ++h) {
    detail::gather_head(x, h, head);
    q.params(h) = traits::calibrate(head.data(), static_cast<int>(x.tokens), head_dim);
    auto blocks = q.head_blocks(h);
    for (index_t tile = 0; tile < q.tiles_per_head(); ++tile) {
      traits::encode_tile(head.data() + tile * tile_floats, head_dim, q.params(h),
                          blocks.data() + tile * blocks_per_tile<F>(head_dim));
    }
  }
  return q;
}

/// Overload for mutable views.
template <tensor_format F, class T>
quantized_tensor<F> quantize(kv_view<T> x) {
  return quantize<F>(kv_view<const T>(x));
}

/// Decodes `q` into `out` (float, half or bfloat16), which must have the same shape.
template <tensor_format F, class T>
void dequantize(const quantized_tensor<F>& q, kv_view<T> out) {
  static_assert(!std::is_const_v<T>, "dequantize writes into its output view");
  using traits = format_traits<F>;
  OSCAR_CHECK_ARG(out.tokens == q.tokens() && out.heads == q.heads() &&
                      out.head_dim == q.head_dim(),
                  out.tokens,
                  oscar::detail::concat("an output view shaped like the tensor: [", q.tokens(), ", ",
                                 q.heads(), ", ", q.head_dim(), "]; got [", out.tokens, ", ",
                                 out.heads, ", ", out.head_dim, "]"));
  const int head_dim = q.head_dim();
  const index_t tile_tokens = tokens_per_tile<F>();
  std::vector<float> tile(static_cast<std::size_t>(tile_tokens * head_dim));
  for (index_t h = 0; h < q.heads(); ++h) {
    auto blocks = q.head_blocks(h);
    for (index_t t0 = 0; t0 < q.tokens(); t0 += tile_tokens) {
      traits::decode_tile(blocks.data() + (t0 / tile_tokens) * blocks_per_tile<F>(head_dim),
                          head_dim, q.params(h), tile.data());
      for (index_t t = 0; t < tile_tokens; ++t) {
        T* row = out.row(t0 + t, h);
        for (index_t d = 0; d < head_dim; ++d) row[d] = T(tile[t * head_dim + d]);
      }
    }
  }
}

}  // namespace oscar::quant
