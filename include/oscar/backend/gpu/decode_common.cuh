// SPDX-License-Identifier: Apache-2.0
/// \file
/// Pieces shared by OSCAR's GPU decode kernels (split-K "flash decoding" over a `paged_kv`):
///
/// - `decode_params`: what every decode kernel takes (by value);
/// - partial results: each work item (a split of an entry's blocks, or the fp16 sinks and
///   window) writes, per query of the KV head's group, the unnormalized output `o[d]`, the
///   running maximum `m` and the sum `l` of its softmax, in log2 units (logits are multiplied by
///   `softmax_scale * log2(e)`, so the kernels use exp2);
/// - `attend_window`: the partial of the sinks and window (fp16 rows, CUDA cores);
/// - `combine_kernel`: merges an entry's partials, undoes the value rotation of the blocks'
///   part once (the value format may rotate; the softmax weights commute with it), adds the
///   window's part, normalizes and writes `out`.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/backend/gpu/warp.cuh"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/numeric.hpp"

namespace oscar::gpu::detail {

/// Most sequences one decode call takes (their slots travel as kernel parameters).
inline constexpr int max_decode_batch = 256;

/// log2(e), to turn natural-log logits into exp2 arguments.
inline constexpr float log2e = 1.4426950408889634f;

/// Parameters of one decode launch.
template <class KV>
struct decode_params {
  paged_kv_view<KV> cache;
  int layer = 0;
  const float* q = nullptr;  ///< [batch][q_heads][head_dim]
  int batch = 0;
  int q_heads = 0;
  int group = 0;              ///< query heads per KV head
  int query_tiles = 1;        ///< tensor-core kernel: blocks per split, 8 query heads each
  float scale_log2 = 0.0f;    ///< softmax scale * log2(e)
  int splits = 0;             ///< block work items per entry (CTAs), the window is one more
  int partials = 0;           ///< partial results per entry (block partials + 1 window)
  int window_partial = 0;     ///< index of the window's partial
  float* part_o = nullptr;    ///< [batch][kv_heads][partials][group][head_dim]
  float* part_ml = nullptr;   ///< [batch][kv_heads][partials][group][2] (m, l)
  slot_id slots[max_decode_batch];
};

/// Offset of partial `p` of (b, h), query `j`, in units of `head_dim` floats (for part_o) or
/// of 2 floats (for part_ml).
template <class KV>
OSCAR_HD_INLINE std::size_t partial_index(const decode_params<KV>& prm, int b, int h, int p,
                                          int j) noexcept {
  return ((static_cast<std::size_t>(b) * prm.cache.kv_heads + h) * prm.partials + p) * prm.group +
         j;
}

#if defined(OSCAR_GPU_COMPILER)

/// Rows of the sinks and window staged in shared memory at a time by `attend_window`.
inline constexpr int window_rows = 64;

/// Floats of shared memory `attend_window` needs: queries and accumulators, probabilities,
/// per-query state, and the staged fp16 K and V rows (row stride head_dim + 2 halves, so that
/// rows fall in different banks).
inline int window_shared_floats(int group, int head_dim) {
  return group * head_dim * 2 + group * window_rows + group * 3 + window_rows * (head_dim + 2);
}

/// The partial of the sinks and window of entry (b, h), computed by all threads of the block
/// (any size, a multiple of the warp size). `smem` holds at least `window_shared_floats`. Rows
/// are staged in shared memory `window_rows` at a time with coalesced 4-byte loads.
template <class KV>
OSCAR_DEVICE void attend_window(const decode_params<KV>& prm, int b, int h, float* smem) {
  const paged_kv_view<KV>& cache = prm.cache;
  const int d = cache.head_dim, G = prm.group, stride = d + 2;
  const std::int64_t e = cache.entry(prm.slots[b], prm.layer, h);
  const entry_state<KV> st = cache.entries[e];
  float* q = smem;                  // [G][d], scaled to log2 units
  float* o = q + G * d;             // [G][d]
  float* p = o + G * d;             // [G][window_rows]
  float* m = p + G * window_rows;   // [G]
  float* l = m + G;                 // [G]
  float* alpha = l + G;             // [G]
  half* ks = reinterpret_cast<half*>(alpha + G);  // [window_rows][stride]
  half* vs = ks + window_rows * stride;           // [window_rows][stride]
  const float* qg = prm.q + (static_cast<std::size_t>(b) * prm.q_heads + h * G) * d;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
    q[i] = qg[i] * prm.scale_log2;
    o[i] = 0.0f;
  }
  for (int j = threadIdx.x; j < G; j += blockDim.x) {
    m[j] = -INFINITY;
    l[j] = 0.0f;
  }
  const int rows = st.sinks + st.window;
  for (int first = 0; first < rows; first += window_rows) {
    const int n = rows - first < window_rows ? rows - first : window_rows;
    // Stage rows [first, first + n): pairs of halves, consecutive threads along a row.
    const int pairs = d / 2;
    for (int i = threadIdx.x; i < n * pairs; i += blockDim.x) {
      const int t = i / pairs, c = 2 * (i % pairs), r = first + t;
      const half* krow = r < st.sinks ? cache.sink_row(cache.sink_k, e, r)
                                      : cache.window_row(cache.window_k, e, st.window_start, r - st.sinks);
      const half* vrow = r < st.sinks ? cache.sink_row(cache.sink_v, e, r)
                                      : cache.window_row(cache.window_v, e, st.window_start, r - st.sinks);
      *reinterpret_cast<std::uint32_t*>(ks + t * stride + c) = *reinterpret_cast<const std::uint32_t*>(krow + c);
      *reinterpret_cast<std::uint32_t*>(vs + t * stride + c) = *reinterpret_cast<const std::uint32_t*>(vrow + c);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * window_rows; i += blockDim.x) {
      const int j = i / window_rows, t = i % window_rows;
      float s = -INFINITY;
      if (t < n) {
        s = 0.0f;
        for (int c = 0; c < d; ++c) s += q[j * d + c] * static_cast<float>(ks[t * stride + c]);
      }
      p[i] = s;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < G; j += blockDim.x) {
      float mx = m[j];
      for (int t = 0; t < n; ++t) mx = fmaxf(mx, p[j * window_rows + t]);
      const float a = exp2f(m[j] - mx);  // 0 on the first chunk (m = -inf)
      float sum = 0.0f;
      for (int t = 0; t < window_rows; ++t) {
        const float w = t < n ? exp2f(p[j * window_rows + t] - mx) : 0.0f;
        p[j * window_rows + t] = w;
        sum += w;
      }
      l[j] = l[j] * a + sum;
      m[j] = mx;
      alpha[j] = a;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
      const int j = i / d, c = i % d;
      float acc = o[i] * alpha[j];
      for (int t = 0; t < n; ++t) acc += p[j * window_rows + t] * static_cast<float>(vs[t * stride + c]);
      o[i] = acc;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
    const int j = i / d, c = i % d;
    prm.part_o[partial_index(prm, b, h, prm.window_partial, j) * d + c] = o[i];
  }
  for (int j = threadIdx.x; j < G; j += blockDim.x) {
    float* ml = prm.part_ml + partial_index(prm, b, h, prm.window_partial, j) * 2;
    ml[0] = m[j];
    ml[1] = l[j];
  }
}

/// Max (`is_max`) or sum over the block's threads; every thread gets the result. `scratch`
/// holds one float per warp. Ends with a barrier.
OSCAR_DEVICE inline float block_reduce(float v, bool is_max, float* scratch) {
  v = is_max ? warp_max(v) : warp_sum(v);
  const int warps = static_cast<int>(blockDim.x) / warp_size;
  __syncthreads();  // scratch may still be read from the previous call
  if (lane_id() == 0) scratch[warp_id()] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < warps; ++w) v = is_max ? fmaxf(v, scratch[w]) : v + scratch[w];
  __syncthreads();
  return v;
}

