// SPDX-License-Identifier: Apache-2.0
/// \file
/// The tensor-core decode kernel (CUDA, sm_80 and newer; sm_89+ converts fp8 scales in one
/// instruction): split-K attention over a `paged_kv` in the mma layout (FP2+ with per-channel
/// keys, head_dim 64 or 128), reading the 2-bit codes and scales of each 64-token record
/// straight from the block pool; nothing is dequantized to memory.
///
/// Grid `(batch * kv_heads * query_tiles, window items + splits)`, 4 warps per block; a query
/// group of more than 8 heads takes `query_tiles` = ceil(group / 8) blocks per split, each
/// attending 8 of its heads (they read the same records). The first work items of each entry
/// are the sinks and window (64 rows each; short, and scheduled first); split s of entry (b, h)
/// splits the entry's records among its 4 warps (balanced to one record); each warp streams its
/// records through a private ring of shared-memory stages filled by `cp.async` (16-byte copies,
/// `stages - 1` records in flight while it computes one) and runs `mma::warp_record` on each
/// (mma_core.hpp). The 4 warps' results are merged in shared memory into one partial per block.
/// The combine kernel finishes.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <cstddef>
#include <cstdint>

#include "oscar/backend/gpu/decode_common.cuh"
#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/mma_core.hpp"
#include "oscar/backend/gpu/paged_kv_view.hpp"
#include "oscar/backend/gpu/warp.cuh"
#include "oscar/quant/format_traits.hpp"

#if !defined(OSCAR_GPU_RUNTIME_CUDA)
#error "decode_mma.cuh is the CUDA tensor-core path; HIP uses decode_generic.cuh"
#endif

namespace oscar::gpu::detail {

/// The warp policy of `mma_core.hpp` on an NVIDIA GPU (sm_80+).
struct device_warp {
  OSCAR_HD_INLINE int lane() const noexcept {
#if defined(__CUDA_ARCH__)
    return static_cast<int>(threadIdx.x) & 31;
#else
    return 0;
#endif
  }
  OSCAR_HD_INLINE float shfl(float v, int src) const noexcept {
#if defined(__CUDA_ARCH__)
    return __shfl_sync(0xffffffffu, v, src);
#else
    (void)src;
    return v;
#endif
  }
  OSCAR_HD_INLINE float shfl_xor(float v, int mask) const noexcept {
#if defined(__CUDA_ARCH__)
    return __shfl_xor_sync(0xffffffffu, v, mask);
#else
    (void)mask;
    return v;
#endif
  }
  OSCAR_HD_INLINE bool any(bool p) const noexcept {
#if defined(__CUDA_ARCH__)
    return __any_sync(0xffffffffu, p) != 0;
#else
    return p;
#endif
  }
  /// Orders the lanes' shared-memory accesses (a warp barrier).
  OSCAR_HD_INLINE void sync() const noexcept {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  /// `*p += v` in shared memory, atomically (a native shared-memory atomic).
  OSCAR_HD_INLINE void atomic_add(std::int32_t* p, std::int32_t v) const noexcept {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
  OSCAR_HD_INLINE std::uint32_t movmatrix(std::uint32_t a) const noexcept {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    std::uint32_t d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(d) : "r"(a));
    return d;
#else
    return a;
#endif
  }
  OSCAR_HD_INLINE void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                           std::uint32_t b1) const noexcept {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    (void)d, (void)a, (void)b0, (void)b1;
#endif
  }
};

/// Records a warp keeps in flight (its ring of shared-memory stages).
inline constexpr int mma_stages = 3;
inline constexpr int mma_warps = 4;

/// Shared memory per warp: its ring of records, then the lo parts of its queries.
OSCAR_HD_INLINE constexpr std::size_t mma_warp_bytes(int d) {
  return static_cast<std::size_t>(mma_stages) * mma::geometry_for(d).bytes +
         static_cast<std::size_t>(d / 16) * 2 * 32 * sizeof(std::uint32_t);
}

/// Shared memory of `decode_mma_kernel` for head_dim `d` and query group `group`.
inline std::size_t mma_shared_bytes(int d, int group) {
  const std::size_t ring = static_cast<std::size_t>(mma_warps) * mma_warp_bytes(d);
  const std::size_t merge = sizeof(float) * mma_warps * 8 * (static_cast<std::size_t>(d) + 2);
  const std::size_t window = sizeof(float) * static_cast<std::size_t>(window_shared_floats(group, d));
  std::size_t bytes = ring > merge ? ring : merge;
  return bytes > window ? bytes : window;
}

OSCAR_DEVICE OSCAR_FORCEINLINE void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
#else
  (void)smem, (void)gmem;
  device_trap();
#endif
}
OSCAR_DEVICE OSCAR_FORCEINLINE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
OSCAR_DEVICE OSCAR_FORCEINLINE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

