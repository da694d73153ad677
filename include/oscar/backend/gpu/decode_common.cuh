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
///   window's part, normalizes and writes `out`;
/// - optional features, served by the generic kernel: attention statistics (`decode_stats`:
///   the kernels write every logit, then `stats_reduce_kernel` and `stats_mass_kernel` turn
///   them into the host backend's `kv_head_stats`) and query-aware block skipping
///   (`skip_plan_kernel`, the rule of `attention/skip.hpp` evaluated in float64 exactly as the
///   host evaluates it).
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "oscar/attention/types.hpp"
#include "oscar/backend/gpu/cache_kernels.cuh"  // half_to_float
#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/backend/gpu/warp.cuh"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/numeric.hpp"

namespace oscar::gpu::detail {

/// Most sequences one decode call takes (their slots travel as kernel parameters).
inline constexpr int max_decode_batch = 256;

/// log2(e), to turn natural-log logits into exp2 arguments.
inline constexpr float log2e = 1.4426950408889634f;

}  // namespace oscar::gpu::detail

namespace oscar::gpu {

/// Where a GPU decode call writes its attention statistics (`options::want_stats`): device
/// arrays of float, the same quantities as the host backend's `attention::kv_head_stats`
/// (natural-log units, averaged over each KV head's query group).
struct decode_stats {
  float* lse = nullptr;         ///< [batch][kv_heads]: mean over the group of log sum_t exp(s_t)
  float* entropy = nullptr;     ///< [batch][kv_heads]: mean over the group of -sum_t p_t log p_t
  float* token_mass = nullptr;  ///< [batch][kv_heads][mass_stride]: mean of p_t, entry order
                                ///< (sinks, blocks, window); 0 past the entry's tokens
  std::size_t mass_stride = 0;  ///< >= the tokens of the longest entry of the call
};

}  // namespace oscar::gpu

