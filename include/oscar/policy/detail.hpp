// SPDX-License-Identifier: Apache-2.0
/// \file
/// Helpers shared by the built-in policies: token budgets and keep-masks turned into actions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "oscar/core/error.hpp"
#include "oscar/importance/head.hpp"
#include "oscar/importance/threshold.hpp"
#include "oscar/policy/concept.hpp"

namespace oscar::policy::detail {

/// Block-region tokens an evicting policy may keep in head `h` when kept tokens cost
/// `kept_bits` bits per element and the region may average `budget` bits: the region counts
/// every token that reached it, evicted ones included.
inline index_t token_budget(const head_view& h, double budget, double kept_bits) {
  const double region = static_cast<double>(h.block_tokens() + h.evicted);
  return static_cast<index_t>(std::floor(region * std::min(1.0, budget / kept_bits)));
}

/// Evict actions for the block tokens of `h` whose `keep[i]` (i: index into the block region,
/// position `h.sinks + i`) is false, merged into ranges.
inline void evict_unkept(const head_view& h, const std::vector<bool>& keep, decision& d) {
  const index_t n = h.block_tokens();
  for (index_t i = 0; i < n;) {
    if (keep[static_cast<std::size_t>(i)]) {
      ++i;
      continue;
    }
    index_t j = i;
    while (j < n && !keep[static_cast<std::size_t>(j)]) ++j;
    d.ranges.push_back({h.layer, h.head, h.sinks + i, j - i, action::evict});
    i = j;
  }
}

/// Keeps the `k` block tokens of `h` with the highest `score` (entry order, all tokens of the
/// head; ties: the older first), evicts the rest, and compacts the head (order kept: equal
/// importance, a stable sort) so emptied blocks return to the pool.
inline void keep_top_block_tokens(const head_view& h, std::span<const double> score, index_t k,
                                  decision& d) {
  const index_t n = h.block_tokens();
  if (k >= n) return;
  const std::span<const double> region = score.subspan(static_cast<std::size_t>(h.sinks),
                                                       static_cast<std::size_t>(n));
  const auto keep = importance::select(region, importance::threshold::top_k(static_cast<int>(k)));
  evict_unkept(h, keep, d);
  d.compactions.push_back({h.layer, h.head, std::vector<float>(static_cast<std::size_t>(h.tokens - (n - k)), 0.0f)});
}

/// Heads to prune: those `select_heads(scores, keep, floor)` does not keep, not yet pruned.
inline void prune_heads(const context& c, const importance::head_scores& scores,
                        const importance::threshold& keep, int floor, decision& d) {
  const std::vector<bool> kept = importance::select_heads(scores, keep, floor);
  for (int l = 0; l < c.layers; ++l) {
    for (int h = 0; h < c.kv_heads; ++h) {
      if (!kept[static_cast<std::size_t>(l) * c.kv_heads + h] && !c.at(l, h).pruned)
        d.heads.push_back({l, h, action::prune});
    }
  }
}

}  // namespace oscar::policy::detail
