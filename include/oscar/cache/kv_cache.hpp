// SPDX-License-Identifier: Apache-2.0
/// \file
/// `kv_cache`: the paged, tiered, copy-on-write KV cache an inference engine hands its K/V to.
///
/// ## Model
/// A cache holds sequences; each sequence has, per (layer, KV head), an *entry*:
///
/// - **sinks**: the first `sink_tokens` (S) tokens ever appended to the entry, kept in fp16
///   (fp32 when the full tier is `quant::kv_fp32`, so a reference cache is lossless);
/// - **blocks**: a table of blocks, each `block_tokens` tokens of K and V in one tier's format
///   (`tier::full`, `mid`, `low`), from that tier's `block_pool`;
/// - **window**: the most recent tokens, in fp16.
///
/// The entry's tokens, in the order `gather` returns them (and `evict`/`compact` positions
/// count), are: sinks, then the valid tokens of each block in table order (within a block in
/// slot order), then the window, oldest first.
///
/// ## Append
/// `append(seq, layer, K, V)` takes `[tokens, kv_heads, head_dim]` views (float, half or
/// bfloat16). Per head, tokens first fill the sinks (while fewer than S tokens were ever
/// appended), the rest join the window (rounded to fp16). Then, while the window holds at least
/// `R + T` tokens (`R = window_tokens`, `T` = the chunk: the largest tile of any tier's formats,
/// e.g. 32 for KIVI, 1 for per-token formats), its oldest `T` tokens *age out*: they are
/// quantized, from their fp16 values, into the last block of the table if it has room, or else
/// into a new block whose tier the `tier_policy` picks. A shared last block is copied first
/// (copy-on-write).
///
/// Formats with per-head metadata (fp8's scale, FP2+'s e4m3 exponent) calibrate it once per
/// (entry, tier): when the first chunk ages out into that tier, over the whole window at that
/// moment (the chunk included), in window order.
///
/// ## Failure
/// Every public function validates its arguments and throws `oscar::error` before it changes
/// anything; an append that needs more blocks than a pool has free throws `errc::out_of_memory`
/// and changes nothing, so the engine can evict and retry.
#pragma once

#include <algorithm>
#include <bitset>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "oscar/cache/allocator.hpp"
#include "oscar/cache/block_pool.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/core/view.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/quant/scale.hpp"
#include "oscar/quant/tensor.hpp"

namespace oscar::cache {

/// Most tokens a block may hold (the per-slot valid mask is a bitset of this size).
inline constexpr int max_block_tokens = 256;

/// One block of an entry's table.
struct block_slot {
  tier level;
  block_id id;
  std::bitset<max_block_tokens> valid;  ///< tokens of the block still in the sequence
};

/// The decoded tokens of one (layer, KV head): `[tokens, head_dim]` each, in entry order.
struct gathered_head {
  index_t tokens = 0;
  std::vector<float> k, v;
};

namespace detail {

/// Per-(entry, tier) metadata of a KV format's key and value formats.
template <class KV>
struct tier_params {
  typename quant::format_traits<typename KV::key>::head_params key{};
  typename quant::format_traits<typename KV::value>::head_params value{};
  bool calibrated = false;
};

/// Serialization of sequences (`oscar/cache/serialize.hpp`) reads and rebuilds entries.
struct serializer;

/// Where tiles of a chunk live inside a block of one tier, for one head_dim.
struct tier_layout {
  int key_tile_tokens = 1;    ///< tokens per key tile
  int value_tile_tokens = 1;  ///< tokens per value tile
  std::size_t key_tile_bytes = 0;
  std::size_t value_tile_bytes = 0;
  std::size_t key_bytes = 0;  ///< all key tiles of a block; value tiles follow
  std::size_t block_bytes = 0;
};

}  // namespace detail

/// The paged KV cache. `Full`, `Mid` and `Low` are KV formats (`quant::kv_format`); the default
/// stores aged-out tokens in FP2+, with FP4+ and fp16 tiers for policies that want them.
template <class Low = quant::fp2plus, class Mid = quant::fp4plus, class Full = quant::kv_fp16,
          block_allocator Allocator = host_allocator>
class kv_cache {
 public:
  using formats = std::tuple<Full, Mid, Low>;  // indexed by tier
  /// Element type of sinks and window: fp16, or fp32 when the full tier is lossless fp32
  /// (`quant::kv_fp32`), so a reference cache rounds nothing.
  using window_type = std::conditional_t<std::is_same_v<typename Full::key, quant::fp32>, float, half>;
  template <int I>
  using tier_format = std::tuple_element_t<I, formats>;
  using pool_type = block_pool<Allocator>;

  /// Builds the pools. Throws `oscar::error` on a shape a tier's formats cannot hold.
  explicit kv_cache(const cache_config& config, const tier_budget& budget = {},
                    tier_policy policy = {}, const Allocator& allocator = {})
      : config_(config), policy_(std::move(policy)) {
    OSCAR_CHECK_ARG(config.layers >= 1, config.layers, ">= 1");
    OSCAR_CHECK_ARG(config.kv_heads >= 1, config.kv_heads, ">= 1");
    const int bt = config.block_tokens;
    OSCAR_CHECK_ARG(bt >= 16 && bt <= max_block_tokens && (bt & (bt - 1)) == 0,
                    config.block_tokens, "a power of two from 16 to 256");
    OSCAR_CHECK_ARG(config.sink_tokens >= 0, config.sink_tokens, ">= 0");
    OSCAR_CHECK_ARG(config.window_tokens >= 0, config.window_tokens, ">= 0");
    chunk_ = 1;
    for_each_tier([&]<int I>() {
      using KV = tier_format<I>;
      quant::check_head_dim<typename KV::key>(config.head_dim);
      quant::check_head_dim<typename KV::value>(config.head_dim);
      chunk_ = std::max({chunk_, quant::tokens_per_tile<typename KV::key>(),
                         quant::tokens_per_tile<typename KV::value>()});
    });
    OSCAR_CHECK_ARG(bt % chunk_ == 0, config.block_tokens,
                    oscar::detail::concat("a multiple of ", chunk_,
                                          ", the token group of the cache's formats"));
    for_each_tier([&]<int I>() {
      layouts_[I] = make_layout<tier_format<I>>();
      const std::size_t capacity = budget[static_cast<tier>(I)] / layouts_[I].block_bytes;
      pools_[I] = std::make_unique<pool_type>(layouts_[I].block_bytes, capacity,
                                              config.head_dim, allocator);
    });
  }

