// SPDX-License-Identifier: Apache-2.0
/// \file
/// Kernels that write a device paged cache (`gpu::paged_kv`): the append path, in up to four
/// stream-ordered launches, and the small table scatter.
///
/// An append of `n` tokens to each of a batch of sequences (one layer) does, per entry, what
/// `cache::kv_cache::append` does on the host, bit for bit:
///   1. `calibrate_kernel` + `calibrate_finish_kernel`: for entries whose first chunk ages out
///      now, the formats' per-head params from the whole window at that moment (old window
///      rows, then the new rows, as fp16), as `format_traits<F>::calibrate` does;
///   2. `encode_chunk_kernel`: one block of 256 threads per aging chunk: its rows (from the
///      window ring or straight from the input, rounded to fp16 like the host window) are
///      staged in shared memory and quantized by all threads together. fpq formats (FP2+,
///      FP4+, KIVI) go through `encode_fpq_parallel`, which reproduces `encode_group` bit for
///      bit with the work spread over groups, scale candidates and code bytes; other formats
///      run their `encode_tile`, a thread per row. The bytes go into the target block, in the
///      native layout or as an mma record (layout.hpp's `pack_item`), and the chunk's
///      per-channel key min/max (decoded keys) into a scratch array;
///   3. `window_kernel`: the new rows that stay go to the sinks or the window ring, the key
///      summaries of the blocks written are updated from the chunks' min/max in token order,
///      and the entry's counts are updated.
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
  std::int32_t first_chunk;    ///< index of the entry's first chunk job of this call
  std::int32_t chunks;         ///< chunk jobs of the entry in this call (consecutive)
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

/// An fp16 value as float, with the hardware conversion where there is one (exact).
OSCAR_DEVICE OSCAR_FORCEINLINE float half_to_float(half h) noexcept {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
#else
  return static_cast<float>(h);
#endif
}

/// A staged element as float (fp16 staging: exact).
OSCAR_DEVICE OSCAR_FORCEINLINE float staged(float x) noexcept { return x; }
OSCAR_DEVICE OSCAR_FORCEINLINE float staged(half x) noexcept { return half_to_float(x); }

/// A window-ring element (fp16) staged as E.
template <class E>
OSCAR_DEVICE OSCAR_FORCEINLINE E stage_ring(half x) noexcept {
  if constexpr (std::is_same_v<E, half>) {
    return x;
  } else {
    return staged(x);
  }
}

