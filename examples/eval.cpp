// SPDX-License-Identifier: Apache-2.0
// oscar-eval (examples/eval.cpp): how much a KV-cache format costs a real model. Runs a llama2.c-format model over
// text once with a lossless fp32 cache and once per format, on the same tokens, and reports per
// format: all-in bits per element, KV bytes held, relative error of the attention output (per
// layer and overall) against the fp32 run, next-token KL divergence and top-1 agreement
// against the fp32 run, and perplexity.
//
//   oscar-eval [--model PATH] [--text PATH | --tokens PATH | --generate N] [--formats a,b,...]
//              [--window R] [--sinks S] [--max-tokens N] [--seed N] [--json]
//              [--policy a,b,...] [--bits-budget B] [--head-importance PATH] [--prune T]
//              [--prefill N] [--interval N] [--evict-threshold X]
//
// Defaults: the shipped model (examples/models/kjv-byte.bin) over held-out text
// (examples/data/kjv-heldout.txt), at the model's full context, window 64, sinks 4.
//
// Policies (`--policy`, oscar::policy; then only the formats named with --formats run too):
// uniform (every block FP2+), streaming (StreamingLLM), h2o (H2O), snapkv (SnapKV, selection
// after the prompt) and attention_aware (OSCAR's mixed precision). `--bits-budget B` is the
// average bits per element of the quantized region (between sinks and window) a policy may
// store: attention_aware spends it on FP2+/FP4+ blocks, pruned heads and evictions; streaming,
// h2o and snapkv keep tokens at fp16 and so keep B/16 of them. With a policy, bits/element is
// what the policy actually stored at the end, per element that reached the region: blocks at
// their format's bits (holes included), evicted tokens at 0, pruned heads at their O(1) mean.
// `--prune T` prunes, after the prompt (`--prefill N` tokens, default 256), the heads whose
// importance is at most T times the largest (at least one kept per layer), for uniform and
// attention_aware; the importance is the head-importance file (default
// examples/models/kjv-byte.heads, Taylor scores from examples/train/calibrate_heads.py; `none`
// for no file), attention_aware also weighs its blocks by it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "engine/llama.hpp"
#include "oscar/oscar.hpp"

#ifndef OSCAR_SOURCE_DIR
#define OSCAR_SOURCE_DIR "."
#endif

namespace q = oscar::quant;
namespace c = oscar::cache;

namespace {

[[noreturn]] void usage_error(const std::string& message);

struct settings {
  std::string model = OSCAR_SOURCE_DIR "/examples/models/kjv-byte.bin";
  std::string text;
  std::string tokens_file;
  int generate = 0;
  std::vector<std::string> formats = {"fp16", "fp8",     "q8_0",    "q4_0",      "kivi4",
                                      "fp4plus", "kivi2", "fp2plus"};
  int window = 64;
  int sinks = 4;
  int max_tokens = 0;  // 0: the model's context length
  std::uint64_t seed = 1;
  bool json = false;
  bool formats_given = false;
  std::vector<std::string> policies;
  double bits_budget = 2.5;
  std::string head_importance = OSCAR_SOURCE_DIR "/examples/models/kjv-byte.heads";
  bool head_importance_given = false;
  double prune = -1.0;  // < 0: no pruning
  int prefill = 256;
  int interval = 16;
  double evict_threshold = -1.0;  // < 0: the policy's default
};

/// What one run over the tokens produced: per step, the logits and each layer's attention output.
struct trace {
  std::vector<std::vector<float>> logits;                    // [steps][vocab]
  std::vector<std::vector<std::vector<float>>> attention;    // [steps][layers][n_heads * hd]
  double kv_bytes = 0;
  double kv_bytes_peak = 0;  // the most the cache held after any step (hooks applied)
  double region_bits = -1;  // with a policy: bits per element it stored
  oscar::index_t pruned_heads = 0, evicted_tokens = 0;
};

struct result {
  std::string format;
  std::string policy = "none";
  oscar::index_t pruned_heads = 0, evicted_tokens = 0;
  double bits_per_element = 0, kv_bytes = 0, kv_bytes_peak = 0;
  std::vector<double> layer_err;
  double attn_rel_err = 0, kl = 0, top1 = 0, ppl = 0;
};

/// Feeds `tokens` to session `s` one by one, recording logits, each layer's attention output
/// and the cache's peak bytes in `out`; `after_step()` runs after each step, before the peak.
template <class Cache, class AfterStep>
void feed(oscar_engine::session<Cache>& s, const Cache& cache, const std::vector<int>& tokens,
          const std::string& label, trace& out, AfterStep&& after_step) {
  const int layers = s.get_model().config().n_layers;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const auto logits = s.step(tokens[i]);
    out.logits.emplace_back(logits.begin(), logits.end());
    out.attention.emplace_back();
    for (int l = 0; l < layers; ++l) {
      const auto a = s.attention_output(l);
      out.attention.back().emplace_back(a.begin(), a.end());
    }
    after_step();
    out.kv_bytes_peak = std::max(out.kv_bytes_peak, static_cast<double>(cache.usage().bytes_used()));
    if ((i + 1) % 128 == 0 || i + 1 == tokens.size()) {
      std::fprintf(stderr, "\roscar-eval: %s %zu/%zu tokens", label.c_str(), i + 1, tokens.size());
    }
  }
}