/// `x <- D H x / sqrt(d)` (`unrotate_unchecked`) by all threads of the block, stage by stage;
/// every butterfly adds and subtracts the same operands as the sequential transform, so the
/// result is bit for bit the same. Ends with a barrier.
OSCAR_DEVICE inline void unrotate_block(float* x, int d) {
  __syncthreads();
  for (int len = 1; len < d; len <<= 1) {
    for (int i = threadIdx.x; i < d / 2; i += blockDim.x) {
      const int j = (i / len) * 2 * len + i % len;
      const float a = x[j], b = x[j + len];
      x[j] = a + b;
      x[j + len] = a - b;
    }
    __syncthreads();
  }
  const float scale = rotation_scale(d);
  for (int c = threadIdx.x; c < d; c += blockDim.x) x[c] = x[c] * scale * rotation_sign(c);
  __syncthreads();
}

/// Merges the partials of each (b, h): grid (kv_heads, batch), a multiple of the warp size of
/// threads, shared memory `combine_shared_bytes`. `unrotate_blocks`: the block partials are in
/// the value format's rotated space. Writes `out[b][h * group + j][c]`.
template <class KV>
__global__ void combine_kernel(decode_params<KV> prm, bool unrotate_blocks, float* out) {
  extern __shared__ __align__(16) float combine_smem[];
  const int h = blockIdx.x, b = blockIdx.y;
  const int d = prm.cache.head_dim, G = prm.group, P = prm.partials;
  float* acc = combine_smem;  // [d]
  float* weight = acc + d;    // [P]
  float* scratch = weight + P;  // [warps]
  for (int j = 0; j < G; ++j) {
    float mx = -INFINITY;
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
      mx = fmaxf(mx, prm.part_ml[partial_index(prm, b, h, p, j) * 2]);
    }
    mx = block_reduce(mx, true, scratch);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
      const float* ml = prm.part_ml + partial_index(prm, b, h, p, j) * 2;
      const float w = ml[0] == -INFINITY ? 0.0f : exp2f(ml[0] - mx);
      weight[p] = w;
      sum += w * ml[1];
    }
    sum = block_reduce(sum, false, scratch);
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      float a = 0.0f;
      for (int p = 0; p < P; ++p) {
        if (p == prm.window_partial || weight[p] == 0.0f) continue;
        a += weight[p] * prm.part_o[partial_index(prm, b, h, p, j) * d + c];
      }
      acc[c] = a;
    }
    if (unrotate_blocks) unrotate_block(acc, d);
    else __syncthreads();
    const float w = weight[prm.window_partial];
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      float a = acc[c];
      if (w != 0.0f) a += w * prm.part_o[partial_index(prm, b, h, prm.window_partial, j) * d + c];
      out[(static_cast<std::size_t>(b) * prm.q_heads + h * G + j) * d + c] = a / sum;
    }
    __syncthreads();
  }
}

/// Shared memory of `combine_kernel` with `threads` threads per block.
inline std::size_t combine_shared_bytes(int head_dim, int partials, int threads) {
  return sizeof(float) *
         (static_cast<std::size_t>(head_dim) + partials + threads / warp_size + 1);
}

#endif  // OSCAR_GPU_COMPILER

}  // namespace oscar::gpu::detail
