// SPDX-License-Identifier: Apache-2.0
/// \file
/// `gpu::paged_kv<KV>`: a paged KV cache that lives in device memory, for the CUDA and HIP
/// attention backends.
///
/// It holds what `cache::kv_cache` holds for one format (the low tier): per (sequence slot,
/// layer, KV head) the fp16 sinks, a table of blocks from one device block pool, and the fp16
/// recent window, with the same aging rule (chunks of `chunk_tokens()` tokens leave the window
/// once it holds `window_tokens + chunk` rows) and the same per-head calibration, so that an
/// append on the device writes the bytes the host cache writes. Blocks use the layout
/// `layout_for<KV>(head_dim)` (layout.hpp): the host's own bytes, or mma records for FP2+ with
/// per-channel keys.
///
/// The host keeps the bookkeeping (free list, reference counts, table lengths) so that it can
/// plan every call, size kernel grids and report out-of-memory *before* anything changes; the
/// device holds the data and the per-entry state kernels read. All device work goes on the
/// stream the caller passes; no call synchronizes the device except `read_entry` (a test and
/// export helper that says so) and the rare growth of an internal scratch buffer (a device
/// allocation). Calls on one cache must be ordered (one stream, or events). Host-to-device
/// metadata travels through pinned staging buffers that are reused once the copy that last
/// used them has completed.
///
/// Supported: create, fork (copy-on-write: blocks are shared, the last block is copied when a
/// fork appends into it), free, append (many sequences of one layer, n tokens each), upload of
/// sequences from a host `kv_cache` whose blocks are all in the low tier with no evicted tokens,
/// and read-back. Each block keeps the host pool's key summary (per-channel min/max of its
/// decoded keys, fp16 rounded outward), written by upload and append as the host writes it.
/// Not (yet) on the device: evict, compact, tiers.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "oscar/backend/gpu/cache_kernels.cuh"
#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/tensor.hpp"

namespace oscar::gpu {

/// Capacity and layout of a device cache.
struct paged_kv_options {
  int max_sequences = 16;          ///< sequence slots (live sequences at once)
  index_t max_tokens = 32768;      ///< tokens per (sequence, layer, KV head) in blocks
  std::size_t pool_blocks = 4096;  ///< blocks in the pool (shared by all slots, layers, heads)
  /// Keep the host cache's block layout even where an mma layout exists (the generic kernel
  /// then serves the cache). HIP builds always use the native layout.
  bool native_layout = false;
};

namespace detail {

/// Pinned host buffers for host-to-device metadata, each reused once the copy that read it has
/// completed (an event query, never a wait unless every buffer is still in flight).
class staging {
 public:
  /// A buffer of at least `bytes` that no queued copy still reads.
  std::byte* acquire(std::size_t bytes) {
    for (auto& b : buffers_) {
      if (!b->busy && b->memory.size() >= bytes) return take(*b);
    }
    for (auto& b : buffers_) {
      if (b->busy && b->memory.size() >= bytes && b->ready.done()) return take(*b);
    }
    buffers_.push_back(std::make_unique<buffer>(std::max<std::size_t>(bytes, 1 << 16)));
    return take(*buffers_.back());
  }
  /// Marks the buffer returned by the last `acquire` as read by work queued on `stream`.
  void release(stream_t stream) {
    current_->ready.record(stream);
    current_->busy = true;
    current_ = nullptr;
  }

 private:
  struct buffer {
    explicit buffer(std::size_t n) : memory(n) {}
    pinned_buffer<std::byte> memory;
    event ready;
    bool busy = false;
  };
  std::byte* take(buffer& b) {
    b.busy = false;
    current_ = &b;
    return b.memory.data();
  }
  std::vector<std::unique_ptr<buffer>> buffers_;
  buffer* current_ = nullptr;
};

/// Appends the bytes of `x` to `out`, padded to 16 bytes; returns its offset.
template <class T>
std::size_t put_bytes(std::vector<std::byte>& out, std::span<const T> x) {
  static_assert(std::is_trivially_copyable_v<T>);
  const std::size_t at = out.size();
  out.resize(at + (x.size_bytes() + 15) / 16 * 16);
  if (!x.empty()) std::memcpy(out.data() + at, x.data(), x.size_bytes());
  return at;
}

}  // namespace detail

/// A device-resident paged KV cache in KV format `KV` (a `quant::kv_format`).
template <class KV>
class paged_kv {
 public:
  using format = KV;
  using key_traits = quant::format_traits<typename KV::key>;
  using value_traits = quant::format_traits<typename KV::value>;
  using state = entry_state<KV>;

