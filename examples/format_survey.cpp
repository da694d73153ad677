// SPDX-License-Identifier: Apache-2.0
// The measurement behind the FP2+ default: every FP2+ candidate at <= 2.5 bits per element,
// next to the shipped formats, on synthetic keys with outlier channels and log-normal values
// (oscar/testing/synthetic_kv.hpp). Prints, per format: all-in bits per element, round-trip
// relative L2 error of K and of V, and the relative error of the attention output
// softmax(q K^T / sqrt(d)) V, all against the unquantized tensors.
//
//   oscar-format-survey [tokens]      (default 2048 tokens, 8 KV heads, head_dim 128)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "oscar/oscar.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace q = oscar::quant;
using oscar::index_t;
using oscar::testing::dense_kv;

namespace {

constexpr index_t kHeads = 8, kHeadDim = 128, kQueries = 16;

template <q::tensor_format F>
dense_kv round_trip(const dense_kv& x) {
  auto encoded = q::quantize<F>(x.view());
  dense_kv y = x;
  q::dequantize(encoded, y.view());
  return y;
}

double relative_error(const std::vector<float>& ref, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    num += (double(ref[i]) - got[i]) * (double(ref[i]) - got[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / den);
}

/// Attention outputs [queries, heads, head_dim] in double, one softmax per (query, head).
std::vector<double> attention(const dense_kv& queries, const dense_kv& k, const dense_kv& v) {
  const index_t d = k.head_dim;
  std::vector<double> out(static_cast<std::size_t>(queries.tokens * k.heads * d), 0.0);
  std::vector<double> score(static_cast<std::size_t>(k.tokens));
  for (index_t qi = 0; qi < queries.tokens; ++qi) {
    for (index_t h = 0; h < k.heads; ++h) {
      const float* qv = queries.view().row(qi, h);
      double max_score = -1e300;
      for (index_t t = 0; t < k.tokens; ++t) {
        double s = 0;
        for (index_t c = 0; c < d; ++c) s += double(qv[c]) * k.view().row(t, h)[c];
        score[t] = s / std::sqrt(double(d));
        max_score = std::max(max_score, score[t]);
      }
      double sum = 0;
      for (index_t t = 0; t < k.tokens; ++t) sum += score[t] = std::exp(score[t] - max_score);
      double* o = &out[(qi * k.heads + h) * d];
      for (index_t t = 0; t < k.tokens; ++t)
        for (index_t c = 0; c < d; ++c) o[c] += score[t] / sum * v.view().row(t, h)[c];
    }
  }
  return out;
}

struct data {
  dense_kv k, v, queries;
  std::vector<double> reference;
};

template <q::tensor_format K, q::tensor_format V>
void report(const data& in, const char* label) {
  const dense_kv k = round_trip<K>(in.k), v = round_trip<V>(in.v);
  const std::vector<double> out = attention(in.queries, k, v);
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - in.reference[i]) * (out[i] - in.reference[i]);
    den += in.reference[i] * in.reference[i];
  }
  const double bits = (q::format_traits<K>::bits_per_element +
                       q::format_traits<V>::bits_per_element) / 2;
  std::printf("%-34s %6.3f %9.4f %9.4f %10.4f\n", label, bits, relative_error(in.k.data, k.data),
              relative_error(in.v.data, v.data), std::sqrt(num / den));
}

template <class KV>
void report_kv(const data& in) {
  report<typename KV::key, typename KV::value>(in, std::string(KV::name).c_str());
}

template <q::fpq_config C>
void report_candidate(const data& in) {
  using F = q::fpq<C>;
  report<F, F>(in, std::string(q::format_traits<F>::name).c_str());
}

// FP2+ candidates at <= 2.5 bits per element (all metadata counted).
constexpr q::fpq_config lm32{.group = 32};
constexpr q::fpq_config lm32_rot{.group = 32, .rotate = true};
constexpr q::fpq_config u32_rot{.levels = q::codebook::uniform, .group = 32, .rotate = true};
constexpr q::fpq_config lm32_bf16_rot{.group = 32, .scale = q::scale_type::bf16, .rotate = true};
constexpr q::fpq_config lm64_rot{.group = 64, .rotate = true};
constexpr q::fpq_config lm64_z_rot{.group = 64, .zero_point = true, .rotate = true};
constexpr q::fpq_config u64_z_rot{.levels = q::codebook::uniform, .group = 64,
                                  .zero_point = true, .rotate = true};
