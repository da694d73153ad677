// SPDX-License-Identifier: Apache-2.0
// The caches the import fuzzer feeds, shared with the seed generator so that seeds match them.
//
// Three small caches cover every kind of tier: per-token formats with both kinds of per-head
// params (FP2+ with per-token keys: an int8 exponent; fp8: an fp32 scale) and chunk 1, KIVI
// (token-axis key groups) with chunk 32, and the default cache (`kv_cache<>`: FP2+ keys in
// 128-token per-channel groups with fp16 outliers and their index bytes, rotated FP2+ values,
// FP4+, fp16) with chunk 128.
#pragma once

#include <cstddef>

#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/quant/formats.hpp"

namespace oscar_fuzz {

using per_token_cache =
    oscar::cache::kv_cache<oscar::quant::fp2plus_kh, oscar::quant::kv_fp8, oscar::quant::kv_fp16>;
using kivi_cache =
    oscar::cache::kv_cache<oscar::quant::kivi2, oscar::quant::kivi4, oscar::quant::kv_fp16>;

using default_cache = oscar::cache::kv_cache<>;

// layers, kv_heads, head_dim, block_tokens, sink_tokens, window_tokens
inline oscar::cache::cache_config per_token_config() { return {2, 2, 64, 16, 2, 4}; }
inline oscar::cache::cache_config kivi_config() { return {1, 2, 32, 32, 2, 4}; }
inline oscar::cache::cache_config default_config() { return {1, 2, 64, 128, 2, 4}; }

/// 256 KiB per tier: 64 blocks of the largest (fp16) tiers, more of the others.
inline constexpr oscar::cache::tier_budget budget{std::size_t{256} << 10, std::size_t{256} << 10,
                                                  std::size_t{256} << 10};

/// Spreads blocks over every tier.
inline oscar::cache::tier mixed_policy(const oscar::cache::block_request& r) {
  return static_cast<oscar::cache::tier>((r.block_index + r.head + r.layer) %
                                         oscar::cache::tier_count);
}

}  // namespace oscar_fuzz
