// SPDX-License-Identifier: Apache-2.0
/// \file
/// Throughput and memory of the paged KV cache (`oscar::cache::kv_cache`) on the host.
///
/// Every cache here has 1 layer, 8 KV heads, head_dim 128, blocks of 64 tokens, 4 sink tokens
/// and a 128-token fp16 window (`cache_config` defaults), and gets synthetic K/V from
/// `oscar/testing/synthetic_kv.hpp` (keys with outlier channels, values with log-normal token
/// scales), 16384 tokens of each, rounded to fp16 once, outside every timed loop.
///
/// - `append/<storage>`: a fresh sequence takes the 16384 tokens of fp16 K and V in calls of
///   512 tokens (as a prefill would hand them over); creating and freeing the sequence is not
///   timed. Rates: tokens/s and GB/s of fp16 input (K + V bytes). `append/memcpy` copies the
///   same bytes in the same 512-token pieces: the floor.
/// - `gather/<storage>`: `gather` (decode to fp32, `[tokens, head_dim]` K and V per head) of a
///   16384-token sequence, GB/s of fp32 output. `gather/memcpy` copies that many fp32 bytes.
///   After the loop it reports the relative RMS error of the gathered K and V against the
///   fp16 input (0 for fp16 storage, which is lossless here).
/// - `bytes/<format>`: memory at 128K context for a Llama-3-70B-shaped model (80 layers, 8 KV
///   heads, head_dim 128). One layer of 8 heads is really filled with 131072 tokens (the 16384
///   synthetic tokens, 8 times over, in calls of 512) and `usage().bytes_used()` is multiplied
///   by 80: the layers of a model are independent and identical in shape, so 80 layers hold
///   exactly 80 times the bytes, without allocating 43 GB of fp16. Runs once per format and
///   prints a progress line to stderr.
///
/// `<storage>` is `fp16` (`kv_cache<kv_fp16, kv_fp16, kv_fp16>`) or `fp2plus`
/// (`kv_cache<fp2plus>`, the default cache: aged-out tokens in FP2+). Block pools are sized
/// from the tokens each cache will hold; only the low tier (the default policy's) has a budget.
///
/// Summary tables (append, gather, bytes at 128K) are printed after the usual Google Benchmark
/// output. The default minimum time per benchmark is 0.5 s (pass `--benchmark_min_time=...` to
/// change it); all usual Google Benchmark flags work (`--benchmark_filter=-bytes` style
/// filters skip the slow 128K fills: `--benchmark_filter='^(append|gather)'`).

#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "bench_support.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/core/view.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace {

using oscar::half;
using oscar::index_t;
namespace q = oscar::quant;
namespace oc = oscar::cache;

// ---- shapes ----------------------------------------------------------------------------------

constexpr int kHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kBlockTokens = 128;  // one tile of the default FP2+ keys
constexpr int kSinks = 4;
constexpr int kWindow = 128;
constexpr index_t kTokens = 16384;  ///< tokens per sequence in append and gather
constexpr index_t kCall = 512;      ///< tokens per append call
constexpr index_t kLongTokens = 131072;  ///< the 128K context of the bytes table
constexpr int kModelLayers = 80;         ///< Llama-3-70B
constexpr std::int64_t kElements = kTokens * kHeads * kHeadDim;  ///< of K (and of V)
constexpr std::int64_t kInputBytes = 2 * kElements * std::int64_t{sizeof(half)};    ///< K + V
constexpr std::int64_t kGatherBytes = 2 * kElements * std::int64_t{sizeof(float)};  ///< K + V
static_assert(kTokens % kCall == 0 && kLongTokens % kTokens == 0);

using fp16_cache = oc::kv_cache<q::kv_fp16, q::kv_fp16, q::kv_fp16>;
using fp2plus_cache = oc::kv_cache<q::fp2plus>;

oc::cache_config config() {
  return oc::cache_config{.layers = 1, .kv_heads = kHeads, .head_dim = kHeadDim,
                          .block_tokens = kBlockTokens, .sink_tokens = kSinks,
                          .window_tokens = kWindow};
}

// ---- the input: 16384 tokens x 8 heads x 128 of fp16 K and V -------------------------------

struct kv_input {
  std::vector<half> k, v;  ///< [tokens, heads, head_dim]
};

std::vector<half> to_half(const std::vector<float>& x) {
  std::vector<half> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = half(x[i]);
  return out;
}

const kv_input& input() {
  static const kv_input data{
      to_half(oscar::testing::synthetic_keys(kTokens, kHeads, kHeadDim, 20261128).data),
      to_half(oscar::testing::synthetic_values(kTokens, kHeads, kHeadDim, 20261129).data)};
  return data;
}