  /// Allocates the pool, tables, windows and sinks in device memory (zeroed on `stream`).
  /// Throws `oscar::error` on a shape the formats do not accept or when device memory runs out.
  paged_kv(const cache::cache_config& config, const paged_kv_options& options,
           stream_t stream)
      : config_(config), options_(options) {
    OSCAR_CHECK_ARG(config.layers >= 1, config.layers, ">= 1");
    OSCAR_CHECK_ARG(config.kv_heads >= 1, config.kv_heads, ">= 1");
    quant::check_head_dim<typename KV::key>(config.head_dim);
    quant::check_head_dim<typename KV::value>(config.head_dim);
    const int bt = config.block_tokens;
    chunk_ = std::max({1, quant::tokens_per_tile<typename KV::key>(),
                       quant::tokens_per_tile<typename KV::value>()});
    OSCAR_CHECK_ARG(bt >= 16 && bt <= cache::max_block_tokens && (bt & (bt - 1)) == 0 &&
                        bt % chunk_ == 0,
                    config.block_tokens,
                    oscar::detail::concat("a power of two from 16 to 256 and a multiple of ",
                                          chunk_, ", the chunk of the cache's formats"));
    OSCAR_CHECK_ARG(config.sink_tokens >= 0, config.sink_tokens, ">= 0");
    OSCAR_CHECK_ARG(config.window_tokens >= 0, config.window_tokens, ">= 0");
    OSCAR_CHECK_ARG(options.max_sequences >= 1, options.max_sequences, ">= 1");
    OSCAR_CHECK_ARG(options.max_tokens >= bt, options.max_tokens,
                    oscar::detail::concat(">= block_tokens (", bt, ")"));
    OSCAR_CHECK_ARG(options.pool_blocks >= 1 && options.pool_blocks < (std::size_t{1} << 31),
                    options.pool_blocks, "1 to 2^31 - 1 blocks");
    layout_ = layout_for<KV>(config.head_dim);
#if defined(OSCAR_GPU_RUNTIME_HIP)
    layout_ = block_layout::native;  // the mma layout feeds the CUDA tensor-core kernel
#endif
    if (options.native_layout) layout_ = block_layout::native;
    const int d = config.head_dim;
    offsets_.key_tile_tokens = quant::tokens_per_tile<typename KV::key>();
    offsets_.value_tile_tokens = quant::tokens_per_tile<typename KV::value>();
    offsets_.key_tile_bytes = static_cast<std::size_t>(quant::blocks_per_tile<typename KV::key>(d)) *
                              sizeof(typename key_traits::block);
    offsets_.value_tile_bytes =
        static_cast<std::size_t>(quant::blocks_per_tile<typename KV::value>(d)) *
        sizeof(typename value_traits::block);
    offsets_.key_bytes = offsets_.key_tile_bytes * (bt / offsets_.key_tile_tokens);
    const std::size_t raw =
        offsets_.key_bytes + offsets_.value_tile_bytes * (bt / offsets_.value_tile_tokens);
    block_bytes_ = (raw + 63) / 64 * 64;  // as the host pool: blocks start on cache lines
    if constexpr (has_mma_layout_v<KV>) {
      if (layout_ == block_layout::mma) {
        block_bytes_ = static_cast<std::size_t>(bt / record_layout<KV>::tokens) *
                       record_layout<KV>::bytes(d);
      }
    }
    max_blocks_ = static_cast<int>((options.max_tokens + bt - 1) / bt);
    window_capacity_ = config.window_tokens + chunk_;
    entry_count_ = static_cast<std::size_t>(options.max_sequences) * config.layers *
                   config.kv_heads;

    pool_ = device_buffer<std::byte>(options.pool_blocks * block_bytes_);
    tables_ = device_buffer<std::int32_t>(entry_count_ * max_blocks_);
    entries_ = device_buffer<state>(entry_count_);
    const std::size_t sink_elems = entry_count_ * config.sink_tokens * d;
    const std::size_t window_elems = entry_count_ * window_capacity_ * d;
    sink_k_ = device_buffer<half>(sink_elems);
    sink_v_ = device_buffer<half>(sink_elems);
    window_k_ = device_buffer<half>(window_elems);
    window_v_ = device_buffer<half>(window_elems);
    key_bounds_ = device_buffer<half>(options.pool_blocks * 2 * static_cast<std::size_t>(d));
    fill_async(pool_.data(), 0, pool_.bytes(), stream);
    fill_async(tables_.data(), 0, tables_.bytes(), stream);
    fill_async(sink_k_.data(), 0, sink_k_.bytes(), stream);
    fill_async(sink_v_.data(), 0, sink_v_.bytes(), stream);
    fill_async(window_k_.data(), 0, window_k_.bytes(), stream);
    fill_async(window_v_.data(), 0, window_v_.bytes(), stream);
    fill_async(key_bounds_.data(), 0, key_bounds_.bytes(), stream);

    refcount_.assign(options.pool_blocks, 0);
    free_.reserve(options.pool_blocks);
    for (std::size_t i = options.pool_blocks; i-- > 0;) free_.push_back(static_cast<std::int32_t>(i));
    slots_.assign(static_cast<std::size_t>(options.max_sequences), false);
    mirror_.assign(entry_count_, mirror_entry{});
  }

  paged_kv(const paged_kv&) = delete;
  paged_kv& operator=(const paged_kv&) = delete;

  [[nodiscard]] const cache::cache_config& config() const noexcept { return config_; }
  [[nodiscard]] const paged_kv_options& options() const noexcept { return options_; }
  [[nodiscard]] block_layout layout() const noexcept { return layout_; }
  [[nodiscard]] int chunk_tokens() const noexcept { return chunk_; }
  [[nodiscard]] std::size_t block_bytes() const noexcept { return block_bytes_; }
  [[nodiscard]] std::size_t free_blocks() const noexcept { return free_.size(); }

  /// The device-side description kernels take.
  [[nodiscard]] paged_kv_view<KV> view() const noexcept {
    paged_kv_view<KV> v;
    v.pool = pool_.data();
    v.block_bytes = block_bytes_;
    v.tables = tables_.data();
    v.entries = entries_.data();
    v.sink_k = sink_k_.data();
    v.sink_v = sink_v_.data();
    v.window_k = window_k_.data();
    v.window_v = window_v_.data();
    v.key_bounds = key_bounds_.data();
    v.layers = config_.layers;
    v.kv_heads = config_.kv_heads;
    v.head_dim = config_.head_dim;
    v.block_tokens = config_.block_tokens;
    v.sink_tokens = config_.sink_tokens;
    v.window_tokens = config_.window_tokens;
    v.window_capacity = window_capacity_;
    v.chunk = chunk_;
    v.max_blocks = max_blocks_;
    v.layout = layout_;
    return v;
  }

  // ---- host bookkeeping, readable without touching the device ---------------------------------

