// SPDX-License-Identifier: Apache-2.0
// The host reference attention against an independent float64 computation with Eigen on the
// cache's gathered (decoded) K/V.
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <Eigen/Dense>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "oscar/attention/host.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/testing/synthetic_kv.hpp"
#include "support.hpp"

namespace c = oscar::cache;
namespace a = oscar::attention;
using oscar::index_t;
using oscar_test::error_from;

namespace {

constexpr int kHeadDim = 64;
constexpr c::tier_budget kBudget{.full = 1 << 20, .mid = 1 << 20, .low = 1 << 20};

/// Eigen reference of one query head: out, lse, entropy and probabilities over rows of K/V.
struct reference {
  Eigen::VectorXd out, p;
  double lse = 0, entropy = 0;
};
reference attend(const Eigen::VectorXd& q, const Eigen::MatrixXd& k, const Eigen::MatrixXd& v,
                 double scale) {
  const Eigen::VectorXd s = scale * (k * q);
  const double m = s.maxCoeff();
  const double log_z = m + std::log((s.array() - m).exp().sum());
  reference r;
  r.p = (s.array() - log_z).exp().matrix();
  r.out = v.transpose() * r.p;
  r.lse = log_z;
  r.entropy = -(r.p.array() * (s.array() - log_z)).sum();
  return r;
}

Eigen::MatrixXd rows(const std::vector<float>& x, index_t tokens) {
  Eigen::MatrixXd m(tokens, kHeadDim);
  for (index_t t = 0; t < tokens; ++t)
    for (int d = 0; d < kHeadDim; ++d) m(t, d) = x[static_cast<std::size_t>(t * kHeadDim + d)];
  return m;
}

double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

template <class Cache>
void fill(Cache& cache, c::seq_id id, index_t tokens, std::uint64_t seed) {
  const auto& cfg = cache.config();
  const auto k = oscar::testing::synthetic_keys(tokens, cfg.kv_heads, kHeadDim, seed);
  const auto v = oscar::testing::synthetic_values(tokens, cfg.kv_heads, kHeadDim, seed + 1);
  for (int l = 0; l < cfg.layers; ++l) cache.append(id, l, k.view(), v.view());
}

/// Decode of every sequence in `seqs` against the Eigen reference, stats included.
template <class Cache>
void check_decode(const Cache& cache, int layer, const std::vector<c::seq_id>& seqs, int q_heads) {
  const auto& cfg = cache.config();
  const auto batch = static_cast<index_t>(seqs.size());
  const auto q = oscar::testing::gaussian_kv(batch, q_heads, kHeadDim, 99, 0.3f);
  std::vector<float> out(static_cast<std::size_t>(batch * q_heads * kHeadDim),
                         std::numeric_limits<float>::quiet_NaN());
  std::vector<a::kv_head_stats> stats;
  const a::options opt{.q_heads = q_heads, .want_stats = true};
  a::decode(oscar::backend::host{}, cache, layer, seqs, q.view(),
            oscar::make_kv_view(out.data(), batch, q_heads, kHeadDim), opt, &stats);
  REQUIRE(stats.size() == static_cast<std::size_t>(batch * cfg.kv_heads));
  const int group = q_heads / cfg.kv_heads;
  const double scale = 1.0 / std::sqrt(double(kHeadDim));
  std::vector<double> want(out.size());
  for (index_t b = 0; b < batch; ++b) {
    const auto g = cache.gather(seqs[static_cast<std::size_t>(b)], layer);
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const Eigen::MatrixXd k = rows(g[h].k, g[h].tokens), v = rows(g[h].v, g[h].tokens);
      double lse = 0, entropy = 0;
      Eigen::VectorXd mass = Eigen::VectorXd::Zero(g[h].tokens);
      for (int j = 0; j < group; ++j) {
        const int qh = h * group + j;
        Eigen::VectorXd qv(kHeadDim);
        for (int d = 0; d < kHeadDim; ++d) qv(d) = q.view()(b, qh, d);
        const reference r = attend(qv, k, v, scale);
        for (int d = 0; d < kHeadDim; ++d) want[(b * q_heads + qh) * kHeadDim + d] = r.out(d);
        lse += r.lse / group;
        entropy += r.entropy / group;
        mass += r.p / group;
      }
      const a::kv_head_stats& s = stats[static_cast<std::size_t>(b * cfg.kv_heads + h)];
      CHECK(std::abs(s.lse - lse) <= 1e-9 * std::max(1.0, std::abs(lse)));
      CHECK(std::abs(s.entropy - entropy) <= 1e-9 * std::max(1.0, entropy));
      REQUIRE(s.token_mass.size() == static_cast<std::size_t>(g[h].tokens));
      double worst = 0, total = 0;
      for (index_t t = 0; t < g[h].tokens; ++t) {
        worst = std::max(worst, std::abs(s.token_mass[t] - mass(t)));
        total += s.token_mass[t];
      }
      CHECK(worst <= 1e-12);
      CHECK(std::abs(total - 1.0) <= 1e-9);
    }
  }
  CHECK(rel_err(out, want) < 1e-5);
}

}  // namespace

