// SPDX-License-Identifier: Apache-2.0
/// \file
/// Device-vs-host bit-exactness of OSCAR's core host/device functions.
///
/// One source for CUDA (nvcc) and HIP (clang): it runs each function below on the GPU and on
/// the host and requires bit-identical results:
///   - every half, bfloat16 and fp8 e4m3 bit pattern decoded to float and encoded back;
///   - ~13 million float bit patterns (a strided sweep over all 2^32, patterns at and next to
///     each format's round-to-nearest-even ties, and a dense sweep of the exponents where
///     subnormal, saturation and overflow paths are taken) encoded to half, bf16 and e4m3;
///   - 2-bit and 4-bit code packing (`pack_codes`, `get_code`), with a tail that is not a
///     whole byte;
///   - the randomized Hadamard rotation (`rotate_unchecked`, `unrotate_unchecked`) of 64-,
///     128- and 256-float vectors.
///
/// Compile device code without floating-point contraction (nvcc -fmad=false, clang
/// -ffp-contract=off), as tests/gpu/CMakeLists.txt does.
///
/// Exit status: 0 all checks passed, 1 a check failed (the mismatches are printed), 2 a GPU
/// runtime call failed, 77 no GPU on this machine (CTest: skipped).
///
/// The vendor runtime is reached only through the small `gpu` namespace of gpu_test_support.hpp;
/// nothing is renamed with macros.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "gpu_test_support.hpp"

#include "oscar/core/bitpack.hpp"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"