  kv_cache(const kv_cache&) = delete;
  kv_cache& operator=(const kv_cache&) = delete;

  ~kv_cache() {
    for (auto& [id, seq] : sequences_) release_all(seq);
  }

  [[nodiscard]] const cache_config& config() const noexcept { return config_; }
  /// Tokens per chunk: the unit in which tokens age out of the window and move in compaction.
  [[nodiscard]] int chunk_tokens() const noexcept { return chunk_; }

  // ---- sequences -------------------------------------------------------------------------

  /// A new, empty sequence.
  seq_id create() {
    sequence seq;
    seq.entries.resize(static_cast<std::size_t>(config_.layers) * config_.kv_heads);
    sequences_.emplace(next_id_, std::move(seq));
    return next_id_++;
  }

  /// A new sequence sharing every block of `parent` (copy-on-write); windows are copied.
  seq_id fork(seq_id parent) {
    sequence copy = find(parent);  // copies tables, windows and params
    sequences_.emplace(next_id_, std::move(copy));
    for (entry& e : sequences_.at(next_id_).entries)  // nothing below can throw
      for (block_slot& s : e.slots) pool_mut(s.level).retain(s.id);
    return next_id_++;
  }

  /// Drops a sequence; blocks no other sequence shares return to their pools.
  void free(seq_id id) {
    auto it = sequences_.find(id);
    check_found(it, id);
    release_all(it->second);
    sequences_.erase(it);
  }

  [[nodiscard]] bool contains(seq_id id) const noexcept { return sequences_.count(id) != 0; }
  [[nodiscard]] index_t sequence_count() const noexcept {
    return static_cast<index_t>(sequences_.size());
  }

  /// Tokens currently held for (seq, layer, head).
  [[nodiscard]] index_t tokens(seq_id id, int layer, int head) const {
    const entry& e = find_entry(id, layer, head);
    return entry_tokens(e);
  }

  // ---- append ----------------------------------------------------------------------------

  /// Appends K and V (`[tokens, kv_heads, head_dim]`, float, half or bfloat16) to (seq, layer).
  template <class T>
  void append(seq_id id, int layer, kv_view<const T> k, kv_view<const T> v) {
    sequence& seq = find(id);
    check_layer(layer);
    check_kv_shape(k, "k");
    check_kv_shape(v, "v");
    OSCAR_CHECK_ARG(v.tokens == k.tokens, v.tokens,
                    oscar::detail::concat("as many tokens as k (", k.tokens, ")"));
    quant::check_finite(k);
    quant::check_finite(v);

    // Plan: how many chunks age out per head, and which new blocks they need.
    std::vector<head_plan> plans(static_cast<std::size_t>(config_.kv_heads));
    std::array<std::size_t, tier_count> needed{};
    for (int h = 0; h < config_.kv_heads; ++h) {
      const entry& e = seq.entries[entry_index(layer, h)];
      head_plan& p = plans[static_cast<std::size_t>(h)];
      if (e.pruned) continue;  // only its running mean of V changes
      const index_t sink_room = std::max<index_t>(0, config_.sink_tokens - e.appended);
      p.to_sinks = std::min(sink_room, k.tokens);
      const index_t window = window_size(e) + k.tokens - p.to_sinks;
      const index_t limit = config_.window_tokens + chunk_;
      p.chunks = window >= limit ? (window - config_.window_tokens) / chunk_ : 0;
      index_t chunks_left = p.chunks;
      if (chunks_left > 0 && !e.slots.empty()) {
        const block_slot& last = e.slots.back();
        const int room = (config_.block_tokens - pool(last.level).fill(last.id)) / chunk_;
        if (room > 0) {
          p.copy_last = pool(last.level).shared(last.id);
          if (p.copy_last) ++needed[static_cast<int>(last.level)];
          chunks_left -= std::min<index_t>(room, chunks_left);
        }
      }
      const index_t per_block = config_.block_tokens / chunk_;
      for (index_t b = 0; chunks_left > 0; ++b, chunks_left -= std::min(per_block, chunks_left)) {
        const tier t = policy_ ? policy_(block_request{id, layer, h,
                                                       static_cast<index_t>(e.slots.size()) + b,
                                                       e.appended})
                               : tier::low;
        OSCAR_CHECK_ARG(static_cast<unsigned>(t) < unsigned{tier_count},
                        static_cast<int>(t), "a tier: full (0), mid (1) or low (2)");
        p.new_tiers.push_back(t);
        ++needed[static_cast<int>(t)];
      }
    }
    check_free(needed, "append");

    // Commit: nothing below can fail.
    std::vector<float> scratch;
    for (int h = 0; h < config_.kv_heads; ++h) {
      entry& e = seq.entries[entry_index(layer, h)];
      const head_plan& p = plans[static_cast<std::size_t>(h)];
      if (e.pruned) {
        for (index_t t = 0; t < k.tokens; ++t) add_to_mean(e, v.row(t, h));
        e.appended += k.tokens;
        continue;
      }
      for (index_t t = 0; t < k.tokens; ++t) {
        auto& dst_k = t < p.to_sinks ? e.sink_k : e.window_k;
        auto& dst_v = t < p.to_sinks ? e.sink_v : e.window_v;
        push_row(dst_k, k.row(t, h));
        push_row(dst_v, v.row(t, h));
      }
      e.appended += k.tokens;
      std::size_t next_new = 0;
      bool copied = false;
      for (index_t c = 0; c < p.chunks; ++c) {
        block_slot* target = nullptr;
        if (!e.slots.empty() &&
            pool(e.slots.back().level).fill(e.slots.back().id) < config_.block_tokens) {
          target = &e.slots.back();
          if (p.copy_last && !copied) {
            copy_on_write(*target);
            copied = true;
          }
        } else {
          const tier t = p.new_tiers[next_new++];
          e.slots.push_back(block_slot{t, pool_mut(t).allocate(), {}});
          target = &e.slots.back();
        }
        age_out_chunk(e, *target, c * chunk_, scratch);
      }
      // The aged-out rows leave the window in one move.
      const std::size_t aged = static_cast<std::size_t>(p.chunks * chunk_) * config_.head_dim;
      e.window_k.erase(e.window_k.begin(), e.window_k.begin() + static_cast<std::ptrdiff_t>(aged));
      e.window_v.erase(e.window_v.begin(), e.window_v.begin() + static_cast<std::ptrdiff_t>(aged));
    }
  }

