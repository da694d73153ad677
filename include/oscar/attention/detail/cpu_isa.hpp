// SPDX-License-Identifier: Apache-2.0
/// \file
/// Which instruction set the CPU attention kernels (`attention/onednn.hpp`) run with.
///
/// The kernels are compiled for every set the compiler can target (GCC or Clang on x86-64:
/// scalar, AVX2 + FMA + F16C, AVX-512 F/BW/DQ/VL), whatever `-march` the including file uses,
/// through target regions (`cpu_simd.hpp`); elsewhere only the portable scalar code exists.
/// At run time the best set this CPU supports is used. When the compiler's own flags already
/// enable a set (`__AVX512F__`, `__AVX2__` predefined), no run-time check is needed for it.
///
/// For tests and debugging the set can be lowered, never raised: by the environment variable
/// `OSCAR_CPU_ISA=scalar|avx2|avx512` (read once) or by `set_cpu_isa_limit`.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "oscar/core/macros.hpp"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(OSCAR_GPU_COMPILER)
/// 1 when the AVX2 and AVX-512 kernels are compiled (GCC or Clang on x86).
#define OSCAR_ATTENTION_X86_KERNELS 1
#include <cpuid.h>
#else
#define OSCAR_ATTENTION_X86_KERNELS 0
#endif

namespace oscar::attention {

/// Instruction sets of the CPU attention kernels, in increasing order.
enum class cpu_isa : std::uint8_t {
  scalar,  ///< portable C++, one float at a time
  avx2,    ///< 8 floats: AVX2, FMA, F16C
  avx512,  ///< 16 floats: AVX-512 F, BW, DQ, VL
};

constexpr std::string_view to_string(cpu_isa isa) noexcept {
  return isa == cpu_isa::avx512 ? "avx512" : isa == cpu_isa::avx2 ? "avx2" : "scalar";
}

namespace detail {

inline cpu_isa detect_cpu_isa() noexcept {
#if OSCAR_ATTENTION_X86_KERNELS && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__AVX512VL__) && defined(__FMA__) && defined(__F16C__) && \
    defined(__BMI2__)
  return cpu_isa::avx512;  // the compiler's flags already require it
#elif OSCAR_ATTENTION_X86_KERNELS
  __builtin_cpu_init();
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && f16c;
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return cpu_isa::avx512;
  }
  return avx2 ? cpu_isa::avx2 : cpu_isa::scalar;
#else
  return cpu_isa::scalar;
#endif
}

/// The limit set by `set_cpu_isa_limit`, initially from `OSCAR_CPU_ISA` (or none).
inline std::atomic<cpu_isa>& cpu_isa_limit() noexcept {
  static std::atomic<cpu_isa> limit = [] {
    const char* env = std::getenv("OSCAR_CPU_ISA");
    const std::string_view name = env ? env : "";
    return name == "scalar" ? cpu_isa::scalar : name == "avx2" ? cpu_isa::avx2 : cpu_isa::avx512;
  }();
  return limit;
}

}  // namespace detail

/// The best instruction set that both this build and this CPU support.
inline cpu_isa supported_cpu_isa() noexcept {
  static const cpu_isa isa = detail::detect_cpu_isa();
  return isa;
}

/// The instruction set the CPU kernels use now: `supported_cpu_isa()`, lowered to the limit.
inline cpu_isa active_cpu_isa() noexcept {
  const cpu_isa limit = detail::cpu_isa_limit().load(std::memory_order_relaxed);
  const cpu_isa best = supported_cpu_isa();
  return limit < best ? limit : best;
}

/// Lowers (or restores, with `cpu_isa::avx512`) the instruction set of later calls, process
/// wide: for tests that run every kernel path on one machine, and for debugging.
inline void set_cpu_isa_limit(cpu_isa limit) noexcept {
  detail::cpu_isa_limit().store(limit, std::memory_order_relaxed);
}

}  // namespace oscar::attention