  /// Tokens held for (slot, layer, head): sinks + blocks + window.
  [[nodiscard]] index_t tokens(slot_id slot, int layer, int head) const {
    const mirror_entry& m = mirror(slot, layer, head);
    return m.sinks + m.tokens + m.window;
  }
  /// Tokens held in blocks for (slot, layer, head).
  [[nodiscard]] index_t block_tokens_held(slot_id slot, int layer, int head) const {
    return mirror(slot, layer, head).tokens;
  }
  [[nodiscard]] bool contains(slot_id slot) const noexcept {
    return slot >= 0 && slot < options_.max_sequences && slots_[static_cast<std::size_t>(slot)];
  }
  /// Validates a slot id (throws `oscar::error` naming it).
  void check_slot(slot_id slot) const {
    OSCAR_CHECK(contains(slot), errc::invalid_argument, "slot ", slot,
                " is not allowed (allowed: a slot returned by create, fork or upload and not yet "
                "freed)");
  }

  // ---- sequences ------------------------------------------------------------------------------

  /// A new, empty sequence slot. Throws `errc::out_of_memory` when every slot is in use.
  slot_id create(stream_t stream) {
    const slot_id slot = take_slot();
    std::vector<state> states(static_cast<std::size_t>(config_.layers) * config_.kv_heads);
    std::byte* host = staging_.acquire(states.size() * sizeof(state));
    std::memcpy(host, states.data(), states.size() * sizeof(state));
    copy_async(entries_.data() + entry_index(slot, 0, 0), host, states.size() * sizeof(state),
               stream);
    staging_.release(stream);
    return slot;
  }

  /// A new slot sharing every block of `parent` (copy-on-write); sinks and window are copied.
  slot_id fork(slot_id parent, stream_t stream) {
    check_slot(parent);
    const slot_id child = take_slot();
    const std::size_t per_slot = static_cast<std::size_t>(config_.layers) * config_.kv_heads;
    const std::size_t from = entry_index(parent, 0, 0), to = entry_index(child, 0, 0);
    for (std::size_t i = 0; i < per_slot; ++i) {
      mirror_[to + i] = mirror_[from + i];
      for (std::int32_t id : mirror_[to + i].table) ++refcount_[static_cast<std::size_t>(id)];
    }
    const std::size_t d = static_cast<std::size_t>(config_.head_dim);
    copy_async(entries_.data() + to, entries_.data() + from, per_slot * sizeof(state), stream);
    copy_async(tables_.data() + to * max_blocks_, tables_.data() + from * max_blocks_,
               per_slot * max_blocks_ * sizeof(std::int32_t), stream);
    const std::size_t sink_row = config_.sink_tokens * d, window_row = window_capacity_ * d;
    copy_async(sink_k_.data() + to * sink_row, sink_k_.data() + from * sink_row,
               per_slot * sink_row * sizeof(half), stream);
    copy_async(sink_v_.data() + to * sink_row, sink_v_.data() + from * sink_row,
               per_slot * sink_row * sizeof(half), stream);
    copy_async(window_k_.data() + to * window_row, window_k_.data() + from * window_row,
               per_slot * window_row * sizeof(half), stream);
    copy_async(window_v_.data() + to * window_row, window_v_.data() + from * window_row,
               per_slot * window_row * sizeof(half), stream);
    return child;
  }

  /// Frees a slot; blocks no other slot shares return to the pool.
  void free(slot_id slot) {
    check_slot(slot);
    const std::size_t per_slot = static_cast<std::size_t>(config_.layers) * config_.kv_heads;
    for (std::size_t i = 0; i < per_slot; ++i) {
      mirror_entry& m = mirror_[entry_index(slot, 0, 0) + i];
      for (std::int32_t id : m.table) release_block(id);
      m = mirror_entry{};
    }
    slots_[static_cast<std::size_t>(slot)] = false;
  }

  // ---- append ----------------------------------------------------------------------------------

