// SPDX-License-Identifier: Apache-2.0
/// \file
/// The tensor-core decode kernel of the default FP2+ (`quant::fp2plus`: Lloyd-Max keys in
/// per-channel groups of 128 tokens with 3 fp16 outliers, Lloyd-Max values in groups of 64;
/// head_dim 64 or 128; CUDA sm_80 and newer): split-K attention over a `paged_kv` in the mma
/// layout, reading the codes, scales and outliers of each 128-token record (layout.hpp,
/// namespace `mma_lm`) straight from the block pool; nothing is dequantized to memory.
///
/// The same scheme as `decode_mma.cuh`: grid `(batch * kv_heads * query_tiles, window items +
/// splits)`, 4 warps per block; the window items attend the fp16 sinks and window
/// (`attend_window`); split s of entry (b, h) divides the entry's records among its 4 warps, each
/// streaming them through a private ring of 2 shared-memory stages filled by `cp.async` and
/// running `mma_lm::warp_record` (mma_core_lm.hpp) on each; the warps' results are merged into
/// one partial per block, and the combine kernel finishes. A tile holds 4 query heads when the
/// group has at most 4 (the lo parts of the queries then use the MMAs' spare columns), else 8;
/// groups of more than 8 take several tiles, each reading the records once.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <cstddef>
#include <cstdint>

#include "oscar/backend/gpu/decode_common.cuh"
#include "oscar/backend/gpu/decode_mma.cuh"
#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/mma_core_lm.hpp"
#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/quant/format_traits.hpp"

#if !defined(OSCAR_GPU_RUNTIME_CUDA)
#error "decode_mma_lm.cuh is the CUDA tensor-core path; HIP uses decode_generic.cuh"
#endif