/// An input element staged as E: rounded to fp16 as the host window stores it (a no-op for
/// fp16 input).
template <class E, class T>
OSCAR_DEVICE OSCAR_FORCEINLINE E stage_input(T x) noexcept {
  if constexpr (std::is_same_v<T, half>) {
    return stage_ring<E>(x);
  } else {
    const float r = window_round(static_cast<float>(x));
    if constexpr (std::is_same_v<E, half>) {
      return half(r);  // exact: r is an fp16 value
    } else {
      return r;
    }
  }
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

/// Per entry and share of its window (`jobs[blockIdx.x]`, share `blockIdx.y` of `gridDim.y`):
/// the absolute maxima of the window's keys and values at the moment its first chunk ages out
/// (old window rows, then the new rows, as fp16), folded into `amax[2 * blockIdx.x + {0, 1}]`
/// (float bits; a maximum of non-negative floats is the maximum of their bits; zeroed before).
template <class KV, class T>
__global__ void calibrate_kernel(paged_kv_view<KV> cache, append_input<T> in,
                                 const entry_job* jobs, unsigned* amax_bits) {
  __shared__ float partial[2][32];
  const entry_job job = jobs[blockIdx.x];
  if (!job.calibrate) return;  // uniform per block
  const int rows = job.old_window + in.tokens - job.to_sinks;
  const int d = cache.head_dim;
  // |x| of the raw input: rounding to fp16 is monotone and symmetric, so the maximum of the
  // rounded magnitudes is the rounded maximum (applied once below).
  float amax[2] = {0.0f, 0.0f};  // never -0: only a larger magnitude replaces it
  const int warps = static_cast<int>(blockDim.x) / warp_size;
  for (int r = blockIdx.y * warps + warp_id(); r < rows; r += gridDim.y * warps) {
    if (r < job.old_window) {
      const half* k = cache.window_row(cache.window_k, job.entry, job.old_start, r);
      const half* v = cache.window_row(cache.window_v, job.entry, job.old_start, r);
      for (int c = lane_id(); c < d; c += warp_size) {
        const float mk = fabsf(staged(k[c])), mv = fabsf(staged(v[c]));
        amax[0] = mk > amax[0] ? mk : amax[0];
        amax[1] = mv > amax[1] ? mv : amax[1];
      }
    } else {
      const int token = job.to_sinks + (r - job.old_window);
      const std::size_t at =
          ((static_cast<std::size_t>(job.batch) * in.tokens + token) * cache.kv_heads + job.head) * d;
      for (int c = lane_id(); c < d; c += warp_size) {
        const float mk = fabsf(static_cast<float>(in.k[at + c]));
        const float mv = fabsf(static_cast<float>(in.v[at + c]));
        amax[0] = mk > amax[0] ? mk : amax[0];
        amax[1] = mv > amax[1] ? mv : amax[1];
      }
    }
  }
  for (int kv = 0; kv < 2; ++kv) {
    amax[kv] = warp_max(amax[kv]);
    if (lane_id() == 0) partial[kv][warp_id()] = amax[kv];
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    const int kv = static_cast<int>(threadIdx.x);
    float m = 0.0f;
    for (int w = 0; w < warps; ++w) m = partial[kv][w] > m ? partial[kv][w] : m;
    m = window_round(m);  // as the window stores it
    atomicMax(amax_bits + 2 * blockIdx.x + kv, static_cast<unsigned>(oscar::detail::float_bits(m)));
  }
}

/// The per-head params of every entry that calibrates in this call, from the maxima
/// `calibrate_kernel` found, as `format_traits<F>::calibrate` computes them.
template <class KV>
__global__ void calibrate_finish_kernel(paged_kv_view<KV> cache, const entry_job* jobs, int count,
                                        const unsigned* amax_bits) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    if (!jobs[i].calibrate) continue;
    entry_state<KV>& e = cache.entries[jobs[i].entry];
    e.key = calibrate_from_amax<typename KV::key>(oscar::detail::bits_float(amax_bits[2 * i]));
    e.value = calibrate_from_amax<typename KV::value>(oscar::detail::bits_float(amax_bits[2 * i + 1]));
    e.calibrated = 1;
  }
}

// ---- 2. encoding ------------------------------------------------------------------------------

template <class F>
struct fpq_traits_of : std::false_type {};
template <quant::fpq_config C>
struct fpq_traits_of<quant::fpq<C>> : std::true_type {};

/// Threads of `encode_chunk_kernel`, and groups its fpq encoder takes per pass.
inline constexpr int encode_threads = 256;

/// How `encode_chunk_kernel` stages the rows of a chunk for format F in shared memory.
/// Formats whose groups run along tokens need the whole chunk at once: as fp16 when they do not
/// rotate (the rows are fp16 values, exactly), else as float. Formats with one-token tiles take
/// the chunk in passes of `rows_per_pass` float rows (rotated in place where they rotate). Row
/// strides carry 4 bytes of padding, so that a thread per row and a thread per channel both
/// touch distinct banks. This keeps the default FP2+ (128-token chunks, head_dim 128) under the
/// 64 KiB of an AMD workgroup.
template <class F>
struct chunk_staging {
  using traits = quant::format_traits<F>;
  static constexpr bool whole_chunk = traits::axis == quant::group_axis::tokens;
  static constexpr bool as_half = whole_chunk && !traits::rotated;
  using element = std::conditional_t<as_half, half, float>;
  static constexpr int rows_per_pass = 64;
  OSCAR_HD_INLINE static constexpr int stride(int d) noexcept { return as_half ? d + 2 : d + 1; }
  OSCAR_HD_INLINE static constexpr int pass_rows(int chunk) noexcept {
    return whole_chunk || chunk < rows_per_pass ? chunk : rows_per_pass;
  }
  OSCAR_HD_INLINE static constexpr std::size_t bytes(int chunk, int d) noexcept {
    return static_cast<std::size_t>(pass_rows(chunk)) * stride(d) * sizeof(element);
  }
};

