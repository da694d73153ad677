// SPDX-License-Identifier: Apache-2.0
/// \file
/// Every format OSCAR ships, by name: the FP2+/FP4+ defaults, KIVI, and the baselines, as
/// tensor formats (keys or values) and as KV formats (a key format and a value format).
#pragma once

#include <string_view>
#include <tuple>

#include "oscar/quant/config.hpp"
#include "oscar/quant/float_formats.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/fpq.hpp"
#include "oscar/quant/llama_formats.hpp"

namespace oscar::quant {

// ---- KIVI (Liu et al. 2024): uniform min/max codes, fp16 scale and min, groups of 32 --------

/// KIVI keys: per-channel groups of 32 tokens.
template <int Bits>
using kivi_key = fpq<fpq_config{.bits = Bits, .levels = codebook::uniform, .group = 32,
                                .axis = group_axis::tokens, .scale = scale_type::fp16,
                                .zero_point = true, .search_scale = false}>;
/// KIVI values: per-token groups of 32 channels.
template <int Bits>
using kivi_value = fpq<fpq_config{.bits = Bits, .levels = codebook::uniform, .group = 32,
                                  .axis = group_axis::head_dim, .scale = scale_type::fp16,
                                  .zero_point = true, .search_scale = false}>;

// ---- FP2+ and FP4+ defaults -------------------------------------------------------------------

/// FP2+ (the default): randomized Hadamard rotation of each head vector (spreads outlier
/// channels), then 2-bit Lloyd-Max codes in groups of 16 channels with an e4m3 scale chosen by
/// MSE search, placed by a per-head power-of-two exponent. 2 + 8/16 = 2.5 bits per element.
/// Chosen as the lowest attention-output error at <= 2.5 bits among the candidates of
/// `examples/format_survey.cpp` (synthetic K/V; README, "Choosing the FP2+ default").
inline constexpr fpq_config fp2plus_key_config{.bits = 2, .levels = codebook::lloyd_max,
                                               .group = 16, .axis = group_axis::head_dim,
                                               .scale = scale_type::e4m3, .rotate = true};
/// FP2+ values: the same layout as keys.
inline constexpr fpq_config fp2plus_value_config = fp2plus_key_config;
/// FP4+: the 4-bit member for important heads and tokens: rotation, 4-bit Lloyd-Max codes,
/// groups of 32 with an fp16 scale. 4 + 16/32 = 4.5 bits per element.
inline constexpr fpq_config fp4plus_config{.bits = 4, .levels = codebook::lloyd_max,
                                           .group = 32, .axis = group_axis::head_dim,
                                           .scale = scale_type::fp16, .rotate = true};

/// FP2+ with per-channel keys: the configuration the real-model sweep picks (README, "FP2+ on
/// the shipped model"). Keys in per-channel groups of 64 tokens, uniform 2-bit codes on the
/// group's min/max (fp16 scale and min, no clipping: clipping a channel's outlier tokens costs
/// attention more than it saves in MSE), 2 + 32/64 = 2.5 bits; values as FP2+. It becomes the
/// `fp2plus` default once the cache tests run with its 64-token chunks.
inline constexpr fpq_config fp2plus_channel_key_config{
    .bits = 2, .levels = codebook::uniform, .group = 64, .axis = group_axis::tokens,
    .scale = scale_type::fp16, .zero_point = true, .search_scale = false};

using fp2plus_key = fpq<fp2plus_key_config>;
using fp2plus_channel_key = fpq<fp2plus_channel_key_config>;
using fp2plus_value = fpq<fp2plus_value_config>;
using fp4plus_key = fpq<fp4plus_config>;
using fp4plus_value = fpq<fp4plus_config>;

// ---- KV formats ------------------------------------------------------------------------------

#define OSCAR_DETAIL_KV_FORMAT(Name, Key, Value, Text)                     \
  struct Name : kv_format<Key, Value> {                                    \
    static constexpr std::string_view name = Text;                         \
  }

OSCAR_DETAIL_KV_FORMAT(kv_fp32, fp32, fp32, "fp32");
OSCAR_DETAIL_KV_FORMAT(kv_fp16, fp16, fp16, "fp16");
OSCAR_DETAIL_KV_FORMAT(kv_bf16, bf16, bf16, "bf16");
OSCAR_DETAIL_KV_FORMAT(kv_fp8, e4m3, e4m3, "fp8-e4m3");
OSCAR_DETAIL_KV_FORMAT(kv_q8_0, q8_0, q8_0, "q8_0");
OSCAR_DETAIL_KV_FORMAT(kv_q4_0, q4_0, q4_0, "q4_0");
OSCAR_DETAIL_KV_FORMAT(kivi2, kivi_key<2>, kivi_value<2>, "kivi2");
OSCAR_DETAIL_KV_FORMAT(kivi4, kivi_key<4>, kivi_value<4>, "kivi4");
OSCAR_DETAIL_KV_FORMAT(fp2plus, fp2plus_key, fp2plus_value, "fp2plus");
OSCAR_DETAIL_KV_FORMAT(fp4plus, fp4plus_key, fp4plus_value, "fp4plus");
OSCAR_DETAIL_KV_FORMAT(fp2plus_kc, fp2plus_channel_key, fp2plus_value, "fp2plus-kc");

#undef OSCAR_DETAIL_KV_FORMAT

/// Every shipped KV format, for tests, benchmarks and tools that iterate over them.
static_assert(sizeof(format_traits<fp2plus_key>::block) == 5, "FP2+ block: e4m3 scale + 16 codes");
static_assert(format_traits<fp2plus_key>::bits_per_element == 2.5, "FP2+ is 2.5 bits/element");
static_assert(sizeof(format_traits<fp2plus_channel_key>::block) == 20,
              "FP2+ per-channel key block: fp16 scale + fp16 min + 64 codes");
static_assert(fp2plus_kc::bits_per_element == 2.5, "FP2+ with per-channel keys is 2.5 bits");
static_assert(sizeof(format_traits<fp4plus_key>::block) == 18, "FP4+ block: fp16 scale + 32 codes");
static_assert(sizeof(format_traits<kivi_key<2>>::block) == 12, "KIVI-2 block: scale, min, 32 codes");

using all_kv_formats =
    std::tuple<kv_fp16, kv_bf16, kv_fp8, kv_q8_0, kv_q4_0, kivi2, kivi4, fp2plus, fp4plus>;

}  // namespace oscar::quant
