// SPDX-License-Identifier: Apache-2.0
// OSCAR quickstart: quantize a K/V tensor with FP2+, decode it, and see what it costs in
// accuracy, next to every other KV format OSCAR ships.
//
//   g++ -std=c++20 -O2 -I include examples/quickstart.cpp -o quickstart && ./quickstart

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "oscar/oscar.hpp"  // everything OSCAR offers on the host

namespace q = oscar::quant;
using oscar::index_t;

// Shape of one layer's K (or V) tensor: [tokens, kv_heads, head_dim], head_dim contiguous.
constexpr index_t kTokens = 1024;
constexpr index_t kHeads = 8;
constexpr index_t kHeadDim = 128;
constexpr index_t kElements = kTokens * kHeads * kHeadDim;
constexpr int kQueriesPerHead = 4;

using tensor = std::vector<float>;                  // [tokens, heads, head_dim]
using query_set = std::vector<std::vector<float>>;  // kQueriesPerHead per head, head after head

oscar::kv_view<float> view(tensor& x) {
  return oscar::make_kv_view(x.data(), kTokens, kHeads, kHeadDim);
}
oscar::kv_view<const float> view(const tensor& x) {
  return oscar::make_kv_view(x.data(), kTokens, kHeads, kHeadDim);
}

// One layer's keys and values.
struct kv_pair {
  tensor keys, values;
};

// Synthetic keys look like real ones: each channel has its own bias, and two channels per head
// are outliers, ten times larger than the rest. Values are plain Gaussian.

kv_pair make_kv(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  tensor bias(kHeads * kHeadDim);
  for (float& b : bias) b = 0.5f * normal(rng);
  kv_pair kv{tensor(kElements), tensor(kElements)};
  for (index_t i = 0; i < kElements; ++i) {
    const index_t channel = i % (kHeads * kHeadDim);  // head * head_dim + d
    const bool outlier = channel % kHeadDim == 7 || channel % kHeadDim == 70;
    kv.keys[i] = bias[channel] + normal(rng) * (outlier ? 10.0f : 1.0f);
    kv.values[i] = normal(rng);
  }
  return kv;
}

// Relative L2 error ||a - b|| / ||a||.
double relative_error(const tensor& reference, const tensor& x) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < reference.size(); ++i) {
    diff += double(reference[i] - x[i]) * (reference[i] - x[i]);
    norm += double(reference[i]) * reference[i];
  }
  return std::sqrt(diff / norm);
}

// One head's attention output softmax(q K^T / sqrt(d)) V for a single query, in double.
std::vector<double> attention(const tensor& keys, const tensor& values, index_t head,
                              const std::vector<float>& query) {
  auto row = [head](const tensor& x, index_t t) { return &x[(t * kHeads + head) * kHeadDim]; };
  std::vector<double> scores(kTokens);
  double max_score = -INFINITY;
  for (index_t t = 0; t < kTokens; ++t) {
    double dot = 0;
    for (index_t d = 0; d < kHeadDim; ++d) dot += double(query[d]) * row(keys, t)[d];
    scores[t] = dot / std::sqrt(double(kHeadDim));
    max_score = std::max(max_score, scores[t]);
  }
  std::vector<double> out(kHeadDim, 0.0);
  double sum = 0;
  for (index_t t = 0; t < kTokens; ++t) {
    const double p = std::exp(scores[t] - max_score);  // subtract the max for stability
    sum += p;
    for (index_t d = 0; d < kHeadDim; ++d) out[d] += p * row(values, t)[d];
  }
  for (double& o : out) o /= sum;
  return out;
}

// Relative error of attention outputs over all heads and queries: ||o_q - o_ref|| / ||o_ref||.
double attention_error(const kv_pair& exact, const kv_pair& decoded, const query_set& queries) {
  double diff = 0, norm = 0;
  for (index_t h = 0; h < kHeads; ++h) {
    for (int i = 0; i < kQueriesPerHead; ++i) {
      const auto& query = queries[h * kQueriesPerHead + i];
      const auto ref = attention(exact.keys, exact.values, h, query);
      const auto out = attention(decoded.keys, decoded.values, h, query);
      for (index_t d = 0; d < kHeadDim; ++d) {
        diff += (out[d] - ref[d]) * (out[d] - ref[d]);
        norm += ref[d] * ref[d];
      }
    }
  }
  return std::sqrt(diff / norm);
}

struct result {
  double bits_traits, bits_measured, k_err, v_err, attn_err;
};

// The whole round trip for one KV format: quantize K and V, decode them, measure the damage.
template <class KV>
result evaluate(const kv_pair& kv, const query_set& queries) {
  const auto qk = q::quantize<typename KV::key>(view(kv.keys));      // K in the key format
  const auto qv = q::quantize<typename KV::value>(view(kv.values));  // V in the value format

  kv_pair decoded{tensor(kElements), tensor(kElements)};
  q::dequantize(qk, view(decoded.keys));
  q::dequantize(qv, view(decoded.values));

  result r{};
  r.bits_traits = KV::bits_per_element;  // what the format promises, scales included
  r.bits_measured = 8.0 * double(qk.bytes() + qv.bytes()) / double(2 * kElements);
  r.k_err = relative_error(kv.keys, decoded.keys);
  r.v_err = relative_error(kv.values, decoded.values);
  r.attn_err = attention_error(kv, decoded, queries);
  return r;
}

void print_row(std::string_view name, const result& r) {
  std::printf("%-10.*s %9.2f %9.2f %10.4f %10.4f %10.4f\n", int(name.size()), name.data(),
              r.bits_traits, r.bits_measured, r.k_err, r.v_err, r.attn_err);
}

// Prints one table row for KV format `KV`; FP2+ is skipped, as it was printed first.
template <class KV>
void compare(const kv_pair& kv, const query_set& queries) {
  if constexpr (!std::is_same_v<KV, q::fp2plus>) print_row(KV::name, evaluate<KV>(kv, queries));
}

// Calls `compare` for each KV format in a std::tuple such as `q::all_kv_formats`, in order.
template <class... KV>
void compare_all(std::tuple<KV...>, const kv_pair& kv, const query_set& queries) {
  (compare<KV>(kv, queries), ...);
}

int main() {
  std::mt19937 rng(42);  // seeded: the same numbers on every run
  const kv_pair kv = make_kv(rng);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  query_set queries(kHeads * kQueriesPerHead, std::vector<float>(kHeadDim));
  for (auto& query : queries)
    for (float& x : query) x = normal(rng);

  try {
    // FP2+ first: the format OSCAR is about.
    const result fp2 = evaluate<q::fp2plus>(kv, queries);
    std::printf("FP2+: %.2f bits/element, K err %.4f, V err %.4f, attention err %.4f\n\n",
                fp2.bits_traits, fp2.k_err, fp2.v_err, fp2.attn_err);

    std::printf("%d tokens x %d KV heads x head_dim %d; errors are relative L2 vs fp32\n",
                int(kTokens), int(kHeads), int(kHeadDim));
    std::printf("%-10s %9s %9s %10s %10s %10s\n", "format", "bits/elt", "measured", "K err",
                "V err", "attn err");
    print_row(q::fp2plus::name, fp2);
    compare_all(q::all_kv_formats{}, kv, queries);  // then every other format OSCAR ships
  } catch (const oscar::error& e) {  // OSCAR reports bad shapes and NaN/Inf input this way
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