TEST_CASE("attention host decode: matches a float64 reference for GQA 1, 4 and 8",
          "[attention]") {
  const int group = GENERATE(1, 4, 8);
  const int sinks = GENERATE(0, 4);
  const int window = GENERATE(0, 32);
  const c::cache_config cfg{.layers = 2, .kv_heads = 2, .head_dim = kHeadDim, .block_tokens = 128,
                            .sink_tokens = sinks, .window_tokens = window};
  // Blocks in all three tiers, chosen by position.
  c::kv_cache<> cache(cfg, kBudget, [](const c::block_request& r) {
    return static_cast<c::tier>(r.block_index % 3);
  });
  const c::seq_id a_seq = cache.create(), b_seq = cache.create();
  fill(cache, a_seq, 300, 1);
  fill(cache, b_seq, 77, 2);
  check_decode(cache, 1, {a_seq, b_seq}, 2 * group);
}

TEST_CASE("attention host decode: after fork, evict and compaction", "[attention]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = kHeadDim, .block_tokens = 32,
                            .sink_tokens = 4, .window_tokens = 16};
  c::kv_cache<oscar::quant::kivi2> cache(cfg, kBudget);
  const c::seq_id parent = cache.create();
  fill(cache, parent, 200, 3);
  const c::seq_id child = cache.fork(parent);
  fill(cache, child, 50, 4);
  const std::vector<index_t> drop{0, 7, 100};
  cache.evict(child, 0, 1, drop);
  check_decode(cache, 0, {parent, child}, 8);

  // Compaction only permutes (k, v) pairs: the output stays the same up to summation order.
  const auto q = oscar::testing::gaussian_kv(1, 8, kHeadDim, 5, 0.3f);
  std::vector<float> before(8 * kHeadDim), after(8 * kHeadDim);
  const a::options opt{.q_heads = 8};
  const std::vector<c::seq_id> one{child};
  a::decode(oscar::backend::host{}, cache, 0, one, q.view(),
            oscar::make_kv_view(before.data(), 1, 8, kHeadDim), opt);
  for (int h = 0; h < 2; ++h) {
    std::vector<float> importance(static_cast<std::size_t>(cache.tokens(child, 0, h)));
    for (std::size_t i = 0; i < importance.size(); ++i) importance[i] = float((i * 37) % 11);
    cache.compact(child, 0, h, importance);
  }
  a::decode(oscar::backend::host{}, cache, 0, one, q.view(),
            oscar::make_kv_view(after.data(), 1, 8, kHeadDim), opt);
  std::vector<double> reference(before.begin(), before.end());
  CHECK(rel_err(after, reference) < 1e-6);
  check_decode(cache, 0, {parent, child}, 8);
}

