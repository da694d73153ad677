// SPDX-License-Identifier: Apache-2.0
/// \file
/// GPU decode benchmark of the default FP2+ (`quant::fp2plus`, its tensor-core kernel) and of
/// FP2+ with per-channel keys (`quant::fp2plus_kc`, the first tensor-core kernel; `--no-kc`
/// skips it) on the shapes of the GPU issue: 32 query heads, 8 KV heads, head_dim 128, (batch, context) = (1, 32K),
/// (1, 128K), (4, 128K), (16, 32K). Printed per shape:
///
/// - decode time (median of timed calls, each after the L2 cache was flushed by writing a
///   256 MiB buffer, so every call reads the cache from memory), the bytes it reads (blocks,
///   fp16 sinks and window, queries, partial results) and the effective GB/s;
/// - the bandwidth floor: bytes read / the device copy bandwidth measured in the same run
///   (cudaMemcpyAsync of 1 GiB, bytes read + written per second), and the fraction of it reached;
/// - for fp2plus_kc, the same decode with `decode_config::fp16_logits` (the faster, less exact
///   key product; the default FP2+ with 4 query heads per KV head keeps ~22-bit logits at no
///   cost, so it has no such variant here);
/// - the append throughput of filling the cache (fp16 K/V in, FP2+ blocks out, 4096 tokens per
///   sequence per call), in GB/s of bytes read + written.
///
/// Output: a human table, and `csv,...` lines that bench/gpu/run.sh joins with PyTorch's SDPA.
/// Usage: oscar-gpu-decode-bench [--iters N] [--shapes 1x32768,4x131072,...] [--no-kc]

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "oscar/backend/gpu/runtime.cuh"

#include "oscar/attention/gpu.cuh"
#include "oscar/backend/gpu/paged_kv.cuh"
#include "oscar/quant/formats.hpp"

namespace gpu = oscar::gpu;
namespace q = oscar::quant;
using oscar::half;

namespace {

constexpr int kv_heads = 8, q_heads = 32, head_dim = 128;

/// Deterministic pseudo-random fp16 K/V: keys with per-channel offsets, values plain.
__global__ void fill_random(half* x, std::size_t n, std::uint32_t seed, bool keys) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 0x9e3779b9u ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    const float u = static_cast<float>(h & 0xffffu) / 65536.0f + static_cast<float>(h >> 16) / 65536.0f - 1.0f;
    const int c = static_cast<int>(i % head_dim);
    const float offset = keys ? 0.25f * static_cast<float>((c * 37) % 11 - 5) : 0.0f;
    x[i] = half(offset + 1.7f * u);
  }
}

__global__ void fill_float(float* x, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 0x27d4eb2fu ^ seed;
    h ^= h >> 15;
    h *= 0x2c1b3c6du;
    h ^= h >> 12;
    x[i] = static_cast<float>(h & 0xffffu) / 32768.0f - 1.0f;
  }
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct shape {
  int batch;
  int context;
};

