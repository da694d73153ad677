// SPDX-License-Identifier: Apache-2.0
/// \file
/// Compiler and platform detection, and the host/device function qualifiers.
///
/// OSCAR headers compile as plain host C++ everywhere. When a GPU compiler sees them, the same
/// inline functions become callable from device code through `OSCAR_HOST_DEVICE`. Nothing here
/// renames vendor APIs: GPU code that needs them lives in `backend/gpu/`.
#pragma once

// ---- platform: which compiler pass is looking at this header --------------------------------
#if defined(__HIP__) || defined(__HIPCC__)
#define OSCAR_PLATFORM_HIP 1
#elif defined(__CUDACC__)
#define OSCAR_PLATFORM_CUDA 1
#endif

#if defined(OSCAR_PLATFORM_HIP) || defined(OSCAR_PLATFORM_CUDA)
#define OSCAR_GPU_COMPILER 1
#endif

// True only in the device pass of a GPU compile (never in host code, never in plain C++).
#if (defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__))
#define OSCAR_DEVICE_CODE 1
#endif

// ---- function qualifiers -------------------------------------------------------------------
#if defined(OSCAR_GPU_COMPILER)
#define OSCAR_HOST_DEVICE __host__ __device__
#define OSCAR_DEVICE __device__
#else
#define OSCAR_HOST_DEVICE
#define OSCAR_DEVICE
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define OSCAR_FORCEINLINE __forceinline
#else
#define OSCAR_FORCEINLINE inline __attribute__((always_inline))
#endif

/// Marks a function usable on host and device that should be inlined.
#define OSCAR_HD_INLINE OSCAR_HOST_DEVICE OSCAR_FORCEINLINE