/// Runs `model` over `tokens` with a cache storing every tier in KV format `KV`.
template <class KV>
trace run(const oscar_engine::model& model, const std::vector<int>& tokens, int sinks, int window,
          const char* label) {
  using cache_type = c::kv_cache<KV, KV, KV>;
  // 64-token blocks, or one tile of a format that groups more tokens.
  const int tile = std::max(q::tokens_per_tile<typename KV::key>(), q::tokens_per_tile<typename KV::value>());
  const c::cache_config cfg = oscar_engine::cache_config_for(model, sinks, window, std::max(64, tile));
  cache_type cache(cfg, oscar_engine::pool_budget_for<cache_type>(model, cfg));
  trace out;
  {
    oscar_engine::session<cache_type> s(model, cache);
    feed(s, cache, tokens, label, out, [] {});
    out.kv_bytes = static_cast<double>(cache.usage().bytes_used());
  }
  std::fprintf(stderr, "\n");
  return out;
}

/// Runs `model` over `tokens` with policy `P` driving a `Cache` (tier hook, hooks, decisions).
template <class Cache, class P>
trace run_policy(const oscar_engine::model& model, const std::vector<int>& tokens,
                 const settings& s, P policy, const oscar::importance::head_scores* gradients,
                 const std::string& label) {
  namespace pol = oscar::policy;
  const c::cache_config cfg = oscar_engine::cache_config_for(model, s.sinks, s.window);
  Cache cache(cfg, oscar_engine::pool_budget_for<Cache>(model, cfg), pol::tier_hook(policy));
  trace out;
  const pol::driver_options options{
      .prefill_tokens = std::min<oscar::index_t>(s.prefill, static_cast<oscar::index_t>(tokens.size()))};
  {
    oscar_engine::session<Cache> session(model, cache);
    const auto go = [&](auto& driver) {
      if constexpr (pol::policy_traits<P>::needs_attention_stats) {
        session.observe_attention([&](int layer, std::span<const oscar::attention::kv_head_stats> st,
                                      oscar::kv_view<const float> o) { driver.observe(layer, st, o); });
      }
      feed(session, cache, tokens, label, out, [&] { driver.end_step(); });
      driver.finish();
      const pol::region_usage u = driver.usage();
      out.region_bits = u.bits_per_element();
      out.pruned_heads = u.pruned_heads;
      out.evicted_tokens = u.evicted_tokens;
      out.kv_bytes = static_cast<double>(cache.usage().bytes_used());
    };
    if (gradients) {
      pol::driver<P, Cache> driver(policy, cache, session.sequence(), *gradients, options);
      go(driver);
    } else {
      pol::driver<P, Cache> driver(policy, cache, session.sequence(), options);
      go(driver);
    }
  }
  std::fprintf(stderr, "\n");
  return out;
}

