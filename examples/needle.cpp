// SPDX-License-Identifier: Apache-2.0
// oscar-needle (examples/needle.cpp): needle-in-a-haystack retrieval at the attention level.
//
// A haystack of `--context` keys with heavy-tailed outlier channels (as real keys have), one
// KV head, stored in each format. At several depths a needle is planted: the haystack's own
// key there plus a signal along a random direction u_i, and query head i asks for it with
// q_i = beta * u_i. The attention output of query head i should then be (close to) the value
// stored at the needle's position. Per format and depth the tool prints the cosine of the
// output to the needle's value and the attention mass on the needle, computed on the same
// cache by the host backend; a needle counts as retrieved when the cosine is at least 0.9.
//
//   oscar-needle [--context N] [--head-dim D] [--depths a,b,...] [--formats a,b,...]
//                [--window R] [--sinks S] [--seed N] [--json] [--check FORMAT]
//
// Defaults: 131072 tokens, head_dim 128, depths 0.02,0.1,0.25,0.5,0.75,0.9,0.98, window 128,
// sinks 4, every format. With --check FORMAT the exit status is 1 unless FORMAT retrieves every
// needle (the CI test runs it at 32K).
//
// The signal's size: the needle's logit stands `kGap` above the haystack's log-sum-exp in the
// fp32 cache, so lossless storage puts about 1 / (1 + exp(-kGap)) of the mass on the needle.
// The gap is set per needle from the fp32 logits, so every depth is equally hard.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "oscar/oscar.hpp"

namespace q = oscar::quant;
namespace c = oscar::cache;
namespace a = oscar::attention;
using oscar::index_t;