  /// Overload for mutable views.
  template <class T>
  void append(seq_id id, int layer, kv_view<T> k, kv_view<T> v) {
    append(id, layer, kv_view<const T>(k), kv_view<const T>(v));
  }

  // ---- evict and compact -----------------------------------------------------------------

  /// Removes tokens of (seq, layer, head) at `positions` (entry order, as `gather` returns
  /// them; any order, no duplicates). Sink and window tokens are erased; block tokens leave
  /// their block's valid mask, and blocks with no valid token left return to the pool.
  void evict(seq_id id, int layer, int head, std::span<const index_t> positions) {
    entry& e = find_entry(id, layer, head);
    check_not_pruned(e, id, layer, head, "evict");
    const index_t total = entry_tokens(e);
    std::vector<index_t> sorted(positions.begin(), positions.end());
    std::sort(sorted.begin(), sorted.end());
    for (std::size_t i = 0; i < sorted.size(); ++i) {
      OSCAR_CHECK_ARG(sorted[i] >= 0 && sorted[i] < total, sorted[i],
                      oscar::detail::concat("positions in [0, ", total, ") of this head"));
      OSCAR_CHECK_ARG(i == 0 || sorted[i] != sorted[i - 1], sorted[i], "each position once");
    }
    // Walk regions back to front so earlier positions stay valid while erasing.
    const index_t sinks = rows(e.sink_k);
    const index_t in_blocks = block_tokens_valid(e);
    const int d = config_.head_dim;
    for (auto it = sorted.rbegin(); it != sorted.rend(); ++it) {
      const index_t pos = *it;
      if (pos >= sinks + in_blocks) {
        erase_row(e.window_k, pos - sinks - in_blocks, d);
        erase_row(e.window_v, pos - sinks - in_blocks, d);
      } else if (pos < sinks) {
        erase_row(e.sink_k, pos, d);
        erase_row(e.sink_v, pos, d);
      } else {
        index_t rest = pos - sinks;
        for (block_slot& s : e.slots) {
          const index_t count = static_cast<index_t>(s.valid.count());
          if (rest < count) {
            s.valid.reset(static_cast<std::size_t>(nth_set_bit(s.valid, rest)));
            break;
          }
          rest -= count;
        }
      }
    }
    std::erase_if(e.slots, [&](const block_slot& s) {
      if (s.valid.any()) return false;
      pool_mut(s.level).release(s.id);
      return true;
    });
  }

