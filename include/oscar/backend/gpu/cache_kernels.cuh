// SPDX-License-Identifier: Apache-2.0
/// \file
/// Kernels that write a device paged cache (`gpu::paged_kv`): the append path, in three
/// stream-ordered launches, and the small table scatter.
///
/// An append of `n` tokens to each of a batch of sequences (one layer) does, per entry, what
/// `cache::kv_cache::append` does on the host, bit for bit:
///   1. `calibrate_kernel`: for entries whose first chunk ages out now, the formats' per-head
///      params from the whole window at that moment (old window rows, then the new rows, as
///      fp16), as `format_traits<F>::calibrate` does;
///   2. `encode_chunk_kernel`: one block of threads per aging chunk: its rows (from the window
///      ring or straight from the input, rounded to fp16 like the host window) are quantized
///      with the formats' own `encode_group`/`encode_tile` and written into the target block,
///      in the native layout or as an mma record;
///   3. `window_kernel`: the new rows that stay go to the sinks or the window ring, and the
///      entry's counts are updated.
/// Bit-identical results need device code compiled without floating-point contraction (nvcc
/// `-fmad=false`, clang `-ffp-contract=off`), as the host reference is.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/backend/gpu/warp.cuh"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/quant/scale.hpp"

namespace oscar::gpu::detail {

// ---- jobs (built on the host, read by the kernels) ---------------------------------------------

/// One chunk that ages out of an entry's window into a block.
struct chunk_job {
  std::int64_t entry;       ///< entry index in the cache
  std::int32_t batch;       ///< row of the input batch
  std::int32_t head;        ///< KV head (input column)
  std::int32_t first_row;   ///< window row of the chunk's first token (window before aging)
  std::int32_t old_window;  ///< window rows held in the ring before the call
  std::int32_t old_start;   ///< ring index of the oldest of them
  std::int32_t to_sinks;    ///< new tokens of this call that went to the sinks
  std::int32_t block;       ///< target block id
  std::int32_t offset;      ///< token offset of the chunk inside the block
};

/// Per-entry bookkeeping of one append call.
struct entry_job {
  std::int64_t entry;
  std::int32_t batch;
  std::int32_t head;
  std::int32_t old_window;
  std::int32_t old_start;
  std::int32_t old_sinks;
  std::int32_t to_sinks;
  std::int32_t aged;           ///< rows that aged out (chunks * chunk)
  std::int32_t calibrate;      ///< 1: calibrate over the window before aging
  std::int32_t new_blocks;     ///< table length after the call
  std::int32_t new_tokens;     ///< tokens in blocks after the call
  std::int32_t new_sinks;
  std::int32_t new_window;
  std::int32_t new_start;
};

/// A block-table update: `tables[index] = block`.
struct table_write {
  std::int64_t index;
  std::int32_t block;
  std::int32_t pad = 0;
};

/// The input of an append: `[batch][tokens][kv_heads][head_dim]` elements of `T` on the device.
template <class T>
struct append_input {
  const T* k;
  const T* v;
  int tokens;  ///< n: new tokens per sequence
};

/// fp16 rounding of a new row, exactly as the host window stores it.
OSCAR_HD_INLINE float window_round(float x) noexcept {
  return static_cast<float>(half(quant::clamp_finite(x, 65504.0f)));
}

/// Row `r` of the window as it stands during the call, before aging: old ring rows first,
/// then the new rows that did not go to the sinks. Element `c`, as float.
template <class KV, class T>
OSCAR_DEVICE OSCAR_FORCEINLINE float window_value(const paged_kv_view<KV>& cache,
                                                  const append_input<T>& in, bool values,
                                                  std::int64_t entry, int batch, int head,
                                                  int old_window, int old_start, int to_sinks,
                                                  int r, int c) {
  if (r < old_window) {
    const half* row = cache.window_row(values ? cache.window_v : cache.window_k, entry,
                                       old_start, r);
    return static_cast<float>(row[c]);
  }
  const int token = to_sinks + (r - old_window);
  const T* src = values ? in.v : in.k;
  const std::size_t at =
      ((static_cast<std::size_t>(batch) * in.tokens + token) * cache.kv_heads + head) *
          cache.head_dim + c;
  return window_round(static_cast<float>(src[at]));
}

/// The per-head params `format_traits<F>::calibrate` returns for data whose absolute maximum
/// is `amax` (every shipped format's calibration depends on the absolute maximum alone).
template <class F>
OSCAR_DEVICE OSCAR_FORCEINLINE typename quant::format_traits<F>::head_params
calibrate_from_amax(float amax) {
  using traits = quant::format_traits<F>;
  using params = typename traits::head_params;
  if constexpr (std::is_same_v<params, quant::fpq_head_params>) {
    if (!(amax > 0.0f)) return {};
    const int e = ilogbf(amax / traits::level(traits::levels - 1)) - 4;
    return {static_cast<std::int8_t>(e < -100 ? -100 : e > 100 ? 100 : e)};
  } else if constexpr (std::is_same_v<params, quant::e4m3_head_params>) {
    return {amax > 0.0f ? amax / fp8_e4m3_max : 1.0f};
  } else {
    static_assert(std::is_empty_v<params>,
                  "gpu::paged_kv: a format with per-head params other than fpq's e4m3 exponent "
                  "or e4m3's scale needs its device calibration added here");
    (void)amax;
    return {};
  }
}

template <class KV>
inline constexpr bool needs_calibration_v =
    !std::is_empty_v<typename quant::format_traits<typename KV::key>::head_params> ||
    !std::is_empty_v<typename quant::format_traits<typename KV::value>::head_params>;

// ---- 1. calibration --------------------------------------------------------------------------

template <class KV, class T>
__global__ void calibrate_kernel(paged_kv_view<KV> cache, append_input<T> in,
                                 const entry_job* jobs, int count) {
  __shared__ float partial[2][32];
  const entry_job job = jobs[blockIdx.x];
  if (!job.calibrate) return;  // uniform per block
  const int rows = job.old_window + in.tokens - job.to_sinks;
  const int d = cache.head_dim;
  float amax[2] = {0.0f, 0.0f};
  for (int i = threadIdx.x; i < rows * d; i += blockDim.x) {
    for (int kv = 0; kv < 2; ++kv) {
      const float x = window_value(cache, in, kv == 1, job.entry, job.batch, job.head,
                                   job.old_window, job.old_start, job.to_sinks, i / d, i % d);
      const float m = x < 0 ? -x : x;
      amax[kv] = m > amax[kv] ? m : amax[kv];
    }
  }
  for (int kv = 0; kv < 2; ++kv) {
    amax[kv] = warp_max(amax[kv]);
    if (lane_id() == 0) partial[kv][warp_id()] = amax[kv];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = (blockDim.x + warp_size - 1) / warp_size;
    float m[2] = {0.0f, 0.0f};
    for (int kv = 0; kv < 2; ++kv)
      for (int w = 0; w < warps; ++w) m[kv] = partial[kv][w] > m[kv] ? partial[kv][w] : m[kv];
    entry_state<KV>& e = cache.entries[job.entry];
    e.key = calibrate_from_amax<typename KV::key>(m[0]);
    e.value = calibrate_from_amax<typename KV::value>(m[1]);
    e.calibrated = 1;
  }
  (void)count;
}

// ---- 2. encoding ------------------------------------------------------------------------------

template <class F>
struct fpq_traits_of : std::false_type {};
template <quant::fpq_config C>
struct fpq_traits_of<quant::fpq<C>> : std::true_type {};

/// Encodes the `chunk` rows in `x` ([chunk][d] floats in shared memory; rotated in place when
/// the format rotates) with format F, writing its tiles to `out`: tile i at `out + tile_at(i)`
/// bytes. Every thread of the block takes part; ends with a barrier.
template <class F, class TileAt>
OSCAR_DEVICE void encode_rows(float* x, int chunk, int d,
                              const typename quant::format_traits<F>::head_params& p,
                              TileAt tile_at) {
  using traits = quant::format_traits<F>;
  using block = typename traits::block;
  constexpr int tile_tokens = quant::tokens_per_tile<F>();
  if constexpr (fpq_traits_of<F>::value) {
    if constexpr (traits::rotated) {
      for (int r = threadIdx.x; r < chunk; r += blockDim.x) rotate_unchecked(x + r * d, d);
      __syncthreads();
    }
    constexpr int group = traits::group;
    if constexpr (traits::axis == quant::group_axis::tokens) {
      // Tile i covers rows [i * group, (i + 1) * group); its block c is channel c.
      const int items = (chunk / group) * d;
      for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int tile = item / d, c = item % d;
        float values[group];
        for (int t = 0; t < group; ++t) values[t] = x[(tile * group + t) * d + c];
        auto* out = reinterpret_cast<block*>(tile_at(tile));
        traits::encode_group(values, p, out[c]);
      }
    } else {
      const int per_row = d / group;
      const int items = chunk * per_row;
      for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int row = item / per_row, g = item % per_row;
        auto* out = reinterpret_cast<block*>(tile_at(row));
        traits::encode_group(x + row * d + g * group, p, out[g]);
      }
    }
  } else {
    for (int tile = threadIdx.x; tile < chunk / tile_tokens; tile += blockDim.x) {
      traits::encode_tile(x + tile * tile_tokens * d, d, p,
                          reinterpret_cast<block*>(tile_at(tile)));
    }
  }
  __syncthreads();
}