namespace oscar::gpu::detail {

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
  int splits = 0;             ///< block work items per entry (CTAs)
  int window_items = 0;       ///< work items of the sinks and window per entry
  int partials = 0;           ///< partial results per entry (block partials, then window ones)
  int window_partial = 0;     ///< index of the first window partial
  float* part_o = nullptr;    ///< [batch][kv_heads][partials][group][head_dim]
  float* part_ml = nullptr;   ///< [batch][kv_heads][partials][group][2] (m, l)
  /// With statistics: [batch][kv_heads][group][stats_stride] logits (log2 units, the softmax
  /// scale applied) in entry order, -inf for tokens of skipped blocks; else null.
  float* stats_logits = nullptr;
  std::size_t stats_stride = 0;
  /// With block skipping: [batch][kv_heads][cache.max_blocks], 1 = leave the block out; else null.
  const std::uint8_t* skip = nullptr;
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

/// Offset of the logits row of query j of (b, h) in `stats_logits`.
template <class KV>
OSCAR_HD_INLINE std::size_t stats_row(const decode_params<KV>& prm, int b, int h, int j) noexcept {
  return ((static_cast<std::size_t>(b) * prm.cache.kv_heads + h) * prm.group + j) * prm.stats_stride;
}

/// Rows of the sinks and window one work item of `attend_window` takes.
inline constexpr int window_rows = 64;

/// Work items (blocks) for the sinks and window of each entry: enough for the most rows an
/// entry can hold (sink_tokens + window_tokens + chunk - 1).
template <class KV>
OSCAR_HD_INLINE int window_items(const paged_kv_view<KV>& cache) noexcept {
  const int rows = cache.sink_tokens + cache.window_capacity - 1;
  return rows <= 0 ? 1 : (rows + window_rows - 1) / window_rows;
}

/// Floats of shared memory `attend_window` needs: queries, probabilities, and the staged fp16
/// K and V rows (row stride head_dim + 2 halves, so that consecutive rows fall in consecutive
/// banks).
inline int window_shared_floats(int group, int head_dim) {
  return group * head_dim + group * window_rows + window_rows * (head_dim + 2);
}

/// Work item `item` of the sinks and window of entry (b, h): rows [64 item, 64 item + 64) of
/// sinks then window, one softmax partial (`prm.window_partial + item`). All threads of the
/// block (a multiple of the warp size); `smem` holds `window_shared_floats` floats.
template <class KV>
OSCAR_DEVICE void attend_window(const decode_params<KV>& prm, int b, int h, int item, float* smem) {
  const paged_kv_view<KV>& cache = prm.cache;
  const int d = cache.head_dim, G = prm.group, stride = d + 2;
  const std::int64_t e = cache.entry(prm.slots[b], prm.layer, h);
  const entry_state<KV> st = cache.entries[e];
  float* q = smem;                 // [G][d], scaled to log2 units
  float* p = q + G * d;            // [G][window_rows]
  half* ks = reinterpret_cast<half*>(p + G * window_rows);  // [window_rows][stride]
  half* vs = ks + window_rows * stride;
  const int first = item * window_rows;
  const int rows = st.sinks + st.window;
  const int n = rows - first < window_rows ? (rows - first > 0 ? rows - first : 0) : window_rows;
  const int partial = prm.window_partial + item;
  if (n == 0) {  // uniform: nothing in this item's range
    for (int i = threadIdx.x; i < G * d; i += blockDim.x) {
      prm.part_o[partial_index(prm, b, h, partial, i / d) * d + i % d] = 0.0f;
    }
    for (int j = threadIdx.x; j < G; j += blockDim.x) {
      float* ml = prm.part_ml + partial_index(prm, b, h, partial, j) * 2;
      ml[0] = -INFINITY;
      ml[1] = 0.0f;
    }
    return;
  }
  const float* qg = prm.q + (static_cast<std::size_t>(b) * prm.q_heads + h * G) * d;
  for (int i = threadIdx.x; i < G * d; i += blockDim.x) q[i] = qg[i] * prm.scale_log2;
  // Stage the rows: 4-byte pieces, consecutive threads along a row.
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
  // Logits: one (query, row) per thread, two channels per step.
  for (int i = threadIdx.x; i < G * window_rows; i += blockDim.x) {
    const int j = i / window_rows, t = i % window_rows;
    float s = -INFINITY;
    if (t < n) {
      float s0 = 0.0f, s1 = 0.0f;
      for (int c = 0; c < d; c += 2) {
        s0 += q[j * d + c] * half_to_float(ks[t * stride + c]);
        s1 += q[j * d + c + 1] * half_to_float(ks[t * stride + c + 1]);
      }
      s = s0 + s1;
      if (prm.stats_logits) {  // entry order: sinks, then (after the blocks) the window
        const int r = first + t;
        const int pos = r < st.sinks ? r : st.tokens + r;
        prm.stats_logits[stats_row(prm, b, h, j) + pos] = s;
      }
    }
    p[i] = s;
  }
  __syncthreads();
  // Softmax per query, one warp per query: p <- exp2(s - m), then the partial's m and l.
  const int warps = static_cast<int>(blockDim.x) / warp_size;
  for (int j = warp_id(); j < G; j += warps) {
    float mx = -INFINITY;
    for (int t = lane_id(); t < window_rows; t += warp_size) mx = fmaxf(mx, p[j * window_rows + t]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int t = lane_id(); t < window_rows; t += warp_size) {
      const float w = t < n ? exp2f(p[j * window_rows + t] - mx) : 0.0f;
      p[j * window_rows + t] = w;
      sum += w;
    }
    sum = warp_sum(sum);
    if (lane_id() == 0) {
      float* ml = prm.part_ml + partial_index(prm, b, h, partial, j) * 2;
      ml[0] = mx;
      ml[1] = sum;
    }
  }
  __syncthreads();
  // Output: one (query, channel pair) per thread.
  for (int i = threadIdx.x; i < G * pairs; i += blockDim.x) {
    const int j = i / pairs, c = 2 * (i % pairs);
    float a0 = 0.0f, a1 = 0.0f;
    for (int t = 0; t < n; ++t) {
      const float w = p[j * window_rows + t];
      a0 += w * half_to_float(vs[t * stride + c]);
      a1 += w * half_to_float(vs[t * stride + c + 1]);
    }
    float* o = prm.part_o + partial_index(prm, b, h, partial, j) * d + c;
    o[0] = a0;
    o[1] = a1;
  }
}

/// Merges the partials of one query of (b, h): grid (group, kv_heads, batch), a multiple of the
/// warp size of threads (one or a few channels each), shared memory `combine_shared_bytes`.
/// Partials [0, window_partial) are the blocks', the rest the window's. Each thread sums its
/// channel over the partials with several independent loads in flight. `unrotate_blocks`: the
/// block partials are in the value format's rotated space. Writes `out[b][h * group + j][c]`.
template <class KV>
__global__ void combine_kernel(decode_params<KV> prm, bool unrotate_blocks, float* out) {
  extern __shared__ __align__(16) float combine_smem[];
  const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int d = prm.cache.head_dim, G = prm.group, P = prm.partials, W = prm.window_partial;
  float* acc = combine_smem;   // [d]
  float* weight = acc + d;     // [P]
  float* total = weight + P;   // [1]
  const std::size_t base = partial_index(prm, b, h, 0, j);  // partial p at base + p * G
  if (threadIdx.x < static_cast<unsigned>(warp_size)) {  // one warp: max, weights, sum
    float mx = -INFINITY;
    for (int p = lane_id(); p < P; p += warp_size) {
      mx = fmaxf(mx, prm.part_ml[(base + static_cast<std::size_t>(p) * G) * 2]);
    }
    mx = warp_max(mx);
    float t = 0.0f;
    for (int p = lane_id(); p < P; p += warp_size) {
      const float* ml = prm.part_ml + (base + static_cast<std::size_t>(p) * G) * 2;
      const float w = ml[0] == -INFINITY ? 0.0f : exp2f(ml[0] - mx);
      weight[p] = w;
      t += w * ml[1];
    }
    t = warp_sum(t);
    if (lane_id() == 0) total[0] = t;
  }
  __syncthreads();
  const std::size_t step = static_cast<std::size_t>(G) * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    const float* o = prm.part_o + base * d + c;  // partial p at o[p * step]
    float a[8] = {};
    int p = 0;
    for (; p + 8 <= W; p += 8) {  // eight independent loads in flight
      float v[8];
      for (int k = 0; k < 8; ++k) v[k] = o[(p + k) * step];
      for (int k = 0; k < 8; ++k) a[k] += weight[p + k] * v[k];
    }
    for (; p < W; ++p) a[0] += weight[p] * o[p * step];
    acc[c] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  }
  if (unrotate_blocks) {
    __syncthreads();
    for (int len = 1; len < d; len <<= 1) {  // the butterflies of unrotate_unchecked, by stage
      for (int k = threadIdx.x; k < d / 2; k += blockDim.x) {
        const int at = (k / len) * 2 * len + k % len;
        const float u = acc[at], v = acc[at + len];
        acc[at] = u + v;
        acc[at + len] = u - v;
      }
      __syncthreads();
    }
    const float scale = rotation_scale(d);
    for (int c = threadIdx.x; c < d; c += blockDim.x) acc[c] = acc[c] * scale * rotation_sign(c);
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float a = acc[c];
    for (int p = W; p < P; ++p) {
      const float w = weight[p];
      if (w != 0.0f) a += w * prm.part_o[(base + static_cast<std::size_t>(p) * G) * d + c];
    }
    out[(static_cast<std::size_t>(b) * prm.q_heads + h * G + j) * d + c] = a / total[0];
  }
}

