// SPDX-License-Identifier: Apache-2.0
/// \file
/// The cache-policy concept: what a user type provides to decide, per (layer, KV head) and per
/// range of tokens, what the cache keeps at which precision.
///
/// A policy is any type with these hooks (the driver, `policy/driver.hpp`, calls them):
///
/// | hook | when | returns |
/// |---|---|---|
/// | `cache::tier on_append(const cache::block_request&)` | the cache needs a new block (tokens age out of the window) | the block's tier |
/// | `decision on_prefill(const context&)` | once, after the prompt (`driver_options::prefill_tokens`) | actions |
/// | `decision on_decode(const context&)` | every `decode_interval()` steps, from the first (0: never) | actions |
/// | `index_t decode_interval() const` | once, at construction of the driver | steps |
///
/// and, optionally, capability flags (`static constexpr bool`): `needs_attention_stats` (the
/// context must carry token scores and online head statistics, so the engine must run
/// attention with statistics) and `needs_gradients` (the context must carry gradient head
/// importance, e.g. a head-importance file). A driver that cannot serve a need is a compile
/// error that says which (`check_capabilities`). A type missing a hook fails `cache_policy`
/// with the hook's own concept named (`has_on_decode`, ...), and the driver's static
/// assertions name the hook and its signature.
///
/// Actions (`action`) apply per (layer, KV head) or per range of tokens in the cache's entry
/// order at the time of the hook: keep at full precision, store at 4 bits (the `mid` tier),
/// store at 2 bits (`low`), prune the head (it keeps only the running mean of its values,
/// `kv_cache::prune`), or evict.
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "oscar/cache/config.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"
#include "oscar/importance/head.hpp"
#include "oscar/importance/token.hpp"

namespace oscar::policy {

/// What a policy asks for a head or a range of tokens.
enum class action : std::uint8_t {
  keep_full,  ///< the full tier (16-bit by default)
  store_mid,  ///< the mid tier (about 4 bits)
  store_low,  ///< the low tier (about 2 bits)
  prune,      ///< the head keeps only the running mean of its values (heads only)
  evict,      ///< the tokens leave the cache (ranges only)
};

constexpr std::string_view to_string(action a) noexcept {
  switch (a) {
    case action::keep_full: return "keep_full";
    case action::store_mid: return "store_mid";
    case action::store_low: return "store_low";
    case action::prune: return "prune";
    case action::evict: return "evict";
  }
  return "unknown";
}

/// The tier of a storing action (`keep_full`, `store_mid`, `store_low`).
constexpr cache::tier tier_of(action a) noexcept {
  return a == action::keep_full ? cache::tier::full
         : a == action::store_mid ? cache::tier::mid
                                  : cache::tier::low;
}

/// An action on a whole (layer, KV head). Only `prune` is a head action.
struct head_action {
  int layer = 0;
  int head = 0;
  action what = action::prune;
};

/// An action on the tokens `[first, first + count)` of (layer, KV head), in entry order at the
/// time of the hook. `evict` evicts exactly those tokens (sink and window tokens included);
/// a storing action re-encodes, in its tier, every block that holds one of those tokens
/// (`kv_cache::retier`; precision is per block, so place tokens with compaction first).
struct range_action {
  int layer = 0;
  int head = 0;
  index_t first = 0;
  index_t count = 0;
  action what = action::store_low;
};

/// Compaction of (layer, KV head) (`kv_cache::compact`): the head's chunks are reordered by
/// `importance` (one per token, entry order after this decision's evictions; empty: the
/// driver's normalized attention) so important tokens share blocks and emptied blocks return.
struct compact_action {
  int layer = 0;
  int head = 0;
  std::vector<float> importance;
};

/// What a hook returns. The driver applies, in this order: head actions; retiering ranges;
/// evicting ranges (positions as they were at the hook); compactions.
struct decision {
  std::vector<head_action> heads;
  std::vector<range_action> ranges;
  std::vector<compact_action> compactions;
  [[nodiscard]] bool empty() const noexcept {
    return heads.empty() && ranges.empty() && compactions.empty();
  }
};

/// One block of a head, as policies see it.
struct block_info {
  cache::tier level = cache::tier::low;
  index_t first = 0;  ///< entry position of the block's first valid token
  index_t valid = 0;  ///< valid tokens (positions first .. first + valid - 1)
  int fill = 0;       ///< tokens written into the block (valid ones and evicted holes)
};

/// What one (layer, KV head) holds at the time of a hook.
struct head_view {
  int layer = 0;
  int head = 0;
  bool pruned = false;
  index_t tokens = 0;   ///< entry tokens: sinks + valid block tokens + window
  index_t sinks = 0;    ///< the first `sinks` tokens are sinks
  index_t window = 0;   ///< the last `window` tokens are the recent window
  index_t evicted = 0;  ///< block-region tokens the driver has evicted so far
  index_t appended = 0; ///< tokens the sequence has fed this head
  std::vector<block_info> blocks;  ///< in table (entry) order
  /// Attention per token (H2O accumulated, ZipCache normalized), entry order; null unless the
  /// policy `needs_attention_stats`.
  const importance::token_scores* scores = nullptr;
  /// The last queries' attention per token (entry order, oldest query first; SnapKV's
  /// observation window); filled for `on_prefill` of a policy that `needs_attention_stats`.
  std::span<const std::vector<double>> observation;

