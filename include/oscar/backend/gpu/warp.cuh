// SPDX-License-Identifier: Apache-2.0
/// \file
/// Warp-level primitives of `oscar::gpu` for device code, one spelling for CUDA and HIP.
///
/// - `warp_size`: 32 on NVIDIA GPUs, the wavefront size on AMD GPUs (64 on CDNA: gfx90a,
///   gfx942); a compile-time constant of the device pass.
/// - `shfl_xor`, `shfl`: shuffles with an explicit `width` (a power of two <= warp_size): lanes
///   exchange values inside aligned segments of `width` lanes. CUDA's full-warp mask is used,
///   so every lane of the warp must call them together (as HIP's wavefront shuffles require).
/// - `sync_warp()`: orders shared-memory accesses among the lanes of a warp.
/// - `device_trap(kernel)`: stops a kernel that reached a path the build does not support (a
///   feature-gated intrinsic compiled for a target without it); the host sees a launch failure.
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include "oscar/core/macros.hpp"

namespace oscar::gpu {

#if defined(OSCAR_GPU_RUNTIME_HIP)
#if defined(__AMDGCN_WAVEFRONT_SIZE)
inline constexpr int warp_size = __AMDGCN_WAVEFRONT_SIZE;
#else
inline constexpr int warp_size = 64;  // CDNA; host pass and targets without the macro
#endif
#else
inline constexpr int warp_size = 32;
#endif

#if defined(OSCAR_GPU_COMPILER)

/// Lane index of the calling thread inside its warp (blocks are 1-D in OSCAR's kernels).
OSCAR_DEVICE OSCAR_FORCEINLINE int lane_id() noexcept {
  return static_cast<int>(threadIdx.x) & (warp_size - 1);
}

/// Warp index of the calling thread inside its block.
OSCAR_DEVICE OSCAR_FORCEINLINE int warp_id() noexcept {
  return static_cast<int>(threadIdx.x) / warp_size;
}

/// `v` of lane `lane ^ mask` (inside segments of `width` lanes).
template <class T>
OSCAR_DEVICE OSCAR_FORCEINLINE T shfl_xor(T v, int mask, int width = warp_size) noexcept {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  return __shfl_xor(v, mask, width);
#else
  return __shfl_xor_sync(0xffffffffu, v, mask, width);
#endif
}

/// `v` of lane `src` of the caller's segment of `width` lanes.
template <class T>
OSCAR_DEVICE OSCAR_FORCEINLINE T shfl(T v, int src, int width = warp_size) noexcept {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  return __shfl(v, src, width);
#else
  return __shfl_sync(0xffffffffu, v, src, width);
#endif
}

/// Orders the shared-memory accesses of the warp's lanes (a wavefront runs in lockstep on AMD
/// GPUs; the compiler barrier keeps accesses in place).
OSCAR_DEVICE OSCAR_FORCEINLINE void sync_warp() noexcept {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
  __builtin_amdgcn_wave_barrier();
  __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
#else
  __syncwarp();
#endif
}

/// Sum over the `width` lanes of the caller's segment (every lane gets the sum).
template <class T>
OSCAR_DEVICE OSCAR_FORCEINLINE T warp_sum(T v, int width = warp_size) noexcept {
  for (int m = width / 2; m > 0; m /= 2) v += shfl_xor(v, m, width);
  return v;
}

/// Maximum over the `width` lanes of the caller's segment.
template <class T>
OSCAR_DEVICE OSCAR_FORCEINLINE T warp_max(T v, int width = warp_size) noexcept {
  for (int m = width / 2; m > 0; m /= 2) {
    const T o = shfl_xor(v, m, width);
    v = o > v ? o : v;
  }
  return v;
}

/// Stops the kernel: reached a path this build does not support.
OSCAR_DEVICE OSCAR_FORCEINLINE void device_trap() noexcept {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  __builtin_trap();
#else
  __trap();
#endif
}

#endif  // OSCAR_GPU_COMPILER

}  // namespace oscar::gpu