/// Shared memory of `encode_chunk_kernel`: the rows as floats, then (mma layout) the native
/// bytes of the chunk (one record's worth).
template <class KV>
inline std::size_t encode_chunk_shared_bytes(int chunk, int d, block_layout layout) {
  std::size_t bytes = static_cast<std::size_t>(chunk) * d * sizeof(float);
  if constexpr (has_mma_layout_v<KV>) {
    if (layout == block_layout::mma) bytes += static_cast<std::size_t>(record_layout<KV>::bytes(d));
  }
  return bytes;
}

/// Where the tiles of a chunk go inside a native block (the host's `tier_layout`).
struct native_offsets {
  std::size_t key_tile_bytes;
  std::size_t value_tile_bytes;
  std::size_t key_bytes;
  int key_tile_tokens;
  int value_tile_tokens;
};

template <class KV, class T>
__global__ void encode_chunk_kernel(paged_kv_view<KV> cache, append_input<T> in,
                                    const chunk_job* jobs, native_offsets lay) {
  using K = typename KV::key;
  using V = typename KV::value;
  extern __shared__ __align__(16) unsigned char encode_smem[];
  const chunk_job job = jobs[blockIdx.x];
  const int d = cache.head_dim;
  const int chunk = cache.chunk;
  float* x = reinterpret_cast<float*>(encode_smem);
  std::uint8_t* native = encode_smem + static_cast<std::size_t>(chunk) * d * sizeof(float);
  std::byte* block = cache.block(job.block);
  const entry_state<KV>& state = cache.entries[job.entry];
  const bool mma = cache.layout == block_layout::mma;

  for (int kv = 0; kv < 2; ++kv) {
    for (int i = threadIdx.x; i < chunk * d; i += blockDim.x) {
      x[i] = window_value(cache, in, kv == 1, job.entry, job.batch, job.head, job.old_window,
                          job.old_start, job.to_sinks, job.first_row + i / d, i % d);
    }
    __syncthreads();
    if (kv == 0) {
      const auto key_params = state.key;
      encode_rows<K>(x, chunk, d, key_params, [&](int tile) -> void* {
        if (mma) return native + tile * lay.key_tile_bytes;
        return block + ((job.offset + tile * lay.key_tile_tokens) / lay.key_tile_tokens) *
                           lay.key_tile_bytes;
      });
    } else {
      const auto value_params = state.value;
      encode_rows<V>(x, chunk, d, value_params, [&](int tile) -> void* {
        if (mma) return native + lay.key_tile_bytes + tile * lay.value_tile_bytes;
        return block + lay.key_bytes +
               ((job.offset + tile * lay.value_tile_tokens) / lay.value_tile_tokens) *
                   lay.value_tile_bytes;
      });
    }
  }
  if constexpr (has_mma_layout_v<KV>) {
    if (mma) {  // the chunk is one record (record_layout<KV>::tokens tokens)
      using rec = record_layout<KV>;
      auto* record = reinterpret_cast<std::uint8_t*>(block) +
                     static_cast<std::size_t>(job.offset / rec::tokens) * rec::bytes(d);
      const std::uint8_t* key_tile = native;
      const std::uint8_t* value_tiles = native + lay.key_tile_bytes;
      for (int item = threadIdx.x; item < rec::pack_items(d); item += blockDim.x) {
        rec::pack_item(key_tile, value_tiles, d, item, record);
      }
    }
  }
}

