// SPDX-License-Identifier: Apache-2.0
/// \file
/// `block_pool`: a fixed number of equal-size blocks carved from one allocation, with a free
/// list, reference counts (for copy-on-write sharing), and per-block key summaries.
///
/// Blocks are identified by a 32-bit index. The pool knows nothing about formats: a block is
/// `block_bytes` opaque bytes plus its metadata, kept in parallel arrays:
/// - `fill(id)`: tokens written into the block so far;
/// - `key_min(id)`, `key_max(id)`: per channel, the smallest and largest decoded key value of
///   those tokens (as in Quest), so attention can bound `q . k` for the whole block. Stored in
///   fp16 rounded outward (min toward -Inf, max toward +Inf), so they remain valid bounds at
///   half the memory: 2 * 2 * head_dim bytes per block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "oscar/cache/allocator.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/numeric.hpp"

namespace oscar::cache {

using block_id = std::uint32_t;

template <block_allocator Allocator = host_allocator>
class block_pool {
 public:
  /// A pool of `capacity` blocks of `block_bytes` bytes, each with `summary_channels` floats of
  /// key min and of key max.
  block_pool(std::size_t block_bytes, std::size_t capacity, int summary_channels,
             Allocator allocator = {})
      : allocator_(std::move(allocator)),
        block_bytes_(block_bytes),
        capacity_(capacity),
        channels_(summary_channels) {
    OSCAR_CHECK_ARG(block_bytes > 0, block_bytes, "> 0");
    OSCAR_CHECK_ARG(capacity < std::numeric_limits<block_id>::max(), capacity,
                    "fewer than 2^32 - 1 blocks");
    if (capacity_ > 0) data_ = static_cast<std::byte*>(allocator_.allocate(block_bytes_ * capacity_));
    refcount_.assign(capacity_, 0);
    fill_.assign(capacity_, 0);
    summary_.assign(capacity_ * 2 * static_cast<std::size_t>(channels_), half(0.0f));
    free_.reserve(capacity_);
    for (std::size_t i = capacity_; i-- > 0;) free_.push_back(static_cast<block_id>(i));
  }

  block_pool(const block_pool&) = delete;
  block_pool& operator=(const block_pool&) = delete;
  ~block_pool() {
    if (data_) allocator_.deallocate(data_, block_bytes_ * capacity_);
  }

  [[nodiscard]] std::size_t block_bytes() const noexcept { return block_bytes_; }
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] std::size_t free_blocks() const noexcept { return free_.size(); }
  [[nodiscard]] std::size_t used_blocks() const noexcept { return capacity_ - free_.size(); }

  /// Takes a block off the free list with reference count 1, fill 0 and zeroed bytes (so no
  /// data of a freed sequence survives in it). Callers check `free_blocks()` first; an empty
  /// pool here is a logic error reported as out_of_memory.
  block_id allocate() {
    OSCAR_CHECK(!free_.empty(), errc::out_of_memory, "block pool of ", capacity_,
                " blocks is full");
    const block_id id = free_.back();
    free_.pop_back();
    refcount_[id] = 1;
    fill_[id] = 0;
    std::memset(data(id), 0, block_bytes_);
    return id;
  }

  void retain(block_id id) noexcept { ++refcount_[id]; }

  /// Drops one reference; the block returns to the free list when none remain.
  void release(block_id id) noexcept {
    if (--refcount_[id] == 0) free_.push_back(id);
  }

  [[nodiscard]] std::uint32_t refcount(block_id id) const noexcept { return refcount_[id]; }
  [[nodiscard]] bool shared(block_id id) const noexcept { return refcount_[id] > 1; }

  [[nodiscard]] std::byte* data(block_id id) noexcept { return data_ + std::size_t{id} * block_bytes_; }
  [[nodiscard]] const std::byte* data(block_id id) const noexcept {
    return data_ + std::size_t{id} * block_bytes_;
  }

  [[nodiscard]] int fill(block_id id) const noexcept { return fill_[id]; }
  void set_fill(block_id id, int tokens) noexcept { fill_[id] = tokens; }

  /// Per-channel lower bound of the block's decoded keys (fp16, rounded toward -Inf).
  [[nodiscard]] std::span<const half> key_min(block_id id) const noexcept {
    return {summary_.data() + summary_offset(id), channel_count()};
  }
  /// Per-channel upper bound of the block's decoded keys (fp16, rounded toward +Inf).
  [[nodiscard]] std::span<const half> key_max(block_id id) const noexcept {
    return {summary_.data() + summary_offset(id) + channel_count(), channel_count()};
  }
  /// Stores per-channel bounds `lo`/`hi` (head_dim floats each), rounded outward to fp16.
  void set_key_bounds(block_id id, std::span<const float> lo, std::span<const float> hi) noexcept {
    half* out = summary_.data() + summary_offset(id);
    for (std::size_t c = 0; c < channel_count(); ++c) {
      out[c] = half::from_bits(float_to_half_bits_down(lo[c]));
      out[channel_count() + c] = half::from_bits(float_to_half_bits_up(hi[c]));
    }
  }
  /// Bytes of key summary per block.
  [[nodiscard]] std::size_t summary_bytes() const noexcept {
    return 2 * channel_count() * sizeof(half);
  }

  /// Copies bytes, fill and summary of `from` into `to` (copy-on-write).
  void copy_block(block_id from, block_id to) noexcept {
    std::memcpy(data(to), data(from), block_bytes_);
    fill_[to] = fill_[from];
    std::memcpy(summary_.data() + summary_offset(to), summary_.data() + summary_offset(from),
                summary_bytes());
  }

 private:
  [[nodiscard]] std::size_t channel_count() const noexcept {
    return static_cast<std::size_t>(channels_);
  }
  /// Start of block `id`'s [min, max] summary, in size_t so large pools cannot overflow.
  [[nodiscard]] std::size_t summary_offset(block_id id) const noexcept {
    return std::size_t{id} * 2 * channel_count();
  }

  Allocator allocator_;
  std::size_t block_bytes_;
  std::size_t capacity_;
  int channels_;
  std::byte* data_ = nullptr;
  std::vector<std::uint32_t> refcount_;
  std::vector<int> fill_;
  std::vector<half> summary_;  // per block: [min[channels], max[channels]]
  std::vector<block_id> free_;  // a stack: the lowest ids come out first
};

}  // namespace oscar::cache