  /// Tokens held in blocks (the region between sinks and window).
  [[nodiscard]] index_t block_tokens() const noexcept { return tokens - sinks - window; }
};

/// Everything a hook sees.
struct context {
  index_t step = 0;  ///< tokens the sequence has processed
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int block_tokens = 0;   ///< tokens per block
  int chunk_tokens = 0;   ///< tokens per chunk (the unit of compaction)
  int sink_tokens = 0;    ///< the cache's sink tokens per head
  int window_tokens = 0;  ///< the cache's recent window per head
  /// The sequence ends here (`driver::finish`): decide everything, partly filled blocks too.
  bool final = false;
  /// Bits per element of each tier's format (full, mid, low), as `kv_format::bits_per_element`.
  std::array<double, cache::tier_count> tier_bits{};
  std::span<const head_view> heads;  ///< [layers * kv_heads], layer-major
  /// Online head statistics since the previous hook; null unless `needs_attention_stats`.
  const importance::head_stats_accumulator* head_stats = nullptr;
  /// Gradient (Taylor) head importance; null unless the driver was given one.
  const importance::head_scores* gradient_importance = nullptr;

  [[nodiscard]] const head_view& at(int layer, int head) const {
    OSCAR_CHECK(layer >= 0 && layer < layers && head >= 0 && head < kv_heads,
                errc::invalid_argument, "head (", layer, ", ", head,
                ") is not allowed (allowed: layer 0 to ", layers - 1, ", head 0 to ",
                kv_heads - 1, ")");
    return heads[static_cast<std::size_t>(layer) * kv_heads + head];
  }
  [[nodiscard]] double bits(cache::tier t) const noexcept { return tier_bits[static_cast<int>(t)]; }
};

// ---- the concept ------------------------------------------------------------------------------

/// `cache::tier on_append(const cache::block_request&)`: the tier of each new block.
template <class P>
concept has_on_append = requires(P& p, const cache::block_request& r) {
  { p.on_append(r) } -> std::same_as<cache::tier>;
};
/// `decision on_prefill(const context&)`: actions after the prompt.
template <class P>
concept has_on_prefill = requires(P& p, const context& c) {
  { p.on_prefill(c) } -> std::same_as<decision>;
};
/// `decision on_decode(const context&)`: actions every `decode_interval()` steps.
template <class P>
concept has_on_decode = requires(P& p, const context& c) {
  { p.on_decode(c) } -> std::same_as<decision>;
};
/// `index_t decode_interval() const`: steps between `on_decode` calls (0: never).
template <class P>
concept has_decode_interval = requires(const P& p) {
  { p.decode_interval() } -> std::convertible_to<index_t>;
};

/// A cache policy: every hook above.
template <class P>
concept cache_policy = has_on_append<P> && has_on_prefill<P> && has_on_decode<P> &&
                       has_decode_interval<P>;

/// Capability flags of a policy (false when the type does not declare them).
template <class P>
struct policy_traits {
  static constexpr bool needs_attention_stats = [] {
    if constexpr (requires { { P::needs_attention_stats } -> std::convertible_to<bool>; })
      return static_cast<bool>(P::needs_attention_stats);
    else
      return false;
  }();
  static constexpr bool needs_gradients = [] {
    if constexpr (requires { { P::needs_gradients } -> std::convertible_to<bool>; })
      return static_cast<bool>(P::needs_gradients);
    else
      return false;
  }();
};

/// What a driver (engine) can give policies.
struct capabilities {
  bool attention_stats = true;  ///< attention runs with statistics (token mass, entropy)
  bool gradients = false;       ///< a gradient head importance is supplied
};

/// Compile-time check of a policy type: one static assertion per hook, naming it, then one per
/// capability `Have` lacks. Used by the driver; call it to check a type of your own.
template <class P, capabilities Have = capabilities{}>
consteval bool check_policy() {
  static_assert(has_on_append<P>,
                "oscar::policy: the policy type lacks the hook on_append: it must have "
                "`oscar::cache::tier on_append(const oscar::cache::block_request&)`, the tier of "
                "each new block");
  static_assert(has_on_prefill<P>,
                "oscar::policy: the policy type lacks the hook on_prefill: it must have "
                "`oscar::policy::decision on_prefill(const oscar::policy::context&)`, called "
                "once after the prompt");
  static_assert(has_on_decode<P>,
                "oscar::policy: the policy type lacks the hook on_decode: it must have "
                "`oscar::policy::decision on_decode(const oscar::policy::context&)`, called "
                "every decode_interval() steps");
  static_assert(has_decode_interval<P>,
                "oscar::policy: the policy type lacks the hook decode_interval: it must have "
                "`oscar::index_t decode_interval() const` (0: on_decode is never called)");
  static_assert(!policy_traits<P>::needs_attention_stats || Have.attention_stats,
                "oscar::policy: the policy needs attention statistics (needs_attention_stats) "
                "but this driver runs attention without them (capabilities::attention_stats "
                "is false)");
  static_assert(!policy_traits<P>::needs_gradients || Have.gradients,
                "oscar::policy: the policy needs gradient head importance (needs_gradients) "
                "but this driver has none (capabilities::gradients is false): construct the "
                "driver with a head_scores, e.g. from load_head_importance");
  return true;
}

}  // namespace oscar::policy
