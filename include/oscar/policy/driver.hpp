// SPDX-License-Identifier: Apache-2.0
/// \file
/// `driver`: runs a cache policy over one sequence of a `kv_cache`.
///
/// The engine tells the driver what happened; the driver keeps the scores, calls the policy's
/// hooks when they are due, and applies the decisions to the cache:
///
/// ```cpp
/// my_policy p;
/// cache::kv_cache<> cache(cfg, budget, policy::tier_hook(p));    // on_append picks tiers
/// policy::driver d(p, cache, seq, {.prefill_tokens = prompt});
/// // per step, per layer: append K/V, attention::decode(..., want_stats, &stats), then
/// d.observe(layer, stats);                                       // when the policy needs stats
/// // after the step's last layer:
/// d.end_step();                                                  // may call on_prefill/on_decode
/// ```
///
/// Scores (`importance::token_scores`, one per (layer, KV head)) are kept in the cache's entry
/// order and follow every eviction and compaction the driver applies. The driver also accounts
/// for what the policy stores (`region_usage`): bits per element of the quantized region, the
/// region between sinks and window, with evicted tokens at zero and pruned heads at their O(1)
/// cost.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "oscar/attention/types.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"
#include "oscar/importance/head.hpp"
#include "oscar/importance/token.hpp"
#include "oscar/policy/concept.hpp"

namespace oscar::policy {

/// When the driver calls `on_prefill`, and what it keeps for it.
struct driver_options {
  /// `on_prefill` runs after this many steps (0: only when `end_prefill()` is called).
  index_t prefill_tokens = 0;
  /// Queries whose token masses are kept for `on_prefill` (SnapKV's observation window).
  int observation_window = 32;
};

/// The tier hook of a cache (`kv_cache`'s `tier_policy`) from a policy's `on_append`. The policy
/// must outlive the cache.
template <class P>
cache::tier_policy tier_hook(P& policy) {
  static_assert(has_on_append<P>,
                "oscar::policy::tier_hook: the policy type lacks the hook on_append: it must have "
                "`oscar::cache::tier on_append(const oscar::cache::block_request&)`");
  return [&policy](const cache::block_request& r) { return policy.on_append(r); };
}

/// What a policy stores in the quantized region of a sequence (between sinks and window).
struct region_usage {
  double bits = 0.0;      ///< stored bits: block tokens (holes included) x their tier's bits, pruned heads' means
  double elements = 0.0;  ///< K and V elements that reached the region (evicted ones included)
  index_t pruned_heads = 0;
  index_t evicted_tokens = 0;  ///< block-region tokens evicted, summed over heads
  std::array<index_t, cache::tier_count> block_tokens{};  ///< tokens written per tier
  /// Average stored bits per element of the region (0 when empty).
  [[nodiscard]] double bits_per_element() const noexcept {
    return elements > 0.0 ? bits / elements : 0.0;
  }
};

/// Runs policy `P` over sequence `seq` of `Cache` (a `kv_cache`). `Have` says what the engine
/// provides; a policy needing more is a compile error naming the missing capability.
template <class P, class Cache, capabilities Have = capabilities{}>
class driver {
  static_assert(check_policy<P, Have>());

 public:
  using traits = policy_traits<P>;

  /// Drives `policy` over `seq`. Throws `oscar::error` for an unknown sequence or bad options.
  driver(P& policy, Cache& cache, cache::seq_id seq, driver_options options = {})
    requires(!Have.gradients)
      : driver(policy, cache, seq, options, nullptr) {}

  /// With gradient head importance (e.g. `load_head_importance(path).scores`), which must
  /// match the cache's layers and KV heads and outlive the driver.
  driver(P& policy, Cache& cache, cache::seq_id seq, const importance::head_scores& gradients,
         driver_options options = {})
      : driver(policy, cache, seq, options, &gradients) {
    OSCAR_CHECK(gradients.layers == cache.config().layers &&
                    gradients.kv_heads == cache.config().kv_heads,
                errc::invalid_argument, "gradient importance of ", gradients.layers, " x ",
                gradients.kv_heads, " heads is not allowed (allowed: the cache's ",
                cache.config().layers, " x ", cache.config().kv_heads, ")");
  }