  /// Rewrites the blocks of (seq, layer, head) so the most important tokens sit together.
  /// `importance` has one finite value per token of the head, in entry order. Per tier, the
  /// chunks that still hold a valid token are ordered by the sum of their valid tokens'
  /// importance, highest first (stable), and packed into the fewest blocks of that tier; the
  /// table then lists the full tier's blocks, then mid, then low. Sinks and window do not
  /// move. Codes are copied, never re-quantized, so every token decodes exactly as before.
  /// Returns the new entry order: element `i` is the position token `i` had before, so scores
  /// kept in entry order follow with `new_scores[i] = old_scores[result[i]]`.
  std::vector<index_t> compact(seq_id id, int layer, int head, std::span<const float> importance) {
    entry& e = find_entry(id, layer, head);
    check_not_pruned(e, id, layer, head, "compact");
    OSCAR_CHECK_ARG(static_cast<index_t>(importance.size()) == entry_tokens(e), importance.size(),
                    oscar::detail::concat("one importance per token of the head (",
                                          entry_tokens(e), ")"));
    for (std::size_t i = 0; i < importance.size(); ++i) {
      OSCAR_CHECK(std::isfinite(importance[i]), errc::non_finite, "importance[", i, "] = ",
                  importance[i], " is not allowed (allowed: finite values)");
    }
    // Collect the chunks to keep, per tier.
    struct chunk_ref {
      std::size_t slot;
      int index;  // chunk index inside the block
      double weight;
      std::bitset<max_block_tokens> valid;  // bits of this chunk, shifted to slot 0
      index_t first = 0;                    // entry position of its first valid token
    };
    std::array<std::vector<chunk_ref>, tier_count> chunks;
    index_t pos = rows(e.sink_k);
    for (std::size_t s = 0; s < e.slots.size(); ++s) {
      const block_slot& slot = e.slots[s];
      const int fill = pool(slot.level).fill(slot.id);
      for (int c = 0; c < fill / chunk_; ++c) {
        chunk_ref ref{s, c, 0.0, {}, pos};
        for (int t = 0; t < chunk_; ++t) {
          if (!slot.valid.test(static_cast<std::size_t>(c * chunk_ + t))) continue;
          ref.valid.set(static_cast<std::size_t>(t));
          ref.weight += importance[static_cast<std::size_t>(pos++)];
        }
        if (ref.valid.any()) chunks[static_cast<int>(slot.level)].push_back(ref);
      }
    }
    // Plan block ids per tier: reuse blocks only this entry holds, allocate the rest.
    const int per_block = config_.block_tokens / chunk_;
    std::array<std::vector<block_id>, tier_count> reusable;
    std::array<std::size_t, tier_count> needed{};
    for (const block_slot& s : e.slots) {
      if (!pool(s.level).shared(s.id)) reusable[static_cast<int>(s.level)].push_back(s.id);
    }
    for (int t = 0; t < tier_count; ++t) {
      std::stable_sort(chunks[t].begin(), chunks[t].end(),
                       [](const chunk_ref& a, const chunk_ref& b) { return a.weight > b.weight; });
      const std::size_t blocks = (chunks[t].size() + per_block - 1) / per_block;
      needed[t] = blocks > reusable[t].size() ? blocks - reusable[t].size() : 0;
    }
    check_free(needed, "compact");

    // Commit: copy every kept chunk's bytes out, then write them to their new places.
    std::vector<block_slot> slots;
    std::vector<std::byte> staging;
    std::vector<float> scratch;
    for_each_tier([&]<int I>() {
      const detail::tier_layout& lay = layouts_[I];
      const std::size_t key_chunk = lay.key_tile_bytes * (chunk_ / lay.key_tile_tokens);
      const std::size_t value_chunk = lay.value_tile_bytes * (chunk_ / lay.value_tile_tokens);
      const std::size_t chunk_bytes = key_chunk + value_chunk;
      staging.resize(chunks[I].size() * chunk_bytes);
      for (std::size_t i = 0; i < chunks[I].size(); ++i) {
        const chunk_ref& r = chunks[I][i];
        const std::byte* block = pool(static_cast<tier>(I)).data(e.slots[r.slot].id);
        std::memcpy(&staging[i * chunk_bytes], block + r.index * key_chunk, key_chunk);
        std::memcpy(&staging[i * chunk_bytes + key_chunk],
                    block + lay.key_bytes + r.index * value_chunk, value_chunk);
      }
      std::size_t reused = 0;
      for (std::size_t i = 0; i < chunks[I].size(); ++i) {
        if (i % per_block == 0) {
          // A reused block gains a reference here and loses the old slot's one below.
          block_id target = 0;
          if (reused < reusable[I].size()) {
            target = reusable[I][reused++];
            pool_mut(static_cast<tier>(I)).retain(target);
          } else {
            target = pool_mut(static_cast<tier>(I)).allocate();
          }
          slots.push_back(block_slot{static_cast<tier>(I), target, {}});
          pool_mut(static_cast<tier>(I)).set_fill(target, 0);
        }
        block_slot& dst = slots.back();
        const int c = static_cast<int>(i % per_block);
        std::byte* block = pool_mut(static_cast<tier>(I)).data(dst.id);
        std::memcpy(block + c * key_chunk, &staging[i * chunk_bytes], key_chunk);
        std::memcpy(block + lay.key_bytes + c * value_chunk, &staging[i * chunk_bytes + key_chunk],
                    value_chunk);
        dst.valid |= chunks[I][i].valid << static_cast<std::size_t>(c * chunk_);
        pool_mut(static_cast<tier>(I)).set_fill(dst.id, (c + 1) * chunk_);
      }
      for (block_slot& s : slots) {
        if (s.level == static_cast<tier>(I)) {
          update_summary<I>(s.id, e, 0, pool(s.level).fill(s.id), scratch);
        }
      }
    });
    for (const block_slot& s : e.slots) pool_mut(s.level).release(s.id);
    e.slots = std::move(slots);

    std::vector<index_t> order;
    order.reserve(importance.size());
    const index_t sinks = rows(e.sink_k);
    for (index_t i = 0; i < sinks; ++i) order.push_back(i);
    for (int t = 0; t < tier_count; ++t) {
      for (const chunk_ref& r : chunks[t]) {
        const auto count = static_cast<index_t>(r.valid.count());
        for (index_t i = 0; i < count; ++i) order.push_back(r.first + i);
      }
    }
    for (auto i = static_cast<index_t>(order.size()); i < static_cast<index_t>(importance.size()); ++i)
      order.push_back(i);
    return order;
  }

  /// Re-encodes block `slot` (index into `blocks(seq, layer, head)`) of (seq, layer, head) in
  /// tier `target`: its tokens are decoded and encoded again, chunk by chunk, into a new block
  /// of that tier, which takes the old one's place in the table (same fill, same valid mask,
  /// so entry order does not change); the old block is released. Moving to a coarser tier
  /// costs what that tier's format loses; moving to a finer one cannot restore what was lost.
  /// A tier's per-head metadata not yet calibrated is calibrated on this block's decoded
  /// tokens. Retiering a block to its own tier does nothing. Throws `out_of_memory` (changing
  /// nothing) when the target pool is full.
  void retier(seq_id id, int layer, int head, std::size_t slot, tier target) {
    entry& e = find_entry(id, layer, head);
    OSCAR_CHECK_ARG(slot < e.slots.size(), slot,
                    oscar::detail::concat("a block index below ", e.slots.size(),
                                          ", the blocks of this head"));
    OSCAR_CHECK_ARG(static_cast<unsigned>(target) < unsigned{tier_count}, static_cast<int>(target),
                    "a tier: full (0), mid (1) or low (2)");
    block_slot& s = e.slots[slot];
    if (s.level == target) return;
    std::array<std::size_t, tier_count> needed{};
    needed[static_cast<int>(target)] = 1;
    check_free(needed, "retier");
    std::vector<float> k, v, scratch;
    decode_block(s, e, k, v);
    const int fill = pool(s.level).fill(s.id);
    const block_id fresh = pool_mut(target).allocate();
    switch (target) {
      case tier::full: encode_block_in<0>(e, fresh, fill, k, v, scratch); break;
      case tier::mid: encode_block_in<1>(e, fresh, fill, k, v, scratch); break;
      case tier::low: encode_block_in<2>(e, fresh, fill, k, v, scratch); break;
    }
    pool_mut(s.level).release(s.id);
    s.level = target;
    s.id = fresh;
  }