  /// Appends `tokens` new tokens to each sequence of `slots` in `layer`. `k` and `v` are device
  /// arrays `[slots.size()][tokens][kv_heads][head_dim]` of `float`, `half` or `bfloat16`,
  /// finite (not checked on the device: NaN/Inf input is the caller's contract here). Each
  /// slot at most once. Throws `oscar::error` before queuing anything on bad arguments, or
  /// `errc::out_of_memory` when the pool or a table would overflow.
  template <class T>
  void append(std::span<const slot_id> slots, int layer, const T* k, const T* v, int tokens,
              stream_t stream) {
    static_assert(is_kv_element_v<T>, "append takes float, oscar::half or oscar::bfloat16");
    OSCAR_CHECK_ARG(layer >= 0 && layer < config_.layers, layer,
                    oscar::detail::concat("0 to ", config_.layers - 1));
    OSCAR_CHECK_ARG(tokens >= 1, tokens, ">= 1");
    std::vector<char> seen(static_cast<std::size_t>(options_.max_sequences), 0);
    for (slot_id slot : slots) {
      check_slot(slot);
      OSCAR_CHECK_ARG(!seen[static_cast<std::size_t>(slot)], slot, "each slot at most once per append");
      seen[static_cast<std::size_t>(slot)] = 1;
    }
    if (slots.empty()) return;

    // Plan: update the host bookkeeping in place, logging what changed, and undo it all if a
    // block or a table runs out, so that a failed append leaves the cache as it was. The
    // planning is O(work of the call) (single-token steps of many sequences are host-bound).
    const int bt = config_.block_tokens, H = config_.kv_heads;
    const std::size_t entries = slots.size() * static_cast<std::size_t>(H);
    std::vector<detail::entry_job> entry_jobs;
    std::vector<detail::chunk_job> chunk_jobs;
    std::vector<detail::table_write> writes;
    std::vector<std::pair<std::int32_t, std::int32_t>> copies;  // COW: from, to
    entry_jobs.reserve(entries);
    struct undo_entry {
      std::size_t e;
      std::size_t table_size;
      std::int32_t last;  ///< table.back() before a copy-on-write replaced it
      int tokens, sinks, window, start;
      index_t appended;
      bool calibrated;
    };
    std::vector<undo_entry> undo;
    std::vector<std::int32_t> taken, unshared;  // blocks allocated; shared blocks released
    undo.reserve(entries);
    auto allocate = [&]() -> std::int32_t {
      OSCAR_CHECK(!free_.empty(), errc::out_of_memory, "append needs more blocks than the ",
                  options_.pool_blocks,
                  " of the device pool; nothing was changed (free sequences, then retry)");
      const std::int32_t id = free_.back();
      free_.pop_back();
      refcount_[static_cast<std::size_t>(id)] = 1;
      taken.push_back(id);
      return id;
    };
    const auto undo_plan = [&]() noexcept {  // the cache as it was before the call
      for (auto it = undo.rbegin(); it != undo.rend(); ++it) {
        mirror_entry& m = mirror_[it->e];
        m.table.resize(it->table_size);
        if (!m.table.empty()) m.table.back() = it->last;
        m.tokens = it->tokens;
        m.sinks = it->sinks;
        m.window = it->window;
        m.start = it->start;
        m.appended = it->appended;
        m.calibrated = it->calibrated;
      }
      for (std::int32_t id : unshared) ++refcount_[static_cast<std::size_t>(id)];
      for (auto it = taken.rbegin(); it != taken.rend(); ++it) {
        refcount_[static_cast<std::size_t>(*it)] = 0;
        free_.push_back(*it);
      }
    };
    bool any_calibration = false;
    try {
      for (std::size_t b = 0; b < slots.size(); ++b) {
        for (int h = 0; h < H; ++h) {
          const std::size_t e = entry_index(slots[b], layer, h);
          mirror_entry& m = mirror_[e];
          undo.push_back({e, m.table.size(), m.table.empty() ? -1 : m.table.back(), m.tokens,
                          m.sinks, m.window, m.start, m.appended, m.calibrated});
          detail::entry_job job{};
          job.entry = static_cast<std::int64_t>(e);
          job.batch = static_cast<std::int32_t>(b);
          job.head = h;
          job.old_window = m.window;
          job.old_start = m.start;
          job.old_sinks = m.sinks;
          const index_t sink_room = std::max<index_t>(0, config_.sink_tokens - m.appended);
          job.to_sinks = static_cast<std::int32_t>(std::min<index_t>(sink_room, tokens));
          const int window = m.window + tokens - job.to_sinks;
          const int chunks = window >= config_.window_tokens + chunk_
                                 ? (window - config_.window_tokens) / chunk_
                                 : 0;
          job.aged = chunks * chunk_;
          job.calibrate = (chunks > 0 && !m.calibrated) ? 1 : 0;
          any_calibration = any_calibration || job.calibrate;
          job.first_chunk = static_cast<std::int32_t>(chunk_jobs.size());
          job.chunks = chunks;
          const int old_window = m.window, old_start = m.start;
          bool own_last = false;  // the last block was allocated or copied in this call
          for (int c = 0; c < chunks; ++c) {
            const int size = static_cast<int>(m.table.size());
            const int last_fill = size == 0 ? bt : m.tokens - (size - 1) * bt;
            if (last_fill == bt) {
              OSCAR_CHECK(size < max_blocks_, errc::out_of_memory, "append would give slot ",
                          slots[b], " layer ", layer, " head ", h, " more than ", max_blocks_,
                          " blocks (capacity max_tokens = ", options_.max_tokens,
                          "); nothing was changed");
              const std::int32_t id = allocate();
              m.table.push_back(id);
              writes.push_back({static_cast<std::int64_t>(e) * max_blocks_ + size, id});
              own_last = true;
            } else if (!own_last) {
              own_last = true;
              const std::int32_t shared = m.table.back();
              if (refcount_[static_cast<std::size_t>(shared)] > 1) {
                const std::int32_t id = allocate();  // copy-on-write of a shared last block
                --refcount_[static_cast<std::size_t>(shared)];
                unshared.push_back(shared);
                copies.emplace_back(shared, id);
                m.table.back() = id;
                writes.push_back({static_cast<std::int64_t>(e) * max_blocks_ + (size - 1), id});
              }
            }
            const int fill = m.tokens - (static_cast<int>(m.table.size()) - 1) * bt;
            detail::chunk_job cj{};
            cj.entry = job.entry;
            cj.batch = job.batch;
            cj.head = h;
            cj.first_row = c * chunk_;
            cj.old_window = old_window;
            cj.old_start = old_start;
            cj.to_sinks = job.to_sinks;
            cj.block = m.table.back();
            cj.offset = fill;
            chunk_jobs.push_back(cj);
            m.tokens += chunk_;
          }
          m.appended += tokens;
          m.sinks += job.to_sinks;
          m.window = window - job.aged;
          m.start = (m.start + job.aged) % window_capacity_;
          m.calibrated = m.calibrated || chunks > 0;
          job.new_blocks = static_cast<std::int32_t>(m.table.size());
          job.new_tokens = m.tokens;
          job.new_sinks = m.sinks;
          job.new_window = m.window;
          job.new_start = m.start;
          entry_jobs.push_back(job);
        }
      }
    } catch (...) {
      undo_plan();
      throw;
    }

    // Queue: metadata upload, copy-on-write copies, table writes, then the append kernels.
    std::vector<std::byte> bytes;
    const std::size_t at_entries =
        detail::put_bytes(bytes, std::span<const detail::entry_job>(entry_jobs));
    const std::size_t at_chunks =
        detail::put_bytes(bytes, std::span<const detail::chunk_job>(chunk_jobs));
    const std::size_t at_writes =
        detail::put_bytes(bytes, std::span<const detail::table_write>(writes));
    // Device-only scratch after the metadata: each chunk's key min/max ([chunks][2][d] floats),
    // then the calibration maxima ([entries][2] float bits).
    const std::size_t at_bounds = bytes.size();
    const std::size_t at_amax =
        at_bounds + chunk_jobs.size() * 2 * static_cast<std::size_t>(config_.head_dim) * sizeof(float);
    const std::size_t scratch_bytes = at_amax + entry_jobs.size() * 2 * sizeof(unsigned);
    std::byte* host = nullptr;
    try {  // device or pinned memory can run out here: nothing is queued yet
      if (scratch_.bytes() < scratch_bytes) scratch_ = device_buffer<std::byte>(scratch_bytes * 2);
      host = staging_.acquire(bytes.size());
    } catch (...) {
      undo_plan();
      throw;
    }
    std::memcpy(host, bytes.data(), bytes.size());
    copy_async(scratch_.data(), host, bytes.size(), stream);
    staging_.release(stream);
    const std::size_t summary_elems = 2 * static_cast<std::size_t>(config_.head_dim);
    for (const auto& [from, to] : copies) {
      copy_async(pool_.data() + static_cast<std::size_t>(to) * block_bytes_,
                 pool_.data() + static_cast<std::size_t>(from) * block_bytes_, block_bytes_,
                 stream);
      copy_async(key_bounds_.data() + static_cast<std::size_t>(to) * summary_elems,
                 key_bounds_.data() + static_cast<std::size_t>(from) * summary_elems,
                 summary_elems * sizeof(half), stream);
    }
    const auto* d_entries = reinterpret_cast<const detail::entry_job*>(scratch_.data() + at_entries);
    const auto* d_chunks = reinterpret_cast<const detail::chunk_job*>(scratch_.data() + at_chunks);
    const auto* d_writes = reinterpret_cast<const detail::table_write*>(scratch_.data() + at_writes);
    auto* d_bounds = reinterpret_cast<float*>(scratch_.data() + at_bounds);
    auto* d_amax = reinterpret_cast<unsigned*>(scratch_.data() + at_amax);
    // Blocks per entry for work over its rows: about 16 rows (two per warp) per block.
    const auto row_blocks = [&](int rows) {
      return static_cast<unsigned>(std::clamp((rows + 15) / 16, 1, 64));
    };
    const paged_kv_view<KV> cv = view();
    const detail::append_input<T> input{k, v, tokens};
    if (!writes.empty()) {
      const int count = static_cast<int>(writes.size());
      detail::table_write_kernel<<<std::min((count + 255) / 256, 1024), 256, 0, stream>>>(
          tables_.data(), d_writes, count);
      check_launch("table_write_kernel");
    }
    const int jobs = static_cast<int>(entry_jobs.size());
    if (any_calibration && detail::needs_calibration_v<KV>) {
      fill_async(d_amax, 0, entry_jobs.size() * 2 * sizeof(unsigned), stream);
      const int rows = window_capacity_ + tokens;  // at most, per entry
      detail::calibrate_kernel<KV, T><<<dim3(static_cast<unsigned>(jobs), row_blocks(rows)), 256, 0,
                                        stream>>>(cv, input, d_entries, d_amax);
      check_launch("calibrate_kernel");
      detail::calibrate_finish_kernel<KV><<<(jobs + 255) / 256, 256, 0, stream>>>(cv, d_entries, jobs,
                                                                                 d_amax);
      check_launch("calibrate_finish_kernel");
    }
    if (!chunk_jobs.empty()) {
      const std::size_t smem = detail::encode_chunk_shared_bytes<KV>(chunk_, config_.head_dim, layout_);
      allow_dynamic_shared(detail::encode_chunk_kernel<KV, T>, smem);
      detail::encode_chunk_kernel<KV, T>
          <<<static_cast<unsigned>(chunk_jobs.size()), detail::encode_threads, smem, stream>>>(
              cv, input, d_chunks, offsets_, d_bounds);
      check_launch("encode_chunk_kernel");
    }
    const int kept_rows = std::min(tokens, config_.sink_tokens + window_capacity_);  // at most
    detail::window_kernel<KV, T><<<dim3(static_cast<unsigned>(jobs), row_blocks(kept_rows)), 256, 0,
                                   stream>>>(cv, input, d_entries, d_chunks, d_bounds);
    check_launch("window_kernel");
  }