/// Shared memory of `combine_kernel`.
inline std::size_t combine_shared_bytes(int head_dim, int partials) {
  return sizeof(float) * (static_cast<std::size_t>(head_dim) + partials + 1);
}

// ---- attention statistics ------------------------------------------------------------------

/// Maximum (`max == true`) or sum of `v` over the block's threads; every thread gets it.
/// `red` holds 32 values of T in shared memory; ends with the block in step.
template <class T>
OSCAR_DEVICE T block_reduce(T v, bool max, T* red) {
  v = max ? warp_max(v) : warp_sum(v);
  if (lane_id() == 0) red[warp_id()] = v;
  __syncthreads();
  const int warps = (static_cast<int>(blockDim.x) + warp_size - 1) / warp_size;
  T r = red[0];
  for (int w = 1; w < warps; ++w) r = max ? (red[w] > r ? red[w] : r) : r + red[w];
  __syncthreads();
  return r;
}

/// Per query of (b, h) (grid (group, kv_heads, batch)): the maximum M and sum L of its softmax
/// over the logits row (log2 units), then its log-sum-exp and entropy in nats, into
/// `group_stats[((b * kv_heads + h) * group + j) * 4 + {0, 1, 2, 3}]` = M, L, lse, entropy:
///
///     lse = ln2 (M + log2 L),   entropy = ln2 (log2 L - U / L),   U = sum_t 2^(s_t - M) (s_t - M).
template <class KV>
__global__ void stats_reduce_kernel(decode_params<KV> prm, float* group_stats) {
  __shared__ float red[32];
  const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const entry_state<KV> st = prm.cache.entries[prm.cache.entry(prm.slots[b], prm.layer, h)];
  const int T = st.sinks + st.tokens + st.window;
  const float* s = prm.stats_logits + stats_row(prm, b, h, j);
  float mx = -INFINITY;
  for (int t = threadIdx.x; t < T; t += blockDim.x) mx = fmaxf(mx, s[t]);
  mx = block_reduce(mx, true, red);
  float l = 0.0f, u = 0.0f;
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    if (s[t] == -INFINITY) continue;  // a token of a skipped block: probability 0
    const float shifted = s[t] - mx;
    const float w = exp2f(shifted);
    l += w;
    u += w * shifted;
  }
  l = block_reduce(l, false, red);
  u = block_reduce(u, false, red);
  if (threadIdx.x == 0) {
    constexpr float ln2 = 0.6931471805599453f;
    float* out = group_stats + ((static_cast<std::size_t>(b) * prm.cache.kv_heads + h) * prm.group + j) * 4;
    out[0] = mx;
    out[1] = l;
    out[2] = ln2 * (mx + log2f(l));
    out[3] = ln2 * (log2f(l) - u / l);
  }
}

