// SPDX-License-Identifier: Apache-2.0
/// \file
/// The Google Benchmark plumbing the bench programs share: a reporter that wraps the one
/// `--benchmark_format` asks for and prints a bench's own summary tables after it, and
/// `run_benchmarks`, the whole of a bench's `main`.
///
/// A bench derives from `oscar_bench::summary_reporter`, writes its context line
/// (`print_context`) and its tables (`print_summary`, reading the recorded runs with `get` and
/// `has`), and calls `oscar_bench::run_benchmarks<its_reporter>(argc, argv, "0.2",
/// register_all)` from `main`. Only bench/*.cpp become executables; this header is included
/// from the same directory.

#pragma once

#include <benchmark/benchmark.h>

#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define OSCAR_BENCH_HAVE_UNISTD 1
#endif

namespace oscar_bench {

/// Value of `--name=value` in argv, or "" when absent.
inline std::string flag_value(int argc, char** argv, std::string_view name) {
  const std::string prefix = "--" + std::string(name) + "=";
  std::string value;
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]).starts_with(prefix)) value = argv[i] + prefix.size();
  }
  return value;
}

inline std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.starts_with("model name")) return line.substr(line.find(':') + 2);
  }
  return "unknown CPU";
}

inline std::string host_name() {
#ifdef OSCAR_BENCH_HAVE_UNISTD
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) == 0) return name;
#endif
  return "unknown host";
}

/// Google Benchmark 1.7 flags a failed run with `error_occurred`; 1.8 renamed it `skipped`.
template <class R>
bool failed(const R& run) {
  if constexpr (requires { run.error_occurred; }) {
    return run.error_occurred;
  } else {
    return static_cast<bool>(run.skipped);
  }
}

/// Wraps the reporter Google Benchmark would use for `--benchmark_format`, records the
/// counters of every successful run, and prints the bench's summary at the end (to stdout for
/// the console format, to stderr for json/csv so machine-readable output stays clean).
///
/// Runs are recorded by function name; with `--benchmark_repetitions` the median wins,
/// otherwise the last iteration run. Rates are the counters `bytes_per_second` and
/// `items_per_second`.
class summary_reporter : public benchmark::BenchmarkReporter {
 public:
  summary_reporter(std::unique_ptr<benchmark::BenchmarkReporter> inner, bool console)
      : inner_(std::move(inner)), out_(console ? std::cout : std::cerr) {}

  bool ReportContext(const Context& context) final {
    print_context(out_);
    return inner_->ReportContext(context);
  }

  void ReportRuns(const std::vector<Run>& runs) final {
    inner_->ReportRuns(runs);
    for (const Run& run : runs) {
      if (failed(run) || !records(run)) continue;
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (run.run_type != Run::RT_Iteration && !median) continue;
      entry& e = results_[run.run_name.function_name];
      if (!median && e.from_median) continue;
      e.from_median = median;
      e.counters.clear();
      for (const auto& [name, counter] : run.counters) e.counters[name] = counter.value;
    }
  }

  /// The summary is printed only when some run was recorded.
  void Finalize() final {
    inner_->Finalize();
    if (results_.empty()) return;
    print_summary(out_);
    out_.flush();
  }

 protected:
  /// The line printed before Google Benchmark's own context (host, CPU, the bench's shapes).
  virtual void print_context(std::ostream& out) = 0;
  /// The summary tables, printed after every benchmark ran.
  virtual void print_summary(std::ostream& out) = 0;
  /// Whether a successful run is recorded; every one is unless a bench says otherwise.
  virtual bool records(const Run& /*run*/) const { return true; }

  /// Counter `counter` of run `name`, or 0 when the run is missing (filtered out, failed).
  double get(const std::string& name, const std::string& counter) const {
    const auto it = results_.find(name);
    if (it == results_.end()) return 0.0;
    const auto c = it->second.counters.find(counter);
    return c == it->second.counters.end() ? 0.0 : c->second;
  }
  bool has(const std::string& name) const { return results_.count(name) != 0; }

 private:
  struct entry {
    std::map<std::string, double> counters;
    bool from_median = false;
  };

  std::unique_ptr<benchmark::BenchmarkReporter> inner_;
  std::ostream& out_;
  std::map<std::string, entry> results_;
};

/// `Reporter` (a `summary_reporter`) around the reporter of `--benchmark_format` (`format`).
template <class Reporter>
std::unique_ptr<Reporter> make_reporter(const std::string& format, bool color) {
  if (format == "json") {
    return std::make_unique<Reporter>(std::make_unique<benchmark::JSONReporter>(), false);
  }
  if (format == "csv") {  // deprecated in Google Benchmark, but still a documented flag value
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
    return std::make_unique<Reporter>(std::make_unique<benchmark::CSVReporter>(), false);
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
  }
  const auto options =
      color ? benchmark::ConsoleReporter::OO_ColorTabular : benchmark::ConsoleReporter::OO_Tabular;
  return std::make_unique<Reporter>(std::make_unique<benchmark::ConsoleReporter>(options), true);
}

/// The whole `main` of a bench: adds `--benchmark_min_time=<default_min_time>` unless the
/// command line sets it, reads `--benchmark_format` and `--benchmark_color`, initializes Google
/// Benchmark (1 on an unrecognized argument), calls `register_benchmarks`, and runs the
/// benchmarks `--benchmark_filter` selects through a `Reporter`.
template <class Reporter>
int run_benchmarks(int argc, char** argv, const char* default_min_time,
                   void (*register_benchmarks)()) {
  // An explicit flag wins over the bench's default minimum time.
  std::vector<char*> args(argv, argv + argc);
  std::string min_time_flag = std::string("--benchmark_min_time=") + default_min_time;
  if (flag_value(argc, argv, "benchmark_min_time").empty()) args.push_back(min_time_flag.data());
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
  register_benchmarks();
  const auto reporter = make_reporter<Reporter>(format, color);
  benchmark::RunSpecifiedBenchmarks(reporter.get());
  benchmark::Shutdown();
  return 0;
}

}  // namespace oscar_bench
