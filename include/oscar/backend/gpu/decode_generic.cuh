// SPDX-License-Identifier: Apache-2.0
/// \file
/// The generic GPU decode kernel: split-K attention over a `paged_kv` (native layout, or mma
/// records), for any KV format, on CUDA and HIP alike (CUDA cores / vector ALUs, no tensor
/// cores).
///
/// Grid `(batch * kv_heads, window items + splits)`: work item `window items + s` takes the s-th
/// share of entry (b, h)'s blocks, in *units* of `unit_tokens` tokens (a multiple of the
/// formats' tiles). Per unit it decodes the keys with the format's own decoder (`decode_group`
/// per channel for per-channel fpq keys, `decode_tile` otherwise) into shared memory, scores
/// the whole query group against them, updates the online softmax, decodes the values into the
/// same buffer and accumulates. The first work items compute the sinks and window. This is the
/// portable path and the reference the tensor-core kernel is compared with on the device; it
/// is not tuned for speed. It also serves the optional features (decode_common.cuh): it leaves
/// out the units of blocks the skip plan marks, and writes every logit for the statistics.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "oscar/backend/gpu/cache_kernels.cuh"
#include "oscar/backend/gpu/decode_common.cuh"
#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/backend/gpu/warp.cuh"
#include "oscar/quant/format_traits.hpp"