/// Token masses of (b, h) (grid (token blocks, kv_heads, batch)): `token_mass[t]` = mean over
/// the group of 2^(s_jt - M_j) / L_j, 0 past the entry's tokens; block 0 also writes the
/// group's mean lse and entropy.
template <class KV>
__global__ void stats_mass_kernel(decode_params<KV> prm, const float* group_stats,
                                  decode_stats out) {
  const int h = blockIdx.y, b = blockIdx.z, G = prm.group;
  const entry_state<KV> st = prm.cache.entries[prm.cache.entry(prm.slots[b], prm.layer, h)];
  const int T = st.sinks + st.tokens + st.window;
  const std::size_t bh = static_cast<std::size_t>(b) * prm.cache.kv_heads + h;
  const float* gs = group_stats + bh * G * 4;
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < out.mass_stride) {
    float mass = 0.0f;
    if (t < static_cast<std::size_t>(T)) {
      for (int j = 0; j < G; ++j) {
        const float s = prm.stats_logits[stats_row(prm, b, h, j) + t];
        mass += exp2f(s - gs[j * 4]) / gs[j * 4 + 1];
      }
      mass /= static_cast<float>(G);
    }
    out.token_mass[bh * out.mass_stride + t] = mass;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    double lse = 0.0, entropy = 0.0;
    for (int j = 0; j < G; ++j) {
      lse += double(gs[j * 4 + 2]) / G;
      entropy += double(gs[j * 4 + 3]) / G;
    }
    out.lse[bh] = static_cast<float>(lse);
    out.entropy[bh] = static_cast<float>(entropy);
  }
}

