// SPDX-License-Identifier: Apache-2.0
/// \file
/// `oscar::gpu`: the thin portability layer between OSCAR's GPU code and the CUDA or HIP
/// runtime. One source serves both vendors: everything vendor-specific is an inline function or
/// an alias in this namespace, selected by which compiler is looking (nvcc or a HIP compiler);
/// no vendor name is renamed with a macro, so nothing leaks into the includer's code.
///
/// - types: `stream_t` (the caller's stream; every OSCAR call takes one), `status_t`;
/// - errors: `check(status, what)` throws `oscar::error` (errc::unsupported for a runtime
///   failure, errc::out_of_memory for a failed allocation) naming the call;
/// - memory: `device_buffer<T>` (device memory, RAII), `pinned_buffer<T>` (page-locked host
///   memory for truly asynchronous copies), `copy_async`, `fill_async` (all on a stream);
/// - `event` (timing and cross-stream ordering), `synchronize(stream)` (only when asked),
///   `device_info()` (multiprocessors, shared memory, warp size of the current device).
///
/// Nothing here synchronizes the device: copies and fills are asynchronous on the stream the
/// caller passes, and only `synchronize` and `event::elapsed_ms` wait.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "oscar/core/error.hpp"
#include "oscar/core/macros.hpp"

#if defined(OSCAR_PLATFORM_HIP) || (defined(OSCAR_WITH_HIP) && !defined(OSCAR_PLATFORM_CUDA))
#include <hip/hip_runtime.h>
#define OSCAR_GPU_RUNTIME_HIP 1
#elif defined(OSCAR_PLATFORM_CUDA) || defined(OSCAR_WITH_CUDA)
#include <cuda_runtime.h>
#define OSCAR_GPU_RUNTIME_CUDA 1
#else
#error "<oscar/backend/gpu/*.cuh> needs a GPU compiler (nvcc or a HIP compiler) or OSCAR_WITH_CUDA / OSCAR_WITH_HIP (link oscar::cuda or oscar::hip)"
#endif

namespace oscar::gpu {

#if defined(OSCAR_GPU_RUNTIME_HIP)
using stream_t = hipStream_t;
using status_t = hipError_t;
using native_event_t = hipEvent_t;
inline constexpr status_t status_ok = hipSuccess;
inline constexpr const char* platform_name = "HIP";
#else
using stream_t = cudaStream_t;
using status_t = cudaError_t;
using native_event_t = cudaEvent_t;
inline constexpr status_t status_ok = cudaSuccess;
inline constexpr const char* platform_name = "CUDA";
#endif

namespace detail {

inline const char* error_string(status_t s) noexcept {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  return hipGetErrorString(s);
#else
  return cudaGetErrorString(s);
#endif
}

inline bool is_out_of_memory(status_t s) noexcept {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  return s == hipErrorOutOfMemory;
#else
  return s == cudaErrorMemoryAllocation;
#endif
}

}  // namespace detail

/// Throws `oscar::error` when a runtime call failed: `errc::out_of_memory` for a failed
/// allocation, `errc::unsupported` otherwise (no device, a bad launch, a kernel fault). `what`
/// names the call, e.g. "cudaMalloc of the block pool".
inline void check(status_t status, const char* what,
                  const char* function = __builtin_FUNCTION(),
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (status == status_ok) [[likely]] return;
  ::oscar::detail::fail(detail::is_out_of_memory(status) ? errc::out_of_memory : errc::unsupported,
                        ::oscar::detail::concat(platform_name, " call failed: ", what, ": ",
                                                detail::error_string(status)),
                        function, file, line);
}

/// Checks that the last kernel launch on this thread was accepted (it does not wait for the
/// kernel; a fault while it runs is reported by a later call or by `synchronize`).
inline void check_launch(const char* kernel, const char* function = __builtin_FUNCTION(),
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipGetLastError(), kernel, function, file, line);
#else
  check(cudaGetLastError(), kernel, function, file, line);
#endif
}

/// Waits for everything queued on `stream` (the one blocking call of this layer, for callers
/// that ask for it: tests, benchmarks, copies back to the host).
inline void synchronize(stream_t stream) {
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipStreamSynchronize(stream), "hipStreamSynchronize");
#else
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
#endif
}

/// Asynchronous copy of `bytes` bytes on `stream`; the direction is inferred from the pointers
/// (unified addressing), so host<->device and device<->device copies use the same call. Host
/// memory should be pinned (`pinned_buffer`) for the copy to overlap with other work.
inline void copy_async(void* dst, const void* src, std::size_t bytes, stream_t stream) {
  if (bytes == 0) return;
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipMemcpyAsync(dst, src, bytes, hipMemcpyDefault, stream), "hipMemcpyAsync");
#else
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
#endif
}

/// Sets `bytes` bytes at device address `dst` to `value`, asynchronously on `stream`.
inline void fill_async(void* dst, int value, std::size_t bytes, stream_t stream) {
  if (bytes == 0) return;
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipMemsetAsync(dst, value, bytes, stream), "hipMemsetAsync");
#else
  check(cudaMemsetAsync(dst, value, bytes, stream), "cudaMemsetAsync");
#endif
}

/// What OSCAR's kernels need to know about the current device.
struct device_properties {
  std::string name;
  int multiprocessors = 0;
  int warp_size = 0;
  std::size_t shared_per_block_optin = 0;  ///< largest dynamic shared memory a block may ask for
  std::size_t shared_per_multiprocessor = 0;
  int major = 0;  ///< compute capability (CUDA) or gfx major (HIP)
  int minor = 0;
};

