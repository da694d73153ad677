// SPDX-License-Identifier: Apache-2.0
/// \file
/// What the device tests of OSCAR's GPU backend (`decode_device_test.cu`,
/// `features_device_test.cu`) share: the backend tag of the build, a pass/fail report, the
/// seeded generator, host <-> device copies through `oscar::gpu`, and `device_test_main`, the
/// common `main` (`--quick`, `--seed N`; exit status 0 passed, 1 a check failed, 2 a runtime
/// call failed, 77 no GPU). Include it after `oscar/backend/gpu/runtime.cuh`.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "oscar/backend/gpu/runtime.cuh"
#include "oscar/backend/tags.hpp"
#include "oscar/core/error.hpp"

namespace oscar_device_test {

#if defined(OSCAR_GPU_RUNTIME_CUDA)
using backend_tag = oscar::backend::cuda;
#else
using backend_tag = oscar::backend::hip;
#endif

/// Prints each check as it runs and counts the outcomes.
struct report {
  int passed = 0;
  int failed = 0;
  void check(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    ++(ok ? passed : failed);
  }
};

/// The run's generator, seeded by `device_test_main`.
inline std::mt19937_64 rng;

/// Device copy of a host vector (waits for the copy).
template <class T>
oscar::gpu::device_buffer<T> to_device(const std::vector<T>& x, oscar::gpu::stream_t s) {
  oscar::gpu::device_buffer<T> d(x.size());
  oscar::gpu::copy_async(d.data(), x.data(), x.size() * sizeof(T), s);
  oscar::gpu::synchronize(s);
  return d;
}

/// Host copy of a device buffer (waits for the copy).
template <class T>
std::vector<T> to_host(const oscar::gpu::device_buffer<T>& d, oscar::gpu::stream_t s) {
  std::vector<T> x(d.size());
  oscar::gpu::copy_async(x.data(), d.data(), d.bytes(), s);
  oscar::gpu::synchronize(s);
  return x;
}

/// Parses `--quick` and `--seed N`, skips (77) without a GPU, seeds `rng`, runs
/// `checks(report&, gpu::stream&, bool quick)` and turns the report or an exception into the
/// exit status.
template <class Checks>
int device_test_main(int argc, char** argv, Checks&& checks) {
  bool quick = false;
  std::uint64_t seed = std::random_device{}();
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
  }
  try {
    int devices = 0;
#if defined(OSCAR_GPU_RUNTIME_HIP)
    const bool have = hipGetDeviceCount(&devices) == hipSuccess && devices > 0;
#else
    const bool have = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
#endif
    if (!have) {
      std::printf("SKIPPED: no GPU device\n");
      return 77;
    }
    std::printf("device: %s; seed %llu%s\n", oscar::gpu::current_device().name.c_str(),
                static_cast<unsigned long long>(seed), quick ? " (quick)" : "");
    rng.seed(seed);
    report r;
    oscar::gpu::stream s;
    checks(r, s, quick);
    std::printf("%d passed, %d failed\n", r.passed, r.failed);
    return r.failed == 0 ? 0 : 1;
  } catch (const oscar::error& e) {
    std::printf("ERROR: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::printf("ERROR: %s\n", e.what());
    return 2;
  }
}

}  // namespace oscar_device_test