  // ---- pruned heads --------------------------------------------------------------------------

  /// Prunes (seq, layer, head), as zeroed query and key weights do: attention over the head is
  /// then uniform, so its output is the mean of its values. The head keeps only that mean,
  /// O(1) memory: its blocks return to their pools, sinks and window are dropped, and from now
  /// on it holds exactly one token, key 0 and value the running mean of every value it held
  /// (decoded) plus every value appended later (kept in float64, published in the window's
  /// type). Any attention backend therefore returns the mean for it, with no special case.
  /// `evict` and `compact` refuse a pruned head; `serialize` refuses a sequence with one.
  /// Pruning a pruned head does nothing.
  void prune(seq_id id, int layer, int head) {
    entry& e = find_entry(id, layer, head);
    if (e.pruned) return;
    const int d = config_.head_dim;
    e.value_sum.assign(static_cast<std::size_t>(d), 0.0);
    e.value_count = 0;
    const auto add_rows = [&](const float* v, index_t n) {
      for (index_t t = 0; t < n; ++t, ++e.value_count)
        for (int c = 0; c < d; ++c) e.value_sum[c] += v[t * d + c];
    };
    std::vector<float> rows_k, rows_v;
    to_floats(e.sink_v, rows_v);
    add_rows(rows_v.data(), rows(e.sink_v));
    for (const block_slot& s : e.slots) {
      decode_block(s, e, rows_k, rows_v);
      for (int t = 0; t < pool(s.level).fill(s.id); ++t) {
        if (s.valid.test(static_cast<std::size_t>(t))) add_rows(rows_v.data() + t * d, 1);
      }
      pool_mut(s.level).release(s.id);
    }
    to_floats(e.window_v, rows_v);
    add_rows(rows_v.data(), rows(e.window_v));
    e.slots.clear();
    e.window_k.clear();
    e.window_v.clear();
    e.sink_k.assign(static_cast<std::size_t>(d), window_type(0.0f));
    e.pruned = true;
    publish_mean(e);
  }

  /// Whether (seq, layer, head) was pruned.
  [[nodiscard]] bool pruned(seq_id id, int layer, int head) const {
    return find_entry(id, layer, head).pruned;
  }

  // ---- reading ---------------------------------------------------------------------------

  /// Decodes (seq, layer) to dense fp32, one `[tokens, head_dim]` K and V per KV head, in
  /// entry order. For references and tests; attention reads the blocks directly.
  [[nodiscard]] std::vector<gathered_head> gather(seq_id id, int layer) const {
    const sequence& seq = find(id);
    check_layer(layer);
    const int d = config_.head_dim;
    std::vector<gathered_head> out(static_cast<std::size_t>(config_.kv_heads));
    std::vector<float> k_block, v_block;
    for (int h = 0; h < config_.kv_heads; ++h) {
      const entry& e = seq.entries[entry_index(layer, h)];
      gathered_head& g = out[static_cast<std::size_t>(h)];
      g.tokens = entry_tokens(e);
      g.k.reserve(static_cast<std::size_t>(g.tokens * d));
      g.v.reserve(static_cast<std::size_t>(g.tokens * d));
      append_rows(g.k, e.sink_k);
      append_rows(g.v, e.sink_v);
      for (const block_slot& s : e.slots) {
        decode_block(s, e, k_block, v_block);
        for (int t = 0; t < pool(s.level).fill(s.id); ++t) {
          if (!s.valid.test(static_cast<std::size_t>(t))) continue;
          g.k.insert(g.k.end(), k_block.begin() + t * d, k_block.begin() + (t + 1) * d);
          g.v.insert(g.v.end(), v_block.begin() + t * d, v_block.begin() + (t + 1) * d);
        }
      }
      append_rows(g.k, e.window_k);
      append_rows(g.v, e.window_v);
    }
    return out;
  }

  /// The block table of (seq, layer, head), in entry order.
  [[nodiscard]] std::span<const block_slot> blocks(seq_id id, int layer, int head) const {
    return find_entry(id, layer, head).slots;
  }

  // ---- direct access for attention backends ------------------------------------------------

  /// What one (seq, layer, KV head) holds, read-only, for backends that attend over the blocks
  /// without `gather`. Entry order is sinks, then the valid tokens of `slots` in table order
  /// (token `t` of a slot is live when `valid.test(t)`, `t < pool(level).fill(id)`), then the
  /// window, oldest first. Sinks and window are `[rows, head_dim]` row-major in `window_type`.
  /// The spans stay valid until the next non-const call on the cache.
  struct entry_view {
    std::span<const window_type> sink_k, sink_v;
    std::span<const window_type> window_k, window_v;
    std::span<const block_slot> slots;
  };

  [[nodiscard]] entry_view view(seq_id id, int layer, int head) const {
    const entry& e = find_entry(id, layer, head);
    return {e.sink_k, e.sink_v, e.window_k, e.window_v, e.slots};
  }

  /// Per-head metadata of tier I's key and value formats for (seq, layer, head), as the
  /// formats' `decode_tile` takes it.
  template <int I>
  [[nodiscard]] const detail::tier_params<tier_format<I>>& params(seq_id id, int layer,
                                                                  int head) const {
    return std::get<I>(find_entry(id, layer, head).params);
  }

  /// Where the tiles of a chunk live inside a block of tier `t`: key tiles from byte 0
  /// (`key_tile_bytes` each, one per `key_tile_tokens` tokens), value tiles from `key_bytes`.
  [[nodiscard]] const detail::tier_layout& layout(tier t) const noexcept {
    return layouts_[static_cast<int>(t)];
  }