// ---- query-aware block skipping ----------------------------------------------------------------

/// The skip plan of entry (b, h) (grid batch * kv_heads): the rule of `attention/skip.hpp`,
/// evaluated in float64 with the host backend's arithmetic (`detail::plan_block_skips`): the
/// reference score of query j is the largest `scale * q_j . k` over the fp16 sinks and window
/// (each dot product summed in channel order; every product of a float and an fp16 value is
/// exact in float64, so a fused multiply-add rounds the same), and a block is left out when
/// `scale * sum_c max(q_c lo_c, q_c hi_c) < ref_j - tau` for every query of the group. Writes
/// `skip[(b * kv_heads + h) * max_blocks + i]` for the entry's blocks and adds the skipped
/// blocks and their tokens to `counts[0]`, `counts[1]`. An entry without sinks and window
/// skips nothing.
template <class KV>
__global__ void skip_plan_kernel(decode_params<KV> prm, double scale, double tau,
                                 std::uint8_t* skip, unsigned long long* counts) {
  __shared__ double red[32];
  __shared__ double ref[16];
  const paged_kv_view<KV>& cache = prm.cache;
  const int h = static_cast<int>(blockIdx.x) % cache.kv_heads;
  const int b = static_cast<int>(blockIdx.x) / cache.kv_heads;
  const int d = cache.head_dim, G = prm.group;
  const std::int64_t e = cache.entry(prm.slots[b], prm.layer, h);
  const entry_state<KV> st = cache.entries[e];
  std::uint8_t* out = skip + (static_cast<std::size_t>(b) * cache.kv_heads + h) * cache.max_blocks;
  const float* qg = prm.q + (static_cast<std::size_t>(b) * prm.q_heads + h * G) * d;
  const int rows = st.sinks + st.window;
  for (int j = 0; j < G; ++j) {  // reference scores (uniform loop: every thread reduces)
    double best = -HUGE_VAL;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
      const half* k = r < st.sinks ? cache.sink_row(cache.sink_k, e, r)
                                   : cache.window_row(cache.window_k, e, st.window_start, r - st.sinks);
      double dot = 0.0;
      for (int c = 0; c < d; ++c) dot += double(qg[j * d + c]) * double(static_cast<float>(k[c]));
      const double sc = scale * dot;
      best = sc > best ? sc : best;
    }
    best = block_reduce(best, true, red);
    if (threadIdx.x == 0) ref[j] = best;
  }
  __syncthreads();
  const half* bounds = cache.key_bounds;
  for (int i = threadIdx.x; i < st.blocks; i += blockDim.x) {
    bool all_low = rows > 0;
    const std::int32_t id = cache.tables[e * cache.max_blocks + i];
    const half* lo = bounds + static_cast<std::size_t>(id) * 2 * d;
    const half* hi = lo + d;
    for (int j = 0; j < G && all_low; ++j) {
      double bound = 0.0;
      for (int c = 0; c < d; ++c) {
        const double x = double(qg[j * d + c]) * double(static_cast<float>(lo[c]));
        const double y = double(qg[j * d + c]) * double(static_cast<float>(hi[c]));
        bound += x > y ? x : y;
      }
      all_low = scale * bound < ref[j] - tau;
    }
    out[i] = all_low ? 1 : 0;
    if (all_low) {
      const int fill = i + 1 < st.blocks ? cache.block_tokens : st.tokens - i * cache.block_tokens;
      atomicAdd(&counts[0], 1ull);
      atomicAdd(&counts[1], static_cast<unsigned long long>(fill));
    }
  }
}

// ---- launching the optional features (decode calls that ask for them) --------------------------