/// Merges the results of a tensor-core block's `mma_warps` warps into the block's partial of
/// split `split` of entry (b, h): queries j0 .. j0 + tile_queries - 1. Each lane brings its
/// share from `warp_end` (`o` per 16-channel tile: channels 16 tile + g + 8 (i >> 1), MMA
/// column 2t + (i & 1); `m`, `l` per column). `smem` holds `mma_warps * 8 * (D + 2)` floats
/// that no warp uses any more after the first barrier here.
template <class KV, int D>
OSCAR_DEVICE void merge_warps(const decode_params<KV>& prm, int b, int h, int split, int j0,
                              int tile_queries, const float (&o)[D / 16][4], const float (&m)[2],
                              const float (&l)[2], unsigned char* smem) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, t = lane & 3;
  // [warp][column 0..7][D + 2] floats.
  __syncthreads();  // the warps' rings are free now
  float* merge = reinterpret_cast<float*>(smem);
  float* mine = merge + static_cast<std::size_t>(warp) * 8 * (D + 2);
  for (int tile = 0; tile < D / 16; ++tile) {
    for (int i = 0; i < 4; ++i) {
      const int j = 2 * t + (i & 1), c = 16 * tile + g + 8 * (i >> 1);
      mine[j * (D + 2) + c] = o[tile][i];
    }
  }
  if (g == 0) {
    for (int c = 0; c < 2; ++c) {
      mine[(2 * t + c) * (D + 2) + D] = m[c];
      mine[(2 * t + c) * (D + 2) + D + 1] = l[c];
    }
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < tile_queries * D; i += mma_warps * 32) {
    const int jl = i / D, c = i % D, j = j0 + jl;
    float mx = -__builtin_huge_valf();
    for (int v = 0; v < mma_warps; ++v) mx = fmaxf(mx, merge[(v * 8 + jl) * (D + 2) + D]);
    float acc = 0.0f, sum = 0.0f;
    for (int v = 0; v < mma_warps; ++v) {
      const float* p = merge + (v * 8 + jl) * (D + 2);
      const float wgt = p[D] == -__builtin_huge_valf() ? 0.0f : exp2f(p[D] - mx);
      acc += wgt * p[c];
      sum += wgt * p[D + 1];
    }
    prm.part_o[partial_index(prm, b, h, split, j) * D + c] = acc;
    if (c == 0) {
      float* ml = prm.part_ml + partial_index(prm, b, h, split, j) * 2;
      ml[0] = mx;
      ml[1] = sum;
    }
  }
}

template <class KV, int D, bool Exact>
__global__ void __launch_bounds__(mma_warps * 32, 2) decode_mma_kernel(decode_params<KV> prm) {
  extern __shared__ __align__(16) unsigned char mma_smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  device_trap();  // the host dispatcher never launches this kernel below sm_80
#else
  // blockIdx.x = (b * kv_heads + h) * query_tiles + sub (sub: query heads 8 sub .. 8 sub + 7
  // of the group); blockIdx.y = work item: the window's first, so they are scheduled first.
  const int sub = static_cast<int>(blockIdx.x) % prm.query_tiles;
  const int h = static_cast<int>(blockIdx.x) / prm.query_tiles % prm.cache.kv_heads;
  const int b = static_cast<int>(blockIdx.x) / prm.query_tiles / prm.cache.kv_heads;
  if (static_cast<int>(blockIdx.y) < prm.window_items) {
    if (sub == 0) attend_window(prm, b, h, static_cast<int>(blockIdx.y), reinterpret_cast<float*>(mma_smem));
    return;
  }
  const int split = static_cast<int>(blockIdx.y) - prm.window_items;
  constexpr mma::geometry geo = mma::geometry_for(D);
  constexpr int ks = D / 16;
  const paged_kv_view<KV>& cache = prm.cache;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) & 31;
  const int g = lane >> 2, G = prm.group;
  const std::int64_t e = cache.entry(prm.slots[b], prm.layer, h);
  const entry_state<KV> st = cache.entries[e];
  const int records = st.tokens / mma::record_tokens;
  const int block_shift = __ffs(cache.block_tokens / mma::record_tokens) - 1;  // records per block: a power of two
  const int block_mask = (1 << block_shift) - 1;
  const int warps = prm.splits * mma_warps;
  const int gw = split * mma_warps + warp;
  const int first = static_cast<int>(static_cast<std::int64_t>(records) * gw / warps);
  const int last = static_cast<int>(static_cast<std::int64_t>(records) * (gw + 1) / warps);
  unsigned char* ring = mma_smem + static_cast<std::size_t>(warp) * mma_warp_bytes(D);
  auto* ql = reinterpret_cast<std::uint32_t*>(ring + mma_stages * geo.bytes);
  const std::int32_t* table = cache.tables + e * cache.max_blocks;

  auto issue = [&](int record, int stage) {
    const std::int32_t id = table[record >> block_shift];
    const std::byte* src = cache.block(id) + static_cast<std::size_t>(record & block_mask) * geo.bytes;
    unsigned char* dst = ring + stage * geo.bytes;
    for (int i = lane; i < geo.bytes / 16; i += 32) cp_async16(dst + 16 * i, src + 16 * i);
  };

  device_warp w;
  mma::warp_state<D> ws;
  const int j0 = 8 * sub;  // first query of this block's tile of the group
  const float* q_row =
      j0 + g < G ? prm.q + (static_cast<std::size_t>(b) * prm.q_heads + h * G + j0 + g) * D
                 : nullptr;
  mma::warp_begin<D>(w, ws, q_row, prm.scale_log2, ql);
  __syncwarp();

  for (int k = 0; k < mma_stages - 1; ++k) {
    if (first + k < last) issue(first + k, k);
    cp_async_commit();
  }
  for (int r = first; r < last; ++r) {
    const int k = r - first;
    if (r + mma_stages - 1 < last) issue(r + mma_stages - 1, (k + mma_stages - 1) % mma_stages);
    cp_async_commit();
    cp_async_wait<mma_stages - 1>();
    __syncwarp();
    mma::warp_record<D, Exact>(w, ws, ring + (k % mma_stages) * geo.bytes);
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  using V = quant::format_traits<typename KV::value>;
  float o[ks][4], m[2], l[2];
  float factor = 1.0f;
  if constexpr (requires { st.value.scale_exponent; }) factor = mma::pow2(st.value.scale_exponent);
  mma::warp_end<D>(w, ws, factor, V::level(3), V::level(2), o, m, l);

  merge_warps<KV, D>(prm, b, h, split, j0, G - j0 < 8 ? G - j0 : 8, o, m, l, mma_smem);
#endif
}

}  // namespace oscar::gpu::detail
