// SPDX-License-Identifier: Apache-2.0
/// \file
/// `uniform`: every aged-out token in the low tier, whatever its format (FP2+, or KIVI-2 for a
/// KIVI-like cache). Optionally prunes heads once, after the prompt, by their gradient
/// importance under a threshold (`prune`), the rest staying uniform.
#pragma once

#include <optional>

#include "oscar/core/error.hpp"
#include "oscar/importance/threshold.hpp"
#include "oscar/policy/concept.hpp"
#include "oscar/policy/detail.hpp"

namespace oscar::policy {

/// Uniform precision: the cache's low tier for every block.
struct uniform {
  /// Heads kept by this threshold over the gradient head importance stay; the others are
  /// pruned after the prompt (none when empty). Needs a driver with gradients then.
  std::optional<importance::threshold> prune;
  int prune_floor = 1;  ///< heads each layer keeps at least

  cache::tier on_append(const cache::block_request&) const noexcept { return cache::tier::low; }
  decision on_prefill(const context& c) const {
    decision d;
    if (!prune) return d;
    OSCAR_CHECK(c.gradient_importance != nullptr, errc::invalid_argument,
                "uniform with prune = a threshold and no gradient head importance is not allowed "
                "(allowed: a driver constructed with head scores)");
    detail::prune_heads(c, *c.gradient_importance, *prune, prune_floor, d);
    return d;
  }
  decision on_decode(const context&) const { return {}; }
  [[nodiscard]] index_t decode_interval() const noexcept { return 0; }
};

}  // namespace oscar::policy