  // ---- upload from a host cache ---------------------------------------------------------------

  /// Copies sequences `seqs` of the host cache `host` (every layer) into new slots, returned in
  /// the same order. The host cache must have this cache's shape and hold `KV` in its low tier,
  /// every block in that tier, every block but the last full, no evicted tokens and no pruned
  /// heads. Blocks the host shares between the given sequences (forks) are shared on the device
  /// too.
  template <class Mid, class Full, class Alloc>
  std::vector<slot_id> upload(const cache::kv_cache<KV, Mid, Full, Alloc>& host,
                              std::span<const cache::seq_id> seqs, stream_t stream) {
    using host_cache = cache::kv_cache<KV, Mid, Full, Alloc>;
    static_assert(std::is_same_v<typename host_cache::window_type, half>,
                  "gpu::paged_kv keeps sinks and window in fp16: upload needs a host cache whose "
                  "full tier is not kv_fp32");
    const cache::cache_config& hc = host.config();
    OSCAR_CHECK(hc.layers == config_.layers && hc.kv_heads == config_.kv_heads &&
                    hc.head_dim == config_.head_dim && hc.block_tokens == config_.block_tokens &&
                    hc.sink_tokens == config_.sink_tokens &&
                    hc.window_tokens == config_.window_tokens,
                errc::invalid_argument,
                "host cache shape is not allowed (allowed: the device cache's layers, kv_heads, "
                "head_dim, block_tokens, sink_tokens and window_tokens)");
    std::size_t free_slots = 0;
    for (bool used : slots_) free_slots += used ? 0 : 1;
    OSCAR_CHECK(seqs.size() <= free_slots, errc::out_of_memory, "upload of ", seqs.size(),
                " sequences needs as many free slots; ", free_slots, " are free");
    for (cache::seq_id seq : seqs) {
      OSCAR_CHECK(host.contains(seq), errc::invalid_argument, "sequence id ", seq,
                  " is not allowed (allowed: a live sequence of the host cache)");
    }
    const int bt = config_.block_tokens, d = config_.head_dim;
    const auto& pool = host.pool(cache::tier::low);

    // Plan and validate everything first.
    std::vector<std::int32_t> free_copy = free_;
    std::map<cache::block_id, std::int32_t> fresh;  // host block -> device block
    std::vector<mirror_entry> planned;
    for (cache::seq_id seq : seqs) {
      for (int layer = 0; layer < config_.layers; ++layer) {
        for (int h = 0; h < config_.kv_heads; ++h) {
          OSCAR_CHECK(!host.pruned(seq, layer, h), errc::unsupported, "sequence ", seq,
                      " layer ", layer, " KV head ", h,
                      " is pruned (a running mean of values); upload is not allowed for pruned "
                      "heads (allowed: heads holding their tokens)");
          const auto ev = host.view(seq, layer, h);
          mirror_entry m;
          for (std::size_t i = 0; i < ev.slots.size(); ++i) {
            const cache::block_slot& s = ev.slots[i];
            OSCAR_CHECK(s.level == cache::tier::low, errc::unsupported, "upload: layer ", layer,
                        " head ", h, " has a block in tier ", cache::to_string(s.level),
                        "; the device cache holds the low tier only");
            const int fill = pool.fill(s.id);
            OSCAR_CHECK(fill == bt || i + 1 == ev.slots.size(), errc::unsupported,
                        "upload: a block other than the last is partly filled (compacted); the "
                        "device cache needs full blocks");
            for (int t = 0; t < cache::max_block_tokens; ++t) {
              OSCAR_CHECK(s.valid.test(static_cast<std::size_t>(t)) == (t < fill),
                          errc::unsupported, "upload: layer ", layer, " head ", h,
                          " has evicted tokens inside a block; the device cache has no masks");
            }
            auto it = fresh.find(s.id);
            if (it == fresh.end()) {
              OSCAR_CHECK(!free_copy.empty(), errc::out_of_memory,
                          "upload needs more blocks than the device pool has free (",
                          free_.size(), "); nothing was changed");
              it = fresh.emplace(s.id, free_copy.back()).first;
              free_copy.pop_back();
            }
            m.table.push_back(it->second);
            m.tokens += fill;
          }
          OSCAR_CHECK(static_cast<int>(m.table.size()) <= max_blocks_, errc::out_of_memory,
                      "upload: layer ", layer, " head ", h, " holds more than max_tokens = ",
                      options_.max_tokens, " tokens in blocks");
          m.sinks = static_cast<int>(ev.sink_k.size() / d);
          m.window = static_cast<int>(ev.window_k.size() / d);
          OSCAR_CHECK(m.window < window_capacity_, errc::unsupported,
                      "upload: the host window holds more rows than window_tokens + chunk");
          m.start = 0;
          m.calibrated = host.template params<2>(seq, layer, h).calibrated;
          // Sinks fill first, so fewer than sink_tokens sinks means nothing went further.
          m.appended = m.sinks < config_.sink_tokens ? m.sinks : m.sinks + m.tokens + m.window;
          planned.push_back(std::move(m));
        }
      }
    }
    std::vector<slot_id> out;
    for (std::size_t i = 0; i < seqs.size(); ++i) out.push_back(take_slot());

    // Stage: new blocks (converted), then per entry: state, table row, sinks, window.
    std::vector<std::byte> bytes;
    std::vector<std::pair<std::size_t, std::int32_t>> block_at;  // staging offset, device id
    std::vector<std::byte> converted(block_bytes_);
    std::vector<std::size_t> bounds_at;  // staging offset of each new block's key min, max
    std::vector<half> bounds(2 * static_cast<std::size_t>(d));
    for (const auto& [host_id, dev_id] : fresh) {
      convert_block(pool.data(host_id), converted.data());
      block_at.emplace_back(detail::put_bytes(bytes, std::span<const std::byte>(converted)), dev_id);
      std::copy(pool.key_min(host_id).begin(), pool.key_min(host_id).end(), bounds.begin());
      std::copy(pool.key_max(host_id).begin(), pool.key_max(host_id).end(), bounds.begin() + d);
      bounds_at.push_back(detail::put_bytes(bytes, std::span<const half>(bounds)));
    }
    struct entry_bytes {
      std::size_t state, table, sink_k, sink_v, window_k, window_v;
    };
    std::vector<entry_bytes> at;
    std::size_t i = 0;
    for (cache::seq_id seq : seqs) {
      for (int layer = 0; layer < config_.layers; ++layer) {
        for (int h = 0; h < config_.kv_heads; ++h, ++i) {
          const mirror_entry& m = planned[i];
          const auto ev = host.view(seq, layer, h);
          const auto& p = host.template params<2>(seq, layer, h);
          state st;
          st.blocks = static_cast<std::int32_t>(m.table.size());
          st.tokens = m.tokens;
          st.sinks = m.sinks;
          st.window = m.window;
          st.window_start = 0;
          st.calibrated = p.calibrated ? 1 : 0;
          st.key = p.key;
          st.value = p.value;
          entry_bytes eb{};
          eb.state = detail::put_bytes(bytes, std::span<const state>(&st, 1));
          eb.table = detail::put_bytes(bytes, std::span<const std::int32_t>(m.table));
          eb.sink_k = detail::put_bytes(bytes, ev.sink_k);
          eb.sink_v = detail::put_bytes(bytes, ev.sink_v);
          eb.window_k = detail::put_bytes(bytes, ev.window_k);
          eb.window_v = detail::put_bytes(bytes, ev.window_v);
          at.push_back(eb);
        }
      }
    }
    std::byte* host_bytes = staging_.acquire(bytes.size());
    std::memcpy(host_bytes, bytes.data(), bytes.size());
    for (std::size_t b = 0; b < block_at.size(); ++b) {
      const auto [offset, id] = block_at[b];
      copy_async(pool_.data() + static_cast<std::size_t>(id) * block_bytes_, host_bytes + offset,
                 block_bytes_, stream);
      copy_async(key_bounds_.data() + static_cast<std::size_t>(id) * bounds.size(),
                 host_bytes + bounds_at[b], bounds.size() * sizeof(half), stream);
    }
    i = 0;
    for (std::size_t q = 0; q < seqs.size(); ++q) {
      for (int layer = 0; layer < config_.layers; ++layer) {
        for (int h = 0; h < config_.kv_heads; ++h, ++i) {
          const mirror_entry& m = planned[i];
          const entry_bytes& eb = at[i];
          const std::size_t e = entry_index(out[q], layer, h);
          copy_async(entries_.data() + e, host_bytes + eb.state, sizeof(state), stream);
          copy_async(tables_.data() + e * max_blocks_, host_bytes + eb.table,
                     m.table.size() * sizeof(std::int32_t), stream);
          const std::size_t sink_elems = static_cast<std::size_t>(m.sinks) * d;
          const std::size_t window_elems = static_cast<std::size_t>(m.window) * d;
          copy_async(sink_k_.data() + e * config_.sink_tokens * d, host_bytes + eb.sink_k,
                     sink_elems * sizeof(half), stream);
          copy_async(sink_v_.data() + e * config_.sink_tokens * d, host_bytes + eb.sink_v,
                     sink_elems * sizeof(half), stream);
          copy_async(window_k_.data() + e * window_capacity_ * d, host_bytes + eb.window_k,
                     window_elems * sizeof(half), stream);
          copy_async(window_v_.data() + e * window_capacity_ * d, host_bytes + eb.window_v,
                     window_elems * sizeof(half), stream);
        }
      }
    }
    staging_.release(stream);

    free_ = std::move(free_copy);
    i = 0;
    for (std::size_t q = 0; q < seqs.size(); ++q) {
      for (int layer = 0; layer < config_.layers; ++layer) {
        for (int h = 0; h < config_.kv_heads; ++h, ++i) {
          for (std::int32_t id : planned[i].table) ++refcount_[static_cast<std::size_t>(id)];
          mirror_[entry_index(out[q], layer, h)] = std::move(planned[i]);
        }
      }
    }
    return out;
  }