// ---- 3. window and counts ------------------------------------------------------------------------

template <class KV, class T>
__global__ void window_kernel(paged_kv_view<KV> cache, append_input<T> in,
                              const entry_job* jobs) {
  const entry_job job = jobs[blockIdx.x];
  const int d = cache.head_dim;
  for (int i = threadIdx.x; i < in.tokens * d; i += blockDim.x) {
    const int token = i / d, c = i % d;
    const std::size_t at =
        ((static_cast<std::size_t>(job.batch) * in.tokens + token) * cache.kv_heads + job.head) *
            d + c;
    const half hk(quant::clamp_finite(static_cast<float>(in.k[at]), 65504.0f));
    const half hv(quant::clamp_finite(static_cast<float>(in.v[at]), 65504.0f));
    if (token < job.to_sinks) {
      const std::int64_t row = job.entry * cache.sink_tokens + job.old_sinks + token;
      cache.sink_k[row * d + c] = hk;
      cache.sink_v[row * d + c] = hv;
    } else {
      const int r = job.old_window + token - job.to_sinks;  // window row before aging
      if (r < job.aged) continue;                            // aged out straight from the input
      const std::int64_t row =
          job.entry * cache.window_capacity + (job.old_start + r) % cache.window_capacity;
      cache.window_k[row * d + c] = hk;
      cache.window_v[row * d + c] = hv;
    }
  }
  if (threadIdx.x == 0) {
    entry_state<KV>& e = cache.entries[job.entry];
    e.blocks = job.new_blocks;
    e.tokens = job.new_tokens;
    e.sinks = job.new_sinks;
    e.window = job.new_window;
    e.window_start = job.new_start;
  }
}

/// `tables[w.index] = w.block` for each write.
template <int = 0>
__global__ void table_write_kernel(std::int32_t* tables, const table_write* writes,
                                          int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    tables[writes[i].index] = writes[i].block;
  }
}

}  // namespace oscar::gpu::detail