/// Loads a head vector (`load(c)`, c < d = Per * warp_size; a warp, lane l holding elements
/// k * warp_size + l), rotates it and stores it to `out`: exactly `rotate_unchecked` (signs,
/// the butterflies of `fwht` stage by stage, the scale), each butterfly `a + b` / `a - b` on
/// the same two values, across lanes by shuffles and across a lane's registers in place.
template <int Per, class Load>
OSCAR_DEVICE OSCAR_FORCEINLINE void rotate_row(float* out, int d, Load load) {
  const int lane = lane_id();
  float v[Per];
#pragma unroll
  for (int k = 0; k < Per; ++k) {
    const int c = k * warp_size + lane;
    v[k] = c < d ? load(c) * rotation_sign(c) : 0.0f;
  }
  for (int len = 1; len < warp_size && len < d; len <<= 1) {
    const bool upper = (lane & len) != 0;
#pragma unroll
    for (int k = 0; k < Per; ++k) {
      const float o = shfl_xor(v[k], len);
      v[k] = upper ? o - v[k] : v[k] + o;
    }
  }
#pragma unroll
  for (int kk = 1; kk < Per; kk <<= 1) {
#pragma unroll
    for (int k = 0; k < Per; ++k) {
      if ((k & kk) == 0) {
        const float a = v[k], b = v[k + kk];
        v[k] = a + b;
        v[k + kk] = a - b;
      }
    }
  }
  const float scale = rotation_scale(d);
#pragma unroll
  for (int k = 0; k < Per; ++k) {
    const int c = k * warp_size + lane;
    if (c < d) out[c] = v[k] * scale;
  }
}

/// Shared scratch of the parallel fpq encoder: per group of the current pass, the fitted range,
/// the outliers, the error of every scale candidate, and the chosen scale and zero point.
struct group_scratch {
  float lo[encode_threads];
  float hi[encode_threads];
  float amax[encode_threads];
  float scale[encode_threads];
  float zero[encode_threads];
  std::uint8_t outlier[encode_threads][4];
  float error[quant::clip_candidates][encode_threads];
};

/// Where the elements of group `gi` of a chunk of `rows` rows sit in the staged rows
/// (`x[base + i * step]`), and which tile and block of the tile receive it. Consecutive groups
/// are consecutive channels (tokens axis) or rows (head_dim axis), so that threads taking
/// consecutive groups read distinct shared-memory banks.
template <class F>
struct group_place {
  int base, step, tile, block;
  OSCAR_DEVICE OSCAR_FORCEINLINE group_place(int gi, int d, int stride, int rows) noexcept {
    using traits = quant::format_traits<F>;
    constexpr int G = traits::group;
    if constexpr (traits::axis == quant::group_axis::tokens) {
      (void)rows;
      tile = gi / d;  // tile i covers rows [i G, (i + 1) G); its block c is channel c
      block = gi % d;
      base = tile * G * stride + block;
      step = stride;
    } else {
      (void)d;
      tile = gi % rows;  // one row per tile
      block = gi / rows;
      base = tile * stride + block * G;
      step = 1;
    }
  }
};

/// `decoded[nearest_code(v, t)]` in one select per threshold, with no run-time index into a
/// local array. The same value: a group's scale is >= 0 and the levels increase, so the decoded
/// levels and the thresholds (midpoints, rounded monotonically) never decrease, and the
/// thresholds below `v` are a prefix t[0..q) whose length q is the nearest code.
template <int Levels>
OSCAR_DEVICE OSCAR_FORCEINLINE float nearest_level(float v, const float* t,
                                                   const float* decoded) noexcept {
  float r = decoded[0];
#pragma unroll
  for (int j = 0; j + 1 < Levels; ++j) r = v > t[j] ? decoded[j + 1] : r;
  return r;
}

/// Scale and zero point of clipping candidate `k` for a group whose fitted range is lo/hi/amax:
/// exactly the arithmetic of `format_traits<fpq<C>>::encode_group`.
template <class F>
OSCAR_DEVICE OSCAR_FORCEINLINE void candidate_scale(
    int k, float lo, float hi, float amax,
    const typename quant::format_traits<F>::head_params& p, float& scale, float& zero) noexcept {
  using traits = quant::format_traits<F>;
  constexpr float level_min = traits::level(0);
  constexpr float level_max = traits::level(traits::levels - 1);
  const float ratio = quant::clip_ratio(k);
  scale = 0.0f;
  zero = 0.0f;
  if constexpr (traits::config.zero_point) {
    (void)amax;
    const float half_range = (hi - lo) * 0.5f * ratio;
    const float mid = (hi + lo) * 0.5f;
    scale = traits::round_scale((half_range + half_range) / (level_max - level_min), p);
    zero = quant::round_to_scale<traits::config.scale>((mid - half_range) - scale * level_min);
  } else {
    (void)lo;
    (void)hi;
    scale = traits::round_scale(amax * ratio / level_max, p);
  }
}