  /// One query's attention statistics of `layer` for this sequence: one entry per KV head
  /// (`attention::decode` with `want_stats` for a batch of this one sequence). `out`, the
  /// attention output `[1, q_heads, head_dim]`, feeds the output-norm scorer when given.
  void observe(int layer, std::span<const attention::kv_head_stats> stats,
               kv_view<const float> out = {}) {
    const auto& cfg = cache_.config();
    OSCAR_CHECK(stats.size() == static_cast<std::size_t>(cfg.kv_heads), errc::invalid_argument,
                stats.size(), " statistics are not allowed (allowed: ", cfg.kv_heads,
                ", one per KV head of the sequence)");
    std::vector<index_t> sinks(stats.size()), window(stats.size());
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const auto v = cache_.view(seq_, layer, h);
      sinks[h] = static_cast<index_t>(v.sink_k.size()) / cfg.head_dim;
      window[h] = static_cast<index_t>(v.window_k.size()) / cfg.head_dim;
    }
    head_stats_.add(layer, stats, sinks, window);
    if (out.data != nullptr) head_stats_.add_output(layer, out);
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const std::size_t i = index(layer, h);
      scores_[i].observe(stats[h].token_mass);
      if (!prefilled_) {
        auto& obs = observation_[i];
        obs.push_back(stats[h].token_mass);
        if (static_cast<int>(obs.size()) > options_.observation_window) obs.erase(obs.begin());
      }
    }
  }

  /// After every layer of a step: counts the step and runs `on_prefill` (once, after
  /// `prefill_tokens` steps) or else `on_decode` (every `decode_interval()` steps, counted from
  /// the first, so a sequence fed token by token is managed before its prompt ends too).
  /// Returns whether a hook ran.
  bool end_step() {
    ++step_;
    if (!prefilled_ && options_.prefill_tokens > 0 && step_ >= options_.prefill_tokens) {
      end_prefill();
      return true;
    }
    if (interval_ > 0 && step_ % interval_ == 0) {
      run([&](const context& c) { return policy_.on_decode(c); });
      return true;
    }
    return false;
  }

  /// Runs `on_prefill` now (at most once; later calls do nothing).
  void end_prefill() {
    if (prefilled_) return;
    run([&](const context& c) { return policy_.on_prefill(c); });
    prefilled_ = true;
    for (auto& obs : observation_) obs.clear();
  }

  /// Runs `on_decode` now with `context::final` set: the sequence ends (or is about to be
  /// measured), so the policy decides everything it was leaving open.
  void finish() {
    run([&](const context& c) { return policy_.on_decode(c); }, true);
  }

  /// Applies a decision (what the hooks' results go through; public for engines and tests).
  /// Every action is validated, and the blocks the decision may need are counted against the
  /// pools' free blocks, before any is applied: a decision that is malformed or might not fit
  /// throws (`invalid_argument`, `non_finite` or `out_of_memory`) and changes nothing.
  void apply(const decision& d) {
    const auto& cfg = cache_.config();
    std::vector<index_t> tokens(scores_.size());
    for (int l = 0; l < cfg.layers; ++l)
      for (int h = 0; h < cfg.kv_heads; ++h) tokens[index(l, h)] = cache_.tokens(seq_, l, h);
    const auto check_head = [&](int layer, int head) {
      OSCAR_CHECK(layer >= 0 && layer < cfg.layers && head >= 0 && head < cfg.kv_heads,
                  errc::invalid_argument, "head (", layer, ", ", head,
                  ") is not allowed (allowed: layer 0 to ", cfg.layers - 1, ", head 0 to ",
                  cfg.kv_heads - 1, ")");
    };
    for (const head_action& a : d.heads) {
      check_head(a.layer, a.head);
      OSCAR_CHECK(a.what == action::prune, errc::invalid_argument, "head action ",
                  to_string(a.what), " is not allowed (allowed: prune; ranges for the others)");
    }
    for (const range_action& r : d.ranges) {
      check_head(r.layer, r.head);
      OSCAR_CHECK(r.what != action::prune, errc::invalid_argument,
                  "range action prune is not allowed (allowed: keep_full, store_mid, store_low, "
                  "evict; prune is a head action)");
      const index_t n = tokens[index(r.layer, r.head)];
      OSCAR_CHECK(r.first >= 0 && r.count >= 0 && r.first + r.count <= n, errc::invalid_argument,
                  "range [", r.first, ", ", r.first + r.count, ") of head (", r.layer, ", ",
                  r.head, ") is not allowed (allowed: within its ", n, " tokens)");
      OSCAR_CHECK(r.count == 0 || !cache_.pruned(seq_, r.layer, r.head), errc::invalid_argument,
                  "a range action on pruned head (", r.layer, ", ", r.head,
                  ") is not allowed (allowed: heads that are not pruned)");
    }
    for (const compact_action& c : d.compactions) check_head(c.layer, c.head);
    check_compactions(d, tokens);
    check_fits(d);

    // Head actions.
    for (const head_action& a : d.heads) {
      if (cache_.pruned(seq_, a.layer, a.head)) continue;
      cache_.prune(seq_, a.layer, a.head);
      scores_[index(a.layer, a.head)].reset(1);
      observation_[index(a.layer, a.head)].clear();
    }
    // Retiering ranges (entry order does not change).
    for (const range_action& r : d.ranges) {
      if (r.what == action::evict || r.count == 0) continue;
      const auto v = cache_.view(seq_, r.layer, r.head);
      index_t pos = static_cast<index_t>(v.sink_k.size()) / cfg.head_dim;
      for (std::size_t s = 0; s < v.slots.size(); ++s) {
        const auto valid = static_cast<index_t>(v.slots[s].valid.count());
        if (pos < r.first + r.count && r.first < pos + valid && v.slots[s].level != tier_of(r.what)) {
          cache_.retier(seq_, r.layer, r.head, s, tier_of(r.what));
        }
        pos += valid;
      }
    }
    // Evicting ranges, one evict per head.
    std::vector<std::vector<index_t>> evict(scores_.size());
    for (const range_action& r : d.ranges) {
      if (r.what != action::evict) continue;
      for (index_t p = r.first; p < r.first + r.count; ++p) evict[index(r.layer, r.head)].push_back(p);
    }
    for (int l = 0; l < cfg.layers; ++l) {
      for (int h = 0; h < cfg.kv_heads; ++h) {
        auto& pos = evict[index(l, h)];
        if (pos.empty() || cache_.pruned(seq_, l, h)) continue;
        std::sort(pos.begin(), pos.end());
        pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
        const auto v = cache_.view(seq_, l, h);
        const index_t sinks = static_cast<index_t>(v.sink_k.size()) / cfg.head_dim;
        const index_t window = static_cast<index_t>(v.window_k.size()) / cfg.head_dim;
        const index_t n = cache_.tokens(seq_, l, h);
        cache_.evict(seq_, l, h, pos);
        if (traits::needs_attention_stats) scores_[index(l, h)].evict(pos);
        else scores_[index(l, h)].reset(0);
        for (index_t p : pos) evicted_[index(l, h)] += (p >= sinks && p < n - window) ? 1 : 0;
      }
    }
    // Compactions.
    for (const compact_action& c : d.compactions) {
      if (cache_.pruned(seq_, c.layer, c.head)) continue;
      importance::token_scores& s = scores_[index(c.layer, c.head)];
      const index_t n = cache_.tokens(seq_, c.layer, c.head);
      std::vector<float> weights = c.importance;
      if (weights.empty()) {  // check_compactions made sure the scores are in step
        for (double x : s.normalized()) weights.push_back(static_cast<float>(x));
      }
      const std::vector<index_t> order = cache_.compact(seq_, c.layer, c.head, weights);
      if (s.size() == n) s.permute(order);
    }
  }

  /// The context a hook would see now.
  [[nodiscard]] context make_context() {
    const auto& cfg = cache_.config();
    views_.assign(scores_.size(), head_view{});
    for (int l = 0; l < cfg.layers; ++l) {
      for (int h = 0; h < cfg.kv_heads; ++h) {
        head_view& hv = views_[index(l, h)];
        const auto v = cache_.view(seq_, l, h);
        hv.layer = l;
        hv.head = h;
        hv.pruned = cache_.pruned(seq_, l, h);
        hv.tokens = cache_.tokens(seq_, l, h);
        hv.sinks = static_cast<index_t>(v.sink_k.size()) / cfg.head_dim;
        hv.window = static_cast<index_t>(v.window_k.size()) / cfg.head_dim;
        hv.evicted = evicted_[index(l, h)];
        hv.appended = step_;
        index_t pos = hv.sinks;
        for (const cache::block_slot& s : v.slots) {
          const auto valid = static_cast<index_t>(s.valid.count());
          hv.blocks.push_back({s.level, pos, valid, cache_.pool(s.level).fill(s.id)});
          pos += valid;
        }
        if (traits::needs_attention_stats) {
          hv.scores = &scores_[index(l, h)];
          hv.observation = observation_[index(l, h)];
        }
      }
    }
    context c;
    c.step = step_;
    c.layers = cfg.layers;
    c.kv_heads = cfg.kv_heads;
    c.head_dim = cfg.head_dim;
    c.block_tokens = cfg.block_tokens;
    c.chunk_tokens = cache_.chunk_tokens();
    c.sink_tokens = cfg.sink_tokens;
    c.window_tokens = cfg.window_tokens;
    c.tier_bits = tier_bits();
    c.heads = views_;
    c.head_stats = traits::needs_attention_stats ? &head_stats_ : nullptr;
    c.gradient_importance = gradients_;
    return c;
  }

  /// Bits per element of the quantized region now (see `region_usage`).
  [[nodiscard]] region_usage usage() const {
    const auto& cfg = cache_.config();
    const auto bits = tier_bits();
    const double per_token = 2.0 * cfg.head_dim;  // K and V elements
    const double mean_bits = 2.0 * cfg.head_dim * 8.0 * sizeof(typename Cache::window_type);
    region_usage u;
    for (int l = 0; l < cfg.layers; ++l) {
      for (int h = 0; h < cfg.kv_heads; ++h) {
        if (cache_.pruned(seq_, l, h)) {
          ++u.pruned_heads;
          const index_t would_be =
              std::max<index_t>(0, step_ - cfg.sink_tokens - cfg.window_tokens);
          u.elements += per_token * static_cast<double>(would_be);
          u.bits += mean_bits;
          continue;
        }
        index_t held = 0;
        for (const cache::block_slot& s : cache_.blocks(seq_, l, h)) {
          const int fill = cache_.pool(s.level).fill(s.id);
          u.bits += per_token * fill * bits[static_cast<int>(s.level)];
          u.block_tokens[static_cast<int>(s.level)] += fill;
          held += static_cast<index_t>(s.valid.count());
        }
        u.evicted_tokens += evicted_[index(l, h)];
        u.elements += per_token * static_cast<double>(held + evicted_[index(l, h)]);
      }
    }
    return u;
  }

  /// The driver's token scores of (layer, head).
  [[nodiscard]] const importance::token_scores& scores(int layer, int head) const {
    return scores_[index(layer, head)];
  }
  [[nodiscard]] index_t step() const noexcept { return step_; }
  [[nodiscard]] bool prefilled() const noexcept { return prefilled_; }

 private:
  driver(P& policy, Cache& cache, cache::seq_id seq, driver_options options,
         const importance::head_scores* gradients)
      : policy_(policy), cache_(cache), seq_(seq), options_(options), gradients_(gradients),
        head_stats_(cache.config().layers, cache.config().kv_heads) {
    OSCAR_CHECK_ARG(options.prefill_tokens >= 0, options.prefill_tokens, ">= 0");
    OSCAR_CHECK_ARG(options.observation_window >= 1, options.observation_window, ">= 1");
    (void)cache.tokens(seq, 0, 0);  // throws for an unknown sequence
    interval_ = static_cast<index_t>(policy.decode_interval());
    OSCAR_CHECK_ARG(interval_ >= 0, interval_, ">= 0 (0: never)");
    const auto n = static_cast<std::size_t>(cache.config().layers) * cache.config().kv_heads;
    scores_.resize(n);
    observation_.resize(n);
    evicted_.assign(n, 0);
  }

  [[nodiscard]] std::size_t index(int layer, int head) const noexcept {
    return static_cast<std::size_t>(layer) * cache_.config().kv_heads + head;
  }

  /// A compaction runs after the decision's prunes and evictions; its importance must have one
  /// finite weight per token left then, or, when empty, the driver's scores must still be in
  /// step with the head (a policy that needs_attention_stats keeps them through evictions).
  void check_compactions(const decision& d, const std::vector<index_t>& tokens) const {
    std::vector<index_t> left = tokens;
    std::vector<std::vector<index_t>> evicted(scores_.size());
    for (const range_action& r : d.ranges) {
      if (r.what != action::evict) continue;
      for (index_t p = r.first; p < r.first + r.count; ++p) evicted[index(r.layer, r.head)].push_back(p);
    }
    for (std::size_t i = 0; i < evicted.size(); ++i) {
      std::sort(evicted[i].begin(), evicted[i].end());
      left[i] -= static_cast<index_t>(std::unique(evicted[i].begin(), evicted[i].end()) - evicted[i].begin());
    }
    std::vector<bool> pruned_now(scores_.size(), false);
    for (const head_action& a : d.heads) pruned_now[index(a.layer, a.head)] = true;
    for (const compact_action& c : d.compactions) {
      const std::size_t i = index(c.layer, c.head);
      if (pruned_now[i] || cache_.pruned(seq_, c.layer, c.head)) continue;  // apply skips them
      if (c.importance.empty()) {  // apply's evictions follow or reset the scores
        const index_t removed = tokens[i] - left[i];
        const index_t scored = scores_[i].size();
        const index_t kept = removed == 0 ? scored : traits::needs_attention_stats ? scored - removed : 0;
        OSCAR_CHECK(kept == left[i],
                    errc::invalid_argument, "a compaction of head (", c.layer, ", ", c.head,
                    ") without importance is not allowed here (allowed: with importance, or "
                    "for a policy that needs_attention_stats, whose scores the driver keeps)");
        continue;
      }
      OSCAR_CHECK(static_cast<index_t>(c.importance.size()) == left[i], errc::invalid_argument,
                  "a compaction of head (", c.layer, ", ", c.head, ") with ",
                  c.importance.size(), " importances is not allowed (allowed: one per token "
                  "left after the decision's evictions, ", left[i], ")");
      for (std::size_t t = 0; t < c.importance.size(); ++t) {
        OSCAR_CHECK(std::isfinite(c.importance[t]), errc::non_finite, "importance[", t,
                    "] = ", c.importance[t], " of the compaction of head (", c.layer, ", ",
                    c.head, ") is not allowed (allowed: finite values)");
      }
    }
  }

  /// Replays `apply`'s block traffic on the pools' free counts: a prune releases the blocks
  /// the head alone holds, a retier takes one block of its target tier and releases the old
  /// one when no fork shares it, and a compaction may need a new block for each shared block
  /// it keeps (the cache reuses blocks the head alone holds; the bound counts every shared one).
  /// Evictions only release blocks; leaving them out keeps the count an upper bound. Throws
  /// `out_of_memory` when a step could find its tier's pool empty.
  void check_fits(const decision& d) const {
    std::array<std::size_t, cache::tier_count> free{};
    for (int t = 0; t < cache::tier_count; ++t) free[t] = cache_.pool(static_cast<cache::tier>(t)).free_blocks();
    struct slot_state {
      cache::tier level;
      bool shared;
    };
    std::vector<std::vector<slot_state>> slots(scores_.size());
    std::vector<bool> pruned(scores_.size(), false);
    const auto& cfg = cache_.config();
    for (int l = 0; l < cfg.layers; ++l) {
      for (int h = 0; h < cfg.kv_heads; ++h) {
        pruned[index(l, h)] = cache_.pruned(seq_, l, h);
        for (const cache::block_slot& b : cache_.blocks(seq_, l, h))
          slots[index(l, h)].push_back({b.level, cache_.pool(b.level).shared(b.id)});
      }
    }
    const auto take = [&](cache::tier t, std::size_t n, const char* what) {
      const auto ti = static_cast<int>(t);
      OSCAR_CHECK(n <= free[ti], errc::out_of_memory, "the decision's ", what, " may need ", n,
                  " more block(s) of tier ", cache::to_string(t), " where ", free[ti],
                  " would be free then (pool capacity ", cache_.pool(t).capacity(),
                  "); nothing was changed (evict more, store lower, or free sequences)");
      free[ti] -= n;
    };
    for (const head_action& a : d.heads) {
      const std::size_t i = index(a.layer, a.head);
      if (pruned[i]) continue;
      for (const slot_state& b : slots[i]) free[static_cast<int>(b.level)] += b.shared ? 0 : 1;
      slots[i].clear();
      pruned[i] = true;
    }
    for (const range_action& r : d.ranges) {
      const std::size_t i = index(r.layer, r.head);
      if (r.what == action::evict || r.count == 0 || pruned[i]) continue;
      const auto blocks = cache_.blocks(seq_, r.layer, r.head);
      index_t pos = static_cast<index_t>(cache_.view(seq_, r.layer, r.head).sink_k.size()) / cfg.head_dim;
      for (std::size_t s = 0; s < blocks.size(); ++s) {
        const auto valid = static_cast<index_t>(blocks[s].valid.count());
        slot_state& b = slots[i][s];
        if (pos < r.first + r.count && r.first < pos + valid && b.level != tier_of(r.what)) {
          take(tier_of(r.what), 1, "retiers");
          free[static_cast<int>(b.level)] += b.shared ? 0 : 1;
          b = {tier_of(r.what), false};
        }
        pos += valid;
      }
    }
    for (const compact_action& c : d.compactions) {
      const std::size_t i = index(c.layer, c.head);
      if (pruned[i]) continue;
      std::array<std::size_t, cache::tier_count> shared{};
      for (slot_state& b : slots[i]) {
        if (!b.shared) continue;
        ++shared[static_cast<int>(b.level)];
        b.shared = false;  // a compaction leaves the head's blocks its own
      }
      for (int t = 0; t < cache::tier_count; ++t) take(static_cast<cache::tier>(t), shared[t], "compactions");
    }
  }

  static std::array<double, cache::tier_count> tier_bits() {
    return {Cache::template tier_format<0>::bits_per_element,
            Cache::template tier_format<1>::bits_per_element,
            Cache::template tier_format<2>::bits_per_element};
  }

  template <class Hook>
  void run(Hook&& hook, bool final = false) {
    context c = make_context();
    c.final = final;
    const decision d = hook(c);
    head_stats_ = importance::head_stats_accumulator(cache_.config().layers, cache_.config().kv_heads);
    apply(d);
  }

  P& policy_;
  Cache& cache_;
  cache::seq_id seq_;
  driver_options options_;
  const importance::head_scores* gradients_;
  index_t interval_ = 0;
  index_t step_ = 0;
  bool prefilled_ = false;
  importance::head_stats_accumulator head_stats_;
  std::vector<importance::token_scores> scores_;
  std::vector<std::vector<std::vector<double>>> observation_;  // oldest query first
  std::vector<index_t> evicted_;
  std::vector<head_view> views_;
};

}  // namespace oscar::policy
