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
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <typeindex>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define OSCAR_BENCH_HAVE_UNISTD 1
#endif

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

/// Value of `--name=value` in argv, or "" when absent.
std::string flag_value(int argc, char** argv, std::string_view name) {
  const std::string prefix = "--" + std::string(name) + "=";
  std::string value;
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]).starts_with(prefix)) value = argv[i] + prefix.size();
  }
  return value;
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.starts_with("model name")) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

std::string host_name() {
#ifdef OSCAR_BENCH_HAVE_UNISTD
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) == 0) return name;
#endif
  return "unknown host";
}

/// Wraps the reporter Google Benchmark would use for `--benchmark_format`, records every
/// run's bytes/s, and prints the summary table at the end (to stdout for the console format,
/// to stderr for json/csv so machine-readable output stays clean).
class summary_reporter : public benchmark::BenchmarkReporter {
 public:
  summary_reporter(std::unique_ptr<benchmark::BenchmarkReporter> inner, bool console)
      : inner_(std::move(inner)), out_(console ? std::cout : std::cerr) {}

  bool ReportContext(const Context& context) override {
    out_ << "oscar quant_throughput on " << host_name() << ": " << cpu_model() << "; input "
         << kTokens << " tokens x " << kHeads << " heads x " << kHeadDim << " fp16 ("
         << kInputBytes / (1024 * 1024) << " MiB)\n";
    return inner_->ReportContext(context);
  }

  // Google Benchmark 1.7 flags a failed run with `error_occurred`; 1.8 renamed it `skipped`.
  template <class R>
  static bool failed(const R& run) {
    if constexpr (requires { run.error_occurred; }) return run.error_occurred;
    else return static_cast<bool>(run.skipped);
  }

  void ReportRuns(const std::vector<Run>& runs) override {
    inner_->ReportRuns(runs);
    for (const Run& run : runs) {
      const auto rate = run.counters.find("bytes_per_second");
      if (failed(run) || rate == run.counters.end()) continue;
      // With --benchmark_repetitions the median wins; otherwise the last iteration run.
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (run.run_type == Run::RT_Iteration || median) {
        entry& e = rates_[run.run_name.function_name];
        if (median || !e.from_median) e = {rate->second.value, median};
      }
    }
  }

  void Finalize() override {
    inner_->Finalize();
    if (rates_.empty()) return;
    const double copy = rate("memcpy/fp16");  // 0 when filtered out
    auto ratio = [copy](double r) { return copy > 0 && r > 0 ? r / copy : 0.0; };
    char line[256];
    out_ << "\nSummary: GB/s of fp16 input (1 GB = 1e9 bytes, CPU time); x memcpy = rate / "
            "memcpy/fp16 rate\n";
    std::snprintf(line, sizeof(line), "%-28s %8s %9s %10s %9s %10s\n", "format", "bits/elt",
                  "enc GB/s", "enc/memcpy", "dec GB/s", "dec/memcpy");
    out_ << line;
    if (copy > 0) {
      std::snprintf(line, sizeof(line), "%-28s %8.2f %9.2f %10.4f %9.2f %10.4f\n", "memcpy/fp16",
                    16.0, copy / 1e9, 1.0, copy / 1e9, 1.0);
      out_ << line;
    }
    for (const format_info& f : formats()) {
      const double enc = rate("encode/" + f.name);
      const double dec = rate("decode/" + f.name);
      if (enc <= 0 && dec <= 0) continue;  // filtered out, or failed
      std::snprintf(line, sizeof(line), "%-28s %8.2f %9.3f %10.4f %9.3f %10.4f\n", f.name.c_str(),
                    f.bits_per_element, enc / 1e9, ratio(enc), dec / 1e9, ratio(dec));
      out_ << line;
    }
    if (copy <= 0) out_ << "(memcpy/fp16 did not run, so the ratios read 0)\n";
    out_.flush();
  }

 private:
  struct entry {
    double bytes_per_second = 0;
    bool from_median = false;
  };
  double rate(const std::string& name) const {
    const auto it = rates_.find(name);
    return it == rates_.end() ? 0.0 : it->second.bytes_per_second;
  }

  std::unique_ptr<benchmark::BenchmarkReporter> inner_;
  std::ostream& out_;
  std::map<std::string, entry> rates_;
};

std::unique_ptr<summary_reporter> make_reporter(const std::string& format, bool color) {
  if (format == "json") {
    return std::make_unique<summary_reporter>(std::make_unique<benchmark::JSONReporter>(), false);
  }
  if (format == "csv") {  // deprecated in Google Benchmark, but still a documented flag value
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
    return std::make_unique<summary_reporter>(std::make_unique<benchmark::CSVReporter>(), false);
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
  }
  const auto options =
      color ? benchmark::ConsoleReporter::OO_ColorTabular : benchmark::ConsoleReporter::OO_Tabular;
  return std::make_unique<summary_reporter>(std::make_unique<benchmark::ConsoleReporter>(options),
                                            true);
}

}  // namespace

int main(int argc, char** argv) {
  // Default to 0.2 s per benchmark so the whole run stays short; an explicit flag wins.
  std::vector<char*> args(argv, argv + argc);
  std::string default_min_time = "--benchmark_min_time=0.2";
  if (flag_value(argc, argv, "benchmark_min_time").empty()) args.push_back(default_min_time.data());
  int args_count = static_cast<int>(args.size());
  args.push_back(nullptr);

  // Read the output flags before Initialize consumes them.
  const std::string format = flag_value(args_count, args.data(), "benchmark_format");
  const std::string color_flag = flag_value(args_count, args.data(), "benchmark_color");
  bool color = color_flag == "true" || color_flag == "yes" || color_flag == "1";
#ifdef OSCAR_BENCH_HAVE_UNISTD
  if (color_flag.empty() || color_flag == "auto") color = isatty(STDOUT_FILENO) != 0;
#endif

  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 1;
  register_all();
  const auto reporter = make_reporter(format, color);
  benchmark::RunSpecifiedBenchmarks(reporter.get());
  benchmark::Shutdown();
  return 0;
}