  // ---- read back ------------------------------------------------------------------------------

  /// What one entry holds, on the host, in the host cache's terms: blocks in the native layout
  /// (an mma record converted back), fills, sinks and window rows oldest first, and params.
  struct entry_snapshot {
    std::vector<std::vector<std::byte>> blocks;  ///< native bytes of each block
    std::vector<int> fills;
    std::vector<std::vector<half>> key_bounds;  ///< per block: key min [head_dim], then max
    std::vector<half> sink_k, sink_v, window_k, window_v;  ///< [rows][head_dim]
    state device_state;
  };

  /// Copies an entry back to the host. Synchronizes `stream` (tests and export only).
  entry_snapshot read_entry(slot_id slot, int layer, int head, stream_t stream) const {
    const mirror_entry& m = mirror(slot, layer, head);
    const std::size_t e = entry_index(slot, layer, head);
    const int d = config_.head_dim;
    entry_snapshot snap;
    std::vector<std::int32_t> table(m.table.size());
    copy_async(&snap.device_state, entries_.data() + e, sizeof(state), stream);
    copy_async(table.data(), tables_.data() + e * max_blocks_, table.size() * sizeof(std::int32_t),
               stream);
    snap.sink_k.resize(static_cast<std::size_t>(config_.sink_tokens) * d);
    snap.sink_v.resize(snap.sink_k.size());
    std::vector<half> ring_k(static_cast<std::size_t>(window_capacity_) * d), ring_v(ring_k.size());
    copy_async(snap.sink_k.data(), sink_k_.data() + e * config_.sink_tokens * d,
               snap.sink_k.size() * sizeof(half), stream);
    copy_async(snap.sink_v.data(), sink_v_.data() + e * config_.sink_tokens * d,
               snap.sink_v.size() * sizeof(half), stream);
    copy_async(ring_k.data(), window_k_.data() + e * window_capacity_ * d,
               ring_k.size() * sizeof(half), stream);
    copy_async(ring_v.data(), window_v_.data() + e * window_capacity_ * d,
               ring_v.size() * sizeof(half), stream);
    synchronize(stream);
    std::vector<std::byte> raw(block_bytes_);
    for (std::size_t i = 0; i < table.size(); ++i) {
      copy_async(raw.data(), pool_.data() + static_cast<std::size_t>(table[i]) * block_bytes_,
                 block_bytes_, stream);
      synchronize(stream);
      snap.blocks.push_back(native_block(raw.data()));
      std::vector<half> kb(2 * static_cast<std::size_t>(d));
      copy_async(kb.data(), key_bounds_.data() + static_cast<std::size_t>(table[i]) * kb.size(),
                 kb.size() * sizeof(half), stream);
      synchronize(stream);
      snap.key_bounds.push_back(std::move(kb));
      snap.fills.push_back(i + 1 == table.size() ? m.tokens - static_cast<int>(i) * config_.block_tokens
                                                 : config_.block_tokens);
    }
    const state& st = snap.device_state;
    snap.sink_k.resize(static_cast<std::size_t>(st.sinks) * d);
    snap.sink_v.resize(static_cast<std::size_t>(st.sinks) * d);
    for (int r = 0; r < st.window; ++r) {
      const std::size_t row = static_cast<std::size_t>((st.window_start + r) % window_capacity_) * d;
      snap.window_k.insert(snap.window_k.end(), ring_k.begin() + row, ring_k.begin() + row + d);
      snap.window_v.insert(snap.window_v.end(), ring_v.begin() + row, ring_v.begin() + row + d);
    }
    return snap;
  }

