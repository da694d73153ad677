// SPDX-License-Identifier: Apache-2.0
/// \file
/// Encode and decode throughput of every K/V tensor format, in GB/s of fp16 input, next to a
/// plain `std::memcpy` of the same fp16 bytes measured in the same run.
///
/// What is timed is the tile-level hot path the cache runs, not allocation:
///
/// - `encode/<format>`: for every tile of every head, convert the tile's fp16 rows (engines hand
///   the cache fp16) into a float tile and `format_traits<F>::encode_tile` it into a
///   preallocated block buffer laid out like `quantized_tensor` (`[heads][tiles][blocks]`).
/// - `decode/<format>`: `decode_tile` every tile into a float tile and convert it to fp16 rows of
///   a preallocated `[tokens, heads, head_dim]` output.
/// - `memcpy/fp16`: `std::memcpy` of the same number of fp16 bytes, the reference row.
///
/// Per-head parameters (`calibrate`: the fp8-e4m3 scale, the e4m3 scale exponent of FP2+) are
/// computed once over the whole head, outside the timed loop, as a cache would fix them before
/// it streams tokens in. After the timed loop each benchmark checks its blocks (and decoded fp16)
/// against `quantize`/`dequantize`, so a fast but wrong loop cannot go unnoticed.
///
/// Bytes processed are always `elements * 2` (the fp16 input), so every row, memcpy included,
/// is in the same unit. A summary table with the ratios to memcpy and each format's
/// bits/element is printed after the usual Google Benchmark output.
///
/// The default minimum time per benchmark is 0.2 s (pass `--benchmark_min_time=...` to change
/// it); all usual Google Benchmark flags work.

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <typeindex>
#include <vector>

#include "bench_support.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/core/view.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/quant/tensor.hpp"