/// log-softmax of logits, in double.
std::vector<double> log_softmax(const std::vector<float>& logits) {
  const double m = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float x : logits) sum += std::exp(double(x) - m);
  const double log_z = m + std::log(sum);
  std::vector<double> out(logits.size());
  for (std::size_t i = 0; i < logits.size(); ++i) out[i] = double(logits[i]) - log_z;
  return out;
}

/// Compares a run with the fp32 reference run over the same tokens.
result compare(const std::string& name, double bits, const trace& ref, const trace& got,
               const std::vector<int>& tokens) {
  result r;
  r.format = name;
  r.bits_per_element = bits;
  r.kv_bytes = got.kv_bytes;
  r.kv_bytes_peak = std::max(got.kv_bytes, got.kv_bytes_peak);
  const std::size_t steps = ref.logits.size();
  const std::size_t layers = ref.attention.front().size();
  std::vector<double> num(layers, 0.0), den(layers, 0.0);
  double kl = 0, nll = 0;
  std::size_t agree = 0, predicted = 0;
  for (std::size_t i = 0; i < steps; ++i) {
    for (std::size_t l = 0; l < layers; ++l) {
      for (std::size_t j = 0; j < ref.attention[i][l].size(); ++j) {
        const double d = double(got.attention[i][l][j]) - ref.attention[i][l][j];
        num[l] += d * d;
        den[l] += double(ref.attention[i][l][j]) * ref.attention[i][l][j];
      }
    }
    const auto lp = log_softmax(ref.logits[i]), lq = log_softmax(got.logits[i]);
    for (std::size_t v = 0; v < lp.size(); ++v) kl += std::exp(lp[v]) * (lp[v] - lq[v]);
    const auto argmax = [](const std::vector<double>& x) {
      return std::max_element(x.begin(), x.end()) - x.begin();
    };
    agree += argmax(lp) == argmax(lq) ? 1 : 0;
    if (i + 1 < steps) {  // the next token is known: perplexity over it
      nll -= lq[static_cast<std::size_t>(tokens[i + 1])];
      ++predicted;
    }
  }
  double all_num = 0, all_den = 0;
  for (std::size_t l = 0; l < layers; ++l) {
    r.layer_err.push_back(std::sqrt(num[l] / den[l]));
    all_num += num[l];
    all_den += den[l];
  }
  r.attn_rel_err = std::sqrt(all_num / all_den);
  r.kl = kl / static_cast<double>(steps);
  r.top1 = static_cast<double>(agree) / static_cast<double>(steps);
  r.ppl = std::exp(nll / static_cast<double>(predicted));
  return r;
}

/// A policy the command line can name, and how to run it.
struct policy_entry {
  std::string name;
  std::function<trace(const oscar_engine::model&, const std::vector<int>&, const settings&,
                      const oscar::importance::head_scores*)>
      run;
};

/// The caches the policies run on: FP2+ (the default) / FP4+ / fp16 tiers for the quantizing
/// policies, fp16 everywhere for the evicting ones (they keep tokens at full precision, as the
/// methods they reproduce do).
using quantizing_cache = c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16>;
using fp16_cache = c::kv_cache<q::kv_fp16, q::kv_fp16, q::kv_fp16>;

std::vector<policy_entry> known_policies() {
  namespace pol = oscar::policy;
  using scores = const oscar::importance::head_scores*;
  using model_t = oscar_engine::model;
  using tokens_t = std::vector<int>;
  const auto pruning = [](const settings& s) {
    return s.prune < 0 ? std::nullopt
                       : std::optional(oscar::importance::threshold::relative_to_max(s.prune));
  };
  return {
      {"uniform",
       [=](const model_t& m, const tokens_t& t, const settings& s, scores g) {
         pol::uniform p{.prune = pruning(s), .prune_floor = 1};
         if (p.prune && !g) usage_error("--prune needs a head-importance file (--head-importance)");
         return run_policy<quantizing_cache>(m, t, s, p, g, "uniform");
       }},
      {"streaming",
       [](const model_t& m, const tokens_t& t, const settings& s, scores g) {
         return run_policy<fp16_cache>(m, t, s, pol::streaming{.bits_budget = s.bits_budget, .interval = s.interval},
                                       g, "streaming");
       }},
      {"h2o",
       [](const model_t& m, const tokens_t& t, const settings& s, scores g) {
         return run_policy<fp16_cache>(m, t, s, pol::h2o{.bits_budget = s.bits_budget, .interval = s.interval},
                                       g, "h2o");
       }},
      {"snapkv",
       [](const model_t& m, const tokens_t& t, const settings& s, scores g) {
         pol::snapkv p;
         p.bits_budget = s.bits_budget;
         return run_policy<fp16_cache>(m, t, s, p, g, "snapkv");
       }},
      {"attention_aware",
       [=](const model_t& m, const tokens_t& t, const settings& s, scores g) {
         pol::attention_aware p;
         p.bits_budget = s.bits_budget;
         p.interval = s.interval;
         if (s.evict_threshold >= 0) p.evict_threshold = s.evict_threshold;
         p.prune = pruning(s);
         return run_policy<quantizing_cache>(m, t, s, p, g, "attention_aware");
       }},
  };
}

