// SPDX-License-Identifier: Apache-2.0
/// \file
/// Configuration and vocabulary of the paged KV cache: tiers, the tier policy hook, shapes,
/// budgets, and what `usage()` reports.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>

#include "oscar/core/view.hpp"

namespace oscar::cache {

/// Sequence handle. Ids are never reused, so a stale id is always detected.
using seq_id = std::uint64_t;

/// Precision tier of a block: one block pool per tier.
enum class tier : std::uint8_t {
  full = 0,  ///< 16-bit (fp16 by default)
  mid = 1,   ///< about 4 bits (FP4+ by default)
  low = 2,   ///< about 2 bits (FP2+ by default)
};
inline constexpr int tier_count = 3;

constexpr std::string_view to_string(tier t) noexcept {
  return t == tier::full ? "full" : t == tier::mid ? "mid" : "low";
}

/// What the tier policy is asked when a (sequence, layer, head) needs a new block.
struct block_request {
  seq_id seq;
  int layer;
  int head;
  index_t block_index;      ///< index of the new block in the head's block table
  index_t tokens_appended;  ///< tokens appended to this head before the current call
};

/// Chooses the tier of each new block. The policy issue supplies attention-aware policies;
/// the default puts every block in the low tier. Called while an append is planned, before
/// anything changes; it must not call back into the cache.
using tier_policy = std::function<tier(const block_request&)>;

/// Shapes and windows of a cache.
struct cache_config {
  int layers = 1;
  int kv_heads = 8;
  int head_dim = 128;
  int block_tokens = 64;    ///< tokens per block: a power of two, 16 to 256
  int sink_tokens = 4;      ///< S: the first S tokens of each head stay in fp16 forever
  int window_tokens = 128;  ///< R: at least the R most recent tokens stay in fp16
};

/// Byte budget per tier; each pool's capacity is budget / block bytes. A zero budget disables
/// the tier.
struct tier_budget {
  std::size_t full = 0;
  std::size_t mid = 0;
  std::size_t low = std::size_t{1} << 30;
  [[nodiscard]] constexpr std::size_t operator[](tier t) const noexcept {
    return t == tier::full ? full : t == tier::mid ? mid : low;
  }
};

/// Memory of one tier's pool.
struct tier_usage {
  std::size_t block_bytes = 0;    ///< bytes per block (K and V of block_tokens tokens, padded)
  std::size_t summary_bytes = 0;  ///< bytes of key min/max summary per block
  std::size_t capacity = 0;       ///< blocks
  std::size_t used = 0;           ///< blocks holding data (shared blocks count once)
  std::size_t free = 0;           ///< blocks on the free list
  /// Bytes of the used blocks, their summaries included.
  [[nodiscard]] std::size_t bytes_used() const noexcept {
    return used * (block_bytes + summary_bytes);
  }
  friend bool operator==(const tier_usage&, const tier_usage&) = default;
};

/// What the cache holds, for engines and benchmarks.
struct cache_usage {
  std::array<tier_usage, tier_count> tiers{};
  std::size_t window_bytes = 0;  ///< fp16 sinks and recent windows, K and V
  index_t sequences = 0;
  index_t token_heads = 0;  ///< stored tokens summed over sequences, layers and KV heads
  [[nodiscard]] std::size_t bytes_used() const noexcept {
    std::size_t total = window_bytes;
    for (const tier_usage& t : tiers) total += t.bytes_used();
    return total;
  }
  /// All-in bits per stored K or V element (blocks, summaries, padding, partial blocks,
  /// windows).
  [[nodiscard]] double bits_per_element(int head_dim) const noexcept {
    return token_heads == 0 ? 0.0
                            : 8.0 * static_cast<double>(bytes_used()) /
                                  (2.0 * static_cast<double>(token_heads) * head_dim);
  }
  /// Equal usage: a failed operation must leave `usage()` exactly as it was.
  friend bool operator==(const cache_usage&, const cache_usage&) = default;
};

}  // namespace oscar::cache