/// Encodes the `rows` staged rows in `x` (row stride `stride`, rotated already when the format
/// rotates) with fpq format F, all threads of the block together, writing block `b` of tile
/// `i` at `tile_at(i) + b * sizeof(block)`. Produces the bytes of
/// `format_traits<F>::encode_group`, bit for bit: each group's outliers and range are found by
/// one thread in element order, each scale candidate's squared error is summed by one thread in
/// element order (candidates run in parallel), the winner is picked in candidate order, and the
/// codes are packed a byte per thread. Ends with a barrier.
template <class F, class E, class TileAt>
OSCAR_DEVICE void encode_fpq_parallel(const E* x, int stride, int rows, int d,
                                      const typename quant::format_traits<F>::head_params& p,
                                      group_scratch& sc, TileAt tile_at) {
  using traits = quant::format_traits<F>;
  using block = typename traits::block;
  constexpr int G = traits::group;
  constexpr int outliers = traits::config.outliers;
  constexpr int levels = traits::levels;
  constexpr int candidates = traits::config.search_scale ? quant::clip_candidates : 1;
  constexpr int per_byte = 8 / traits::bits;
  constexpr int code_bytes = G / per_byte;
  const int groups = traits::axis == quant::group_axis::tokens ? (rows / G) * d : rows * (d / G);
  const int tid = static_cast<int>(threadIdx.x), nt = static_cast<int>(blockDim.x);
  const auto out_of = [&](const group_place<F>& g) -> std::uint8_t* {
    return reinterpret_cast<block*>(tile_at(g.tile))[g.block].bytes;
  };
  // Outlier indices live in registers (compile-time indices only); the scratch keeps a copy.
  const auto is_outlier = [&](const int* o, int i) {
    bool r = false;
#pragma unroll
    for (int k = 0; k < outliers; ++k) r = r || o[k] == i;
    return r;
  };
  for (int first = 0; first < groups; first += encode_threads) {
    const int count = groups - first < encode_threads ? groups - first : encode_threads;
    // A: outliers (largest |x| first, ties to the lower index) and the range of the rest.
    for (int gl = tid; gl < count; gl += nt) {
      const group_place<F> g(first + gl, d, stride, rows);
      const E* v = x + g.base;
      std::uint8_t* bytes = out_of(g);
      int o[4] = {-1, -1, -1, -1};
#pragma unroll
      for (int k = 0; k < outliers; ++k) {
        int best = -1;
        float best_mag = -1.0f;
        for (int i = 0; i < G; ++i) {
          const float e = staged(v[i * g.step]);
          const float mag = e < 0 ? -e : e;
          if (!is_outlier(o, i) && mag > best_mag) {
            best = i;
            best_mag = mag;
          }
        }
        o[k] = best;
        const std::uint16_t h =
            float_to_half_bits(quant::clamp_finite(staged(v[best * g.step]), 65504.0f));
        bytes[traits::outlier_value_offset + 2 * k] = static_cast<std::uint8_t>(h & 0xffu);
        bytes[traits::outlier_value_offset + 2 * k + 1] = static_cast<std::uint8_t>(h >> 8);
        bytes[traits::outlier_index_offset + k] = static_cast<std::uint8_t>(best);
      }
      float lo = 0.0f, hi = 0.0f, amax = 0.0f;
      bool first_kept = true;
      for (int i = 0; i < G; ++i) {
        if (is_outlier(o, i)) continue;
        const float e = staged(v[i * g.step]);
        lo = first_kept || e < lo ? e : lo;
        hi = first_kept || e > hi ? e : hi;
        const float mag = e < 0 ? -e : e;
        amax = mag > amax ? mag : amax;
        first_kept = false;
      }
      sc.lo[gl] = lo;
      sc.hi[gl] = hi;
      sc.amax[gl] = amax;
#pragma unroll
      for (int k = 0; k < 4; ++k) sc.outlier[gl][k] = static_cast<std::uint8_t>(o[k]);
    }
    __syncthreads();
    // B: the squared error of every (group, candidate), summed in element order.
    if constexpr (candidates > 1) {
      for (int item = tid; item < count * candidates; item += nt) {
        const int gl = item % count, k = item / count;
        const group_place<F> g(first + gl, d, stride, rows);
        const E* v = x + g.base;
        int o[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) o[k] = sc.outlier[gl][k];
        float scale, zero;
        candidate_scale<F>(k, sc.lo[gl], sc.hi[gl], sc.amax[gl], p, scale, zero);
        float t[levels - 1];
        traits::thresholds(scale, zero, t);
        float decoded[levels];
#pragma unroll
        for (int j = 0; j < levels; ++j) decoded[j] = traits::dequant(scale, zero, j);
        float error = 0.0f;
        for (int i = 0; i < G; ++i) {
          const float e = staged(v[i * g.step]);
          const float diff = e - nearest_level<levels>(e, t, decoded);
          error += is_outlier(o, i) ? 0.0f : diff * diff;
        }
        sc.error[k][gl] = error;
      }
      __syncthreads();
    }
    // C: the winner (smallest error, ties to the earlier candidate); scale and zero bytes.
    for (int gl = tid; gl < count; gl += nt) {
      int best = 0;
      if constexpr (candidates > 1) {
        float best_error = sc.error[0][gl];
        for (int k = 1; k < candidates; ++k) {
          if (sc.error[k][gl] < best_error) {
            best = k;
            best_error = sc.error[k][gl];
          }
        }
      }
      float scale, zero;
      candidate_scale<F>(best, sc.lo[gl], sc.hi[gl], sc.amax[gl], p, scale, zero);
      const group_place<F> g(first + gl, d, stride, rows);
      std::uint8_t* bytes = out_of(g);
      quant::store_scale<traits::config.scale>(bytes, scale * traits::exponent_factor(p, true));
      if constexpr (traits::config.zero_point) {
        quant::store_scale<traits::config.scale>(bytes + traits::zero_offset, zero);
      }
      sc.scale[gl] = scale;
      sc.zero[gl] = zero;
    }
    __syncthreads();
    // D: codes, one byte per thread (codes LSB first, as pack_codes).
    for (int item = tid; item < count * code_bytes; item += nt) {
      const int gl = item % count, byte = item / count;
      const group_place<F> g(first + gl, d, stride, rows);
      const E* v = x + g.base;
      float t[levels - 1];
      traits::thresholds(sc.scale[gl], sc.zero[gl], t);
      unsigned packed = 0;
#pragma unroll
      for (int j = 0; j < per_byte; ++j) {
        const int i = byte * per_byte + j;
        packed |= static_cast<unsigned>(traits::nearest_code(staged(v[i * g.step]), t))
                  << (traits::bits * j);
      }
      out_of(g)[traits::code_offset + byte] = static_cast<std::uint8_t>(packed);
    }
    __syncthreads();
  }
}

