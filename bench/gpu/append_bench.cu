// SPDX-License-Identifier: Apache-2.0
/// \file
/// GPU append benchmark: `gpu::paged_kv::append` (fp16 K/V in, the cache's blocks, key
/// summaries, fp16 sinks and window out) against the device copy bandwidth measured in the
/// same run, on 8 KV heads of head_dim 128 (the decode benchmark's model), one layer.
///
/// Two workloads per format:
/// - **prefill**: `batch` fresh sequences append 2048 tokens each in one call (most tokens
///   age out of the window into blocks at once);
/// - **decode step**: `batch` sequences, each holding 1000 tokens, append 1 token per call,
///   timed over 512 consecutive steps (so each entry ages 4 chunks of 128 tokens out of its
///   window in between: the amortized encoding is included).
///
/// GB/s counts the bytes an append must move at least: the fp16 K/V input read once, the
/// window rows read again where a chunk ages out of the ring, and everything written (block
/// bytes of the aged chunks, their key summaries, fp16 sink and window rows). Times are device
/// times between events (median of repeats); "host us" is the wall time per call including
/// OSCAR's host-side planning and launches, which bounds single-token steps.
///
/// Usage: oscar-gpu-append-bench [--iters N] [--prefill-only]

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "oscar/backend/gpu/runtime.cuh"

#include "oscar/backend/gpu/paged_kv.cuh"
#include "oscar/quant/formats.hpp"

namespace gpu = oscar::gpu;
namespace q = oscar::quant;
using oscar::half;

namespace {

constexpr int kv_heads = 8, head_dim = 128;

/// Deterministic pseudo-random fp16 rows: keys with per-channel offsets, values plain.
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
    x[i] = half((keys ? 0.25f * static_cast<float>((c * 37) % 11 - 5) : 0.0f) + 1.7f * u);
  }
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Device copy bandwidth (bytes read + written per second) of a 1 GiB cudaMemcpyAsync.
double copy_bandwidth(gpu::stream_t s) {
  const std::size_t bytes = std::size_t{1} << 30;
  gpu::device_buffer<std::byte> a(bytes), b(bytes);
  gpu::fill_async(a.data(), 1, bytes, s);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    gpu::event start, stop;
    start.record(s);
    gpu::copy_async(b.data(), a.data(), bytes, s);
    stop.record(s);
    if (i >= 2) ms.push_back(stop.elapsed_ms(start));
  }
  return 2.0 * static_cast<double>(bytes) / (median(ms) * 1e-3);
}

struct result {
  double device_us;
  double host_us;
  double bytes;
};

/// Bytes an append of `tokens` rows per entry must move for an entry that held `held` tokens
/// (`window` of them in the ring) before the call.
template <class KV>
double append_bytes(const gpu::paged_kv<KV>& c, int held, int window_before, int tokens) {
  const auto& cfg = c.config();
  const int chunk = c.chunk_tokens();
  const int to_sinks = std::max(0, std::min(cfg.sink_tokens - held, tokens));
  const int window = window_before + tokens - to_sinks;
  const int chunks = window >= cfg.window_tokens + chunk ? (window - cfg.window_tokens) / chunk : 0;
  const int aged = chunks * chunk;
  const double row = 2.0 * head_dim * sizeof(half);  // one K and one V row in fp16
  const double read = tokens * row + std::min(aged, window_before) * row;
  const double written = static_cast<double>(chunks) * c.block_bytes() * chunk / cfg.block_tokens +
                         chunks * 2.0 * head_dim * sizeof(half) +  // key summary updates
                         (tokens - std::max(0, aged - window_before)) * row;
  return kv_heads * (read + written);
}

template <class KV>
result prefill(int batch, int tokens, int iters, gpu::stream_t s) {
  const oscar::cache::cache_config cfg{.layers = 1, .kv_heads = kv_heads, .head_dim = head_dim,
                                       .block_tokens = 128, .sink_tokens = 4, .window_tokens = 128};
  gpu::paged_kv<KV> cache(cfg, {.max_sequences = batch, .max_tokens = tokens + 256,
                                .pool_blocks = static_cast<std::size_t>(batch) * kv_heads * (tokens / 128 + 2)},
                          s);
  const std::size_t n = static_cast<std::size_t>(batch) * tokens * kv_heads * head_dim;
  gpu::device_buffer<half> k(n), v(n);
  fill_random<<<1024, 256, 0, s>>>(k.data(), n, 11, true);
  fill_random<<<1024, 256, 0, s>>>(v.data(), n, 12, false);
  gpu::check_launch("fill_random");
  std::vector<float> ms, host_ms;
  double bytes = 0;
  for (int it = 0; it < iters + 2; ++it) {
    std::vector<gpu::slot_id> slots;
    for (int b = 0; b < batch; ++b) slots.push_back(cache.create(s));
    bytes = batch * append_bytes(cache, 0, 0, tokens);
    gpu::synchronize(s);
    gpu::event start, stop;
    const auto t0 = std::chrono::steady_clock::now();
    start.record(s);
    cache.append(std::span<const gpu::slot_id>(slots), 0, k.data(), v.data(), tokens, s);
    stop.record(s);
    const auto t1 = std::chrono::steady_clock::now();
    const float t = stop.elapsed_ms(start);
    if (it >= 2) {
      ms.push_back(t);
      host_ms.push_back(std::chrono::duration<float, std::milli>(t1 - t0).count());
    }
    for (gpu::slot_id slot : slots) cache.free(slot);
  }
  return {median(ms) * 1e3, median(host_ms) * 1e3, bytes};
}