/// Fills a cache of format KV (block_tokens per block) for each shape through the append
/// kernels, times decode, and prints a row and a csv line tagged `tag`.
template <class KV>
void run_format(const char* tag, const char* label, int block_tokens, const std::vector<shape>& shapes,
                int max_batch, int max_context, int iters, double copy_bw, gpu::device_buffer<std::byte>& flush,
                std::size_t flush_bytes, gpu::stream_t stream) {
  std::size_t max_blocks = 0;
  for (const shape& s : shapes) {
    max_blocks = std::max(max_blocks, static_cast<std::size_t>(s.batch) * kv_heads *
                                          (s.context / block_tokens + 1));
  }
  const oscar::cache::cache_config cfg{.layers = 1, .kv_heads = kv_heads, .head_dim = head_dim,
                                       .block_tokens = block_tokens, .sink_tokens = 4,
                                       .window_tokens = 128};
  gpu::paged_kv<KV> cache(cfg, {.max_sequences = max_batch, .max_tokens = max_context,
                                .pool_blocks = max_blocks + 16},
                          stream);
  // Bytes per block token and KV head (a record holds exactly a native chunk's bytes).
  using rec = gpu::record_layout<KV>;
  const double token_bytes = static_cast<double>(rec::bytes(head_dim)) / rec::tokens;
  const int chunk_tokens = 4096;
  gpu::device_buffer<half> k(static_cast<std::size_t>(max_batch) * chunk_tokens * kv_heads * head_dim);
  gpu::device_buffer<half> v(k.size());
  gpu::device_buffer<float> qd(static_cast<std::size_t>(max_batch) * q_heads * head_dim);
  gpu::device_buffer<float> out(qd.size());
  gpu::decode_workspace ws;

  std::printf("\n%s (%s, %.1f bits per element, %d-token blocks)\n", label,
              cache.layout() == gpu::block_layout::mma ? "tensor-core kernel" : "generic kernel",
              KV::bits_per_element, block_tokens);
  std::printf("%-12s %10s %10s %9s %10s %9s %8s %10s %10s\n", "shape", "decode us", "MB read",
              "GB/s", "floor us", "of floor", "splits", "append GB/s", "fp16-logits us");
  for (const shape& s : shapes) {
    std::vector<gpu::slot_id> slots;
    for (int i = 0; i < s.batch; ++i) slots.push_back(cache.create(stream));
    // Fill: the context through the append kernels, 4096 tokens per sequence per call.
    double append_bytes = 0.0, append_ms = 0.0;
    for (int done = 0, call = 0; done < s.context; done += chunk_tokens, ++call) {
      const int n = std::min(chunk_tokens, s.context - done);
      const std::size_t elems = static_cast<std::size_t>(s.batch) * n * kv_heads * head_dim;
      fill_random<<<1024, 256, 0, stream>>>(k.data(), elems, 17u * call + 1u, true);
      fill_random<<<1024, 256, 0, stream>>>(v.data(), elems, 31u * call + 7u, false);
      gpu::check_launch("fill_random");
      gpu::event start, stop;
      start.record(stream);
      cache.append(std::span<const gpu::slot_id>(slots), 0, k.data(), v.data(), n, stream);
      stop.record(stream);
      append_ms += stop.elapsed_ms(start);
      // Read: fp16 K and V; written: the blocks' bytes (and the window).
      append_bytes += static_cast<double>(elems) * 2 * sizeof(half) +
                      static_cast<double>(s.batch) * n * kv_heads * token_bytes;
    }
    fill_float<<<256, 256, 0, stream>>>(qd.data(), static_cast<std::size_t>(s.batch) * q_heads * head_dim, 99u);
    gpu::check_launch("fill_float");

    const oscar::attention::options opt{.q_heads = q_heads};
    const std::span<const gpu::slot_id> sl(slots);
    for (int i = 0; i < 5; ++i) {
      oscar::attention::decode(oscar::backend::cuda{}, cache, 0, sl, qd.data(), out.data(), opt, ws, stream);
    }
    gpu::synchronize(stream);
    auto time_decode = [&](const gpu::decode_config& dc) {
      std::vector<float> ms;
      for (int i = 0; i < iters; ++i) {
        gpu::fill_async(flush.data(), i & 0xff, flush_bytes, stream);  // evict the cache from L2
        gpu::event start, stop;
        start.record(stream);
        oscar::attention::decode(oscar::backend::cuda{}, cache, 0, sl, qd.data(), out.data(), opt,
                                 ws, stream, dc);
        stop.record(stream);
        ms.push_back(stop.elapsed_ms(start));
      }
      return median(ms) * 1e-3;
    };
    // 4-query tiles of the default FP2+ always keep ~22-bit logits (fp16_logits changes nothing).
    const bool fp16_variant = !gpu::is_mma_lm_v<KV>;
    const double t16 = fp16_variant ? time_decode({.fp16_logits = true}) : 0.0;
    const double t = time_decode({});
    // Bytes read: every block token, the fp16 sinks and window rows (K and V), the queries, and
    // the partials (written, then read).
    double tokens_in_blocks = 0.0, fp16_rows = 0.0;
    for (gpu::slot_id slot : slots) {
      for (int h = 0; h < kv_heads; ++h) {
        tokens_in_blocks += static_cast<double>(cache.block_tokens_held(slot, 0, h));
        fp16_rows += static_cast<double>(cache.tokens(slot, 0, h) - cache.block_tokens_held(slot, 0, h));
      }
    }
    const int G = q_heads / kv_heads;
    const double partial_bytes = 2.0 * s.batch * kv_heads * ws.last_partials * G * (head_dim + 2) * 4.0;
    const double bytes = tokens_in_blocks * token_bytes + fp16_rows * head_dim * 2 * 2 +
                         s.batch * q_heads * head_dim * 4.0 * 2 + partial_bytes;
    const double floor = bytes / copy_bw;
    char name[32];
    std::snprintf(name, sizeof name, "%dx%dK", s.batch, s.context / 1024);
    const double append_gbs = append_bytes / (append_ms * 1e-3) / 1e9;
    std::printf("%-12s %10.1f %10.1f %9.0f %10.1f %8.0f%% %8d %10.1f %10.1f\n", name, t * 1e6,
                bytes / 1e6, bytes / t / 1e9, floor * 1e6, 100.0 * floor / t, ws.last_splits,
                append_gbs, t16 * 1e6);
    std::printf("csv,%s,%d,%d,%.3f,%.0f,%.0f,%.3f,%.1f,%.0f,%.3f\n", tag, s.batch, s.context, t * 1e6,
                bytes, copy_bw, floor * 1e6, append_gbs, append_bytes, t16 * 1e6);
    std::fflush(stdout);
    for (gpu::slot_id slot : slots) cache.free(slot);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 30;
  bool with_kc = true;
  std::vector<shape> shapes{{1, 32768}, {1, 131072}, {4, 131072}, {16, 32768}};
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) iters = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--no-kc") == 0) with_kc = false;
    if (std::strcmp(argv[i], "--shapes") == 0 && i + 1 < argc) {
      shapes.clear();
      std::string s = argv[++i];
      std::size_t at = 0;
      while (at < s.size()) {
        const std::size_t comma = s.find(',', at);
        const std::string one = s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
        const std::size_t x = one.find('x');
        shapes.push_back({std::atoi(one.substr(0, x).c_str()), std::atoi(one.substr(x + 1).c_str())});
        at = comma == std::string::npos ? s.size() : comma + 1;
      }
    }
  }
  try {
    gpu::stream stream;
    const gpu::device_properties dev = gpu::current_device();
    std::printf("device: %s, %d SMs\n", dev.name.c_str(), dev.multiprocessors);

    // Copy bandwidth: 1 GiB device-to-device, bytes read + written.
    const std::size_t copy_bytes = std::size_t{1} << 30;
    gpu::device_buffer<std::byte> a(copy_bytes), b(copy_bytes);
    gpu::fill_async(a.data(), 1, copy_bytes, stream);
    std::vector<float> copy_ms;
    for (int i = 0; i < 12; ++i) {
      gpu::event start, stop;
      start.record(stream);
      gpu::copy_async(b.data(), a.data(), copy_bytes, stream);
      stop.record(stream);
      if (i >= 2) copy_ms.push_back(stop.elapsed_ms(start));
      else stop.wait();
    }
    const double copy_bw = 2.0 * copy_bytes / (median(copy_ms) * 1e-3);
    std::printf("copy bandwidth: %.0f GB/s (read + write, 1 GiB cudaMemcpyAsync, median of 10)\n",
                copy_bw / 1e9);
    // The L2 flush buffer reuses `a`; `b` is freed.
    b = gpu::device_buffer<std::byte>();
    const std::size_t flush_bytes = std::size_t{256} << 20;

    int max_batch = 1, max_context = 1;
    for (const shape& s : shapes) {
      max_batch = std::max(max_batch, s.batch);
      max_context = std::max(max_context, s.context);
    }
    // The default FP2+ (128-token blocks, its tensor-core kernel), then FP2+ with per-channel
    // keys (64-token blocks), the previous tensor-core path.
    run_format<q::fp2plus>("oscar", "fp2plus", 128, shapes, max_batch, max_context, iters, copy_bw,
                           a, flush_bytes, stream);
    if (with_kc) {
      run_format<q::fp2plus_kc>("oscar-kc", "fp2plus-kc", 64, shapes, max_batch, max_context, iters,
                                copy_bw, a, flush_bytes, stream);
    }
    return 0;
  } catch (const std::exception& e) {
    std::printf("ERROR: %s\n", e.what());
    return 2;
  }
}