  /// Native bytes of a block as this cache stores it (mma records converted back).
  [[nodiscard]] std::vector<std::byte> native_block(const std::byte* stored) const {
    std::vector<std::byte> out(native_block_bytes(), std::byte{0});
    if (layout_ == block_layout::native) {
      std::memcpy(out.data(), stored, block_bytes_);
      return out;
    }
    if constexpr (has_mma_layout_v<KV>) {
      using rec = record_layout<KV>;
      const int d = config_.head_dim;
      for (int r = 0; r < config_.block_tokens / rec::tokens; ++r) {
        auto* key_tile = reinterpret_cast<std::uint8_t*>(out.data()) + r * offsets_.key_tile_bytes;
        auto* value_tiles = reinterpret_cast<std::uint8_t*>(out.data()) + offsets_.key_bytes +
                            static_cast<std::size_t>(r) * rec::tokens * offsets_.value_tile_bytes;
        rec::unpack_record(reinterpret_cast<const std::uint8_t*>(stored) +
                               static_cast<std::size_t>(r) * rec::bytes(d),
                           d, key_tile, value_tiles);
      }
    }
    return out;
  }

  /// Bytes of a block in the host cache's layout (padded to 64 like the host pool).
  [[nodiscard]] std::size_t native_block_bytes() const noexcept {
    const std::size_t raw = offsets_.key_bytes + offsets_.value_tile_bytes *
                                                     (config_.block_tokens / offsets_.value_tile_tokens);
    return (raw + 63) / 64 * 64;
  }