/// A format the command line can name: its KV bits per element and how to run it.
struct format_entry {
  std::string name;
  double bits;
  std::function<trace(const oscar_engine::model&, const std::vector<int>&, int, int)> run;
};

template <class KV>
format_entry entry(const char* name) {
  return {name, KV::bits_per_element,
          [name](const oscar_engine::model& m, const std::vector<int>& t, int sinks, int window) {
            return run<KV>(m, t, sinks, window, name);
          }};
}

// FP2+ family variants at <= 2.5 bits per element for the sweep (`--formats sweep`): the same
// format for K and V, or per-channel keys (groups along tokens, as KIVI) with per-token values;
// codebook (u/lm), group size and axis (g<N>h per token, g<N>t per channel), scale type,
// rotation, zero point, outliers (o<N>) and the clip search (minmax: none) each vary. The
// default FP2+ is "k:fp2-lm-g128t-fp16-z-o3-minmax/v:fp2-lm-g64h-e4m3-rot".
template <q::fpq_config C>
using fpq = q::fpq<C>;
constexpr q::fpq_config lm16_e4m3_rot{.group = 16, .scale = q::scale_type::e4m3, .rotate = true};
constexpr q::fpq_config lm32_rot{.group = 32, .rotate = true};
constexpr q::fpq_config lm32{.group = 32};
constexpr q::fpq_config u32_rot{.levels = q::codebook::uniform, .group = 32, .rotate = true};
constexpr q::fpq_config lm64_z_rot{.group = 64, .zero_point = true, .rotate = true};
constexpr q::fpq_config lm64_e4m3_o1_rot{.group = 64, .scale = q::scale_type::e4m3, .rotate = true,
                                         .outliers = 1};
constexpr q::fpq_config lm32_tokens{.group = 32, .axis = q::group_axis::tokens};
constexpr q::fpq_config u64_z_tokens{.levels = q::codebook::uniform, .group = 64,
                                     .axis = q::group_axis::tokens, .zero_point = true};
constexpr q::fpq_config lm64_z_tokens{.group = 64, .axis = q::group_axis::tokens,
                                      .zero_point = true};
constexpr q::fpq_config u64_z_tokens_minmax{.levels = q::codebook::uniform, .group = 64,
                                            .axis = q::group_axis::tokens, .zero_point = true,
                                            .search_scale = false};
constexpr q::fpq_config u64_z_o1_tokens_minmax{.levels = q::codebook::uniform, .group = 64,
                                               .axis = q::group_axis::tokens, .zero_point = true,
                                               .outliers = 1, .search_scale = false};
constexpr q::fpq_config u128_z_o2_tokens_minmax{.levels = q::codebook::uniform, .group = 128,
                                                .axis = q::group_axis::tokens, .zero_point = true,
                                                .outliers = 2, .search_scale = false};
constexpr q::fpq_config u128_z_o1_tokens_minmax{.levels = q::codebook::uniform, .group = 128,
                                                .axis = q::group_axis::tokens, .zero_point = true,
                                                .outliers = 1, .search_scale = false};