/// A cache whose low-tier pool holds `tokens` tokens of every head (plus a spare block per
/// head); the other tiers get no budget (the default policy puts every block in the low tier).
template <class Cache>
std::unique_ptr<Cache> make_cache(index_t tokens) {
  // A zero budget disables a tier without allocating, so a probe tells the block size.
  const Cache probe(config(), oc::tier_budget{.full = 0, .mid = 0, .low = 0});
  const std::size_t block_bytes = probe.usage().tiers[static_cast<int>(oc::tier::low)].block_bytes;
  const auto blocks = static_cast<std::size_t>(kHeads * (tokens / kBlockTokens + 1));
  return std::make_unique<Cache>(config(),
                                 oc::tier_budget{.full = 0, .mid = 0, .low = blocks * block_bytes});
}

/// Appends `tokens` tokens of the input (cycling through it) in calls of `kCall` tokens.
template <class Cache>
void append_tokens(Cache& cache, oc::seq_id seq, index_t tokens) {
  const kv_input& x = input();
  for (index_t t = 0; t < tokens; t += kCall) {
    const index_t first = t % kTokens;
    const auto offset = static_cast<std::size_t>(first * kHeads * kHeadDim);
    cache.append(seq, 0, oscar::make_kv_view(x.k.data() + offset, kCall, kHeads, kHeadDim),
                 oscar::make_kv_view(x.v.data() + offset, kCall, kHeads, kHeadDim));
  }
}

// ---- append ----------------------------------------------------------------------------------

void bm_append_memcpy(benchmark::State& state) {
  const kv_input& x = input();
  std::vector<half> k(x.k.size()), v(x.v.size());
  const auto call_bytes = static_cast<std::size_t>(kCall * kHeads * kHeadDim) * sizeof(half);
  const auto call_elements = static_cast<std::size_t>(kCall * kHeads * kHeadDim);
  for (auto _ : state) {
    for (std::size_t i = 0; i < x.k.size(); i += call_elements) {
      std::memcpy(k.data() + i, x.k.data() + i, call_bytes);
      std::memcpy(v.data() + i, x.v.data() + i, call_bytes);
    }
    benchmark::DoNotOptimize(k.data());
    benchmark::DoNotOptimize(v.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kInputBytes);
  state.SetItemsProcessed(state.iterations() * kTokens);
}

template <class Cache>
void bm_append(benchmark::State& state) {
  (void)input();  // untimed
  const auto cache = make_cache<Cache>(kTokens);
  double bits = 0;
  for (auto _ : state) {
    state.PauseTiming();
    const oc::seq_id seq = cache->create();
    state.ResumeTiming();
    append_tokens(*cache, seq, kTokens);
    state.PauseTiming();
    if (cache->tokens(seq, 0, kHeads - 1) != kTokens) {
      state.SkipWithError("the sequence does not hold every appended token");
      state.ResumeTiming();
      break;
    }
    bits = cache->usage().bits_per_element(kHeadDim);
    cache->free(seq);
    state.ResumeTiming();
  }
  state.SetBytesProcessed(state.iterations() * kInputBytes);
  state.SetItemsProcessed(state.iterations() * kTokens);
  state.counters["bits/elt"] = bits;
}

// ---- gather ----------------------------------------------------------------------------------

void bm_gather_memcpy(benchmark::State& state) {
  std::vector<float> src(static_cast<std::size_t>(2 * kElements), 1.0f);
  std::vector<float> dst(src.size());
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), static_cast<std::size_t>(kGatherBytes));
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kGatherBytes);
  state.SetItemsProcessed(state.iterations() * kTokens);
}

/// Relative RMS error of gathered K (or V) of every head against the fp16 input.
double relative_rms(const std::vector<oc::gathered_head>& heads, bool keys) {
  const std::vector<half>& x = keys ? input().k : input().v;
  double err = 0, ref = 0;
  for (int h = 0; h < kHeads; ++h) {
    const std::vector<float>& y = keys ? heads[static_cast<std::size_t>(h)].k
                                       : heads[static_cast<std::size_t>(h)].v;
    for (index_t t = 0; t < kTokens; ++t) {
      for (int d = 0; d < kHeadDim; ++d) {
        const double a = static_cast<float>(x[static_cast<std::size_t>((t * kHeads + h) * kHeadDim + d)]);
        const double b = y[static_cast<std::size_t>(t * kHeadDim + d)];
        err += (a - b) * (a - b);
        ref += a * a;
      }
    }
  }
  return ref > 0 ? std::sqrt(err / ref) : 0.0;
}