 private:
  struct mirror_entry {
    std::vector<std::int32_t> table;
    int tokens = 0;
    int sinks = 0;
    int window = 0;
    int start = 0;
    index_t appended = 0;
    bool calibrated = false;
  };

  [[nodiscard]] std::size_t entry_index(slot_id slot, int layer, int head) const noexcept {
    return (static_cast<std::size_t>(slot) * config_.layers + layer) * config_.kv_heads + head;
  }
  const mirror_entry& mirror(slot_id slot, int layer, int head) const {
    check_slot(slot);
    OSCAR_CHECK_ARG(layer >= 0 && layer < config_.layers, layer,
                    oscar::detail::concat("0 to ", config_.layers - 1));
    OSCAR_CHECK_ARG(head >= 0 && head < config_.kv_heads, head,
                    oscar::detail::concat("0 to ", config_.kv_heads - 1));
    return mirror_[entry_index(slot, layer, head)];
  }

  slot_id take_slot() {
    for (std::size_t i = 0; i < slots_.size(); ++i) {
      if (!slots_[i]) {
        slots_[i] = true;
        return static_cast<slot_id>(i);
      }
    }
    OSCAR_CHECK(false, errc::out_of_memory, "all ", options_.max_sequences,
                " sequence slots of the device cache are in use (free one, or raise "
                "paged_kv_options::max_sequences)");
    return -1;
  }

  void release_block(std::int32_t id) noexcept {
    if (--refcount_[static_cast<std::size_t>(id)] == 0) free_.push_back(id);
  }

  /// Converts a host block (native layout) into this cache's layout.
  void convert_block(const std::byte* native, std::byte* out) const {
    if (layout_ == block_layout::native) {
      std::memcpy(out, native, block_bytes_);
      return;
    }
    if constexpr (has_mma_layout_v<KV>) {
      using rec = record_layout<KV>;
      const int d = config_.head_dim;
      for (int r = 0; r < config_.block_tokens / rec::tokens; ++r) {
        const auto* key_tile = reinterpret_cast<const std::uint8_t*>(native) + r * offsets_.key_tile_bytes;
        const auto* value_tiles = reinterpret_cast<const std::uint8_t*>(native) + offsets_.key_bytes +
                                  static_cast<std::size_t>(r) * rec::tokens * offsets_.value_tile_bytes;
        rec::pack_record(key_tile, value_tiles, d,
                         reinterpret_cast<std::uint8_t*>(out) + static_cast<std::size_t>(r) * rec::bytes(d));
      }
    }
  }

  cache::cache_config config_;
  paged_kv_options options_;
  block_layout layout_ = block_layout::native;
  detail::native_offsets offsets_{};
  int chunk_ = 1;
  std::size_t block_bytes_ = 0;
  int max_blocks_ = 0;
  int window_capacity_ = 0;
  std::size_t entry_count_ = 0;

  device_buffer<std::byte> pool_;
  device_buffer<std::int32_t> tables_;
  device_buffer<state> entries_;
  device_buffer<half> sink_k_, sink_v_, window_k_, window_v_;
  device_buffer<half> key_bounds_;  ///< [pool_blocks][2][head_dim]: key min, then max
  device_buffer<std::byte> scratch_;

  std::vector<std::uint32_t> refcount_;
  std::vector<std::int32_t> free_;
  std::vector<bool> slots_;
  std::vector<mirror_entry> mirror_;
  detail::staging staging_;
};

}  // namespace oscar::gpu