namespace oscar::gpu::detail {

/// Records a warp of the mma_lm kernel keeps in flight: two 128-token stages (one loading while
/// one is attended) keep two blocks of 4 warps per multiprocessor in shared memory.
inline constexpr int mma_lm_stages = 2;

/// Shared memory per warp: its ring of records, its outlier correction table, the second parts
/// of its queries.
OSCAR_HD_INLINE constexpr std::size_t mma_lm_warp_bytes(int d, int qpt) {
  return static_cast<std::size_t>(mma_lm_stages) * mma_lm::geometry_for(d).bytes +
         static_cast<std::size_t>(mma_lm::corr_entries(qpt)) * sizeof(std::int32_t) +
         static_cast<std::size_t>(d / 16) * 2 * 32 * sizeof(std::uint32_t);
}

/// Shared memory of `decode_mma_lm_kernel`: the warps' areas and the tile's fp32 queries, or
/// the merge area, or the window's.
inline std::size_t mma_lm_shared_bytes(int d, int qpt, int group) {
  const std::size_t work = static_cast<std::size_t>(mma_warps) * mma_lm_warp_bytes(d, qpt) +
                           static_cast<std::size_t>(qpt) * d * sizeof(float);
  const std::size_t merge = sizeof(float) * mma_warps * 8 * (static_cast<std::size_t>(d) + 2);
  const std::size_t window = sizeof(float) * static_cast<std::size_t>(window_shared_floats(group, d));
  std::size_t bytes = work > merge ? work : merge;
  return bytes > window ? bytes : window;
}

template <class KV, int D, int QPT, bool Exact>
__global__ void __launch_bounds__(mma_warps * 32, 2) decode_mma_lm_kernel(decode_params<KV> prm) {
  extern __shared__ __align__(16) unsigned char mma_lm_smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  device_trap();  // the host dispatcher never launches this kernel below sm_80
#else
  // blockIdx.x = (b * kv_heads + h) * query_tiles + sub (sub: query heads QPT sub ..
  // QPT sub + QPT - 1 of the group); blockIdx.y = work item: the window's first.
  const int sub = static_cast<int>(blockIdx.x) % prm.query_tiles;
  const int h = static_cast<int>(blockIdx.x) / prm.query_tiles % prm.cache.kv_heads;
  const int b = static_cast<int>(blockIdx.x) / prm.query_tiles / prm.cache.kv_heads;
  if (static_cast<int>(blockIdx.y) < prm.window_items) {
    if (sub == 0) {
      attend_window(prm, b, h, static_cast<int>(blockIdx.y), reinterpret_cast<float*>(mma_lm_smem));
    }
    return;
  }
  const int split = static_cast<int>(blockIdx.y) - prm.window_items;
  constexpr mma_lm::geometry geo = mma_lm::geometry_for(D);
  constexpr int ks = D / 16;
  const paged_kv_view<KV>& cache = prm.cache;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, G = prm.group;
  const std::int64_t e = cache.entry(prm.slots[b], prm.layer, h);
  const entry_state<KV> st = cache.entries[e];
  const int records = st.tokens / mma_lm::record_tokens;
  const int block_shift = __ffs(cache.block_tokens / mma_lm::record_tokens) - 1;  // a power of two
  const int block_mask = (1 << block_shift) - 1;
  const int warps = prm.splits * mma_warps;
  const int gw = split * mma_warps + warp;
  const int first = static_cast<int>(static_cast<std::int64_t>(records) * gw / warps);
  const int last = static_cast<int>(static_cast<std::int64_t>(records) * (gw + 1) / warps);
  unsigned char* area = mma_lm_smem + static_cast<std::size_t>(warp) * mma_lm_warp_bytes(D, QPT);
  auto* corr = reinterpret_cast<std::int32_t*>(area + mma_lm_stages * geo.bytes);
  auto* y = reinterpret_cast<std::uint32_t*>(corr + mma_lm::corr_entries(QPT));
  auto* qf = reinterpret_cast<float*>(mma_lm_smem + static_cast<std::size_t>(mma_warps) *
                                                        mma_lm_warp_bytes(D, QPT));
  const std::int32_t* table = cache.tables + e * cache.max_blocks;

  auto issue = [&](int record, int stage) {
    const std::int32_t id = table[record >> block_shift];
    const std::byte* src = cache.block(id) + static_cast<std::size_t>(record & block_mask) * geo.bytes;
    unsigned char* dst = area + stage * geo.bytes;
    for (int i = lane; i < geo.bytes / 16; i += 32) cp_async16(dst + 16 * i, src + 16 * i);
  };

  device_warp w;
  mma_lm::warp_state<D, QPT> ws;
  const int j0 = QPT * sub;  // first query of this block's tile of the group
  const int jq = j0 + mma_lm::column_query<QPT>(g);
  const float* q_row =
      jq < G ? prm.q + (static_cast<std::size_t>(b) * prm.q_heads + h * G + jq) * D : nullptr;
  mma_lm::warp_begin<D, QPT>(w, ws, q_row, prm.scale_log2, y, warp == 0 ? qf : nullptr, corr);
  ws.qf = qf;
  __syncthreads();  // qf is written by warp 0 and read by all

  using K = quant::format_traits<typename KV::key>;
  const float key_l0 = K::level(2), key_l1 = K::level(3);
  for (int k = 0; k < mma_lm_stages - 1; ++k) {
    if (first + k < last) issue(first + k, k);
    cp_async_commit();
  }
  for (int r = first; r < last; ++r) {
    const int k = r - first;
    if (r + mma_lm_stages - 1 < last) {
      issue(r + mma_lm_stages - 1, (k + mma_lm_stages - 1) % mma_lm_stages);
    }
    cp_async_commit();
    cp_async_wait<mma_lm_stages - 1>();
    __syncwarp();
    mma_lm::warp_record<D, QPT, Exact>(w, ws, area + (k % mma_lm_stages) * geo.bytes, key_l0, key_l1);
    __syncwarp();  // every lane is done with this stage (and the corrections) before reuse
  }
  cp_async_wait<0>();

  using V = quant::format_traits<typename KV::value>;
  float o[ks][4], m[2], l[2];
  float factor = 1.0f;
  if constexpr (requires { st.value.scale_exponent; }) factor = mma::pow2(st.value.scale_exponent);
  mma_lm::warp_end<D, QPT>(w, ws, factor, V::level(2), V::level(3), o, m, l);

  merge_warps<KV, D>(prm, b, h, split, j0, G - j0 < QPT ? G - j0 : QPT, o, m, l, mma_lm_smem);
#endif
}

}  // namespace oscar::gpu::detail