template <class Cache>
void bm_gather(benchmark::State& state) {
  const auto cache = make_cache<Cache>(kTokens);
  const oc::seq_id seq = cache->create();
  append_tokens(*cache, seq, kTokens);  // untimed
  for (auto _ : state) {
    auto heads = cache->gather(seq, 0);
    benchmark::DoNotOptimize(heads.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kGatherBytes);
  state.SetItemsProcessed(state.iterations() * kTokens);
  const auto heads = cache->gather(seq, 0);
  for (const oc::gathered_head& g : heads) {
    if (g.tokens != kTokens) {
      state.SkipWithError("gather did not return every appended token");
      return;
    }
  }
  state.counters["k_rel_rms"] = relative_rms(heads, true);
  state.counters["v_rel_rms"] = relative_rms(heads, false);
}

// ---- bytes at 128K, Llama-3-70B shape --------------------------------------------------------

/// One format's row of the bytes table, in registration order.
struct bytes_format {
  std::string name;
  double format_bits;  ///< bits/element of the key format alone (blocks only)
};
std::vector<bytes_format>& bytes_formats() {
  static std::vector<bytes_format> list;
  return list;
}

template <class KV>
void bm_bytes(benchmark::State& state) {
  using Cache = oc::kv_cache<KV, KV, KV>;
  (void)input();
  const std::string name(KV::name);
  oc::cache_usage usage;
  double seconds = 0;
  for (auto _ : state) {
    state.PauseTiming();
    std::fprintf(stderr, "cache_throughput: filling 1 layer x %d heads with %lld tokens of %s ...\n",
                 kHeads, static_cast<long long>(kLongTokens), name.c_str());
    std::fflush(stderr);
    auto cache = make_cache<Cache>(kLongTokens);
    const oc::seq_id seq = cache->create();
    const auto start = std::chrono::steady_clock::now();
    state.ResumeTiming();
    append_tokens(*cache, seq, kLongTokens);
    state.PauseTiming();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    usage = cache->usage();
    cache.reset();
    state.ResumeTiming();
  }
  const double layer_bytes = static_cast<double>(usage.bytes_used());
  const double bits = usage.bits_per_element(kHeadDim);
  std::fprintf(stderr,
               "cache_throughput: %s: %.1f s, %.0f bytes per layer, %.3f bits/element, %.2f GB "
               "at %d layers\n",
               name.c_str(), seconds, layer_bytes, bits, layer_bytes * kModelLayers / 1e9,
               kModelLayers);
  std::fflush(stderr);
  if (usage.token_heads != kLongTokens * kHeads) {
    state.SkipWithError("the cache does not hold every appended token");
    return;
  }
  state.SetItemsProcessed(state.iterations() * kLongTokens);
  state.SetBytesProcessed(state.iterations() * kLongTokens * kHeads * kHeadDim * 2 *
                          std::int64_t{sizeof(half)});
  state.counters["layer_bytes"] = layer_bytes;
  state.counters["bits/elt"] = bits;
  state.counters["GB@80L"] = layer_bytes * kModelLayers / 1e9;
}

template <class KV>
void register_bytes() {
  const std::string name(KV::name);
  bytes_formats().push_back({name, q::format_traits<typename KV::key>::bits_per_element});
  benchmark::RegisterBenchmark(("bytes/" + name).c_str(), bm_bytes<KV>)
      ->Iterations(1)
      ->Unit(benchmark::kSecond);
}

void register_all() {
  benchmark::RegisterBenchmark("append/memcpy", bm_append_memcpy)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("append/fp16", bm_append<fp16_cache>)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("append/fp2plus", bm_append<fp2plus_cache>)
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("gather/memcpy", bm_gather_memcpy)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("gather/fp16", bm_gather<fp16_cache>)->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("gather/fp2plus", bm_gather<fp2plus_cache>)
      ->Unit(benchmark::kMillisecond);
  register_bytes<q::kv_fp16>();
  register_bytes<q::kv_q8_0>();
  register_bytes<q::kv_fp8>();
  register_bytes<q::kv_q4_0>();
  register_bytes<q::fp4plus>();
  register_bytes<q::kivi2>();
  register_bytes<q::fp2plus>();
}

// ---- reporting -------------------------------------------------------------------------------

/// Prints the summary tables (append, gather, bytes at 128K) after the usual output.
class cache_reporter : public oscar_bench::summary_reporter {
 public:
  using summary_reporter::summary_reporter;

 private:
  void print_context(std::ostream& out) override {
    out << "oscar cache_throughput on " << oscar_bench::host_name() << ": "
        << oscar_bench::cpu_model() << "; cache of 1 layer x " << kHeads << " KV heads x "
        << kHeadDim << ", blocks of " << kBlockTokens << " tokens, " << kSinks << " sinks, window "
        << kWindow << "; " << kTokens << " tokens per sequence, appended " << kCall
        << " at a time\n";
  }

  void print_summary(std::ostream& out) override {
    print_append(out);
    print_gather(out);
    print_bytes(out);
  }

  void print_append(std::ostream& out) const {
    if (!has("append/memcpy") && !has("append/fp16") && !has("append/fp2plus")) return;
    const double floor = get("append/memcpy", "bytes_per_second");
    char line[256];
    out << "\nAppend: " << kTokens << " tokens of fp16 K and V (" << kInputBytes / (1 << 20)
        << " MiB) per sequence in calls of " << kCall
        << "; GB/s of fp16 input (1 GB = 1e9 bytes), CPU time\n";
    std::snprintf(line, sizeof(line), "%-16s %14s %10s %10s %12s %9s\n", "storage", "tokens/s",
                  "GB/s", "x memcpy", "ms/sequence", "bits/elt");
    out << line;
    for (const char* storage : {"memcpy", "fp16", "fp2plus"}) {
      const std::string name = std::string("append/") + storage;
      if (!has(name)) continue;
      const double rate = get(name, "bytes_per_second");
      const double tokens = get(name, "items_per_second");
      const double bits = std::string_view(storage) == "memcpy" ? 16.0 : get(name, "bits/elt");
      std::snprintf(line, sizeof(line), "%-16s %14.0f %10.3f %10.4f %12.1f %9.3f\n", storage,
                    tokens, rate / 1e9, floor > 0 ? rate / floor : 0.0,
                    tokens > 0 ? 1e3 * kTokens / tokens : 0.0, bits);
      out << line;
    }
  }

  void print_gather(std::ostream& out) const {
    if (!has("gather/memcpy") && !has("gather/fp16") && !has("gather/fp2plus")) return;
    const double floor = get("gather/memcpy", "bytes_per_second");
    char line[256];
    out << "\nGather: decode a " << kTokens << "-token sequence (8 heads) to fp32 K and V ("
        << kGatherBytes / (1 << 20) << " MiB); GB/s of fp32 output, CPU time\n";
    std::snprintf(line, sizeof(line), "%-16s %10s %10s %12s %11s %11s\n", "storage", "GB/s",
                  "x memcpy", "ms/sequence", "K rel RMS", "V rel RMS");
    out << line;
    for (const char* storage : {"memcpy", "fp16", "fp2plus"}) {
      const std::string name = std::string("gather/") + storage;
      if (!has(name)) continue;
      const double rate = get(name, "bytes_per_second");
      std::snprintf(line, sizeof(line), "%-16s %10.3f %10.4f %12.1f %11.2e %11.2e\n", storage,
                    rate / 1e9, floor > 0 ? rate / floor : 0.0,
                    rate > 0 ? 1e3 * static_cast<double>(kGatherBytes) / rate : 0.0,
                    get(name, "k_rel_rms"), get(name, "v_rel_rms"));
      out << line;
    }
  }

  void print_bytes(std::ostream& out) const {
    bool any = false;
    for (const bytes_format& f : bytes_formats()) any = any || has("bytes/" + f.name);
    if (!any) return;
    const double fp16 = get("bytes/fp16", "GB@80L");
    char line[256];
    out << "\nKV cache at " << kLongTokens << " tokens, Llama-3-70B shape (" << kModelLayers
        << " layers x " << kHeads << " KV heads x " << kHeadDim
        << "): usage().bytes_used() of 1 real layer x " << kModelLayers << "; 1 GB = 1e9 bytes\n";
    out << "(all-in bits/elt: blocks, padding, the partial last block, fp16 sinks and window; "
           "format = the key format's blocks alone)\n";
    std::snprintf(line, sizeof(line), "%-10s %10s %10s %12s %10s %10s %12s %9s\n", "format",
                  "format b/e", "all-in b/e", "GB @ 128K", "x fp16", "fp16 / x", "KB/token",
                  "fill s");
    out << line;
    for (const bytes_format& f : bytes_formats()) {
      const std::string name = "bytes/" + f.name;
      if (!has(name)) continue;
      const double gb = get(name, "GB@80L");
      const double tokens_per_s = get(name, "items_per_second");
      std::snprintf(line, sizeof(line), "%-10s %10.3f %10.3f %12.3f %10.4f %10.2f %12.2f %9.1f\n",
                    f.name.c_str(), f.format_bits, get(name, "bits/elt"), gb,
                    fp16 > 0 ? gb / fp16 : 0.0, gb > 0 && fp16 > 0 ? fp16 / gb : 0.0,
                    gb * 1e9 / static_cast<double>(kLongTokens) / 1e3,
                    tokens_per_s > 0 ? static_cast<double>(kLongTokens) / tokens_per_s : 0.0);
      out << line;
    }
    if (fp16 <= 0) out << "(bytes/fp16 did not run, so the ratios read 0)\n";
  }
};

}  // namespace

int main(int argc, char** argv) {
  // Default to 0.5 s per benchmark (a few iterations of the slowest rows); an explicit flag wins.
  return oscar_bench::run_benchmarks<cache_reporter>(argc, argv, "0.5", register_all);
}
