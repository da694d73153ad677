// SPDX-License-Identifier: Apache-2.0
/// \file
/// Device-vs-host bit-exactness of the tensor formats' `encode_tile` and `decode_tile`.
///
/// One source for CUDA (nvcc) and HIP (clang). For each format below and head_dim 64 and 128
/// (where the format supports it), seeded synthetic keys (`oscar::testing::synthetic_keys`:
/// outlier channels, per-channel bias) are cut into tiles of `tokens_per_tile<F>()` tokens of
/// one head; each head's `head_params` come from the host `calibrate` over that head's data.
/// Then, with one GPU thread per tile:
///   (a) every tile is encoded on the device and its blocks must equal the host `encode_tile`
///       blocks byte for byte;
///   (b) the host-encoded blocks are decoded on the device and the floats must equal the host
///       `decode_tile` floats bit for bit.
/// The four heads of each data set have different magnitudes so that the saturation (fp16
/// scales beyond 65504) and subnormal-scale paths are taken too, and some tiles are all zero
/// or constant.
///
/// Output buffers are poisoned before every kernel (device: 0xFF bytes; host: 0xA5 bytes), so
/// a byte or float that one side leaves unwritten shows up as a mismatch.
///
/// Compile device code without floating-point contraction (nvcc -fmad=false, clang
/// -ffp-contract=off), as tests/gpu/CMakeLists.txt does.
///
/// Exit status: 0 all checks passed, 1 a check failed (the mismatches are printed), 2 a GPU
/// runtime call failed, 77 no GPU on this machine (CTest: skipped).

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "gpu_test_support.hpp"

#include "oscar/quant/formats.hpp"

#include "oscar/testing/synthetic_kv.hpp"

namespace q = oscar::quant;

namespace {

using gpu_test::after_launch;
using gpu_test::blocks_for;
using gpu_test::device_buffer;
using gpu_test::gpu_error;
using gpu_test::threads_per_block;

// ---- test data ----------------------------------------------------------------------------------

constexpr int heads = 4;
constexpr int tiles_per_head = 1024;
constexpr std::uint64_t seed = 0x05ca7f00du;

/// Magnitude of each head: ordinary, tiny (subnormal fp16 scales), huge (fp16 scales and values
/// saturate), ordinary with zero and constant tiles.
constexpr float head_scale[heads] = {1.0f, 1.0e-4f, 2.0e5f, 1.0f};

/// `heads * tokens * head_dim` floats, head-major: head h's tokens are contiguous, so tile i of
/// head h starts at token i * tokens_per_tile of that head.
std::vector<float> make_heads(int tokens, int head_dim) {
  const oscar::testing::dense_kv keys =
      oscar::testing::synthetic_keys(tokens, heads, head_dim, seed + static_cast<unsigned>(head_dim));
  std::vector<float> x(static_cast<std::size_t>(heads) * tokens * head_dim);
  for (int h = 0; h < heads; ++h) {
    for (int t = 0; t < tokens; ++t) {
      for (int d = 0; d < head_dim; ++d) {
        x[(static_cast<std::size_t>(h) * tokens + t) * head_dim + d] =
            keys.data[(static_cast<std::size_t>(t) * heads + h) * head_dim + d] * head_scale[h];
      }
    }
  }
  return x;
}

/// Head 3: every 17th tile all zero, every 23rd tile constant.
void add_special_tiles(std::vector<float>& x, int tokens, int head_dim, int tile_tokens) {
  const std::size_t tile_floats = static_cast<std::size_t>(tile_tokens) * head_dim;
  float* head = x.data() + static_cast<std::size_t>(3) * tokens * head_dim;
  for (int tile = 0; tile < tokens / tile_tokens; ++tile) {
    float* p = head + tile * tile_floats;
    if (tile % 17 == 5) {
      for (std::size_t i = 0; i < tile_floats; ++i) p[i] = 0.0f;
    } else if (tile % 23 == 7) {
      for (std::size_t i = 0; i < tile_floats; ++i) p[i] = 3.0f;
    }
  }
}

// ---- kernels: one thread per tile ---------------------------------------------------------------

template <class F>
__global__ void encode_kernel(int tiles, int head_dim, int tile_floats, int tile_blocks,
                              const float* x,
                              const typename q::format_traits<F>::head_params* params,
                              typename q::format_traits<F>::block* out) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < tiles; i += blockDim.x * gridDim.x) {
    q::format_traits<F>::encode_tile(x + static_cast<std::size_t>(i) * tile_floats, head_dim,
                                     params[i / tiles_per_head],
                                     out + static_cast<std::size_t>(i) * tile_blocks);
  }
}