template <class KV>
result decode_steps(int batch, int steps, gpu::stream_t s) {
  const oscar::cache::cache_config cfg{.layers = 1, .kv_heads = kv_heads, .head_dim = head_dim,
                                       .block_tokens = 128, .sink_tokens = 4, .window_tokens = 128};
  const int held = 1000;
  gpu::paged_kv<KV> cache(cfg, {.max_sequences = batch, .max_tokens = held + steps + 256,
                                .pool_blocks = static_cast<std::size_t>(batch) * kv_heads *
                                               ((held + steps) / 128 + 2)},
                          s);
  const std::size_t n = static_cast<std::size_t>(batch) * held * kv_heads * head_dim;
  gpu::device_buffer<half> k(n), v(n);
  fill_random<<<1024, 256, 0, s>>>(k.data(), n, 21, true);
  fill_random<<<1024, 256, 0, s>>>(v.data(), n, 22, false);
  gpu::check_launch("fill_random");
  std::vector<gpu::slot_id> slots;
  for (int b = 0; b < batch; ++b) slots.push_back(cache.create(s));
  cache.append(std::span<const gpu::slot_id>(slots), 0, k.data(), v.data(), held, s);
  // Bytes of the steps: replay the window bookkeeping of one entry (all entries are alike).
  double bytes = 0;
  int window = 0, total = held;
  {
    const int chunk = cache.chunk_tokens();
    window = held - cfg.sink_tokens;
    const int chunks = window >= cfg.window_tokens + chunk ? (window - cfg.window_tokens) / chunk : 0;
    window -= chunks * chunk;
  }
  for (int i = 0; i < steps; ++i) {
    bytes += batch * append_bytes(cache, total, window, 1);
    const int chunk = cache.chunk_tokens();
    window += 1;
    if (window >= cfg.window_tokens + chunk) window -= ((window - cfg.window_tokens) / chunk) * chunk;
    ++total;
  }
  gpu::synchronize(s);
  gpu::event start, stop;
  const auto t0 = std::chrono::steady_clock::now();
  start.record(s);
  for (int i = 0; i < steps; ++i) {  // the step's new row: any row of the prefill input
    const std::size_t at = static_cast<std::size_t>(i % held) * kv_heads * head_dim;
    cache.append(std::span<const gpu::slot_id>(slots), 0, k.data() + at, v.data() + at, 1, s);
  }
  stop.record(s);
  const float t = stop.elapsed_ms(start);
  const auto t1 = std::chrono::steady_clock::now();
  return {t * 1e3 / steps, std::chrono::duration<double, std::micro>(t1 - t0).count() / steps,
          bytes / steps};
}

template <class KV>
void run_format(const char* name, double copy, int iters, gpu::stream_t s) {
  for (int batch : {1, 16}) {
    const result r = prefill<KV>(batch, 2048, iters, s);
    std::printf("%-11s prefill %4d x 2048  %9.1f %9.1f %9.2f %8.0f %6.1f%%\n", name, batch,
                r.device_us, r.host_us, r.bytes / 1e6, r.bytes / (r.device_us * 1e3),
                100.0 * r.bytes / (r.device_us * 1e-6) / copy);
  }
  for (int batch : {16, 128}) {
    const result r = decode_steps<KV>(batch, 512, s);
    std::printf("%-11s step    %4d x 1     %9.1f %9.1f %9.3f %8.0f %6.1f%%\n", name, batch,
                r.device_us, r.host_us, r.bytes / 1e6, r.bytes / (r.device_us * 1e3),
                100.0 * r.bytes / (r.device_us * 1e-6) / copy);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 10;
  bool prefill_only = false;  // one prefill of 16 x 2048 tokens (for a profiler)
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) iters = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--prefill-only") == 0) prefill_only = true;
  }
  try {
    gpu::stream s;
    if (prefill_only) {
      const result r = prefill<q::fp2plus>(16, 2048, iters, s);
      std::printf("fp2plus prefill 16 x 2048: %.1f us\n", r.device_us);
      return 0;
    }
    const gpu::device_properties dev = gpu::current_device();
    const double copy = copy_bandwidth(s);
    std::printf("device: %s; copy bandwidth %.0f GB/s (read + write, 1 GiB, median of 10)\n",
                dev.name.c_str(), copy / 1e9);
    std::printf("8 KV heads, head_dim 128, 128-token blocks, 4 sinks, 128-token window; fp16 input\n");
    std::printf("%-11s %-7s %-12s %9s %9s %9s %8s %7s\n", "format", "what", "batch x tok",
                "device us", "host us", "MB moved", "GB/s", "of copy");
    run_format<q::fp2plus>("fp2plus", copy, iters, s);
    run_format<q::fp2plus_kc>("fp2plus-kc", copy, iters, s);
    return 0;
  } catch (const std::exception& e) {
    std::printf("ERROR: %s\n", e.what());
    return 2;
  }
}