namespace oscar::gpu::detail {

/// Tokens per unit of the generic kernel for a cache with `chunk`-token chunks.
inline int generic_unit_tokens(int chunk, int block_tokens) {
  const int u = block_tokens < 64 ? block_tokens : 64;
  return chunk > u ? chunk : u;
}

/// Shared memory of `decode_generic_kernel` (floats): the unit's rows, the scaled queries, the
/// accumulators, the probabilities, per query m, l, alpha, an mma record's scales and (the
/// default FP2+ in the mma layout) the record's native bytes; the window block needs less.
inline std::size_t generic_shared_bytes(int unit, int group, int head_dim,
                                        std::size_t record_native_bytes = 0) {
  const std::size_t floats = static_cast<std::size_t>(unit) * head_dim +
                             2 * static_cast<std::size_t>(group) * head_dim +
                             static_cast<std::size_t>(group) * unit + 3 * group +
                             4 * static_cast<std::size_t>(head_dim) +
                             (record_native_bytes + 3) / 4;
  const std::size_t window = static_cast<std::size_t>(window_shared_floats(group, head_dim));
  return sizeof(float) * (floats > window ? floats : window);
}

/// Decodes the key (`values == false`) or value tiles of `count` tokens starting at token
/// `offset` of a native block into `x` ([unit][d] floats). All threads; ends with a barrier.
template <class F>
OSCAR_DEVICE void decode_native(const std::byte* block, std::size_t section,
                                std::size_t tile_bytes, int offset, int count, int d,
                                const typename quant::format_traits<F>::head_params& p,
                                float* x) {
  using traits = quant::format_traits<F>;
  using blk = typename traits::block;
  constexpr int tt = quant::tokens_per_tile<F>();
  const std::byte* base = block + section + static_cast<std::size_t>(offset / tt) * tile_bytes;
  if constexpr (fpq_traits_of<F>::value && traits::axis == quant::group_axis::tokens &&
                !traits::rotated) {
    constexpr int group = traits::group;  // == tt
    const int items = (count / tt) * d;
    for (int item = threadIdx.x; item < items; item += blockDim.x) {
      const int tile = item / d, c = item % d;
      const auto* in = reinterpret_cast<const blk*>(base + tile * tile_bytes);
      float v[group];
      traits::decode_group(in[c], p, v);
      for (int t = 0; t < group; ++t) x[(tile * group + t) * d + c] = v[t];
    }
  } else {
    for (int tile = threadIdx.x; tile < count / tt; tile += blockDim.x) {
      traits::decode_tile(reinterpret_cast<const blk*>(base + tile * tile_bytes), d, p,
                          x + tile * tt * d);
    }
  }
  __syncthreads();
}

/// Decodes the keys (`values == false`) or values of one mma record (64 tokens, layout.hpp)
/// into `x` ([64][d] floats), to the same floats as the native tiles' `decode_group` /
/// `decode_tile` give (rotation undone). Walks the record with the layout's own forward maps
/// (`key_param_channel`, `value_scale_token`, `key_position`, `value_position`, `code_bit`):
/// first the scales (and key minimums) into `params` (4 d floats of shared memory), then the
/// code words. All threads; ends with a barrier.
template <class KV>
OSCAR_DEVICE void decode_record(const std::uint8_t* record, int d, bool values,
                                const typename quant::format_traits<typename KV::key>::head_params& kp,
                                const typename quant::format_traits<typename KV::value>::head_params& vp,
                                float* params, float* x) {
  using K = quant::format_traits<typename KV::key>;
  using V = quant::format_traits<typename KV::value>;
  const mma::geometry g = mma::geometry_for(d);
  const int ks = g.ksteps;
  if (!values) {
    float* scale = params;  // [d]
    float* zero = params + d;
    for (int item = threadIdx.x; item < 4 * ks; item += blockDim.x) {
      const int kk = item / 4, t = item % 4;
      const std::uint8_t* in = record + g.key_params + item * 16;
      for (int i = 0; i < 4; ++i) {
        const int c = mma::key_param_channel(t, kk, i);
        scale[c] = quant::load_scale<K::config.scale>(in + 2 * i) * K::exponent_factor(kp, false);
        zero[c] = quant::load_scale<K::config.scale>(in + 8 + 2 * i);
      }
    }
  } else {
    float* scale = params;  // [64 tokens][ks groups]
    for (int item = threadIdx.x; item < mma::record_steps * 4 * ks; item += blockDim.x) {
      const int group = item % ks, t = (item / ks) % 4, s = item / (4 * ks);
      const std::uint8_t* in = record + g.value_scales + 4 * item;
      for (int i = 0; i < 4; ++i) {
        const int token = mma::step_tokens * s + mma::value_scale_token(t, i);
        scale[token * ks + group] =
            quant::load_scale<V::config.scale>(in + i) * V::exponent_factor(vp, false);
      }
    }
  }
  __syncthreads();
  const int words = mma::record_steps * 32 * g.words_per_lane;
  const std::uint8_t* codes = record + (values ? g.value_codes : g.key_codes);
  for (int item = threadIdx.x; item < words; item += blockDim.x) {
    const int w = item % g.words_per_lane, lane = (item / g.words_per_lane) % 32,
              s = item / (g.words_per_lane * 32);
    const std::uint32_t word = mma::load_le32(codes + 4 * item);
    for (int xi = 0; xi < 2; ++xi) {
      const int xk = 2 * w + xi;
      for (int reg = 0; reg < 4; ++reg) {
        for (int e = 0; e < 2; ++e) {
          const int code = static_cast<int>((word >> mma::code_bit(xk, reg, e)) & 3u);
          if (!values) {
            const mma::token_channel p = mma::key_position(s, lane, xk, reg, e);
            x[p.token * d + p.channel] = K::dequant(params[p.channel], params[d + p.channel], code);
          } else {
            const mma::token_channel p = mma::value_position(s, lane, xk, reg, e);
            x[p.token * d + p.channel] = V::dequant(params[p.token * ks + p.channel / 16], 0.0f, code);
          }
        }
      }
    }
  }
  __syncthreads();
  if constexpr (V::rotated) {
    if (values) {
      for (int t = threadIdx.x; t < mma::record_tokens; t += blockDim.x) unrotate_unchecked(x + t * d, d);
      __syncthreads();
    }
  }
}

/// Rebuilds the native chunk of a default-FP2+ record (`mma_lm`, 128 tokens) in shared memory:
/// `native` receives the key tile (`45 d` bytes) and then the value tiles, exactly the bytes
/// `mma_lm::unpack_record` writes, with all threads: the code words scatter their codes by
/// shared-memory `atomicOr` into zeroed bytes (4-byte words; `native` must be 4-byte aligned),
/// then the scales, zero points, outliers and value scales are copied, in a second phase, so
/// no plain byte store meets an atomic on the same word. Ends with a barrier.
OSCAR_DEVICE void unpack_lm_record(const std::uint8_t* record, int d, std::uint8_t* native) {
  namespace lm = mma_lm;
  const lm::geometry g = lm::geometry_for(d);
  const int key_bytes = d * lm::key_block_bytes;
  auto* words32 = reinterpret_cast<unsigned int*>(native);
  for (int i = threadIdx.x; i < (g.bytes + 3) / 4; i += blockDim.x) words32[i] = 0u;
  __syncthreads();
  const auto set_bits = [&](int byte, unsigned int bits) {
    atomicOr(words32 + byte / 4, bits << (8 * (byte % 4)));
  };
  const int words = lm::record_steps * 32 * g.words_per_lane;
  for (int item = threadIdx.x; item < 2 * words; item += blockDim.x) {
    const bool values = item >= words;
    const int index = values ? item - words : item;
    const int w = index % g.words_per_lane, lane = (index / g.words_per_lane) % 32,
              s = index / (g.words_per_lane * 32);
    const std::uint32_t word = mma::load_le32(record + (values ? g.value_codes : g.key_codes) + 4 * index);
    for (int xi = 0; xi < 2; ++xi) {
      for (int reg = 0; reg < 4; ++reg) {
        for (int e = 0; e < 2; ++e) {
          const unsigned int code = (word >> lm::code_bit(xi, reg, e)) & 3u;
          if (!values) {
            const mma::token_channel k = mma::key_position(s, lane, 2 * w + xi, reg, e);
            set_bits(k.channel * lm::key_block_bytes + lm::key_code_offset + k.token / 4,
                     code << (2 * (k.token % 4)));
          } else {
            const mma::token_channel v = mma::value_position(s, lane, 2 * w + xi, reg, e);
            set_bits(key_bytes + (v.token * g.vgroups + v.channel / lm::value_group) * lm::value_block_bytes +
                         1 + (v.channel % lm::value_group) / 4,
                     code << (2 * (v.channel % 4)));
          }
        }
      }
    }
  }
  __syncthreads();
  const int params = 4 * g.ksteps, entries = lm::outliers * d;
  const int scales = lm::record_steps * 4 * g.vgroups;
  for (int item = threadIdx.x; item < params + entries + scales; item += blockDim.x) {
    if (item < params) {  // fp16 scales and zero points of 4 channels
      const int kk = item / 4, t = item % 4;
      const std::uint8_t* in = record + g.key_params + item * 16;
      for (int i = 0; i < 4; ++i) {
        std::uint8_t* block = native + mma::key_param_channel(t, kk, i) * lm::key_block_bytes;
        block[0] = in[2 * i];
        block[1] = in[2 * i + 1];
        block[2] = in[8 + 2 * i];
        block[3] = in[8 + 2 * i + 1];
      }
    } else if (item < params + entries) {  // one outlier: fp16 value and index byte
      const int n = item - params;
      const lm::outlier_slot o = lm::outlier_entry(n);
      std::uint8_t* block = native + o.channel * lm::key_block_bytes;
      block[lm::key_outlier_value_offset + 2 * o.slot] = record[g.outlier_values + 2 * n];
      block[lm::key_outlier_value_offset + 2 * o.slot + 1] = record[g.outlier_values + 2 * n + 1];
      block[lm::key_outlier_index_offset + o.slot] = record[g.outlier_index + n];
    } else {  // e4m3 scales of 4 tokens of one value group
      const int i4 = item - params - entries;
      const int group = i4 % g.vgroups, t = (i4 / g.vgroups) % 4, s = i4 / (4 * g.vgroups);
      const std::uint8_t* in = record + g.value_scales + 4 * i4;
      for (int i = 0; i < 4; ++i) {
        const int token = lm::step_tokens * s + mma::value_scale_token(t, i);
        native[key_bytes + (token * g.vgroups + group) * lm::value_block_bytes] = in[i];
      }
    }
  }
  __syncthreads();
}

template <class KV>
__global__ void decode_generic_kernel(decode_params<KV> prm, native_offsets lay, int unit) {
  extern __shared__ __align__(16) float generic_smem[];
  // blockIdx.x = b * kv_heads + h; blockIdx.y = work item, the window's first.
  const int h = static_cast<int>(blockIdx.x) % prm.cache.kv_heads;
  const int b = static_cast<int>(blockIdx.x) / prm.cache.kv_heads;
  if (static_cast<int>(blockIdx.y) < prm.window_items) {
    attend_window(prm, b, h, static_cast<int>(blockIdx.y), generic_smem);
    return;
  }
  const int split = static_cast<int>(blockIdx.y) - prm.window_items;
  const paged_kv_view<KV>& cache = prm.cache;
  const int d = cache.head_dim, G = prm.group;
  const std::int64_t e = cache.entry(prm.slots[b], prm.layer, h);
  const entry_state<KV> st = cache.entries[e];
  float* x = generic_smem;        // [unit][d]
  float* q = x + unit * d;        // [G][d]
  float* o = q + G * d;           // [G][d]
  float* p = o + G * d;           // [G][unit]
  float* m = p + G * unit;        // [G]
  float* l = m + G;               // [G]
  float* alpha = l + G;           // [G]
  float* record_params = alpha + G;  // [4 d]: scales of an mma record (mma layout only)
  // The native bytes of a default-FP2+ record (mma layout of `quant::fp2plus` only).
  auto* record_native = reinterpret_cast<std::uint8_t*>(record_params + 4 * d);
  const float* qg = prm.q + (static_cast<std::size_t>(b) * prm.q_heads + h * G) * d;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
    q[i] = qg[i] * prm.scale_log2;
    o[i] = 0.0f;
  }
  for (int j = threadIdx.x; j < G; j += blockDim.x) {
    m[j] = -INFINITY;
    l[j] = 0.0f;
  }
  const int units = (st.tokens + unit - 1) / unit;
  const int per_split = (units + prm.splits - 1) / prm.splits;
  const int first = split * per_split;
  const int last = first + per_split < units ? first + per_split : units;
  __syncthreads();
  for (int u = first; u < last; ++u) {
    const int token = u * unit;  // token index among the entry's block tokens
    const int count = st.tokens - token < unit ? st.tokens - token : unit;
    if (prm.skip &&
        prm.skip[(static_cast<std::size_t>(b) * cache.kv_heads + h) * cache.max_blocks +
                 token / cache.block_tokens]) {  // uniform: the whole unit is left out
      if (prm.stats_logits) {
        for (int i = threadIdx.x; i < G * count; i += blockDim.x) {
          prm.stats_logits[stats_row(prm, b, h, i / count) + st.sinks + token + i % count] = -INFINITY;
        }
      }
      continue;
    }
    const std::int32_t id = cache.tables[e * cache.max_blocks + token / cache.block_tokens];
    const std::byte* block = cache.block(id);
    const int offset = token % cache.block_tokens;
    // Decodes the unit's keys or values into x (ends with a barrier).
    const auto decode_unit = [&](bool values) {
      if constexpr (has_mma_layout_v<KV>) {
        if (cache.layout == block_layout::mma) {  // the unit is one record
          using rec = record_layout<KV>;
          const auto* record = reinterpret_cast<const std::uint8_t*>(block) +
                               static_cast<std::size_t>(offset / rec::tokens) * rec::bytes(d);
          if constexpr (rec::lm) {  // rebuild the native chunk once, for the keys
            if (!values) unpack_lm_record(record, d, record_native);
            const auto* chunk = reinterpret_cast<const std::byte*>(record_native);
            if (values) {
              decode_native<typename KV::value>(chunk, lay.key_tile_bytes, lay.value_tile_bytes,
                                                0, count, d, st.value, x);
            } else {
              decode_native<typename KV::key>(chunk, 0, lay.key_tile_bytes, 0, count, d, st.key, x);
            }
          } else {
            decode_record<KV>(record, d, values, st.key, st.value, record_params, x);
          }
          return;
        }
      }
      if (values) {
        decode_native<typename KV::value>(block, lay.key_bytes, lay.value_tile_bytes, offset,
                                          count, d, st.value, x);
      } else {
        decode_native<typename KV::key>(block, 0, lay.key_tile_bytes, offset, count, d, st.key, x);
      }
    };
    decode_unit(false);
    for (int i = threadIdx.x; i < G * unit; i += blockDim.x) {
      const int j = i / unit, t = i % unit;
      float s = -INFINITY;
      if (t < count) {
        s = 0.0f;
        for (int c = 0; c < d; ++c) s += q[j * d + c] * x[t * d + c];
        if (prm.stats_logits) prm.stats_logits[stats_row(prm, b, h, j) + st.sinks + token + t] = s;
      }
      p[i] = s;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < G; j += blockDim.x) {
      float mx = m[j];
      for (int t = 0; t < count; ++t) mx = fmaxf(mx, p[j * unit + t]);
      const float a = exp2f(m[j] - mx);
      float sum = 0.0f;
      for (int t = 0; t < unit; ++t) {
        const float w = t < count ? exp2f(p[j * unit + t] - mx) : 0.0f;
        p[j * unit + t] = w;
        sum += w;
      }
      l[j] = l[j] * a + sum;
      m[j] = mx;
      alpha[j] = a;
    }
    decode_unit(true);  // its barrier also orders p and alpha
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
      const int j = i / d, c = i % d;
      float acc = o[i] * alpha[j];
      for (int t = 0; t < count; ++t) acc += p[j * unit + t] * x[t * d + c];
      o[i] = acc;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
    const int j = i / d, c = i % d;
    prm.part_o[partial_index(prm, b, h, split, j) * d + c] = o[i];
  }
  for (int j = threadIdx.x; j < G; j += blockDim.x) {
    float* ml = prm.part_ml + partial_index(prm, b, h, split, j) * 2;
    ml[0] = m[j];
    ml[1] = l[j];
  }
}

}  // namespace oscar::gpu::detail