/// Where the tiles of a chunk go inside a native block (the host's `tier_layout`).
struct native_offsets {
  std::size_t key_tile_bytes;
  std::size_t value_tile_bytes;
  std::size_t key_bytes;
  int key_tile_tokens;
  int value_tile_tokens;
};

/// Shared memory of `encode_chunk_kernel`: the staged rows (the larger of the key and value
/// staging), the encoder's scratch, then (mma layout) the native bytes of the chunk.
template <class KV>
std::size_t encode_chunk_shared_bytes(int chunk, int d, block_layout layout) {
  const std::size_t k = chunk_staging<typename KV::key>::bytes(chunk, d);
  const std::size_t v = chunk_staging<typename KV::value>::bytes(chunk, d);
  std::size_t bytes = ((k > v ? k : v) + 15) / 16 * 16 + sizeof(group_scratch);
  if constexpr (has_mma_layout_v<KV>) {
    if (layout == block_layout::mma) bytes += static_cast<std::size_t>(record_layout<KV>::bytes(d));
  }
  return bytes;
}

/// Stages, encodes (format F, tiles at `tile_at(i)`, i counted from the chunk's first row) and,
/// for keys (`lo != nullptr`), bounds the rows of one chunk: per channel the min and max of its
/// decoded keys in token order (as `kv_cache::update_summary` scans them) into `lo`/`hi`.
/// All threads of the block; ends with a barrier.
template <class F, class KV, class T, class TileAt>
OSCAR_DEVICE void encode_part(const paged_kv_view<KV>& cache, const append_input<T>& in,
                              const chunk_job& job, bool values,
                              const typename quant::format_traits<F>::head_params& p,
                              unsigned char* stage, group_scratch& sc, TileAt tile_at, float* lo,
                              float* hi) {
  using traits = quant::format_traits<F>;
  using block = typename traits::block;
  using st = chunk_staging<F>;
  using E = typename st::element;
  const int d = cache.head_dim, chunk = cache.chunk;
  const int stride = st::stride(d), rows = st::pass_rows(chunk);
  E* x = reinterpret_cast<E*>(stage);
  float l = 0.0f, h = 0.0f;  // this thread's channel bounds (key summaries, one-token tiles)
  for (int r0 = 0; r0 < chunk; r0 += rows) {
    const int warps = static_cast<int>(blockDim.x) / warp_size;
    for (int r = warp_id(); r < rows; r += warps) {  // a warp per row: coalesced loads
      const int row = job.first_row + r0 + r;          // window row before aging
      E* out = x + r * stride;
      const half* ring = nullptr;
      const T* src = nullptr;
      if (row < job.old_window) {
        ring = cache.window_row(values ? cache.window_v : cache.window_k, job.entry, job.old_start,
                                row);
      } else {
        const int token = job.to_sinks + (row - job.old_window);
        src = (values ? in.v : in.k) +
              ((static_cast<std::size_t>(job.batch) * in.tokens + token) * cache.kv_heads +
               job.head) * d;
      }
      if constexpr (fpq_traits_of<F>::value && traits::rotated) {
        const auto load = [&](int c) {
          return ring ? staged(ring[c]) : stage_input<float>(src[c]);
        };
        switch (d / warp_size) {  // rotated while staged: bit for bit rotate_unchecked
          case 1: rotate_row<1>(out, d, load); break;
          case 2: rotate_row<2>(out, d, load); break;
          case 4: rotate_row<4>(out, d, load); break;
          default: rotate_row<8>(out, d, load); break;
        }
      } else if (ring) {
        for (int c = lane_id(); c < d; c += warp_size) out[c] = stage_ring<E>(ring[c]);
      } else {
        for (int c = lane_id(); c < d; c += warp_size) out[c] = stage_input<E>(src[c]);
      }
    }
    __syncthreads();
    const auto pass_tile = [&](int tile) { return tile_at(r0 + tile); };
    if constexpr (fpq_traits_of<F>::value) {
      encode_fpq_parallel<F>(static_cast<const E*>(x), stride, rows, d, p, sc, pass_tile);
    } else {
      static_assert(quant::tokens_per_tile<F>() == 1,
                    "gpu::paged_kv: formats other than fpq must have one-token tiles");
      for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        traits::encode_tile(x + r * stride, d, p, reinterpret_cast<block*>(pass_tile(r)));
      }
      __syncthreads();
    }
    if (lo == nullptr) continue;
    if constexpr (st::whole_chunk) {
      constexpr int G = traits::group;  // one group per channel and tile
      if constexpr (fpq_traits_of<F>::value && !traits::rotated) {
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
          float cl = 0.0f, ch = 0.0f;
          for (int tile = 0; tile < chunk / G; ++tile) {
            // The values decode_group gives, one at a time (no local array): code i at
            // zero + scale * level, replaced by the last outlier stored for index i.
            const std::uint8_t* bytes = reinterpret_cast<const block*>(tile_at(tile))[c].bytes;
            const float scale = quant::load_scale<traits::config.scale>(bytes) *
                                traits::exponent_factor(p, false);
            const float zero = traits::config.zero_point
                                   ? quant::load_scale<traits::config.scale>(bytes + traits::zero_offset)
                                   : 0.0f;
            for (int t = 0; t < G; ++t) {
              float e = traits::dequant(scale, zero, get_code<traits::bits>(bytes + traits::code_offset, t));
#pragma unroll
              for (int k = 0; k < traits::config.outliers; ++k) {
                if (bytes[traits::outlier_index_offset + k] == t) {
                  e = half_bits_to_float(static_cast<std::uint16_t>(
                      bytes[traits::outlier_value_offset + 2 * k] |
                      (bytes[traits::outlier_value_offset + 2 * k + 1] << 8)));
                }
              }
              cl = (tile == 0 && t == 0) || e < cl ? e : cl;
              ch = (tile == 0 && t == 0) || ch < e ? e : ch;
            }
          }
          lo[c] = cl;
          hi[c] = ch;
        }
      } else {  // rotated tiles along tokens: decode whole tiles (float staging) and scan
        float* y = reinterpret_cast<float*>(stage);
        for (int tile = threadIdx.x; tile < chunk / G; tile += blockDim.x) {
          traits::decode_tile(reinterpret_cast<const block*>(tile_at(tile)), d, p, y + tile * G * d);
        }
        __syncthreads();
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
          float cl = y[c], ch = y[c];
          for (int t = 0; t < chunk; ++t) {
            cl = y[t * d + c] < cl ? y[t * d + c] : cl;
            ch = ch < y[t * d + c] ? y[t * d + c] : ch;
          }
          lo[c] = cl;
          hi[c] = ch;
        }
      }
    } else {  // one-token tiles: decode this pass's rows over the staged ones, scan in order
      float* y = reinterpret_cast<float*>(stage);
      for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        traits::decode_tile(reinterpret_cast<const block*>(pass_tile(r)), d, p, y + r * stride);
      }
      __syncthreads();
      for (int c = threadIdx.x; c < d; c += blockDim.x) {  // d <= encode_threads: one channel
        for (int t = 0; t < rows; ++t) {
          const float e = y[t * stride + c];
          l = (r0 == 0 && t == 0) || e < l ? e : l;
          h = (r0 == 0 && t == 0) || h < e ? e : h;
        }
        if (r0 + rows >= chunk) {
          lo[c] = l;
          hi[c] = h;
        }
      }
    }
    __syncthreads();
  }
}