constexpr q::fpq_config u128_z_o3_tokens_minmax{.levels = q::codebook::uniform, .group = 128,
                                                .axis = q::group_axis::tokens, .zero_point = true,
                                                .outliers = 3, .search_scale = false};
constexpr q::fpq_config lm128_z_o3_tokens_minmax{.group = 128, .axis = q::group_axis::tokens,
                                                 .zero_point = true, .outliers = 3,
                                                 .search_scale = false};
constexpr q::fpq_config lm64_e4m3_rot{.group = 64, .scale = q::scale_type::e4m3, .rotate = true};
constexpr q::fpq_config lm64_e4m3{.group = 64, .scale = q::scale_type::e4m3};
constexpr q::fpq_config u64_e4m3_rot{.levels = q::codebook::uniform, .group = 64,
                                     .scale = q::scale_type::e4m3, .rotate = true};
constexpr q::fpq_config lm32_e4m3_rot{.group = 32, .scale = q::scale_type::e4m3, .rotate = true};
template <q::fpq_config K, q::fpq_config V>
struct pair : q::kv_format<fpq<K>, fpq<V>> {};

std::vector<format_entry> sweep_formats() {
  return {entry<pair<lm16_e4m3_rot, lm16_e4m3_rot>>("fp2-lm-g16h-e4m3-rot"),
          entry<pair<lm32_rot, lm32_rot>>("fp2-lm-g32h-fp16-rot"),
          entry<pair<lm32, lm32>>("fp2-lm-g32h-fp16"),
          entry<pair<u32_rot, u32_rot>>("fp2-u-g32h-fp16-rot"),
          entry<pair<lm64_z_rot, lm64_z_rot>>("fp2-lm-g64h-fp16-z-rot"),
          entry<pair<lm64_e4m3_o1_rot, lm64_e4m3_o1_rot>>("fp2-lm-g64h-e4m3-rot-o1"),
          entry<pair<lm32_tokens, lm16_e4m3_rot>>("k:fp2-lm-g32t-fp16/v:fp2-lm-g16h-e4m3-rot"),
          entry<pair<u64_z_tokens, lm16_e4m3_rot>>("k:fp2-u-g64t-fp16-z/v:fp2-lm-g16h-e4m3-rot"),
          entry<pair<lm64_z_tokens, lm16_e4m3_rot>>("k:fp2-lm-g64t-fp16-z/v:fp2-lm-g16h-e4m3-rot"),
          entry<pair<u64_z_tokens_minmax, lm16_e4m3_rot>>(
              "k:fp2-u-g64t-fp16-z-minmax/v:fp2-lm-g16h-e4m3-rot"),
          entry<pair<u64_z_tokens, lm32_rot>>("k:fp2-u-g64t-fp16-z/v:fp2-lm-g32h-fp16-rot"),
          entry<pair<u64_z_o1_tokens_minmax, lm64_e4m3_rot>>(
              "k:fp2-u-g64t-fp16-z-o1-minmax/v:fp2-lm-g64h-e4m3-rot"),
          entry<pair<u128_z_o2_tokens_minmax, lm32_e4m3_rot>>(
              "k:fp2-u-g128t-fp16-z-o2-minmax/v:fp2-lm-g32h-e4m3-rot"),
          entry<pair<u128_z_o1_tokens_minmax, lm32_e4m3_rot>>(
              "k:fp2-u-g128t-fp16-z-o1-minmax/v:fp2-lm-g32h-e4m3-rot"),
          entry<pair<u128_z_o3_tokens_minmax, lm64_e4m3_rot>>(
              "k:fp2-u-g128t-fp16-z-o3-minmax/v:fp2-lm-g64h-e4m3-rot"),
          entry<pair<u128_z_o3_tokens_minmax, lm64_e4m3>>(
              "k:fp2-u-g128t-fp16-z-o3-minmax/v:fp2-lm-g64h-e4m3"),
          entry<pair<u128_z_o3_tokens_minmax, u64_e4m3_rot>>(
              "k:fp2-u-g128t-fp16-z-o3-minmax/v:fp2-u-g64h-e4m3-rot"),
          entry<pair<lm128_z_o3_tokens_minmax, lm64_e4m3_rot>>(
              "k:fp2-lm-g128t-fp16-z-o3-minmax/v:fp2-lm-g64h-e4m3-rot")};
}