  /// The pool of a tier (block bytes, fill, key summaries).
  [[nodiscard]] const pool_type& pool(tier t) const noexcept { return *pools_[static_cast<int>(t)]; }

  /// Memory accounting over all sequences.
  [[nodiscard]] cache_usage usage() const {
    cache_usage u;
    for (int t = 0; t < tier_count; ++t) {
      u.tiers[t] = tier_usage{pools_[t]->block_bytes(), pools_[t]->summary_bytes(),
                              pools_[t]->capacity(), pools_[t]->used_blocks(),
                              pools_[t]->free_blocks()};
    }
    for (const auto& [id, seq] : sequences_) {
      for (const entry& e : seq.entries) {
        u.window_bytes += (e.sink_k.size() + e.sink_v.size() + e.window_k.size() +
                           e.window_v.size()) * sizeof(window_type);
        u.token_heads += entry_tokens(e);
      }
    }
    u.sequences = static_cast<index_t>(sequences_.size());
    return u;
  }

 private:
  friend struct detail::serializer;

  struct entry {
    index_t appended = 0;                  ///< tokens ever appended
    bool pruned = false;                   ///< see `prune`: one token, k = 0, v = the mean
    std::vector<double> value_sum;         ///< pruned: sum of the values in the mean
    index_t value_count = 0;               ///< pruned: how many values the mean holds
    std::vector<window_type> sink_k, sink_v;      ///< [sinks, head_dim]
    std::vector<window_type> window_k, window_v;  ///< [window, head_dim], oldest first
    std::vector<block_slot> slots;
    std::tuple<detail::tier_params<Full>, detail::tier_params<Mid>, detail::tier_params<Low>>
        params;
  };
  struct sequence {
    std::vector<entry> entries;  ///< [layers * kv_heads]
  };
  struct head_plan {
    index_t to_sinks = 0;
    index_t chunks = 0;
    bool copy_last = false;
    std::vector<tier> new_tiers;
  };

  template <class F>
  static void for_each_tier(F&& f) {
    f.template operator()<0>();
    f.template operator()<1>();
    f.template operator()<2>();
  }

  template <class KV>
  detail::tier_layout make_layout() const {
    using K = quant::format_traits<typename KV::key>;
    using V = quant::format_traits<typename KV::value>;
    detail::tier_layout lay;
    lay.key_tile_tokens = quant::tokens_per_tile<typename KV::key>();
    lay.value_tile_tokens = quant::tokens_per_tile<typename KV::value>();
    lay.key_tile_bytes =
        quant::blocks_per_tile<typename KV::key>(config_.head_dim) * sizeof(typename K::block);
    lay.value_tile_bytes =
        quant::blocks_per_tile<typename KV::value>(config_.head_dim) * sizeof(typename V::block);
    lay.key_bytes = lay.key_tile_bytes * (config_.block_tokens / lay.key_tile_tokens);
    const std::size_t bytes =
        lay.key_bytes + lay.value_tile_bytes * (config_.block_tokens / lay.value_tile_tokens);
    lay.block_bytes = (bytes + 63) / 64 * 64;  // blocks start on cache lines
    return lay;
  }

  pool_type& pool_mut(tier t) noexcept { return *pools_[static_cast<int>(t)]; }

  sequence& find(seq_id id) {
    auto it = sequences_.find(id);
    check_found(it, id);
    return it->second;
  }
  const sequence& find(seq_id id) const {
    auto it = sequences_.find(id);
    check_found(it, id);
    return it->second;
  }
  template <class It>
  void check_found(It it, seq_id id) const {
    OSCAR_CHECK(it != sequences_.end(), errc::invalid_argument, "sequence id ", id,
                " is not allowed (allowed: an id returned by create, fork or import and not yet "
                "freed)");
  }
  void check_layer(int layer) const {
    OSCAR_CHECK_ARG(layer >= 0 && layer < config_.layers, layer,
                    oscar::detail::concat("0 to ", config_.layers - 1));
  }
  template <class T>
  void check_kv_shape(kv_view<const T> x, const char* name) const {
    OSCAR_CHECK(x.heads == config_.kv_heads && x.head_dim == config_.head_dim,
                errc::invalid_argument, name, " shape [", x.tokens, ", ", x.heads, ", ",
                x.head_dim, "] is not allowed (allowed: [tokens, ", config_.kv_heads, ", ",
                config_.head_dim, "])");
  }
  std::size_t entry_index(int layer, int head) const noexcept {
    return static_cast<std::size_t>(layer) * config_.kv_heads + head;
  }
  entry& find_entry(seq_id id, int layer, int head) {
    return const_cast<entry&>(std::as_const(*this).find_entry(id, layer, head));
  }
  const entry& find_entry(seq_id id, int layer, int head) const {
    const sequence& seq = find(id);
    check_layer(layer);
    OSCAR_CHECK_ARG(head >= 0 && head < config_.kv_heads, head,
                    oscar::detail::concat("0 to ", config_.kv_heads - 1));
    return seq.entries[entry_index(layer, head)];
  }

  void check_free(const std::array<std::size_t, tier_count>& needed, const char* what) const {
    for (int t = 0; t < tier_count; ++t) {
      OSCAR_CHECK(needed[t] <= pools_[t]->free_blocks(), errc::out_of_memory, what, " needs ",
                  needed[t], " new blocks of tier ", to_string(static_cast<tier>(t)), " but ",
                  pools_[t]->free_blocks(), " of ", pools_[t]->capacity(),
                  " are free; nothing was changed (evict or free sequences, then retry)");
    }
  }