/// One block of `encode_threads` threads per aging chunk (`jobs[blockIdx.x]`): stages the
/// chunk's key rows (from the window ring or the input, rounded to fp16 as the host window
/// stores them), encodes them, writes the chunk's per-channel key min/max to
/// `bounds[blockIdx.x][2][d]` (merged into the block summary by `window_kernel`), then the
/// value rows; in the mma layout the native bytes are staged and packed into a record.
template <class KV, class T>
__global__ void __launch_bounds__(encode_threads)
    encode_chunk_kernel(paged_kv_view<KV> cache, append_input<T> in, const chunk_job* jobs,
                        native_offsets lay, float* bounds) {
  using K = typename KV::key;
  using V = typename KV::value;
  extern __shared__ __align__(16) unsigned char encode_smem[];
  const chunk_job job = jobs[blockIdx.x];
  const int d = cache.head_dim;
  const int chunk = cache.chunk;
  const std::size_t k_bytes = chunk_staging<K>::bytes(chunk, d);
  const std::size_t v_bytes = chunk_staging<V>::bytes(chunk, d);
  const std::size_t stage_bytes = ((k_bytes > v_bytes ? k_bytes : v_bytes) + 15) / 16 * 16;
  group_scratch& sc = *reinterpret_cast<group_scratch*>(encode_smem + stage_bytes);
  std::uint8_t* native = encode_smem + stage_bytes + sizeof(group_scratch);
  std::byte* block = cache.block(job.block);
  const entry_state<KV>& state = cache.entries[job.entry];
  const bool mma = cache.layout == block_layout::mma;
  const auto key_tile = [&](int tile) -> void* {
    if (mma) return native + tile * lay.key_tile_bytes;
    return block + ((job.offset + tile * lay.key_tile_tokens) / lay.key_tile_tokens) *
                       lay.key_tile_bytes;
  };
  const auto value_tile = [&](int tile) -> void* {
    if (mma) return native + lay.key_tile_bytes + tile * lay.value_tile_bytes;
    return block + lay.key_bytes +
           ((job.offset + tile * lay.value_tile_tokens) / lay.value_tile_tokens) *
               lay.value_tile_bytes;
  };
  float* lo = bounds + static_cast<std::size_t>(blockIdx.x) * 2 * d;
  const auto key_params = state.key;
  const auto value_params = state.value;
  encode_part<K>(cache, in, job, false, key_params, encode_smem, sc, key_tile, lo, lo + d);
  encode_part<V>(cache, in, job, true, value_params, encode_smem, sc, value_tile, nullptr, nullptr);
  if constexpr (has_mma_layout_v<KV>) {
    if (mma) {  // the chunk is one record (record_layout<KV>::tokens tokens)
      using rec = record_layout<KV>;
      auto* record = reinterpret_cast<std::uint8_t*>(block) +
                     static_cast<std::size_t>(job.offset / rec::tokens) * rec::bytes(d);
      const std::uint8_t* keys = native;
      const std::uint8_t* values = native + lay.key_tile_bytes;
      for (int item = threadIdx.x; item < rec::pack_items(d); item += blockDim.x) {
        rec::pack_item(keys, values, d, item, record);
      }
    }
  }
}