constexpr q::fpq_config u64_z_tokens{.levels = q::codebook::uniform, .group = 64,
                                     .axis = q::group_axis::tokens, .zero_point = true};
constexpr q::fpq_config lm32_e4m3_rot{.group = 32, .scale = q::scale_type::e4m3, .rotate = true};
constexpr q::fpq_config lm16_e4m3_rot{.group = 16, .scale = q::scale_type::e4m3, .rotate = true};
constexpr q::fpq_config lm64_e4m3_o1{.group = 64, .scale = q::scale_type::e4m3, .outliers = 1};
constexpr q::fpq_config lm128_o2_rot{.group = 128, .rotate = true, .outliers = 2};
constexpr q::fpq_config lm32_rot_minmax{.group = 32, .rotate = true, .search_scale = false};
// FP4+ candidates at <= 4.5 bits per element.
constexpr q::fpq_config fp4_lm32_rot{.bits = 4, .group = 32, .rotate = true};
constexpr q::fpq_config fp4_lm16_e4m3_rot{.bits = 4, .group = 16, .scale = q::scale_type::e4m3,
                                          .rotate = true};
constexpr q::fpq_config fp4_u64_z_rot{.bits = 4, .levels = q::codebook::uniform, .group = 64,
                                      .zero_point = true, .rotate = true};

}  // namespace

int main(int argc, char** argv) {
  const index_t tokens = argc > 1 ? std::atoll(argv[1]) : 2048;
  if (tokens <= 0 || tokens % 128 != 0) {
    std::fprintf(stderr, "tokens must be a positive multiple of 128, got %s\n", argv[1]);
    return 2;
  }
  // Queries come from the key distribution (same seed, later tokens): like real queries, they
  // load the same outlier channels as the keys.
  const dense_kv kq = oscar::testing::synthetic_keys(tokens + kQueries, kHeads, kHeadDim, 7);
  data in;
  in.k = kq;
  in.k.tokens = tokens;
  in.k.data.resize(static_cast<std::size_t>(tokens * kHeads * kHeadDim));
  in.queries = kq;
  in.queries.tokens = kQueries;
  in.queries.data.assign(kq.data.end() - kQueries * kHeads * kHeadDim, kq.data.end());
  in.v = oscar::testing::synthetic_values(tokens, kHeads, kHeadDim, 8);
  in.reference = attention(in.queries, in.k, in.v);

  std::printf("synthetic K/V: %lld tokens, %lld KV heads, head_dim %lld, %lld queries\n",
              static_cast<long long>(tokens), static_cast<long long>(kHeads),
              static_cast<long long>(kHeadDim), static_cast<long long>(kQueries));
  std::printf("%-34s %6s %9s %9s %10s\n", "format", "bits", "K err", "V err", "attn err");
  std::printf("-- shipped KV formats\n");
  std::apply([&](auto... f) { (report_kv<decltype(f)>(in), ...); }, q::all_kv_formats{});
  std::printf("-- FP2+ candidates (same format for K and V)\n");
  report_candidate<lm32>(in);
  report_candidate<lm32_rot>(in);
  report_candidate<lm32_rot_minmax>(in);
  report_candidate<u32_rot>(in);
  report_candidate<lm32_bf16_rot>(in);
  report_candidate<lm64_rot>(in);
  report_candidate<lm64_z_rot>(in);
  report_candidate<u64_z_rot>(in);
  report_candidate<u64_z_tokens>(in);
  report_candidate<lm32_e4m3_rot>(in);
  report_candidate<lm16_e4m3_rot>(in);
  report_candidate<lm64_e4m3_o1>(in);
  report_candidate<lm128_o2_rot>(in);
  std::printf("-- FP4+ candidates\n");
  report_candidate<fp4_lm32_rot>(in);
  report_candidate<fp4_lm16_e4m3_rot>(in);
  report_candidate<fp4_u64_z_rot>(in);
  return 0;
}
