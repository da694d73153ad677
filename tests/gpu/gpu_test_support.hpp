// SPDX-License-Identifier: Apache-2.0
/// \file
/// Shared support for the device-vs-host tests in tests/gpu: a thin `gpu` namespace over the
/// CUDA or HIP runtime, error handling (`CHECK_GPU`, `after_launch`), and `device_buffer`.
///
/// One source for CUDA (nvcc) and HIP (clang). The vendor runtime is reached only through the
/// `gpu` namespace below; nothing is renamed with macros. A failed runtime call throws
/// `gpu_test::gpu_error` naming the call and where it was made; the tests' main() prints it and
/// exits with 2.
#pragma once

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <cstdio>
#include <string>
#include <vector>

#if defined(__HIP__)
#include <hip/hip_runtime.h>
#else
#include <cuda_runtime.h>
#endif

// ---- portability shim: thin wrappers over the CUDA or HIP runtime -----------------------------
namespace gpu {

#if defined(__HIP__)
using error_t = hipError_t;
inline constexpr error_t success = hipSuccess;
inline const char* error_string(error_t e) { return hipGetErrorString(e); }
inline error_t device_count(int* n) { return hipGetDeviceCount(n); }
inline error_t device_name(int device, std::string& name) {
  hipDeviceProp_t prop{};
  const error_t e = hipGetDeviceProperties(&prop, device);
  if (e == success) name = prop.name;
  return e;
}
inline error_t malloc_bytes(void** ptr, std::size_t bytes) { return hipMalloc(ptr, bytes); }
inline error_t free_bytes(void* ptr) { return hipFree(ptr); }
inline error_t memset_bytes(void* ptr, int value, std::size_t bytes) {
  return hipMemset(ptr, value, bytes);
}
inline error_t copy_to_device(void* dst, const void* src, std::size_t bytes) {
  return hipMemcpy(dst, src, bytes, hipMemcpyHostToDevice);
}
inline error_t copy_to_host(void* dst, const void* src, std::size_t bytes) {
  return hipMemcpy(dst, src, bytes, hipMemcpyDeviceToHost);
}
inline error_t last_launch_error() { return hipGetLastError(); }
inline error_t synchronize() { return hipDeviceSynchronize(); }
#else
using error_t = cudaError_t;
inline constexpr error_t success = cudaSuccess;
inline const char* error_string(error_t e) { return cudaGetErrorString(e); }
inline error_t device_count(int* n) { return cudaGetDeviceCount(n); }
inline error_t device_name(int device, std::string& name) {
  cudaDeviceProp prop{};
  const error_t e = cudaGetDeviceProperties(&prop, device);
  if (e == success) name = prop.name;
  return e;
}
inline error_t malloc_bytes(void** ptr, std::size_t bytes) { return cudaMalloc(ptr, bytes); }
inline error_t free_bytes(void* ptr) { return cudaFree(ptr); }
inline error_t memset_bytes(void* ptr, int value, std::size_t bytes) {
  return cudaMemset(ptr, value, bytes);
}
inline error_t copy_to_device(void* dst, const void* src, std::size_t bytes) {
  return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
}
inline error_t copy_to_host(void* dst, const void* src, std::size_t bytes) {
  return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
}
inline error_t last_launch_error() { return cudaGetLastError(); }
inline error_t synchronize() { return cudaDeviceSynchronize(); }
#endif

}  // namespace gpu

namespace gpu_test {

// ---- error handling -----------------------------------------------------------------------------

/// A failed GPU runtime call; main() prints it and exits with 2.
struct gpu_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline void check(gpu::error_t status, const char* call, const char* file, int line) {
  if (status != gpu::success) {
    throw gpu_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                    gpu::error_string(status));
  }
}

#define CHECK_GPU(call) ::gpu_test::check((call), #call, __FILE__, __LINE__)

/// Checks the launch itself, then waits for the kernel and checks how it ended. `file` defaults
/// to the caller's file.
inline void after_launch(const char* kernel, int line, const char* file = __builtin_FILE()) {
  check(gpu::last_launch_error(), kernel, file, line);
  check(gpu::synchronize(), kernel, file, line);
}

/// Device memory for `n` elements of `T`, freed on scope exit.
template <class T>
class device_buffer {
 public:
  explicit device_buffer(std::size_t n) : size_(n) {
    void* ptr = nullptr;
    CHECK_GPU(gpu::malloc_bytes(&ptr, bytes()));
    data_ = static_cast<T*>(ptr);
  }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) {
    CHECK_GPU(gpu::copy_to_device(data_, host.data(), bytes()));
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { (void)gpu::free_bytes(data_); }  // nothing useful to do on failure here

  [[nodiscard]] T* get() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t bytes() const noexcept { return size_ * sizeof(T); }

  /// Sets every byte to `value`, e.g. to poison an output buffer before a kernel writes it.
  void fill_bytes(unsigned char value) { CHECK_GPU(gpu::memset_bytes(data_, value, bytes())); }

  [[nodiscard]] std::vector<T> to_host() const {
    std::vector<T> host(size_);
    CHECK_GPU(gpu::copy_to_host(host.data(), data_, bytes()));
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

inline constexpr unsigned threads_per_block = 256;

/// Blocks for a grid-stride loop over `n` items.
inline unsigned blocks_for(std::size_t n) {
  const std::size_t blocks = (n + threads_per_block - 1) / threads_per_block;
  return static_cast<unsigned>(std::clamp<std::size_t>(blocks, 1, 8192));
}

/// Exit status meaning "no GPU here": CTest reports the test as skipped.
inline constexpr int no_device_exit_code = 77;

/// Prints device 0's name and returns true, or prints why there is none and returns false.
inline bool announce_device() {
  int devices = 0;
  const gpu::error_t status = gpu::device_count(&devices);
  if (status != gpu::success || devices == 0) {
    std::printf("SKIPPED: no GPU device (%s)\n",
                status != gpu::success ? gpu::error_string(status) : "device count is 0");
    return false;
  }
  std::string name;
  CHECK_GPU(gpu::device_name(0, name));
  std::printf("device 0: %s\n", name.c_str());
  return true;
}

}  // namespace gpu_test
