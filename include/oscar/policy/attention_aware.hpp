// SPDX-License-Identifier: Apache-2.0
/// \file
/// `attention_aware`: OSCAR's default policy: mixed precision under a bits budget, spending
/// bits where attention looks.
///
/// - New blocks are *staged* in the full tier (lossless against the fp16 window), so nothing is
///   quantized before its importance is known.
/// - Every `interval` steps each staged block that is complete (or every staged block, at the
///   end of the sequence) is a *unit*, with the score `w_h * a`: `a` the mean normalized
///   attention (ZipCache) of its tokens, `w_h` the head's weight (its gradient importance over
///   the mean of all heads', when the driver has one; otherwise 1). Blocks already stored are
///   units too, but can only go down (2-bit codes cannot be made 4-bit again).
/// - Units below `evict_threshold * max` are evicted. Then, with the staged units at the low
///   tier (2 bits), while the region is over `bits_budget` the lowest units are evicted; with
///   budget left, staged units are promoted to the mid tier (4 bits) in score order while it
///   fits, and then, still in score order, kept at full precision while that fits. A unit kept
///   at full precision stays staged: the next decision may still store it lower. The budget
///   counts every token that reached the region, evicted ones at zero and pruned heads' at
///   their O(1) cost.
/// - With `prune` set, heads not kept by that threshold over the head scores (gradient
///   importance, else the online concentration `1 - normalized entropy` of the prompt) are
///   pruned after the prompt: they keep only the running mean of their values.
///
/// Precision is chosen per block (the unit of a tier). With the FP2+ default's 128-token key
/// groups a chunk fills a 128-token block, so a unit is 128 consecutive tokens; with per-token
/// formats tokens also age into blocks in arrival order (this policy does not regroup them by
/// compaction).
#pragma once

#include <algorithm>
#include <cstddef>
#include <optional>
#include <tuple>
#include <vector>

#include "oscar/importance/head.hpp"
#include "oscar/importance/threshold.hpp"
#include "oscar/policy/concept.hpp"
#include "oscar/policy/detail.hpp"

namespace oscar::policy {

/// Attention-aware mixed precision under a bits budget.
struct attention_aware {
  static constexpr bool needs_attention_stats = true;
  double bits_budget = 2.5;      ///< average bits per element of the block region
  index_t interval = 16;         ///< decode steps between decisions
  /// Units scoring below this fraction of the batch's best unit are evicted. 0.2 was chosen
  /// on the shipped model over three 1024-byte windows of its *training* split (the KL to the
  /// fp32 cache at budgets 2.5 and 2.0, among 0.1 to 0.25, with `interval` 1 and 16;
  /// bench/results/2026-11-28-policies.md), not on the held-out text results are reported on.
  double evict_threshold = 0.2;
  /// Heads kept by this threshold stay; the rest are pruned after the prompt (none when empty).
  std::optional<importance::threshold> prune;
  int prune_floor = 1;  ///< heads each layer keeps at least

  cache::tier on_append(const cache::block_request&) const noexcept { return cache::tier::full; }

  decision on_prefill(const context& c) const {
    decision d;
    if (prune) {
      importance::head_scores s = c.gradient_importance ? *c.gradient_importance
                                                        : c.head_stats->concentration();
      detail::prune_heads(c, s, *prune, prune_floor, d);
    }
    std::vector<bool> pruned(c.heads.size(), false);
    for (const head_action& a : d.heads)
      pruned[static_cast<std::size_t>(a.layer) * c.kv_heads + a.head] = true;
    allocate(c, pruned, d);
    return d;
  }

  decision on_decode(const context& c) const {
    decision d;
    allocate(c, std::vector<bool>(c.heads.size(), false), d);
    return d;
  }

  [[nodiscard]] index_t decode_interval() const noexcept { return interval; }

 private:
  struct unit {
    int layer, head;
    index_t first, valid;
    int fill;
    cache::tier level;
    bool staged;
    double score;
    action what;  // for a stored unit, keep_full means "as it is"
  };

  /// Head weights: gradient importance over its mean (1 without one).
  static importance::head_scores weights(const context& c) {
    importance::head_scores w = importance::head_scores::zeros(c.layers, c.kv_heads);
    double mean = 0.0;
    if (c.gradient_importance) {
      for (double x : c.gradient_importance->values) mean += x;
      mean /= static_cast<double>(w.values.size());
    }
    for (std::size_t i = 0; i < w.values.size(); ++i)
      w.values[i] = mean > 0.0 ? c.gradient_importance->values[i] / mean : 1.0;
    return w;
  }

  void allocate(const context& c, const std::vector<bool>& pruning, decision& d) const {
    const importance::head_scores w = weights(c);
    const double low = c.bits(cache::tier::low), mid = c.bits(cache::tier::mid);
    std::vector<unit> units;
    double region = 0.0;  // tokens that reached the region
    double cost = 0.0;    // bits per element x tokens, with staged units at `low`
    for (std::size_t i = 0; i < c.heads.size(); ++i) {
      const head_view& h = c.heads[i];
      if (h.pruned || pruning[i]) {
        region += static_cast<double>(
            std::max<index_t>(0, h.appended - c.sink_tokens - c.window_tokens));
        continue;
      }
      region += static_cast<double>(h.block_tokens() + h.evicted);
      const std::vector<double> attention = h.scores->normalized();
      for (std::size_t b = 0; b < h.blocks.size(); ++b) {
        const block_info& blk = h.blocks[b];
        const bool staged = blk.level == cache::tier::full;
        const bool open = staged && !c.final && b + 1 == h.blocks.size() && blk.fill < c.block_tokens;
        cost += blk.fill * (staged ? low : c.bits(blk.level));
        if (open || blk.valid == 0) continue;  // still filling: decided when complete
        double a = 0.0;
        for (index_t t = blk.first; t < blk.first + blk.valid; ++t) a += attention[static_cast<std::size_t>(t)];
        units.push_back({h.layer, h.head, blk.first, blk.valid, blk.fill, blk.level, staged,
                         w(h.layer, h.head) * a / static_cast<double>(blk.valid),
                         staged ? action::store_low : action::keep_full});
      }
    }
    if (units.empty()) return;
    std::stable_sort(units.begin(), units.end(),
                     [](const unit& a, const unit& b) { return a.score > b.score; });
    const double budget = bits_budget * region;
    const auto unit_cost = [&](const unit& u) { return u.fill * (u.staged ? low : c.bits(u.level)); };
    // Evict by threshold, then the lowest units while over budget.
    const double cut = evict_threshold * units.front().score;
    for (unit& u : units) {
      if (u.score < cut) {
        u.what = action::evict;
        cost -= unit_cost(u);
      }
    }
    for (auto it = units.rbegin(); it != units.rend() && cost > budget; ++it) {
      if (it->what == action::evict) continue;
      it->what = action::evict;
      cost -= unit_cost(*it);
    }
    // Promote staged units to mid, then to full, in score order while the budget allows.
    const double full = c.bits(cache::tier::full);
    for (const auto& [from, to, bits] : {std::tuple{action::store_low, action::store_mid, mid - low},
                                        std::tuple{action::store_mid, action::keep_full, full - mid}}) {
      for (unit& u : units) {
        if (!u.staged || u.what != from) continue;
        if (cost + u.fill * bits <= budget) {
          u.what = to;
          cost += u.fill * bits;
        }
      }
    }
    for (const unit& u : units) {
      if (u.what == action::keep_full) continue;  // stays as it is (full: still staged)
      d.ranges.push_back({u.layer, u.head, u.first, u.valid, u.what});
    }
  }
};

}  // namespace oscar::policy