// ---- 3. window and counts ------------------------------------------------------------------------

/// Per entry (`jobs[blockIdx.x]`, its rows shared among `gridDim.y` blocks): the new rows that
/// stay go to the sinks or the window ring; block y = 0 also updates the key summaries of the
/// blocks the call wrote from the chunks' bounds (`encode_chunk_kernel`), chunk by chunk in
/// token order as the host cache does, and the entry's counts.
template <class KV, class T>
__global__ void window_kernel(paged_kv_view<KV> cache, append_input<T> in,
                              const entry_job* jobs, const chunk_job* chunk_jobs,
                              const float* bounds) {
  const entry_job job = jobs[blockIdx.x];
  const int d = cache.head_dim;
  // New rows that stay: the sinks' rows, then those from `keep` on (earlier ones aged out
  // straight from the input). Shared among the gridDim.y blocks of the entry.
  const int keep = job.to_sinks + (job.aged > job.old_window ? job.aged - job.old_window : 0);
  const int rows = job.to_sinks + (in.tokens - keep);
  const int warps = static_cast<int>(blockDim.x) / warp_size;
  for (int i = blockIdx.y * warps + warp_id(); i < rows; i += gridDim.y * warps) {  // a warp per row
    const int token = i < job.to_sinks ? i : keep + (i - job.to_sinks);
    const std::size_t at =
        ((static_cast<std::size_t>(job.batch) * in.tokens + token) * cache.kv_heads + job.head) * d;
    half* out_k;
    half* out_v;
    if (token < job.to_sinks) {
      const std::int64_t row = job.entry * cache.sink_tokens + job.old_sinks + token;
      out_k = cache.sink_k + row * d;
      out_v = cache.sink_v + row * d;
    } else {
      const int r = job.old_window + token - job.to_sinks;  // window row before aging
      const std::int64_t row =
          job.entry * cache.window_capacity + (job.old_start + r) % cache.window_capacity;
      out_k = cache.window_k + row * d;
      out_v = cache.window_v + row * d;
    }
    for (int c = lane_id(); c < d; c += warp_size) {
      out_k[c] = stage_input<half>(in.k[at + c]);
      out_v[c] = stage_input<half>(in.v[at + c]);
    }
  }
  if (blockIdx.y != 0) return;
  // Key summaries, one thread per channel. A chunk into a fresh block (offset 0) starts the
  // bounds; a later one widens the stored (already rounded) bounds: min(stored, chunk min)
  // taken the way std::min scans, then rounded outward again, exactly as
  // kv_cache::update_summary does.
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    for (int j = job.first_chunk; j < job.first_chunk + job.chunks; ++j) {
      const chunk_job& cj = chunk_jobs[j];
      const float* b = bounds + static_cast<std::size_t>(j) * 2 * d;
      half* stored = cache.key_bounds + static_cast<std::size_t>(cj.block) * 2 * d;
      float lo = b[c], hi = b[d + c];
      if (cj.offset != 0) {
        const float old_lo = static_cast<float>(stored[c]), old_hi = static_cast<float>(stored[d + c]);
        lo = lo < old_lo ? lo : old_lo;
        hi = old_hi < hi ? hi : old_hi;
      }
      stored[c] = half::from_bits(float_to_half_bits_down(lo));
      stored[d + c] = half::from_bits(float_to_half_bits_up(hi));
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