std::vector<format_entry> known_formats() {
  std::vector<format_entry> all = {
      entry<q::kv_fp32>("fp32"),   entry<q::kv_fp16>("fp16"),   entry<q::kv_fp8>("fp8"),
      entry<q::kv_q8_0>("q8_0"),   entry<q::kv_q4_0>("q4_0"),   entry<q::kivi2>("kivi2"),
      entry<q::kivi4>("kivi4"),    entry<q::fp2plus>("fp2plus"), entry<q::fp4plus>("fp4plus"),
      entry<q::fp2plus_kh>("fp2plus-kh"), entry<q::fp2plus_kc>("fp2plus-kc")};
  for (format_entry& f : sweep_formats()) all.push_back(std::move(f));
  return all;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr,
               "oscar-eval: %s\nusage: oscar-eval [--model PATH] [--text PATH | --tokens PATH | "
               "--generate N] [--formats a,b,...] [--window R] [--sinks S] [--max-tokens N] "
               "[--seed N] [--json] [--policy a,b,...] [--bits-budget B] [--head-importance PATH] "
               "[--prune T] [--prefill N] [--interval N] [--evict-threshold X]\n",
               message.c_str());
  std::exit(2);
}

int parse_int(const std::string& flag, const char* value, int min) {
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || v < min || v > 1 << 24) {
    usage_error(flag + " = " + value + " is not allowed (allowed: an integer >= " +
                std::to_string(min) + ")");
  }
  return static_cast<int>(v);
}

double parse_double(const std::string& flag, const char* value, double min, double max) {
  char* end = nullptr;
  const double v = std::strtod(value, &end);
  if (*value == '\0' || *end != '\0' || !(v >= min && v <= max)) {
    usage_error(flag + " = " + value + " is not allowed (allowed: a number from " +
                std::to_string(min) + " to " + std::to_string(max) + ")");
  }
  return v;
}

settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage_error(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--model") s.model = value();
    else if (flag == "--text") s.text = value();
    else if (flag == "--tokens") s.tokens_file = value();
    else if (flag == "--generate") s.generate = parse_int(flag, value(), 1);
    else if (flag == "--formats") {
      s.formats = split(value());
      s.formats_given = true;
    }
    else if (flag == "--policy") s.policies = split(value());
    else if (flag == "--bits-budget") s.bits_budget = parse_double(flag, value(), 0.0, 32.0);
    else if (flag == "--head-importance") {
      s.head_importance = value();
      s.head_importance_given = true;
    }
    else if (flag == "--prune") s.prune = parse_double(flag, value(), 0.0, 1.0);
    else if (flag == "--prefill") s.prefill = parse_int(flag, value(), 1);
    else if (flag == "--interval") s.interval = parse_int(flag, value(), 1);
    else if (flag == "--evict-threshold") s.evict_threshold = parse_double(flag, value(), 0.0, 1.0);
    else if (flag == "--window") s.window = parse_int(flag, value(), 0);
    else if (flag == "--sinks") s.sinks = parse_int(flag, value(), 0);
    else if (flag == "--max-tokens") s.max_tokens = parse_int(flag, value(), 2);
    else if (flag == "--seed") s.seed = static_cast<std::uint64_t>(parse_int(flag, value(), 0));
    else if (flag == "--json") s.json = true;
    else usage_error("unknown option " + flag);
  }
  const int sources = !s.text.empty() + !s.tokens_file.empty() + (s.generate > 0);
  if (sources > 1) usage_error("give at most one of --text, --tokens, --generate");
  if (sources == 0) s.text = OSCAR_SOURCE_DIR "/examples/data/kjv-heldout.txt";
  if (!s.policies.empty() && !s.formats_given) s.formats.clear();
  return s;
}

