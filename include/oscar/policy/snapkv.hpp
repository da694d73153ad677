// SPDX-License-Identifier: Apache-2.0
/// \file
/// `snapkv`: SnapKV (Li et al. 2024): once, after the prompt, each head keeps the tokens its
/// observation window (the prompt's last queries, `driver_options::observation_window`) votes
/// for, pooled over neighbours, and evicts the rest; later tokens are all kept. Kept tokens are
/// stored in the full tier; `bits_budget` sets how many stay at the selection (as `streaming`).
#pragma once

#include "oscar/importance/token.hpp"
#include "oscar/policy/concept.hpp"
#include "oscar/policy/detail.hpp"

namespace oscar::policy {

/// Prefill-time selection per head by the observation window's pooled attention.
struct snapkv {
  static constexpr bool needs_attention_stats = true;
  double bits_budget = 0.0;  ///< bits per element of the block region at the selection
  int kernel = 7;            ///< pooling window (odd)
  importance::pooling pool = importance::pooling::max;

  cache::tier on_append(const cache::block_request&) const noexcept { return cache::tier::full; }
  decision on_prefill(const context& c) const {
    decision d;
    for (const head_view& h : c.heads) {
      if (h.pruned) continue;
      const auto votes = importance::snapkv_scores(h.observation, h.tokens, kernel, pool);
      detail::keep_top_block_tokens(h, votes,
                                    detail::token_budget(h, bits_budget, c.bits(cache::tier::full)), d);
    }
    return d;
  }
  decision on_decode(const context&) const { return {}; }
  [[nodiscard]] index_t decode_interval() const noexcept { return 0; }
};

}  // namespace oscar::policy