namespace {

using oscar::half;
using oscar::index_t;
namespace q = oscar::quant;

// ---- the input: 4096 tokens x 8 KV heads x 128 channels of fp16 ------------------------------

constexpr index_t kTokens = 4096;
constexpr index_t kHeads = 8;
constexpr int kHeadDim = 128;
constexpr index_t kElements = kTokens * kHeads * kHeadDim;
constexpr std::int64_t kInputBytes = kElements * static_cast<std::int64_t>(sizeof(half));

/// Seeded N(0, 1) data, `[tokens, heads, head_dim]`, with every 16th channel scaled by 10
/// (the outlier channels real keys have).
const std::vector<half>& input() {
  static const std::vector<half> data = [] {
    std::mt19937_64 rng(20240607);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<half> x(static_cast<std::size_t>(kElements));
    for (index_t i = 0; i < kElements; ++i) {
      const bool outlier = (i % kHeadDim) % 16 == 0;
      x[static_cast<std::size_t>(i)] = half(normal(rng) * (outlier ? 10.0f : 1.0f));
    }
    return x;
  }();
  return data;
}

oscar::kv_view<const half> input_view() {
  return oscar::make_kv_view(input().data(), kTokens, kHeads, kHeadDim);
}

/// The reference encoding of the input in format `F` (library entry point `quantize`), made
/// once: its per-head params feed the encode benchmark, its blocks the decode benchmark.
template <class F>
const q::quantized_tensor<F>& reference() {
  static const q::quantized_tensor<F> tensor = q::quantize<F>(input_view());
  return tensor;
}

// ---- the timed loops -------------------------------------------------------------------------

/// fp16 rows of `tile_tokens` tokens of head `h`, starting at token `t0`, into a float tile.
void load_tile(const half* x, index_t t0, index_t h, int tile_tokens, float* tile) {
  for (int t = 0; t < tile_tokens; ++t) {
    const half* row = x + ((t0 + t) * kHeads + h) * kHeadDim;
    for (int d = 0; d < kHeadDim; ++d) tile[t * kHeadDim + d] = static_cast<float>(row[d]);
  }
}

/// A float tile back into fp16 rows.
void store_tile(const float* tile, index_t t0, index_t h, int tile_tokens, half* y) {
  for (int t = 0; t < tile_tokens; ++t) {
    half* row = y + ((t0 + t) * kHeads + h) * kHeadDim;
    for (int d = 0; d < kHeadDim; ++d) row[d] = half(tile[t * kHeadDim + d]);
  }
}

template <class F>
void encode_all(const half* x, const q::quantized_tensor<F>& ref, float* tile,
                typename q::format_traits<F>::block* out) {
  constexpr int tile_tokens = q::tokens_per_tile<F>();
  constexpr int tile_blocks = q::blocks_per_tile<F>(kHeadDim);
  const index_t tiles = kTokens / tile_tokens;
  for (index_t h = 0; h < kHeads; ++h) {
    for (index_t i = 0; i < tiles; ++i) {
      load_tile(x, i * tile_tokens, h, tile_tokens, tile);
      q::format_traits<F>::encode_tile(tile, kHeadDim, ref.params(h),
                                       out + (h * tiles + i) * tile_blocks);
    }
  }
}

template <class F>
void decode_all(const q::quantized_tensor<F>& ref, float* tile, half* y) {
  constexpr int tile_tokens = q::tokens_per_tile<F>();
  constexpr int tile_blocks = q::blocks_per_tile<F>(kHeadDim);
  for (index_t h = 0; h < kHeads; ++h) {
    const auto blocks = ref.head_blocks(h);
    for (index_t i = 0; i < ref.tiles_per_head(); ++i) {
      q::format_traits<F>::decode_tile(blocks.data() + i * tile_blocks, kHeadDim, ref.params(h),
                                       tile);
      store_tile(tile, i * tile_tokens, h, tile_tokens, y);
    }
  }
}

// ---- benchmarks ------------------------------------------------------------------------------

void bm_memcpy(benchmark::State& state) {
  const std::vector<half>& x = input();
  std::vector<half> y(x.size());
  for (auto _ : state) {
    std::memcpy(y.data(), x.data(), static_cast<std::size_t>(kInputBytes));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kInputBytes);
}

template <class F>
void bm_encode(benchmark::State& state) {
  using block = typename q::format_traits<F>::block;
  const q::quantized_tensor<F>& ref = reference<F>();  // untimed: params and the check below
  std::vector<block> out(static_cast<std::size_t>(kHeads * ref.blocks_per_head()));
  std::vector<float> tile(static_cast<std::size_t>(q::tokens_per_tile<F>() * kHeadDim));
  for (auto _ : state) {
    encode_all<F>(input().data(), ref, tile.data(), out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kInputBytes);
  for (index_t h = 0; h < kHeads; ++h) {
    const auto expected = ref.head_blocks(h);
    if (std::memcmp(out.data() + h * ref.blocks_per_head(), expected.data(),
                    expected.size_bytes()) != 0) {
      state.SkipWithError("encoded blocks differ from quantize()");
      return;
    }
  }
}

template <class F>
void bm_decode(benchmark::State& state) {
  const q::quantized_tensor<F>& ref = reference<F>();
  std::vector<half> y(static_cast<std::size_t>(kElements));
  std::vector<float> tile(static_cast<std::size_t>(q::tokens_per_tile<F>() * kHeadDim));
  for (auto _ : state) {
    decode_all<F>(ref, tile.data(), y.data());
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * kInputBytes);
  std::vector<half> expected(y.size());
  q::dequantize(ref, oscar::make_kv_view(expected.data(), kTokens, kHeads, kHeadDim));
  if (std::memcmp(y.data(), expected.data(), y.size() * sizeof(half)) != 0) {
    state.SkipWithError("decoded fp16 differs from dequantize()");
  }
}

/// One summary row per tensor format, in registration order.
struct format_info {
  std::string name;
  double bits_per_element;
};
std::vector<format_info>& formats() {
  static std::vector<format_info> list;
  return list;
}

/// Registers encode/decode for tensor format `F` unless the same type is already registered
/// (FP2+ keys and values, for one, are the same type).
template <class F>
void register_format(std::set<std::type_index>& seen) {
  if (!seen.insert(std::type_index(typeid(F))).second) return;
  using traits = q::format_traits<F>;
  const std::string name(traits::name);
  formats().push_back({name, traits::bits_per_element});
  benchmark::RegisterBenchmark(("encode/" + name).c_str(), bm_encode<F>);
  benchmark::RegisterBenchmark(("decode/" + name).c_str(), bm_decode<F>);
}

void register_all() {
  benchmark::RegisterBenchmark("memcpy/fp16", bm_memcpy);  // first: the reference
  std::set<std::type_index> seen;
  std::apply(
      [&](auto... kv) {
        ((register_format<typename decltype(kv)::key>(seen),
          register_format<typename decltype(kv)::value>(seen)),
         ...);
      },
      q::all_kv_formats{});
}

// ---- reporting -------------------------------------------------------------------------------

/// Prints the summary table of every run's bytes/s after the usual output.
class quant_reporter : public oscar_bench::summary_reporter {
 public:
  using summary_reporter::summary_reporter;

 private:
  void print_context(std::ostream& out) override {
    out << "oscar quant_throughput on " << oscar_bench::host_name() << ": "
        << oscar_bench::cpu_model() << "; input " << kTokens << " tokens x " << kHeads
        << " heads x " << kHeadDim << " fp16 (" << kInputBytes / (1024 * 1024) << " MiB)\n";
  }

  bool records(const Run& run) const override {
    return run.counters.count("bytes_per_second") != 0;
  }

  void print_summary(std::ostream& out) override {
    const double copy = rate("memcpy/fp16");  // 0 when filtered out
    auto ratio = [copy](double r) { return copy > 0 && r > 0 ? r / copy : 0.0; };
    char line[256];
    out << "\nSummary: GB/s of fp16 input (1 GB = 1e9 bytes, CPU time); x memcpy = rate / "
           "memcpy/fp16 rate\n";
    std::snprintf(line, sizeof(line), "%-28s %8s %9s %10s %9s %10s\n", "format", "bits/elt",
                  "enc GB/s", "enc/memcpy", "dec GB/s", "dec/memcpy");
    out << line;
    if (copy > 0) {
      std::snprintf(line, sizeof(line), "%-28s %8.2f %9.2f %10.4f %9.2f %10.4f\n", "memcpy/fp16",
                    16.0, copy / 1e9, 1.0, copy / 1e9, 1.0);
      out << line;
    }
    for (const format_info& f : formats()) {
      const double enc = rate("encode/" + f.name);
      const double dec = rate("decode/" + f.name);
      if (enc <= 0 && dec <= 0) continue;  // filtered out, or failed
      std::snprintf(line, sizeof(line), "%-28s %8.2f %9.3f %10.4f %9.3f %10.4f\n", f.name.c_str(),
                    f.bits_per_element, enc / 1e9, ratio(enc), dec / 1e9, ratio(dec));
      out << line;
    }
    if (copy <= 0) out << "(memcpy/fp16 did not run, so the ratios read 0)\n";
  }

  double rate(const std::string& name) const { return get(name, "bytes_per_second"); }
};

}  // namespace

int main(int argc, char** argv) {
  // Default to 0.2 s per benchmark so the whole run stays short; an explicit flag wins.
  return oscar_bench::run_benchmarks<quant_reporter>(argc, argv, "0.2", register_all);
}