template <class F>
__global__ void decode_kernel(int tiles, int head_dim, int tile_floats, int tile_blocks,
                              const typename q::format_traits<F>::block* in,
                              const typename q::format_traits<F>::head_params* params, float* y) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < tiles; i += blockDim.x * gridDim.x) {
    q::format_traits<F>::decode_tile(in + static_cast<std::size_t>(i) * tile_blocks, head_dim,
                                     params[i / tiles_per_head],
                                     y + static_cast<std::size_t>(i) * tile_floats);
  }
}

// ---- comparison and reporting -------------------------------------------------------------------

constexpr int max_printed = 6;

struct counts {
  long tiles = 0;             ///< tiles checked
  long mismatched_tiles = 0;  ///< tiles with at least one differing byte or float
  long mismatches = 0;        ///< differing bytes (encode) or floats (decode)
};

struct report {
  int passed = 0;
  int failed = 0;
};

std::uint32_t bits_of(float f) {
  std::uint32_t u = 0;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

/// Compares `tiles` tiles of `tile_bytes` bytes each.
counts compare_bytes(const char* what, int head_dim, int tiles, std::size_t tile_bytes,
                     const std::uint8_t* host, const std::uint8_t* device) {
  counts c;
  c.tiles = tiles;
  for (int t = 0; t < tiles; ++t) {
    const std::uint8_t* h = host + t * tile_bytes;
    const std::uint8_t* d = device + t * tile_bytes;
    if (std::memcmp(h, d, tile_bytes) == 0) continue;
    ++c.mismatched_tiles;
    for (std::size_t b = 0; b < tile_bytes; ++b) {
      if (h[b] == d[b]) continue;
      if (++c.mismatches <= max_printed) {
        std::printf("  MISMATCH %s head_dim %d: tile %d (head %d) byte %zu: host 0x%02x, "
                    "device 0x%02x\n",
                    what, head_dim, t, t / tiles_per_head, b, h[b], d[b]);
      }
    }
  }
  return c;
}

/// Compares `tiles` tiles of `tile_floats` floats each, bit for bit.
counts compare_floats(const char* what, int head_dim, int tiles, std::size_t tile_floats,
                      const float* host, const float* device) {
  counts c;
  c.tiles = tiles;
  for (int t = 0; t < tiles; ++t) {
    const float* h = host + t * tile_floats;
    const float* d = device + t * tile_floats;
    if (std::memcmp(h, d, tile_floats * sizeof(float)) == 0) continue;
    ++c.mismatched_tiles;
    for (std::size_t e = 0; e < tile_floats; ++e) {
      if (bits_of(h[e]) == bits_of(d[e])) continue;
      if (++c.mismatches <= max_printed) {
        std::printf("  MISMATCH %s head_dim %d: tile %d (head %d) element %zu (token %zu, "
                    "channel %zu): host 0x%08x (%.9g), device 0x%08x (%.9g)\n",
                    what, head_dim, t, t / tiles_per_head, e, e / head_dim, e % head_dim,
                    bits_of(h[e]), static_cast<double>(h[e]), bits_of(d[e]),
                    static_cast<double>(d[e]));
      }
    }
  }
  return c;
}

void add(counts& total, const counts& c) {
  total.tiles += c.tiles;
  total.mismatched_tiles += c.mismatched_tiles;
  total.mismatches += c.mismatches;
}

void print_result(report& r, const std::string& name, const char* what, const counts& c) {
  const bool ok = c.mismatches == 0;
  std::printf("%s %-32s %-6s tiles %7ld  mismatched tiles %ld  mismatches %ld\n",
              ok ? "ok  " : "FAIL", name.c_str(), what, c.tiles, c.mismatched_tiles, c.mismatches);
  ++(ok ? r.passed : r.failed);
}

// ---- one format ---------------------------------------------------------------------------------

/// Checks format `F`; `alias` is how the test names it in C++ (the format's own name follows).
template <class F>
void check_format(report& r, const char* alias) {
  using traits = q::format_traits<F>;
  using block = typename traits::block;
  using head_params = typename traits::head_params;
  const std::string name(traits::name);
  constexpr int tile_tokens = q::tokens_per_tile<F>();

  std::printf("-- %s (%s): %d token(s) per tile, %zu-byte blocks\n", alias, name.c_str(),
              tile_tokens, sizeof(block));
  counts encode_total;
  counts decode_total;
  for (const int head_dim : {64, 128}) {
    if (!traits::supports_head_dim(head_dim)) {
      std::printf("     %-32s head_dim %d not supported by the format: skipped\n", name.c_str(),
                  head_dim);
      continue;
    }
    const int tokens = tiles_per_head * tile_tokens;
    const int tiles = heads * tiles_per_head;
    const int tile_floats = tile_tokens * head_dim;
    const int tile_blocks = q::blocks_per_tile<F>(head_dim);

    std::vector<float> x = make_heads(tokens, head_dim);
    add_special_tiles(x, tokens, head_dim, tile_tokens);

    std::vector<head_params> params(heads);
    for (int h = 0; h < heads; ++h) {
      params[h] = traits::calibrate(x.data() + static_cast<std::size_t>(h) * tokens * head_dim,
                                    tokens, head_dim);
    }

    // Host reference.
    const std::size_t n_blocks = static_cast<std::size_t>(tiles) * tile_blocks;
    const std::size_t n_floats = static_cast<std::size_t>(tiles) * tile_floats;
    std::vector<block> host_blocks(n_blocks);
    std::vector<float> host_decoded(n_floats);
    std::memset(static_cast<void*>(host_blocks.data()), 0xA5, n_blocks * sizeof(block));
    std::memset(static_cast<void*>(host_decoded.data()), 0xA5, n_floats * sizeof(float));
    for (int t = 0; t < tiles; ++t) {
      traits::encode_tile(x.data() + static_cast<std::size_t>(t) * tile_floats, head_dim,
                          params[t / tiles_per_head],
                          host_blocks.data() + static_cast<std::size_t>(t) * tile_blocks);
    }
    for (int t = 0; t < tiles; ++t) {
      traits::decode_tile(host_blocks.data() + static_cast<std::size_t>(t) * tile_blocks,
                          head_dim, params[t / tiles_per_head],
                          host_decoded.data() + static_cast<std::size_t>(t) * tile_floats);
    }

    // (a) encode on the device.
    const device_buffer<float> d_x(x);
    const device_buffer<head_params> d_params(params);
    device_buffer<block> d_blocks(n_blocks);
    d_blocks.fill_bytes(0xFF);
    encode_kernel<F><<<blocks_for(tiles), threads_per_block>>>(
        tiles, head_dim, tile_floats, tile_blocks, d_x.get(), d_params.get(), d_blocks.get());
    after_launch("encode_kernel", __LINE__);
    const std::vector<block> device_blocks = d_blocks.to_host();
    const counts enc = compare_bytes(
        (name + " encode").c_str(), head_dim, tiles, tile_blocks * sizeof(block),
        reinterpret_cast<const std::uint8_t*>(host_blocks.data()),
        reinterpret_cast<const std::uint8_t*>(device_blocks.data()));

    // (b) decode the host-encoded blocks on the device.
    const device_buffer<block> d_host_blocks(host_blocks);
    device_buffer<float> d_decoded(n_floats);
    d_decoded.fill_bytes(0xFF);
    decode_kernel<F><<<blocks_for(tiles), threads_per_block>>>(
        tiles, head_dim, tile_floats, tile_blocks, d_host_blocks.get(), d_params.get(),
        d_decoded.get());
    after_launch("decode_kernel", __LINE__);
    const std::vector<float> device_decoded = d_decoded.to_host();
    const counts dec = compare_floats((name + " decode").c_str(), head_dim, tiles, tile_floats,
                                      host_decoded.data(), device_decoded.data());

    const std::string label = name + " hd" + std::to_string(head_dim);
    print_result(r, label, "encode", enc);
    print_result(r, label, "decode", dec);
    add(encode_total, enc);
    add(decode_total, dec);
  }
  std::printf("== %s: tiles %ld, encode mismatches %ld (in %ld tiles), decode mismatches %ld "
              "(in %ld tiles)\n",
              alias, encode_total.tiles, encode_total.mismatches,
              encode_total.mismatched_tiles, decode_total.mismatches,
              decode_total.mismatched_tiles);
}

// The fpq configurations beyond the named formats: bf16 scales with outliers, and uniform codes
// with a zero point; both rotated, groups along head_dim.
using fpq_bf16_outliers =
    q::fpq<q::fpq_config{.group = 128, .scale = q::scale_type::bf16, .rotate = true, .outliers = 2}>;
using fpq_uniform_zero =
    q::fpq<q::fpq_config{.levels = q::codebook::uniform, .group = 64, .zero_point = true,
                         .rotate = true}>;

}  // namespace

int main() {
  try {
    if (!gpu_test::announce_device()) return gpu_test::no_device_exit_code;

    report r;
    check_format<q::fp16>(r, "fp16");
    check_format<q::bf16>(r, "bf16");
    check_format<q::e4m3>(r, "e4m3");
    check_format<q::q8_0>(r, "q8_0");
    check_format<q::q4_0>(r, "q4_0");
    check_format<q::kivi_key<2>>(r, "kivi_key<2>");
    check_format<q::kivi_value<2>>(r, "kivi_value<2>");
    check_format<q::kivi_key<4>>(r, "kivi_key<4>");
    check_format<q::fp2plus_key>(r, "fp2plus_key");
    check_format<q::fp4plus_key>(r, "fp4plus_key");
    check_format<fpq_bf16_outliers>(r, "fpq{group 128, bf16, rotate, outliers 2}");
    check_format<fpq_uniform_zero>(r, "fpq{uniform, group 64, zero_point, rotate}");

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
