// SPDX-License-Identifier: Apache-2.0
/// \file
/// Plain floating-point baselines: `fp32` (the lossless reference), `fp16`, `bf16`, and `e4m3`
/// (fp8 with a per-head scale, as vLLM's fp8 KV cache). Blocks hold 32 elements of one head
/// vector.
#pragma once

#include <cstddef>
#include <string_view>

#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/scale.hpp"

namespace oscar::quant {

struct fp32 {};  ///< IEEE binary32 per element: lossless, the reference cache for quality runs.
struct fp16 {};  ///< IEEE binary16 per element; values beyond +-65504 saturate.
struct bf16 {};  ///< bfloat16 per element.
struct e4m3 {};  ///< fp8 e4m3 per element, divided by a per-head fp32 scale (amax / 448).

struct block_fp32 {
  float v[32];
};
struct block_fp16 {
  half v[32];
};
struct block_bf16 {
  bfloat16 v[32];
};
struct block_e4m3 {
  fp8_e4m3 v[32];
};
static_assert(sizeof(block_fp32) == 128, "block_fp32: 32 x 4 bytes");
static_assert(sizeof(block_fp16) == 64, "block_fp16: 32 x 2 bytes");
static_assert(sizeof(block_bf16) == 64, "block_bf16: 32 x 2 bytes");
static_assert(sizeof(block_e4m3) == 32, "block_e4m3: 32 x 1 byte");

/// Per-head metadata of `e4m3`: values are stored as `e4m3(x / scale)`.
struct e4m3_head_params {
  float scale = 1.0f;
  friend constexpr bool operator==(e4m3_head_params, e4m3_head_params) = default;
};

namespace detail {

/// Shared traits of the element-wise float formats: one token per tile, 32 elements per block.
template <class Block, class Element, scale_type Storage>
struct elementwise_traits {
  static constexpr int bits = 8 * static_cast<int>(sizeof(Element));
  static constexpr int group = 32;
  static constexpr group_axis axis = group_axis::head_dim;
  static constexpr bool rotated = false;
  using block = Block;
  static constexpr std::size_t bytes_per_block = sizeof(Block);
  static constexpr double bits_per_element = 8.0 * bytes_per_block / group;

  static constexpr bool supports_head_dim(int head_dim) noexcept {
    return head_dim > 0 && head_dim % group == 0;
  }

  OSCAR_HOST_DEVICE static void encode_scaled(const float* x, int head_dim, float inv_scale,
                                              Block* out) noexcept {
    for (int i = 0; i < head_dim; ++i) {
      const float c = clamp_finite(x[i] * inv_scale, max_finite(Storage));
      out[i / group].v[i % group] = Element(c);
    }
  }

  OSCAR_HOST_DEVICE static void decode_scaled(const Block* in, int head_dim, float scale,
                                              float* y) noexcept {
    for (int i = 0; i < head_dim; ++i) y[i] = static_cast<float>(in[i / group].v[i % group]) * scale;
  }
};

}  // namespace detail

template <>
struct format_traits<fp32> {
  static constexpr std::string_view name = "fp32";
  static constexpr int bits = 32;
  static constexpr int group = 32;
  static constexpr group_axis axis = group_axis::head_dim;
  static constexpr bool rotated = false;
  using block = block_fp32;
  static constexpr std::size_t bytes_per_block = sizeof(block_fp32);
  static constexpr double bits_per_element = 32.0;
  using head_params = no_head_params;
  static constexpr bool supports_head_dim(int head_dim) noexcept {
    return head_dim > 0 && head_dim % group == 0;
  }
  static constexpr head_params calibrate(const float*, int, int) noexcept { return {}; }
  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params&,
                                            block* out) noexcept {
    for (int i = 0; i < head_dim; ++i) out[i / group].v[i % group] = x[i];
  }
  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params&,
                                            float* y) noexcept {
    for (int i = 0; i < head_dim; ++i) y[i] = in[i / group].v[i % group];
  }
};

template <>
struct format_traits<fp16> : detail::elementwise_traits<block_fp16, half, scale_type::fp16> {
  static constexpr std::string_view name = "fp16";
  using head_params = no_head_params;
  static constexpr head_params calibrate(const float*, int, int) noexcept { return {}; }
  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params&,
                                            block* out) noexcept {
    encode_scaled(x, head_dim, 1.0f, out);
  }
  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params&,
                                            float* y) noexcept {
    decode_scaled(in, head_dim, 1.0f, y);
  }
};

template <>
struct format_traits<bf16> : detail::elementwise_traits<block_bf16, bfloat16, scale_type::bf16> {
  static constexpr std::string_view name = "bf16";
  using head_params = no_head_params;
  static constexpr head_params calibrate(const float*, int, int) noexcept { return {}; }
  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params&,
                                            block* out) noexcept {
    encode_scaled(x, head_dim, 1.0f, out);
  }
  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params&,
                                            float* y) noexcept {
    decode_scaled(in, head_dim, 1.0f, y);
  }
};

template <>
struct format_traits<e4m3> : detail::elementwise_traits<block_e4m3, fp8_e4m3, scale_type::e4m3> {
  static constexpr std::string_view name = "fp8-e4m3";
  using head_params = e4m3_head_params;

  /// Per-head scale from `tokens x head_dim` contiguous floats: absmax / 448 (1 when all zero).
  static head_params calibrate(const float* x, int tokens, int head_dim) noexcept {
    float amax = 0.0f;
    for (long i = 0; i < static_cast<long>(tokens) * head_dim; ++i) {
      const float m = x[i] < 0 ? -x[i] : x[i];
      amax = m > amax ? m : amax;
    }
    return {amax > 0.0f ? amax / fp8_e4m3_max : 1.0f};
  }
  OSCAR_HOST_DEVICE static void encode_tile(const float* x, int head_dim, const head_params& p,
                                            block* out) noexcept {
    encode_scaled(x, head_dim, 1.0f / p.scale, out);
  }
  OSCAR_HOST_DEVICE static void decode_tile(const block* in, int head_dim, const head_params& p,
                                            float* y) noexcept {
    decode_scaled(in, head_dim, p.scale, y);
  }
};

}  // namespace oscar::quant
