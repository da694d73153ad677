// SPDX-License-Identifier: Apache-2.0
/// \file
/// `h2o`: Heavy-Hitter Oracle (Zhang et al. 2023): the recent window plus the tokens with the
/// most accumulated attention ("heavy hitters"), the rest evicted every `interval` steps. Kept
/// tokens are stored in the full tier; `bits_budget` sets how many stay (as `streaming`).
#pragma once

#include "oscar/policy/concept.hpp"
#include "oscar/policy/detail.hpp"

namespace oscar::policy {

/// Heavy hitters by accumulated attention + recent window, in full precision.
struct h2o {
  static constexpr bool needs_attention_stats = true;
  double bits_budget = 0.0;  ///< bits per element of the block region
  index_t interval = 16;     ///< decode steps between evictions

  cache::tier on_append(const cache::block_request&) const noexcept { return cache::tier::full; }
  decision on_prefill(const context& c) const { return on_decode(c); }
  decision on_decode(const context& c) const {
    decision d;
    for (const head_view& h : c.heads) {
      if (h.pruned) continue;
      detail::keep_top_block_tokens(h, h.scores->accumulated(),
                                    detail::token_budget(h, bits_budget, c.bits(cache::tier::full)), d);
    }
    return d;
  }
  [[nodiscard]] index_t decode_interval() const noexcept { return interval; }
};

}  // namespace oscar::policy