TEST_CASE("attention host prefill: causal over the cache plus the chunk", "[attention]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = kHeadDim, .block_tokens = 128,
                            .sink_tokens = 4, .window_tokens = 16};
  c::kv_cache<> cache(cfg, kBudget);
  const c::seq_id id = cache.create();
  fill(cache, id, 100, 6);
  const index_t chunk = 9;
  const int q_heads = 8, group = 4;
  const auto q = oscar::testing::gaussian_kv(chunk, q_heads, kHeadDim, 7, 0.3f);
  const auto k = oscar::testing::synthetic_keys(chunk, 2, kHeadDim, 8);
  const auto v = oscar::testing::synthetic_values(chunk, 2, kHeadDim, 9);
  std::vector<float> out(static_cast<std::size_t>(chunk * q_heads * kHeadDim));
  std::vector<a::kv_head_stats> stats;
  a::prefill(oscar::backend::host{}, cache, 0, id, q.view(), k.view(), v.view(),
             oscar::make_kv_view(out.data(), chunk, q_heads, kHeadDim),
             a::options{.q_heads = q_heads, .want_stats = true}, &stats);
  const auto g = cache.gather(id, 0);
  const double scale = 1.0 / std::sqrt(double(kHeadDim));
  std::vector<double> want(out.size());
  for (int h = 0; h < 2; ++h) {
    for (index_t i = 0; i < chunk; ++i) {
      // Cached rows, then chunk rows 0..i.
      const index_t n = g[h].tokens + i + 1;
      Eigen::MatrixXd km(n, kHeadDim), vm(n, kHeadDim);
      km.topRows(g[h].tokens) = rows(g[h].k, g[h].tokens);
      vm.topRows(g[h].tokens) = rows(g[h].v, g[h].tokens);
      for (index_t t = 0; t <= i; ++t) {
        for (int d = 0; d < kHeadDim; ++d) {
          km(g[h].tokens + t, d) = k.view()(t, h, d);
          vm(g[h].tokens + t, d) = v.view()(t, h, d);
        }
      }
      double lse = 0;
      for (int j = 0; j < group; ++j) {
        const int qh = h * group + j;
        Eigen::VectorXd qv(kHeadDim);
        for (int d = 0; d < kHeadDim; ++d) qv(d) = q.view()(i, qh, d);
        const reference r = attend(qv, km, vm, scale);
        for (int d = 0; d < kHeadDim; ++d) want[(i * q_heads + qh) * kHeadDim + d] = r.out(d);
        lse += r.lse / group;
      }
      const a::kv_head_stats& s = stats[static_cast<std::size_t>(i * 2 + h)];
      CHECK(s.token_mass.size() == static_cast<std::size_t>(n));
      CHECK(std::abs(s.lse - lse) <= 1e-9 * std::max(1.0, std::abs(lse)));
    }
  }
  CHECK(rel_err(out, want) < 1e-5);
}

TEST_CASE("attention host: bad calls are rejected before any output is written",
          "[attention][errors]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = kHeadDim, .block_tokens = 128,
                            .sink_tokens = 0, .window_tokens = 0};
  c::kv_cache<> cache(cfg, kBudget);
  const c::seq_id full = cache.create(), empty = cache.create();
  fill(cache, full, 40, 10);
  auto q = oscar::testing::gaussian_kv(1, 8, kHeadDim, 11);
  std::vector<float> out(8 * kHeadDim, 123.0f);
  const auto out_view = oscar::make_kv_view(out.data(), 1, 8, kHeadDim);
  const auto expect = [&](const std::vector<c::seq_id>& seqs, const a::options& opt,
                          const char* fragment) {
    const auto e = error_from([&] {
      a::decode(oscar::backend::host{}, cache, 0, seqs, q.view(), out_view, opt);
    });
    REQUIRE(e.has_value());
    CHECK_THAT(e->what(), Catch::Matchers::ContainsSubstring(fragment));
    for (float x : out) REQUIRE(x == 123.0f);
  };
  expect({full}, {.q_heads = 7}, "q_heads = 7 is not allowed");     // not a multiple of 2
  expect({full}, {.q_heads = 34}, "q_heads = 34 is not allowed");   // 17 per KV head
  expect({full}, {.q_heads = 4}, "q shape [1, 8, 64]");             // view has 8 heads
  expect({full, full}, {.q_heads = 8}, "q shape [1, 8, 64]");       // batch 2, one query row
  expect({empty}, {.q_heads = 8}, "has no tokens");
  expect({full + 100}, {.q_heads = 8}, "sequence id");
  expect({full}, {.q_heads = 8, .softmax_scale = -1.0f}, "softmax_scale");
  q.view()(0, 3, 5) = std::numeric_limits<float>::quiet_NaN();
  expect({full}, {.q_heads = 8}, "token 0, head 3, channel 5");
}