namespace {

constexpr double kRetrieved = 0.9;    // cosine to the needle's value that counts as retrieved
constexpr int kChunk = 4096;          // tokens per append

struct settings {
  index_t context = 131072;
  int head_dim = 128;
  std::vector<double> depths = {0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98};
  std::vector<std::string> formats = {"fp16", "fp8",   "q8_0",    "q4_0",   "kivi4",
                                      "fp4plus", "kivi2", "fp2plus", "fp2plus-kh", "fp2plus-kc"};
  int window = 128;
  int sinks = 4;
  double gap = 3.0;  // the needle's logit minus the haystack's log-sum-exp, in the fp32 cache
  std::uint64_t seed = 1;
  bool json = false;
  std::string check;
};

/// The haystack with its needles planted, and the queries that look for them.
struct haystack {
  index_t tokens = 0;
  int head_dim = 0;
  std::vector<float> k, v;        // [tokens, head_dim]
  std::vector<index_t> position;  // per needle
  std::vector<float> query;       // [needles, head_dim]
};

/// Keys: per-channel bias plus noise; 1 channel in 32 is an outlier channel with a large bias
/// and Student-t (3 degrees of freedom) noise of scale 10, so its tail reaches far past what a
/// Gaussian of the same scale would. Values: Gaussian with a log-normal scale per token.
haystack make_haystack(const settings& s) {
  const int d = s.head_dim;
  std::mt19937_64 rng(s.seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::student_t_distribution<double> heavy(3.0);
  std::vector<double> bias(static_cast<std::size_t>(d)), gain(static_cast<std::size_t>(d), 1.0);
  std::vector<bool> outlier(static_cast<std::size_t>(d), false);
  for (int c = 0; c < d; ++c) bias[c] = 0.5 * normal(rng);
  for (int i = 0; i < d / 32; ++i) {
    const auto c = static_cast<std::size_t>(rng() % static_cast<std::uint64_t>(d));
    outlier[c] = true;
    gain[c] = 10.0;
    bias[c] = 5.0;
  }
  haystack h;
  h.tokens = s.context;
  h.head_dim = d;
  h.k.resize(static_cast<std::size_t>(s.context) * d);
  h.v.resize(h.k.size());
  for (index_t t = 0; t < s.context; ++t) {
    const double scale = std::exp(0.5 * normal(rng));
    for (int c = 0; c < d; ++c) {
      const double noise = outlier[c] ? heavy(rng) : normal(rng);
      h.k[t * d + c] = static_cast<float>(bias[c] + gain[c] * noise);
      h.v[t * d + c] = static_cast<float>(scale * normal(rng));
    }
  }
  // Needles: a random unit direction u per depth; the query is beta * u, and the needle key gets
  // m * u added, with m solving (beta * (u . k + m) * softmax_scale) = lse(haystack) + kGap.
  const double softmax_scale = 1.0 / std::sqrt(double(d));
  const double beta = std::sqrt(double(d));  // haystack logits: a spread of about 3
  for (double depth : s.depths) {
    const auto p = std::clamp<index_t>(static_cast<index_t>(std::llround(depth * double(s.context - 1))),
                                       0, s.context - 1);
    std::vector<double> u(static_cast<std::size_t>(d));
    double norm = 0;
    for (double& x : u) {
      x = normal(rng);
      norm += x * x;
    }
    for (double& x : u) x /= std::sqrt(norm);
    std::vector<double> logit(static_cast<std::size_t>(s.context));
    for (index_t t = 0; t < s.context; ++t) {
      double dot = 0;
      for (int c = 0; c < d; ++c) dot += u[c] * h.k[t * d + c];
      logit[t] = beta * dot * softmax_scale;
    }
    double max = -INFINITY;
    for (index_t t = 0; t < s.context; ++t) if (t != p) max = std::max(max, logit[t]);
    double sum = 0;
    for (index_t t = 0; t < s.context; ++t) if (t != p) sum += std::exp(logit[t] - max);
    const double lse = max + std::log(sum);
    const double m = (lse + s.gap - logit[p]) / (beta * softmax_scale);
    for (int c = 0; c < d; ++c) h.k[p * d + c] += static_cast<float>(m * u[c]);
    h.position.push_back(p);
    for (int c = 0; c < d; ++c) h.query.push_back(static_cast<float>(beta * u[c]));
  }
  return h;
}

struct needle_result {
  index_t position = 0;
  double depth = 0, cosine = 0, mass = 0;
};

struct format_result {
  std::string format;
  double bits_per_element = 0;
  std::vector<needle_result> needles;
  [[nodiscard]] bool all_retrieved() const {
    return std::all_of(needles.begin(), needles.end(),
                       [](const needle_result& n) { return n.cosine >= kRetrieved; });
  }
};

/// Stores the haystack in a cache of KV format `KV` and asks every needle's query at once (one
/// query head per needle, all reading the single KV head).
template <class KV>
format_result run(const settings& s, const haystack& h, const std::string& name) {
  using cache_type = c::kv_cache<KV, KV, KV>;
  const int d = h.head_dim;
  const c::cache_config cfg{.layers = 1, .kv_heads = 1, .head_dim = d, .block_tokens = 256,
                            .sink_tokens = s.sinks, .window_tokens = s.window};
  const std::size_t block_bytes = cache_type(cfg, c::tier_budget{0, 0, 0}).pool(c::tier::low).block_bytes();
  const std::size_t blocks = static_cast<std::size_t>(h.tokens / cfg.block_tokens + 2);
  cache_type cache(cfg, c::tier_budget{0, 0, blocks * block_bytes});
  const c::seq_id id = cache.create();
  for (index_t t = 0; t < h.tokens; t += kChunk) {
    const index_t n = std::min<index_t>(kChunk, h.tokens - t);
    const auto k = oscar::make_kv_view(h.k.data() + t * d, n, 1, d);
    const auto v = oscar::make_kv_view(h.v.data() + t * d, n, 1, d);
    cache.append(id, 0, k, v);
  }
  const int needles = static_cast<int>(h.position.size());
  std::vector<float> out(static_cast<std::size_t>(needles) * d);
  std::vector<a::kv_head_stats> stats;
  const std::vector<c::seq_id> seqs{id};
  a::decode(oscar::backend::host{}, cache, 0, seqs, oscar::make_kv_view(h.query.data(), 1, needles, d),
            oscar::make_kv_view(out.data(), 1, needles, d),
            a::options{.q_heads = needles, .want_stats = true}, &stats);
  // The KV head's token_mass averages the group's probabilities: the needle's own query is the
  // one that puts mass on it, so its mass is needles * the averaged mass (other queries put
  // about exp(-gap - log(N)) there). Token order is entry order, the haystack's order here.
  format_result r{name, KV::bits_per_element, {}};
  for (int i = 0; i < needles; ++i) {
    const index_t p = h.position[static_cast<std::size_t>(i)];
    double dot = 0, no = 0, nv = 0;
    for (int c = 0; c < d; ++c) {
      const double o = out[static_cast<std::size_t>(i) * d + c], v = h.v[p * d + c];
      dot += o * v;
      no += o * o;
      nv += v * v;
    }
    r.needles.push_back({p, s.depths[static_cast<std::size_t>(i)], dot / std::sqrt(no * nv),
                         needles * stats[0].token_mass[static_cast<std::size_t>(p)]});
  }
  return r;
}

using runner = std::function<format_result(const settings&, const haystack&)>;

std::vector<std::pair<std::string, runner>> known_formats() {
  std::vector<std::pair<std::string, runner>> all;
  const auto add = [&]<class KV>(const char* name) {
    all.emplace_back(name, [name](const settings& s, const haystack& h) { return run<KV>(s, h, name); });
  };
  add.operator()<q::kv_fp32>("fp32");
  add.operator()<q::kv_fp16>("fp16");
  add.operator()<q::kv_fp8>("fp8");
  add.operator()<q::kv_q8_0>("q8_0");
  add.operator()<q::kv_q4_0>("q4_0");
  add.operator()<q::kivi4>("kivi4");
  add.operator()<q::kivi2>("kivi2");
  add.operator()<q::fp4plus>("fp4plus");
  add.operator()<q::fp2plus>("fp2plus");
  add.operator()<q::fp2plus_kh>("fp2plus-kh");
  add.operator()<q::fp2plus_kc>("fp2plus-kc");
  return all;
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr,
               "oscar-needle: %s\nusage: oscar-needle [--context N] [--head-dim D] "
               "[--depths a,b,...] [--formats a,b,...] [--window R] [--sinks S] [--seed N] "
               "[--json] [--check FORMAT]\n",
               message.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

long parse_int(const std::string& flag, const char* value, long min, long max) {
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  if (*value == '\0' || *end != '\0' || v < min || v > max) {
    usage_error(flag + " = " + value + " is not allowed (allowed: an integer from " +
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
    if (flag == "--context") s.context = parse_int(flag, value(), 1024, 1 << 22);
    else if (flag == "--head-dim") s.head_dim = static_cast<int>(parse_int(flag, value(), 64, 256));
    else if (flag == "--window") s.window = static_cast<int>(parse_int(flag, value(), 0, 1 << 16));
    else if (flag == "--sinks") s.sinks = static_cast<int>(parse_int(flag, value(), 0, 1 << 16));
    else if (flag == "--seed") s.seed = static_cast<std::uint64_t>(parse_int(flag, value(), 0, 1L << 30));
    else if (flag == "--formats") s.formats = split(value());
    else if (flag == "--json") s.json = true;
    else if (flag == "--gap") {
      char* end = nullptr;
      const char* text = value();
      s.gap = std::strtod(text, &end);
      if (*end != '\0' || !(s.gap >= -10.0 && s.gap <= 20.0))
        usage_error(std::string("--gap = ") + text + " is not allowed (allowed: a number from -10 to 20)");
    }
    else if (flag == "--check") s.check = value();
    else if (flag == "--depths") {
      s.depths.clear();
      for (const std::string& x : split(value())) {
        char* end = nullptr;
        const double depth = std::strtod(x.c_str(), &end);
        if (*end != '\0' || !(depth >= 0.0 && depth <= 1.0))
          usage_error("--depths entry " + x + " is not allowed (allowed: a number from 0 to 1)");
        s.depths.push_back(depth);
      }
      if (s.depths.empty() || s.depths.size() > 16)
        usage_error("--depths needs 1 to 16 depths (one query head each)");
    } else usage_error("unknown option " + flag);
  }
  if (s.head_dim != 64 && s.head_dim != 128 && s.head_dim != 256)
    usage_error("--head-dim = " + std::to_string(s.head_dim) + " is not allowed (allowed: 64, 128, 256)");
  if (!s.check.empty() && std::find(s.formats.begin(), s.formats.end(), s.check) == s.formats.end())
    s.formats.push_back(s.check);
  return s;
}

}  // namespace

int main(int argc, char** argv) try {
  const settings s = parse(argc, argv);
  const auto formats = known_formats();
  std::vector<const runner*> chosen;
  for (const std::string& name : s.formats) {
    const auto it = std::find_if(formats.begin(), formats.end(),
                                 [&](const auto& f) { return f.first == name; });
    if (it == formats.end()) {
      std::string allowed;
      for (const auto& f : formats) allowed += (allowed.empty() ? "" : ", ") + f.first;
      usage_error("--formats entry " + name + " is not allowed (allowed: " + allowed + ")");
    }
    chosen.push_back(&it->second);
  }
  std::fprintf(stderr, "oscar-needle: building a haystack of %lld keys (head_dim %d)\n",
               static_cast<long long>(s.context), s.head_dim);
  const haystack h = make_haystack(s);
  std::vector<format_result> results;
  results.push_back(run<q::kv_fp32>(s, h, "fp32"));
  for (std::size_t i = 0; i < chosen.size(); ++i) {
    if (s.formats[i] == "fp32") continue;
    std::fprintf(stderr, "oscar-needle: [%zu/%zu] %s\n", i + 1, chosen.size(), s.formats[i].c_str());
    results.push_back((*chosen[i])(s, h));
  }

  if (s.json) {
    std::printf("[");
    for (std::size_t i = 0; i < results.size(); ++i) {
      const format_result& r = results[i];
      std::printf("%s\n {\"format\": \"%s\", \"bits_per_element\": %.4f, \"context\": %lld, "
                  "\"retrieved_all\": %s, \"needles\": [",
                  i ? "," : "", r.format.c_str(), r.bits_per_element,
                  static_cast<long long>(s.context), r.all_retrieved() ? "true" : "false");
      for (std::size_t j = 0; j < r.needles.size(); ++j) {
        const needle_result& n = r.needles[j];
        std::printf("%s{\"depth\": %.4f, \"position\": %lld, \"cosine\": %.6f, \"mass\": %.6f}",
                    j ? ", " : "", n.depth, static_cast<long long>(n.position), n.cosine, n.mass);
      }
      std::printf("]}");
    }
    std::printf("\n]\n");
  } else {
    std::printf("needle in a haystack: %lld keys, head_dim %d, sinks %d, window %d; "
                "cosine of the output to the needle's value (mass on the needle)\n",
                static_cast<long long>(s.context), s.head_dim, s.sinks, s.window);
    std::printf("%-11s %5s", "format", "bits");
    for (double depth : s.depths) std::printf("  %13.0f%%", 100.0 * depth);
    std::printf("  retrieved\n");
    for (const format_result& r : results) {
      std::printf("%-11s %5.2f", r.format.c_str(), r.bits_per_element);
      for (const needle_result& n : r.needles) std::printf("  %6.3f (%4.2f)", n.cosine, n.mass);
      int hits = 0;
      for (const needle_result& n : r.needles) hits += n.cosine >= kRetrieved;
      std::printf("  %d/%zu\n", hits, r.needles.size());
    }
  }
  if (!s.check.empty()) {
    const auto it = std::find_if(results.begin(), results.end(),
                                 [&](const format_result& r) { return r.format == s.check; });
    if (!it->all_retrieved()) {
      std::fprintf(stderr, "oscar-needle: %s misses a needle (cosine < %.2f)\n", s.check.c_str(), kRetrieved);
      return 1;
    }
    std::fprintf(stderr, "oscar-needle: %s retrieves every needle\n", s.check.c_str());
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "oscar-needle: %s\n", e.what());
  return 1;
}
