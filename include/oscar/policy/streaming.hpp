// SPDX-License-Identifier: Apache-2.0
/// \file
/// `streaming`: StreamingLLM (Xiao et al. 2024): attention sinks plus the most recent tokens,
/// the middle evicted. Kept tokens are stored in the full tier (fp16, as StreamingLLM keeps
/// them); `bits_budget` sets how many of the aged-out tokens stay besides the cache's window,
/// so the comparison with quantizing policies is at equal memory: a head keeps the newest
/// `budget / full bits` of its block region.
#pragma once

#include <vector>

#include "oscar/policy/concept.hpp"
#include "oscar/policy/detail.hpp"

namespace oscar::policy {

/// Sinks + recent tokens in full precision, the rest evicted.
struct streaming {
  double bits_budget = 0.0;  ///< bits per element of the block region (0: keep only sinks and window)
  index_t interval = 16;     ///< decode steps between evictions

  cache::tier on_append(const cache::block_request&) const noexcept { return cache::tier::full; }
  decision on_prefill(const context& c) const { return on_decode(c); }
  decision on_decode(const context& c) const {
    decision d;
    for (const head_view& h : c.heads) {
      if (h.pruned) continue;
      const index_t n = h.block_tokens();
      const index_t keep = detail::token_budget(h, bits_budget, c.bits(cache::tier::full));
      if (keep >= n) continue;
      std::vector<bool> kept(static_cast<std::size_t>(n), false);
      for (index_t i = n - keep; i < n; ++i) kept[static_cast<std::size_t>(i)] = true;
      detail::evict_unkept(h, kept, d);
      d.compactions.push_back({h.layer, h.head, std::vector<float>(static_cast<std::size_t>(h.tokens - (n - keep)), 0.0f)});
    }
    return d;
  }
  [[nodiscard]] index_t decode_interval() const noexcept { return interval; }
};

}  // namespace oscar::policy
