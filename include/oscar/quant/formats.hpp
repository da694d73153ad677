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

/// FP2+ keys (the default): 2-bit Lloyd-Max codes spanning the min/max of per-channel groups of
/// 128 tokens (fp16 scale and zero point), and each group's 3 most extreme tokens kept exactly
/// as fp16 outliers: 2 + (2 + 2 + 3 * 3) * 8 / 128 = 2.8125 bits per element. Keys have outlier
/// *channels* with heavy-tailed tokens: a per-channel group gives each channel its own range,
/// the outliers keep a few extreme tokens from stretching that range for the rest, and no
/// clipping (a clipped outlier token is exactly what attention looks at). Tiles hold 128
/// tokens, so a cache storing FP2+ ages tokens out of its window 128 at a time.
inline constexpr fpq_config fp2plus_key_config{
    .bits = 2, .levels = codebook::lloyd_max, .group = 128, .axis = group_axis::tokens,
    .scale = scale_type::fp16, .zero_point = true, .outliers = 3, .search_scale = false};
/// FP2+ values: randomized Hadamard rotation of each head vector (spreads outlier channels), then
/// 2-bit Lloyd-Max codes in groups of 64 channels with an e4m3 scale chosen by MSE search,
/// placed by a per-head power-of-two exponent: 2 + 8 / 64 = 2.125 bits per element.
///
/// Keys and values together: 2.46875 bits per element. The pair is the lowest attention-output
/// error and KL at <= 2.5 bits per element of the real-model sweep (`oscar-eval --formats
/// sweep`; README, "Choosing the FP2+ default").
inline constexpr fpq_config fp2plus_value_config{.bits = 2, .levels = codebook::lloyd_max,
                                                 .group = 64, .axis = group_axis::head_dim,
                                                 .scale = scale_type::e4m3, .rotate = true};
/// Earlier FP2+ candidates, kept for comparisons (`fp2plus_kh`, `fp2plus_kc`): per-token keys
/// and values, rotated, 2-bit Lloyd-Max in groups of 16 with an e4m3 scale (the choice on
/// synthetic K/V), and per-channel keys in groups of 64 tokens without outliers.
inline constexpr fpq_config fp2plus_g16_config{.bits = 2, .levels = codebook::lloyd_max,
                                               .group = 16, .axis = group_axis::head_dim,
                                               .scale = scale_type::e4m3, .rotate = true};
inline constexpr fpq_config fp2plus_channel_g64_config{
    .bits = 2, .levels = codebook::uniform, .group = 64, .axis = group_axis::tokens,
    .scale = scale_type::fp16, .zero_point = true, .search_scale = false};
/// FP4+: the 4-bit member for important heads and tokens: rotation, 4-bit Lloyd-Max codes,
/// groups of 32 with an fp16 scale. 4 + 16/32 = 4.5 bits per element.
inline constexpr fpq_config fp4plus_config{.bits = 4, .levels = codebook::lloyd_max,
                                           .group = 32, .axis = group_axis::head_dim,
                                           .scale = scale_type::fp16, .rotate = true};

using fp2plus_key = fpq<fp2plus_key_config>;
using fp2plus_value = fpq<fp2plus_value_config>;
using fp2plus_g16 = fpq<fp2plus_g16_config>;
using fp2plus_channel_g64 = fpq<fp2plus_channel_g64_config>;
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
OSCAR_DETAIL_KV_FORMAT(fp2plus_kh, fp2plus_g16, fp2plus_g16, "fp2plus-kh");
OSCAR_DETAIL_KV_FORMAT(fp2plus_kc, fp2plus_channel_g64, fp2plus_g16, "fp2plus-kc");

#undef OSCAR_DETAIL_KV_FORMAT


static_assert(sizeof(format_traits<fp2plus_key>::block) == 45,
              "FP2+ key block: fp16 scale, fp16 min, 3 fp16 outliers and their indices, 128 codes");
static_assert(sizeof(format_traits<fp2plus_value>::block) == 17,
              "FP2+ value block: e4m3 scale + 64 codes");
static_assert(fp2plus::bits_per_element == 2.46875, "FP2+ is 2.47 bits per element");
static_assert(fp2plus_kh::bits_per_element == 2.5 && fp2plus_kc::bits_per_element == 2.5);
static_assert(sizeof(format_traits<fp4plus_key>::block) == 18, "FP4+ block: fp16 scale + 32 codes");
static_assert(sizeof(format_traits<kivi_key<2>>::block) == 12, "KIVI-2 block: scale, min, 32 codes");

/// Every shipped KV format, for tests, benchmarks and tools that iterate over them.
using all_kv_formats =
    std::tuple<kv_fp16, kv_bf16, kv_fp8, kv_q8_0, kv_q4_0, kivi2, kivi4, fp2plus, fp4plus>;

}  // namespace oscar::quant