std::vector<int> read_tokens(const settings& s, const oscar_engine::model& model, int limit) {
  std::vector<int> tokens;
  const int vocab = model.config().vocab_size;
  if (!s.text.empty()) {
    std::ifstream in(s.text, std::ios::binary);
    if (!in) usage_error("cannot read --text " + s.text);
    if (vocab != 256) usage_error("--text needs a byte-level model (vocab 256); use --tokens");
    for (char ch; tokens.size() < static_cast<std::size_t>(limit) && in.get(ch);)
      tokens.push_back(static_cast<unsigned char>(ch));
  } else if (!s.tokens_file.empty()) {
    std::ifstream in(s.tokens_file);
    if (!in) usage_error("cannot read --tokens " + s.tokens_file);
    for (long t; tokens.size() < static_cast<std::size_t>(limit) && in >> t;) {
      if (t < 0 || t >= vocab) {
        usage_error("token " + std::to_string(t) + " in " + s.tokens_file +
                    " is not allowed (allowed: 0 to " + std::to_string(vocab - 1) + ")");
      }
      tokens.push_back(static_cast<int>(t));
    }
  } else {
    // Sample from the model itself with the fp32 cache at temperature 1.
    using cache_type = c::kv_cache<q::kv_fp32, q::kv_fp32, q::kv_fp32>;
    const c::cache_config cfg = oscar_engine::cache_config_for(model, 0, 0);
    cache_type cache(cfg, oscar_engine::pool_budget_for<cache_type>(model, cfg));
    oscar_engine::session<cache_type> session(model, cache);
    std::mt19937_64 rng(s.seed);
    int token = '\n' < vocab ? '\n' : 0;
    const int count = std::min(limit, s.generate);
    for (int i = 0; i < count; ++i) {
      tokens.push_back(token);
      if (i + 1 == count) break;
      const auto logits = session.step(token);
      const auto lp = log_softmax(std::vector<float>(logits.begin(), logits.end()));
      std::vector<double> p(lp.size());
      for (std::size_t v = 0; v < lp.size(); ++v) p[v] = std::exp(lp[v]);
      token = static_cast<int>(std::discrete_distribution<int>(p.begin(), p.end())(rng));
    }
  }
  if (tokens.size() < 2) usage_error("need at least 2 tokens to evaluate");
  return tokens;
}

void print_table(const std::vector<result>& results, const settings& s, std::size_t tokens,
                 double ref_ppl) {
  std::printf("oscar-eval: %s, %zu tokens, sinks %d, window %d; reference: fp32 cache (ppl %.4f)\n",
              s.model.c_str(), tokens, s.sinks, s.window, ref_ppl);
  const bool policies = std::any_of(results.begin(), results.end(),
                                    [](const result& r) { return r.policy != "none"; });
  if (policies) {
    std::printf("policies: bits budget %.3f, prefill %d, interval %d%s\n", s.bits_budget, s.prefill,
                s.interval, s.prune >= 0 ? (", prune threshold " + std::to_string(s.prune)).c_str() : "");
  }
  std::size_t width = 9;
  for (const result& r : results) width = std::max(width, r.format.size());
  std::printf("%-*s %8s %12s %10s %11s %8s %8s", static_cast<int>(width), "format", "bits/el", "KV bytes",
              "attn err", "KL", "top-1", "ppl");
  if (policies) std::printf(" %12s %6s %8s", "peak bytes", "pruned", "evicted");
  std::printf("  %s\n", "attn err per layer");
  for (const result& r : results) {
    std::printf("%-*s %8.3f %12.0f %10.5f %11.3e %8.4f %8.4f", static_cast<int>(width),
                r.format.c_str(),
                r.bits_per_element, r.kv_bytes, r.attn_rel_err, r.kl, r.top1, r.ppl);
    if (policies) {
      std::printf(" %12.0f %6lld %8lld", r.kv_bytes_peak, static_cast<long long>(r.pruned_heads),
                  static_cast<long long>(r.evicted_tokens));
    }
    std::printf(" ");
    for (double e : r.layer_err) std::printf(" %.5f", e);
    std::printf("\n");
  }
}