namespace {

using gpu_test::after_launch;
using gpu_test::blocks_for;
using gpu_test::device_buffer;
using gpu_test::gpu_error;
using gpu_test::threads_per_block;

// ---- comparison and reporting -------------------------------------------------------------------

std::uint32_t bits_of(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct report {
  int passed = 0;
  int failed = 0;
};

/// Compares `device` to `host` bit for bit; prints the first mismatches with `describe(i)`
/// (the input of item `i`) and counts the check as passed or failed.
template <class T, class Describe>
void compare(report& r, const char* what, const std::vector<T>& host, const std::vector<T>& device,
             Describe describe) {
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < host.size(); ++i) {
    if (std::memcmp(&host[i], &device[i], sizeof(T)) == 0) continue;
    if (++mismatches <= 8) {
      std::uint64_t h = 0;
      std::uint64_t d = 0;
      std::memcpy(&h, &host[i], sizeof(T));
      std::memcpy(&d, &device[i], sizeof(T));
      std::printf("  MISMATCH %s [%zu] input %s: host 0x%llx, device 0x%llx\n", what, i,
                  describe(i).c_str(), static_cast<unsigned long long>(h),
                  static_cast<unsigned long long>(d));
    }
  }
  if (host.size() != device.size() || mismatches != 0) {
    std::printf("FAIL %s: %zu of %zu results differ\n", what, mismatches, host.size());
    ++r.failed;
  } else {
    std::printf("ok   %s: %zu results bit-identical\n", what, host.size());
    ++r.passed;
  }
}

std::string hex(std::uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

/// A 32-bit mix for deterministic test data (the same on every run and machine).
constexpr std::uint32_t mix(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// ---- 1. every bit pattern of each 16/8-bit format: decode, then encode the result ------------

struct half_format {
  using bits_t = std::uint16_t;
  static constexpr const char* name = "half";
  static constexpr std::uint32_t patterns = 1u << 16;
  OSCAR_HD_INLINE static float decode(bits_t b) { return oscar::half_bits_to_float(b); }
  OSCAR_HD_INLINE static bits_t encode(float f) { return oscar::float_to_half_bits(f); }
};
struct bf16_format {
  using bits_t = std::uint16_t;
  static constexpr const char* name = "bf16";
  static constexpr std::uint32_t patterns = 1u << 16;
  OSCAR_HD_INLINE static float decode(bits_t b) { return oscar::bf16_bits_to_float(b); }
  OSCAR_HD_INLINE static bits_t encode(float f) { return oscar::float_to_bf16_bits(f); }
};
struct e4m3_format {
  using bits_t = std::uint8_t;
  static constexpr const char* name = "e4m3";
  static constexpr std::uint32_t patterns = 1u << 8;
  OSCAR_HD_INLINE static float decode(bits_t b) { return oscar::e4m3_bits_to_float(b); }
  OSCAR_HD_INLINE static bits_t encode(float f) { return oscar::float_to_e4m3_bits(f); }
};

template <class Format>
__global__ void decode_encode_kernel(std::uint32_t n, float* decoded,
                                     typename Format::bits_t* reencoded) {
  for (std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += blockDim.x * gridDim.x) {
    const float f = Format::decode(static_cast<typename Format::bits_t>(i));
    decoded[i] = f;
    reencoded[i] = Format::encode(f);
  }
}

template <class Format>
void check_all_patterns(report& r) {
  using bits_t = typename Format::bits_t;
  constexpr std::uint32_t n = Format::patterns;
  std::vector<float> host_decoded(n);
  std::vector<bits_t> host_reencoded(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    host_decoded[i] = Format::decode(static_cast<bits_t>(i));
    host_reencoded[i] = Format::encode(host_decoded[i]);
  }

  device_buffer<float> decoded(n);
  device_buffer<bits_t> reencoded(n);
  decode_encode_kernel<Format>
      <<<blocks_for(n), threads_per_block>>>(n, decoded.get(), reencoded.get());
  after_launch("decode_encode_kernel", __LINE__);

  const auto input = [](std::size_t i) { return hex(i); };
  compare(r, (std::string(Format::name) + " -> float").c_str(), host_decoded, decoded.to_host(),
          input);
  compare(r, (std::string(Format::name) + " -> float -> " + Format::name).c_str(), host_reencoded,
          reencoded.to_host(), input);
}

// ---- 2. float bit patterns encoded to every format ----------------------------------------------

std::vector<std::uint32_t> float_patterns() {
  std::vector<std::uint32_t> p;
  // (a) strided sweep over the whole uint32 space: 4,206,629 patterns, stride 1021 (odd, so the
  //     low bits vary too), from 0x00000000 to 0xffffff94: both signs, every exponent, NaNs.
  constexpr std::uint32_t stride = 1021;
  for (std::uint64_t x = 0; x <= 0xffffffffull; x += stride)
    p.push_back(static_cast<std::uint32_t>(x));
  // (b) round-to-nearest-even ties and their neighbours for the shifts of the normal paths
  //     (13: half, 16: bf16, 20: e4m3) on random bases: 2^18 * 3 * 3 patterns.
  for (std::uint32_t i = 0; i < (1u << 18); ++i) {
    const std::uint32_t base = mix(i * 2654435761u + 1u);
    for (const int shift : {13, 16, 20}) {
      const std::uint32_t low_mask = (1u << shift) - 1u;
      const std::uint32_t tie = (base & ~low_mask) | (1u << (shift - 1));
      p.push_back(tie - 1u);
      p.push_back(tie);
      p.push_back(tie + 1u);
    }
  }
  // (c) dense sweep of biased exponents 96..143 (|x| from 2^-31 to 2^17, both signs): the
  //     subnormal and flush-to-zero paths of half (2^-25..2^-14) and e4m3 (2^-10..2^-6), e4m3
  //     saturation at 448 and half overflow at 65520. Mantissa stride 127 (odd).
  for (std::uint32_t sign = 0; sign < 2; ++sign) {
    for (std::uint32_t exponent = 96; exponent < 144; ++exponent) {
      for (std::uint32_t mantissa = 0; mantissa < (1u << 23); mantissa += 127) {
        p.push_back(sign << 31 | exponent << 23 | mantissa);
      }
    }
  }
  return p;
}

__global__ void encode_kernel(std::size_t n, const std::uint32_t* patterns, std::uint16_t* to_half,
                              std::uint16_t* to_bf16, std::uint8_t* to_e4m3) {
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += static_cast<std::size_t>(blockDim.x) * gridDim.x) {
    const float f = oscar::detail::bits_float(patterns[i]);
    to_half[i] = oscar::float_to_half_bits(f);
    to_bf16[i] = oscar::float_to_bf16_bits(f);
    to_e4m3[i] = oscar::float_to_e4m3_bits(f);
  }
}

void check_float_patterns(report& r) {
  const std::vector<std::uint32_t> patterns = float_patterns();
  const std::size_t n = patterns.size();
  std::vector<std::uint16_t> host_half(n);
  std::vector<std::uint16_t> host_bf16(n);
  std::vector<std::uint8_t> host_e4m3(n);
  for (std::size_t i = 0; i < n; ++i) {
    const float f = oscar::detail::bits_float(patterns[i]);
    host_half[i] = oscar::float_to_half_bits(f);
    host_bf16[i] = oscar::float_to_bf16_bits(f);
    host_e4m3[i] = oscar::float_to_e4m3_bits(f);
  }

  device_buffer<std::uint32_t> input(patterns);
  device_buffer<std::uint16_t> to_half(n);
  device_buffer<std::uint16_t> to_bf16(n);
  device_buffer<std::uint8_t> to_e4m3(n);
  encode_kernel<<<blocks_for(n), threads_per_block>>>(n, input.get(), to_half.get(), to_bf16.get(),
                                                      to_e4m3.get());
  after_launch("encode_kernel", __LINE__);

  const auto describe = [&](std::size_t i) { return "float bits " + hex(patterns[i]); };
  compare(r, "float -> half", host_half, to_half.to_host(), describe);
  compare(r, "float -> bf16", host_bf16, to_bf16.to_host(), describe);
  compare(r, "float -> e4m3", host_e4m3, to_e4m3.to_host(), describe);
}

// ---- 3. 2- and 4-bit code packing ---------------------------------------------------------------

constexpr int pack_rows = 4096;
constexpr int codes_per_row = 130;  // not a multiple of 4: the last byte is partial

/// Packs each row of codes, then reads every code back with get_code.
template <int Bits>
__global__ void pack_kernel(const std::uint8_t* codes, std::uint8_t* packed,
                            std::uint8_t* unpacked) {
  constexpr int row_bytes = oscar::packed_bytes<Bits>(codes_per_row);
  for (int row = blockIdx.x * blockDim.x + threadIdx.x; row < pack_rows;
       row += blockDim.x * gridDim.x) {
    std::uint8_t* out = packed + static_cast<std::size_t>(row) * row_bytes;
    oscar::pack_codes<Bits>(codes + static_cast<std::size_t>(row) * codes_per_row, codes_per_row,
                            out);
    for (int i = 0; i < codes_per_row; ++i) {
      unpacked[static_cast<std::size_t>(row) * codes_per_row + i] = oscar::get_code<Bits>(out, i);
    }
  }
}

template <int Bits>
void check_packing(report& r, const std::vector<std::uint8_t>& codes) {
  constexpr int row_bytes = oscar::packed_bytes<Bits>(codes_per_row);
  std::vector<std::uint8_t> host_packed(static_cast<std::size_t>(pack_rows) * row_bytes);
  std::vector<std::uint8_t> host_unpacked(codes.size());
  for (int row = 0; row < pack_rows; ++row) {
    std::uint8_t* out = host_packed.data() + static_cast<std::size_t>(row) * row_bytes;
    oscar::pack_codes<Bits>(codes.data() + static_cast<std::size_t>(row) * codes_per_row,
                            codes_per_row, out);
    for (int i = 0; i < codes_per_row; ++i) {
      host_unpacked[static_cast<std::size_t>(row) * codes_per_row + i] =
          oscar::get_code<Bits>(out, i);
    }
  }

  device_buffer<std::uint8_t> input(codes);
  device_buffer<std::uint8_t> packed(host_packed.size());
  device_buffer<std::uint8_t> unpacked(codes.size());
  pack_kernel<Bits>
      <<<blocks_for(pack_rows), threads_per_block>>>(input.get(), packed.get(), unpacked.get());
  after_launch("pack_kernel", __LINE__);

  const std::string name = "pack_codes<" + std::to_string(Bits) + ">";
  const auto describe_byte = [&](std::size_t i) {
    return "row " + std::to_string(i / row_bytes) + " byte " + std::to_string(i % row_bytes);
  };
  const auto describe_code = [&](std::size_t i) { return "code " + hex(codes[i]); };
  compare(r, name.c_str(), host_packed, packed.to_host(), describe_byte);
  const std::vector<std::uint8_t> device_unpacked = unpacked.to_host();
  compare(r, ("get_code<" + std::to_string(Bits) + ">").c_str(), host_unpacked, device_unpacked,
          describe_code);

  // And the round trip itself: unpack(pack(c)) keeps the low Bits bits of every code.
  std::size_t lost = 0;
  for (std::size_t i = 0; i < codes.size(); ++i) {
    if (device_unpacked[i] != (codes[i] & ((1u << Bits) - 1u))) ++lost;
  }
  if (lost != 0) {
    std::printf("FAIL %s round trip: %zu of %zu codes changed\n", name.c_str(), lost, codes.size());
    ++r.failed;
  } else {
    std::printf("ok   %s round trip: %zu codes\n", name.c_str(), codes.size());
    ++r.passed;
  }
}

// ---- 4. Hadamard rotation -----------------------------------------------------------------------

constexpr int rotation_vectors = 4096;

__global__ void rotate_kernel(int n, float* rotated, float* restored) {
  for (int v = blockIdx.x * blockDim.x + threadIdx.x; v < rotation_vectors;
       v += blockDim.x * gridDim.x) {
    float* x = rotated + static_cast<std::size_t>(v) * n;
    float* y = restored + static_cast<std::size_t>(v) * n;
    oscar::rotate_unchecked(x, n);
    for (int i = 0; i < n; ++i) y[i] = x[i];
    oscar::unrotate_unchecked(y, n);
  }
}

/// Deterministic vectors in [-8, 8), with an outlier channel in every 4th vector and a few
/// subnormal entries (no NaN: NaN payloads after arithmetic differ between CPUs and GPUs).
std::vector<float> rotation_input(int n) {
  std::vector<float> x(static_cast<std::size_t>(rotation_vectors) * n);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const std::uint32_t h = mix(static_cast<std::uint32_t>(i) ^ 0x5bd1e995u);
    x[i] = (static_cast<float>(h >> 8) * (1.0f / 16777216.0f) - 0.5f) * 16.0f;
  }
  for (int v = 0; v < rotation_vectors; v += 4) x[static_cast<std::size_t>(v) * n + 3] *= 300.0f;
  for (int v = 1; v < rotation_vectors; v += 97) x[static_cast<std::size_t>(v) * n] = 1.0e-40f;
  return x;
}

void check_rotation(report& r, int n) {
  const std::vector<float> input = rotation_input(n);
  std::vector<float> host_rotated = input;
  std::vector<float> host_restored(input.size());
  for (int v = 0; v < rotation_vectors; ++v) {
    float* x = host_rotated.data() + static_cast<std::size_t>(v) * n;
    float* y = host_restored.data() + static_cast<std::size_t>(v) * n;
    oscar::rotate_unchecked(x, n);
    std::copy(x, x + n, y);
    oscar::unrotate_unchecked(y, n);
  }

  device_buffer<float> rotated(input);
  device_buffer<float> restored(input.size());
  rotate_kernel<<<blocks_for(rotation_vectors), threads_per_block>>>(n, rotated.get(),
                                                                     restored.get());
  after_launch("rotate_kernel", __LINE__);

  const auto describe = [&](std::size_t i) {
    return "vector " + std::to_string(i / n) + " element " + std::to_string(i % n) + " = " +
           hex(bits_of(input[i]));
  };
  const std::string dim = std::to_string(n);
  compare(r, ("rotate_unchecked n=" + dim).c_str(), host_rotated, rotated.to_host(), describe);
  compare(r, ("unrotate_unchecked n=" + dim).c_str(), host_restored, restored.to_host(), describe);
}

}  // namespace

int main() {
  try {
    if (!gpu_test::announce_device()) return gpu_test::no_device_exit_code;

    report r;
    check_all_patterns<half_format>(r);
    check_all_patterns<bf16_format>(r);
    check_all_patterns<e4m3_format>(r);
    check_float_patterns(r);

    std::vector<std::uint8_t> codes(static_cast<std::size_t>(pack_rows) * codes_per_row);
    for (std::size_t i = 0; i < codes.size(); ++i) {
      // Full bytes, not just valid codes: pack_codes must ignore the high bits.
      codes[i] = static_cast<std::uint8_t>(mix(static_cast<std::uint32_t>(i)) >> 24);
    }
    check_packing<2>(r, codes);
    check_packing<4>(r, codes);

    for (const int n : {64, 128, 256}) check_rotation(r, n);

    std::printf("%d passed, %d failed\n", r.passed, r.failed);
    return r.failed == 0 ? 0 : 1;
  } catch (const gpu_error& e) {
    std::printf("GPU ERROR: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::printf("ERROR: %s\n", e.what());
    return 2;
  }
}