  index_t rows(const std::vector<window_type>& x) const noexcept {
    return static_cast<index_t>(x.size()) / config_.head_dim;
  }
  index_t window_size(const entry& e) const noexcept { return rows(e.window_k); }
  static index_t block_tokens_valid(const entry& e) noexcept {
    index_t n = 0;
    for (const block_slot& s : e.slots) n += static_cast<index_t>(s.valid.count());
    return n;
  }
  index_t entry_tokens(const entry& e) const noexcept {
    return rows(e.sink_k) + block_tokens_valid(e) + window_size(e);
  }
  static int nth_set_bit(const std::bitset<max_block_tokens>& bits, index_t n) noexcept {
    for (int i = 0; i < max_block_tokens; ++i) {
      if (bits.test(static_cast<std::size_t>(i)) && n-- == 0) return i;
    }
    return -1;
  }

  /// Appends one head vector in the window's type; fp16 saturates at +-65504 like every OSCAR
  /// format, so a finite input never becomes Inf in the cache.
  template <class T>
  void push_row(std::vector<window_type>& dst, const T* row) const {
    for (int d = 0; d < config_.head_dim; ++d) {
      const float x = static_cast<float>(row[d]);
      if constexpr (std::is_same_v<window_type, float>) dst.push_back(x);
      else dst.push_back(half(quant::clamp_finite(x, 65504.0f)));
    }
  }
  static void erase_row(std::vector<window_type>& x, index_t row, int d) {
    x.erase(x.begin() + row * d, x.begin() + (row + 1) * d);
  }
  static void append_rows(std::vector<float>& dst, const std::vector<window_type>& src) {
    for (window_type h : src) dst.push_back(static_cast<float>(h));
  }

  void release_all(sequence& seq) noexcept {
    for (entry& e : seq.entries)
      for (block_slot& s : e.slots) pool_mut(s.level).release(s.id);
  }

  void check_not_pruned(const entry& e, seq_id id, int layer, int head, const char* what) const {
    OSCAR_CHECK(!e.pruned, errc::invalid_argument, what, " of sequence ", id, " layer ", layer,
                " KV head ", head, " is not allowed (allowed: a head that was not pruned; a pruned "
                "head holds only the running mean of its values)");
  }

  /// Adds one value row to a pruned head's running mean.
  template <class T>
  void add_to_mean(entry& e, const T* row) {
    for (int c = 0; c < config_.head_dim; ++c) e.value_sum[c] += static_cast<float>(row[c]);
    ++e.value_count;
    publish_mean(e);
  }

  /// Writes a pruned head's mean into its one value row, in the window's type.
  void publish_mean(entry& e) const {
    const int d = config_.head_dim;
    e.sink_v.resize(static_cast<std::size_t>(d));
    for (int c = 0; c < d; ++c) {
      const double mean = e.value_count > 0 ? e.value_sum[c] / static_cast<double>(e.value_count) : 0.0;
      if constexpr (std::is_same_v<window_type, float>) e.sink_v[c] = static_cast<float>(mean);
      else e.sink_v[c] = half(quant::clamp_finite(static_cast<float>(mean), 65504.0f));
    }
  }

  /// Encodes `fill` decoded tokens (`k`, `v`: [fill, head_dim]) into the empty block `id` of
  /// tier I, calibrating the tier's per-head metadata on them if it is not yet calibrated.
  template <int I>
  void encode_block_in(entry& e, block_id id, int fill, const std::vector<float>& k,
                       const std::vector<float>& v, std::vector<float>& scratch) {
    using KV = tier_format<I>;
    using K = quant::format_traits<typename KV::key>;
    using V = quant::format_traits<typename KV::value>;
    const int d = config_.head_dim;
    const detail::tier_layout& lay = layouts_[I];
    auto& params = std::get<I>(e.params);
    if (!params.calibrated) {
      params.key = K::calibrate(k.data(), fill, d);
      params.value = V::calibrate(v.data(), fill, d);
      params.calibrated = true;
    }
    std::byte* block = pool_mut(static_cast<tier>(I)).data(id);
    for (int t = 0; t < fill; t += lay.key_tile_tokens) {
      K::encode_tile(k.data() + static_cast<std::size_t>(t) * d, d, params.key,
                     reinterpret_cast<typename K::block*>(block + (t / lay.key_tile_tokens) *
                                                                      lay.key_tile_bytes));
    }
    for (int t = 0; t < fill; t += lay.value_tile_tokens) {
      V::encode_tile(v.data() + static_cast<std::size_t>(t) * d, d, params.value,
                     reinterpret_cast<typename V::block*>(block + lay.key_bytes +
                                                          (t / lay.value_tile_tokens) *
                                                              lay.value_tile_bytes));
    }
    pool_mut(static_cast<tier>(I)).set_fill(id, fill);
    update_summary<I>(id, e, 0, fill, scratch);
  }

  void copy_on_write(block_slot& slot) {
    const block_id fresh = pool_mut(slot.level).allocate();
    pool_mut(slot.level).copy_block(slot.id, fresh);
    pool_mut(slot.level).release(slot.id);
    slot.id = fresh;
  }

  /// Quantizes the chunk at window row `first` into `slot` (which has room). Rows before
  /// `first` have already aged out (the caller erases them afterwards), so the window "at this
  /// moment" is rows [first, end). Calibrates the tier's per-head metadata on first use.
  void age_out_chunk(entry& e, block_slot& slot, index_t first, std::vector<float>& scratch) {
    switch (slot.level) {
      case tier::full: age_out_chunk_in<0>(e, slot, first, scratch); break;
      case tier::mid: age_out_chunk_in<1>(e, slot, first, scratch); break;
      case tier::low: age_out_chunk_in<2>(e, slot, first, scratch); break;
    }
  }