void print_json(const std::vector<result>& results) {
  std::printf("[\n");
  for (std::size_t i = 0; i < results.size(); ++i) {
    const result& r = results[i];
    std::printf("  {\"format\": \"%s\", \"policy\": \"%s\", \"bits_per_element\": %.6f, "
                "\"kv_bytes\": %.0f, \"kv_bytes_peak\": %.0f, \"pruned_heads\": %lld, "
                "\"evicted_tokens\": %lld, \"attn_rel_err\": %.9g, \"attn_rel_err_per_layer\": [",
                r.format.c_str(), r.policy.c_str(), r.bits_per_element, r.kv_bytes, r.kv_bytes_peak,
                static_cast<long long>(r.pruned_heads), static_cast<long long>(r.evicted_tokens),
                r.attn_rel_err);
    for (std::size_t l = 0; l < r.layer_err.size(); ++l)
      std::printf("%s%.9g", l ? ", " : "", r.layer_err[l]);
    std::printf("], \"kl\": %.9g, \"top1\": %.9g, \"ppl\": %.9g, \"ppl_vs_fp32\": %.9g}%s\n", r.kl,
                r.top1, r.ppl, r.ppl / results.front().ppl, i + 1 < results.size() ? "," : "");
  }
  std::printf("]\n");
}

}  // namespace

int main(int argc, char** argv) {
  const settings s = parse(argc, argv);
  try {
    const oscar_engine::model model = oscar_engine::model::load(s.model);
    const int context = model.config().seq_len;
    const int limit = s.max_tokens > 0 ? std::min(s.max_tokens, context) : context;
    const std::vector<int> tokens = read_tokens(s, model, limit);

    const auto formats = known_formats();
    std::vector<const format_entry*> chosen;
    std::vector<std::string> names = s.formats;
    if (names.size() == 1 && names[0] == "sweep") {  // the FP2+ family sweep, KIVI-2 to compare
      names = {"kivi2"};
      for (const format_entry& f : sweep_formats()) names.push_back(f.name);
    }
    for (const std::string& name : names) {
      const auto it = std::find_if(formats.begin(), formats.end(),
                                   [&](const format_entry& f) { return name == f.name; });
      if (it == formats.end()) {
        std::string names;
        std::string known;
        for (const auto& f : formats) known += (known.empty() ? "" : ", ") + f.name;
        usage_error("format " + name + " is not allowed (allowed: sweep, " + known + ")");
      }
      chosen.push_back(&*it);
    }
    const auto policies = known_policies();
    std::vector<const policy_entry*> chosen_policies;
    for (const std::string& name : s.policies) {
      const auto it = std::find_if(policies.begin(), policies.end(),
                                   [&](const policy_entry& p) { return name == p.name; });
      if (it == policies.end()) {
        std::string known;
        for (const auto& p : policies) known += (known.empty() ? "" : ", ") + p.name;
        usage_error("policy " + name + " is not allowed (allowed: " + known + ")");
      }
      chosen_policies.push_back(&*it);
    }
    std::optional<oscar::importance::head_importance> importance;
    if (!chosen_policies.empty() && s.head_importance != "none" &&
        (s.head_importance_given || std::ifstream(s.head_importance).good())) {
      importance = oscar::importance::load_head_importance(s.head_importance);
      importance->check_shape(model.config().n_layers, model.config().n_kv_heads);
    }
    const trace reference = formats.front().run(model, tokens, 0, 0);  // fp32: nothing in fp16
    std::vector<result> results;
    results.push_back(compare("fp32", 32.0, reference, reference, tokens));
    for (const format_entry* f : chosen) {
      results.push_back(compare(f->name, f->bits, reference, f->run(model, tokens, s.sinks, s.window),
                                tokens));
    }
    for (const policy_entry* p : chosen_policies) {
      const trace t = p->run(model, tokens, s, importance ? &importance->scores : nullptr);
      std::string label = "policy:" + p->name;
      if (s.prune >= 0 && (p->name == "uniform" || p->name == "attention_aware")) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "+prune%.2f", s.prune);
        label += buf;
      }
      result r = compare(label, t.region_bits, reference, t, tokens);
      r.policy = p->name;
      r.pruned_heads = t.pruned_heads;
      r.evicted_tokens = t.evicted_tokens;
      results.push_back(std::move(r));
    }
    if (s.json) print_json(results);
    else print_table(results, s, tokens.size(), results.front().ppl);
  } catch (const oscar::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