/// Properties of the current device; throws when there is none.
inline device_properties current_device() {
  device_properties p;
  int device = 0;
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipGetDevice(&device), "hipGetDevice");
  hipDeviceProp_t prop{};
  check(hipGetDeviceProperties(&prop, device), "hipGetDeviceProperties");
  p.shared_per_block_optin = prop.sharedMemPerBlock;
  p.shared_per_multiprocessor = prop.maxSharedMemoryPerMultiProcessor;
#else
  check(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  p.shared_per_block_optin = prop.sharedMemPerBlockOptin;
  p.shared_per_multiprocessor = prop.sharedMemPerMultiprocessor;
#endif
  p.name = prop.name;
  p.multiprocessors = prop.multiProcessorCount;
  p.warp_size = prop.warpSize;
  p.major = prop.major;
  p.minor = prop.minor;
  return p;
}

/// Lets `kernel` use `bytes` of dynamic shared memory per block (a runtime call only the first
/// time a kernel needs more than it was allowed; thread-safe).
template <class Kernel>
void allow_dynamic_shared(Kernel kernel, std::size_t bytes) {
  static std::mutex lock;
  static std::map<const void*, std::size_t> allowed;  // per kernel
  const std::lock_guard<std::mutex> guard(lock);
  std::size_t& limit =
      allowed.try_emplace(reinterpret_cast<const void*>(kernel), 48 * 1024).first->second;
  if (bytes <= limit) return;
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                            hipFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "hipFuncSetAttribute (dynamic shared memory)");
#else
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes)),
        "cudaFuncSetAttribute (dynamic shared memory)");
#endif
  limit = bytes;
}

/// Device memory for `n` objects of trivially copyable `T`, freed on destruction. Allocation
/// is synchronous (done once, up front); everything that moves data is asynchronous.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n) : size_(n) {
    if (n == 0) return;
    void* p = nullptr;
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipMalloc(&p, n * sizeof(T)), "hipMalloc");
#else
    check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
#endif
    data_ = static_cast<T*>(p);
  }
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { release(); }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return size_ * sizeof(T); }

 private:
  void release() noexcept {
    if (data_ == nullptr) return;
#if defined(OSCAR_GPU_RUNTIME_HIP)
    (void)hipFree(data_);  // nothing useful to do with a failure while releasing
#else
    (void)cudaFree(data_);
#endif
    data_ = nullptr;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Page-locked host memory for `n` objects of `T` (asynchronous copies need it to overlap).
template <class T>
class pinned_buffer {
 public:
  pinned_buffer() = default;
  explicit pinned_buffer(std::size_t n) : size_(n) {
    if (n == 0) return;
    void* p = nullptr;
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipHostMalloc(&p, n * sizeof(T), hipHostMallocDefault), "hipHostMalloc");
#else
    check(cudaMallocHost(&p, n * sizeof(T)), "cudaMallocHost");
#endif
    data_ = static_cast<T*>(p);
  }
  pinned_buffer(pinned_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;
  ~pinned_buffer() { release(); }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  T& operator[](std::size_t i) const noexcept { return data_[i]; }

 private:
  void release() noexcept {
    if (data_ == nullptr) return;
#if defined(OSCAR_GPU_RUNTIME_HIP)
    (void)hipHostFree(data_);
#else
    (void)cudaFreeHost(data_);
#endif
    data_ = nullptr;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A runtime event: `record` on a stream, then `elapsed_ms` between two events (which waits
/// for the later one) or `wait` to block the host until it has happened.
class event {
 public:
  event() {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipEventCreate(&e_), "hipEventCreate");
#else
    check(cudaEventCreate(&e_), "cudaEventCreate");
#endif
  }
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  ~event() {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    (void)hipEventDestroy(e_);
#else
    (void)cudaEventDestroy(e_);
#endif
  }
  void record(stream_t stream) {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipEventRecord(e_, stream), "hipEventRecord");
#else
    check(cudaEventRecord(e_, stream), "cudaEventRecord");
#endif
  }
  void wait() {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipEventSynchronize(e_), "hipEventSynchronize");
#else
    check(cudaEventSynchronize(e_), "cudaEventSynchronize");
#endif
  }
  /// True once the work recorded before this event has completed (never blocks).
  [[nodiscard]] bool done() const {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    const status_t s = hipEventQuery(e_);
    if (s == hipErrorNotReady) return false;
#else
    const status_t s = cudaEventQuery(e_);
    if (s == cudaErrorNotReady) return false;
#endif
    check(s, "event query");
    return true;
  }
  /// Milliseconds from `start` to this event (waits for this event).
  [[nodiscard]] float elapsed_ms(const event& start) {
    wait();
    float ms = 0.0f;
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipEventElapsedTime(&ms, start.e_, e_), "hipEventElapsedTime");
#else
    check(cudaEventElapsedTime(&ms, start.e_, e_), "cudaEventElapsedTime");
#endif
    return ms;
  }
  [[nodiscard]] native_event_t native() const noexcept { return e_; }

 private:
  native_event_t e_{};
};

/// A stream owned by the caller's code (tests, benchmarks); OSCAR's API takes `stream_t`.
class stream {
 public:
  stream() {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    check(hipStreamCreateWithFlags(&s_, hipStreamNonBlocking), "hipStreamCreate");
#else
    check(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "cudaStreamCreate");
#endif
  }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() {
#if defined(OSCAR_GPU_RUNTIME_HIP)
    (void)hipStreamDestroy(s_);
#else
    (void)cudaStreamDestroy(s_);
#endif
  }
  [[nodiscard]] stream_t get() const noexcept { return s_; }
  operator stream_t() const noexcept { return s_; }  // NOLINT: a stream is its handle

 private:
  stream_t s_{};
};

}  // namespace oscar::gpu