  template <int I>
  void age_out_chunk_in(entry& e, block_slot& slot, index_t first, std::vector<float>& scratch) {
    using KV = tier_format<I>;
    using K = quant::format_traits<typename KV::key>;
    using V = quant::format_traits<typename KV::value>;
    const int d = config_.head_dim;
    const detail::tier_layout& lay = layouts_[I];
    auto& params = std::get<I>(e.params);
    const auto window_k =
        std::span<const window_type>(e.window_k).subspan(static_cast<std::size_t>(first * d));
    const auto window_v =
        std::span<const window_type>(e.window_v).subspan(static_cast<std::size_t>(first * d));
    if (!params.calibrated) {
      const int window = static_cast<int>(window_size(e) - first);
      to_floats(window_k, scratch);
      params.key = K::calibrate(scratch.data(), window, d);
      to_floats(window_v, scratch);
      params.value = V::calibrate(scratch.data(), window, d);
      params.calibrated = true;
    }
    pool_type& p = pool_mut(slot.level);
    const int fill = p.fill(slot.id);
    std::byte* block = p.data(slot.id);
    // Keys, then values: the chunk's first `chunk_` rows of the window, as floats.
    to_floats(window_k.first(static_cast<std::size_t>(chunk_) * d), scratch);
    for (int t = 0; t < chunk_; t += lay.key_tile_tokens) {
      auto* out = reinterpret_cast<typename K::block*>(
          block + ((fill + t) / lay.key_tile_tokens) * lay.key_tile_bytes);
      K::encode_tile(scratch.data() + t * d, d, params.key, out);
    }
    to_floats(window_v.first(static_cast<std::size_t>(chunk_) * d), scratch);
    for (int t = 0; t < chunk_; t += lay.value_tile_tokens) {
      auto* out = reinterpret_cast<typename V::block*>(
          block + lay.key_bytes + ((fill + t) / lay.value_tile_tokens) * lay.value_tile_bytes);
      V::encode_tile(scratch.data() + t * d, d, params.value, out);
    }
    for (int t = 0; t < chunk_; ++t) slot.valid.set(static_cast<std::size_t>(fill + t));
    p.set_fill(slot.id, fill + chunk_);
    update_summary<I>(slot.id, e, fill, fill + chunk_, scratch);
  }

  static void to_floats(std::span<const window_type> src, std::vector<float>& dst) {
    dst.resize(src.size());
    for (std::size_t i = 0; i < src.size(); ++i) dst[i] = static_cast<float>(src[i]);
  }

  /// Decodes the keys of tokens [from, to) of a block of tier I into `keys` ([to - from, d]).
  template <int I>
  void decode_keys(const std::byte* block, const typename quant::format_traits<
                                              typename tier_format<I>::key>::head_params& params,
                   int from, int to, std::vector<float>& keys) const {
    using K = quant::format_traits<typename tier_format<I>::key>;
    const detail::tier_layout& lay = layouts_[I];
    const int d = config_.head_dim;
    keys.resize(static_cast<std::size_t>(to - from) * d);
    for (int t = from; t < to; t += lay.key_tile_tokens) {
      const auto* in = reinterpret_cast<const typename K::block*>(
          block + (t / lay.key_tile_tokens) * lay.key_tile_bytes);
      K::decode_tile(in, d, params, keys.data() + static_cast<std::size_t>(t - from) * d);
    }
  }

  /// Widens the block's key bounds with the decoded keys of tokens [from, to); `from == 0`
  /// starts them afresh. Rounding outward commutes with min/max, so the stored bounds are the
  /// exact min/max of all the block's keys rounded outward, whatever the order of updates.
  template <int I>
  void update_summary(block_id id, const entry& e, int from, int to, std::vector<float>& scratch) {
    pool_type& p = pool_mut(static_cast<tier>(I));
    decode_keys<I>(p.data(id), std::get<I>(e.params).key, from, to, scratch);
    const int d = config_.head_dim;
    std::vector<float> lo(static_cast<std::size_t>(d)), hi(static_cast<std::size_t>(d));
    for (int c = 0; c < d; ++c) {
      lo[c] = from == 0 ? scratch[c] : static_cast<float>(p.key_min(id)[c]);
      hi[c] = from == 0 ? scratch[c] : static_cast<float>(p.key_max(id)[c]);
    }
    for (int t = 0; t < to - from; ++t) {
      for (int c = 0; c < d; ++c) {
        const float x = scratch[static_cast<std::size_t>(t) * d + c];
        lo[c] = std::min(lo[c], x);
        hi[c] = std::max(hi[c], x);
      }
    }
    p.set_key_bounds(id, lo, hi);
  }

  void decode_block(const block_slot& s, const entry& e, std::vector<float>& k,
                    std::vector<float>& v) const {
    switch (s.level) {
      case tier::full: decode_block_in<0>(s, e, k, v); break;
      case tier::mid: decode_block_in<1>(s, e, k, v); break;
      case tier::low: decode_block_in<2>(s, e, k, v); break;
    }
  }

  template <int I>
  void decode_block_in(const block_slot& s, const entry& e, std::vector<float>& k,
                       std::vector<float>& v) const {
    using V = quant::format_traits<typename tier_format<I>::value>;
    const detail::tier_layout& lay = layouts_[I];
    const pool_type& p = pool(static_cast<tier>(I));
    const int fill = p.fill(s.id);
    const int d = config_.head_dim;
    decode_keys<I>(p.data(s.id), std::get<I>(e.params).key, 0, fill, k);
    v.resize(static_cast<std::size_t>(fill) * d);
    for (int t = 0; t < fill; t += lay.value_tile_tokens) {
      const auto* in = reinterpret_cast<const typename V::block*>(
          p.data(s.id) + lay.key_bytes + (t / lay.value_tile_tokens) * lay.value_tile_bytes);
      V::decode_tile(in, d, std::get<I>(e.params).value, v.data() + static_cast<std::size_t>(t) * d);
    }
  }

  cache_config config_;
  tier_policy policy_;
  int chunk_ = 1;
  std::array<detail::tier_layout, tier_count> layouts_{};
  std::array<std::unique_ptr<pool_type>, tier_count> pools_;
  std::map<seq_id, sequence> sequences_;
  seq_id next_id_ = 1;
};

}  // namespace oscar::cache
