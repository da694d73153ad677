// SPDX-License-Identifier: Apache-2.0
/// \file
/// What the GPU kernels see of a device-resident paged cache (`gpu::paged_kv`): plain structs of
/// device pointers and sizes, passed to kernels by value. Host-compilable, so it can be checked
/// and documented without a GPU compiler.
///
/// Storage, per (sequence slot, layer, KV head) *entry* `e = (slot * layers + layer) * kv_heads
/// + head`:
/// - `tables[e * max_blocks + i]`: block id of the i-th block of the entry; every block is full
///   (`block_tokens` tokens) except the last, which holds a multiple of the chunk;
/// - `entries[e]`: `entry_state` (counts, window ring position, the formats' per-head params);
/// - `sink_k/v[(e * sink_tokens + r) * head_dim + c]`: the fp16 sink rows, oldest first;
/// - `window_k/v[(e * window_capacity + r) * head_dim + c]`: the fp16 window, a ring of
///   `window_capacity` rows whose oldest row is `window_start`;
/// - `pool[id * block_bytes ...]`: block `id`, in the layout `layout` (see layout.hpp);
/// - `key_bounds[(id * 2 + 0) * head_dim + c]` / `[(id * 2 + 1) * head_dim + c]`: block `id`'s
///   per-channel min / max of its decoded keys in fp16 rounded outward, the host block pool's
///   `key_min` / `key_max` (for query-aware block skipping, `attention/skip.hpp`).
#pragma once

#include <cstddef>
#include <cstdint>

#include "oscar/backend/gpu/layout.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/format_traits.hpp"

namespace oscar::gpu {

/// Index of a sequence slot of a device cache.
using slot_id = std::int32_t;

/// Per-entry state the kernels read, in device memory.
template <class KV>
struct entry_state {
  using key_params = typename quant::format_traits<typename KV::key>::head_params;
  using value_params = typename quant::format_traits<typename KV::value>::head_params;
  std::int32_t blocks = 0;        ///< entries of the block table
  std::int32_t tokens = 0;        ///< tokens in the blocks
  std::int32_t sinks = 0;         ///< rows in the sink buffer
  std::int32_t window = 0;        ///< rows in the window ring
  std::int32_t window_start = 0;  ///< ring index of the oldest window row
  std::int32_t calibrated = 0;    ///< the per-head params below are set
  key_params key{};
  value_params value{};
};

/// A device cache as kernels see it.
template <class KV>
struct paged_kv_view {
  std::byte* pool = nullptr;
  std::size_t block_bytes = 0;
  std::int32_t* tables = nullptr;
  entry_state<KV>* entries = nullptr;
  half* sink_k = nullptr;
  half* sink_v = nullptr;
  half* window_k = nullptr;
  half* window_v = nullptr;
  half* key_bounds = nullptr;
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int block_tokens = 0;
  int sink_tokens = 0;
  int window_tokens = 0;
  int window_capacity = 0;  ///< ring rows: window_tokens + chunk
  int chunk = 0;            ///< tokens that age out of the window together
  int max_blocks = 0;       ///< table capacity per entry
  block_layout layout = block_layout::native;

  [[nodiscard]] OSCAR_HD_INLINE std::int64_t entry(slot_id slot, int layer, int head) const noexcept {
    return (static_cast<std::int64_t>(slot) * layers + layer) * kv_heads + head;
  }
  [[nodiscard]] OSCAR_HD_INLINE const std::byte* block(std::int32_t id) const noexcept {
    return pool + static_cast<std::size_t>(id) * block_bytes;
  }
  [[nodiscard]] OSCAR_HD_INLINE std::byte* block(std::int32_t id) noexcept {
    return pool + static_cast<std::size_t>(id) * block_bytes;
  }
  [[nodiscard]] OSCAR_HD_INLINE const half* sink_row(const half* base, std::int64_t e,
                                                     int row) const noexcept {
    return base + (e * sink_tokens + row) * head_dim;
  }
  /// Row `r` (0 = oldest) of the window ring of entry `e`.
  [[nodiscard]] OSCAR_HD_INLINE const half* window_row(const half* base, std::int64_t e,
                                                       int start, int r) const noexcept {
    return base + (e * window_capacity + (start + r) % window_capacity) * head_dim;
  }
};

}  // namespace oscar::gpu