/// Device scratch of a call's optional features: 16 bytes of skip counters, the skip plan
/// ([batch][kv_heads][max_blocks] bytes, padded to 16), then the logits
/// ([batch][kv_heads][group][mass_stride] floats) and the per-query statistics (4 floats each).
template <class KV>
std::size_t feature_scratch_bytes(const decode_params<KV>& prm, const attention::options& opt,
                                  const decode_stats* stats) {
  const std::size_t entries = static_cast<std::size_t>(prm.batch) * prm.cache.kv_heads;
  const std::size_t plan = opt.skip_threshold > 0.0f ? (entries * prm.cache.max_blocks + 15) / 16 * 16 : 0;
  const std::size_t floats =
      opt.want_stats ? entries * prm.group * (stats->mass_stride + 4) : 0;
  return 16 + plan + sizeof(float) * floats;
}

/// Queues the skip plan (with `opt.skip_threshold > 0`) and points `prm` at it and at the
/// logits buffer (with `opt.want_stats`), in `scratch` (`feature_scratch_bytes`).
template <class KV>
void prepare_features(decode_params<KV>& prm, const attention::options& opt, float scale,
                      const decode_stats* stats, std::byte* scratch, stream_t stream) {
  const std::size_t entries = static_cast<std::size_t>(prm.batch) * prm.cache.kv_heads;
  const bool skipping = opt.skip_threshold > 0.0f;
  const std::size_t plan_bytes = skipping ? (entries * prm.cache.max_blocks + 15) / 16 * 16 : 0;
  if (skipping) {
    auto* counts = reinterpret_cast<unsigned long long*>(scratch);
    auto* plan = reinterpret_cast<std::uint8_t*>(scratch + 16);
    fill_async(counts, 0, 2 * sizeof(unsigned long long), stream);
    skip_plan_kernel<KV><<<static_cast<unsigned>(entries), 128, 0, stream>>>(
        prm, static_cast<double>(scale), static_cast<double>(opt.skip_threshold), plan, counts);
    check_launch("skip_plan_kernel");
    prm.skip = plan;
  }
  if (opt.want_stats) {
    prm.stats_logits = reinterpret_cast<float*>(scratch + 16 + plan_bytes);
    prm.stats_stride = stats->mass_stride;
  }
}

/// Queues the statistics kernels after the decode kernel wrote the logits.
template <class KV>
void finish_stats(const decode_params<KV>& prm, const decode_stats& stats, stream_t stream) {
  const int H = prm.cache.kv_heads, G = prm.group;
  float* group_stats =
      prm.stats_logits + static_cast<std::size_t>(prm.batch) * H * G * prm.stats_stride;
  const dim3 heads(static_cast<unsigned>(G), static_cast<unsigned>(H), static_cast<unsigned>(prm.batch));
  stats_reduce_kernel<KV><<<heads, 256, 0, stream>>>(prm, group_stats);
  check_launch("stats_reduce_kernel");
  const std::size_t token_blocks = (stats.mass_stride + 255) / 256;
  stats_mass_kernel<KV><<<dim3(static_cast<unsigned>(token_blocks > 0 ? token_blocks : 1),
                               static_cast<unsigned>(H), static_cast<unsigned>(prm.batch)),
                          256, 0, stream>>>(prm, group_stats, stats);
  check_launch("stats_mass_kernel");
}

/// Waits for the stream and adds the skip counters in `scratch` to `report`.
inline void read_skip_counts(const std::byte* scratch, attention::skip_report& report,
                             stream_t stream) {
  unsigned long long counts[2] = {0, 0};
  copy_async(counts, scratch, sizeof counts, stream);
  synchronize(stream);
  report.blocks_skipped += static_cast<index_t>(counts[0]);
  report.tokens_skipped += static_cast<index_t>(counts[1]);
}

#endif  // OSCAR_GPU_COMPILER

}  // namespace oscar::gpu::detail
