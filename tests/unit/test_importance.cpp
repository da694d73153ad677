// SPDX-License-Identifier: Apache-2.0
// Importance scorers and thresholds: the Taylor head score against finite differences on a tiny
// attention model, the head-importance file format, the online head scores, the token scores
// (H2O, ZipCache, SnapKV) against hand-computed values, and every threshold rule.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <Eigen/Dense>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "oscar/attention/types.hpp"
#include "oscar/core/view.hpp"
#include "oscar/importance/head.hpp"
#include "oscar/importance/threshold.hpp"
#include "oscar/importance/token.hpp"
#include "support.hpp"

namespace imp = oscar::importance;
using Catch::Approx;
using oscar::index_t;
using oscar_test::error_from;

namespace {

/// A one-layer attention model with a head mask, small enough to differentiate by hand:
/// per query head h, A_h = softmax(Q_h K_h^T / sqrt(d)) V_h (causal, GQA), then
/// logits_t = sum_h xi_{kv(h)} W_h A_{t,h} and L = mean_t cross-entropy(logits_t, y_t).
struct tiny_model {
  static constexpr int T = 5, D = 8, Q = 4, KV = 2, HD = 3, V = 6;
  Eigen::MatrixXd x, wq[Q], wk[KV], wv[KV], wo[Q];
  std::vector<int> y;

  explicit tiny_model(unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> n(0.0, 1.0);
    const auto random = [&](int r, int c) {
      Eigen::MatrixXd m(r, c);
      for (int i = 0; i < r; ++i)
        for (int j = 0; j < c; ++j) m(i, j) = n(rng);
      return m;
    };
    x = random(T, D);
    for (auto& m : wq) m = random(D, HD);
    for (auto& m : wk) m = random(D, HD);
    for (auto& m : wv) m = random(D, HD);
    for (auto& m : wo) m = random(V, HD);
    for (int t = 0; t < T; ++t) y.push_back(static_cast<int>(rng() % V));
  }

  /// Attention outputs [T, Q, HD] (independent of the mask).
  std::vector<float> attention() const {
    std::vector<float> a(T * Q * HD);
    for (int h = 0; h < Q; ++h) {
      const int g = h / (Q / KV);
      const Eigen::MatrixXd q = x * wq[h], k = x * wk[g], v = x * wv[g];
      for (int t = 0; t < T; ++t) {
        Eigen::VectorXd s(t + 1);
        for (int u = 0; u <= t; ++u) s(u) = q.row(t).dot(k.row(u)) / std::sqrt(double(HD));
        const Eigen::VectorXd p = (s.array() - s.maxCoeff()).exp() / (s.array() - s.maxCoeff()).exp().sum();
        const Eigen::VectorXd o = v.topRows(t + 1).transpose() * p;
        for (int c = 0; c < HD; ++c) a[(t * Q + h) * HD + c] = static_cast<float>(o(c));
      }
    }
    return a;
  }

  double loss(const std::vector<float>& a, const double (&xi)[KV]) const {
    double l = 0;
    for (int t = 0; t < T; ++t) {
      Eigen::VectorXd z = Eigen::VectorXd::Zero(V);
      for (int h = 0; h < Q; ++h) {
        Eigen::VectorXd ah(HD);
        for (int c = 0; c < HD; ++c) ah(c) = a[(t * Q + h) * HD + c];
        z += xi[h / (Q / KV)] * wo[h] * ah;
      }
      l += std::log((z.array() - z.maxCoeff()).exp().sum()) + z.maxCoeff() - z(y[t]);
    }
    return l / T;
  }

  /// dL/dA at xi = 1: (W_h^T (softmax(z_t) - onehot(y_t))) / T.
  std::vector<float> gradient(const std::vector<float>& a) const {
    std::vector<float> g(a.size());
    for (int t = 0; t < T; ++t) {
      Eigen::VectorXd z = Eigen::VectorXd::Zero(V);
      for (int h = 0; h < Q; ++h) {
        Eigen::VectorXd ah(HD);
        for (int c = 0; c < HD; ++c) ah(c) = a[(t * Q + h) * HD + c];
        z += wo[h] * ah;
      }
      Eigen::VectorXd p = (z.array() - z.maxCoeff()).exp();
      p /= p.sum();
      p(y[t]) -= 1.0;
      for (int h = 0; h < Q; ++h) {
        const Eigen::VectorXd gh = wo[h].transpose() * p / T;
        for (int c = 0; c < HD; ++c) g[(t * Q + h) * HD + c] = static_cast<float>(gh(c));
      }
    }
    return g;
  }
};

}  // namespace

TEST_CASE("Taylor head importance equals |dL/dxi| by finite differences on a tiny model",
          "[policy][importance]") {
  using M = tiny_model;
  imp::taylor_accumulator acc(1, M::Q, M::KV, M::HD);
  double want[M::KV] = {0, 0};
  constexpr int examples = 4;
  for (int e = 0; e < examples; ++e) {
    const M m(100 + e);
    const auto a = m.attention();
    const auto g = m.gradient(a);
    acc.add(0, oscar::make_kv_view(a.data(), M::T, M::Q, M::HD),
            oscar::make_kv_view(g.data(), M::T, M::Q, M::HD));
    for (int h = 0; h < M::KV; ++h) {
      const double eps = 1e-4;
      double up[M::KV] = {1, 1}, down[M::KV] = {1, 1};
      up[h] += eps;
      down[h] -= eps;
      want[h] += std::abs((m.loss(a, up) - m.loss(a, down)) / (2 * eps)) / examples;
    }
  }
  const imp::head_scores got = acc.mean();
  for (int h = 0; h < M::KV; ++h) {
    INFO("kv head " << h);
    CHECK(got(0, h) == Approx(want[h]).epsilon(1e-5));
  }
  const imp::head_scores n = acc.normalized();
  const double norm = std::hypot(want[0], want[1]);
  CHECK(n(0, 0) == Approx(want[0] / norm).epsilon(1e-5));
  CHECK(n(0, 1) == Approx(want[1] / norm).epsilon(1e-5));

  // Bad input changes nothing.
  std::vector<float> a(3 * 2 * 3, 1.0f);
  CHECK(error_from([&] {
          acc.add(0, oscar::make_kv_view(a.data(), 3, 2, 3), oscar::make_kv_view(a.data(), 3, 2, 3));
        }).has_value());
  CHECK(acc.mean().values == got.values);
}

TEST_CASE("normalize_per_layer divides each layer by its L2 norm", "[policy][importance]") {
  imp::head_scores s = imp::head_scores::zeros(3, 2);
  s(0, 0) = 3;
  s(0, 1) = 4;
  s(2, 0) = 0;
  s(2, 1) = 2;
  const imp::head_scores n = imp::normalize_per_layer(s);
  CHECK(n.values == std::vector<double>{0.6, 0.8, 0, 0, 0, 1});
  CHECK(error_from([] { (void)imp::head_scores::zeros(0, 2); }).has_value());
}

TEST_CASE("head-importance files parse, round-trip and reject malformed text",
          "[policy][importance]") {
  const std::string text =
      "oscar-head-importance 1\r\n# made by hand\nlayers 2\nkv_heads 2\n\nscore taylor\n"
      "normalization l2-per-layer\n1 1 0.25\n0 0 1\n# a comment between rows\n1 0 0.5\n0 1 0\n";
  const imp::head_importance h = imp::parse_head_importance(text);
  CHECK(h.score == "taylor");
  CHECK(h.normalization == "l2-per-layer");
  CHECK(h.scores.values == std::vector<double>{1, 0, 0.5, 0.25});
  const imp::head_importance again = imp::parse_head_importance(imp::format_head_importance(h));
  CHECK(again.scores.values == h.scores.values);
  CHECK(again.score == h.score);
  h.check_shape(2, 2);
  CHECK(error_from([&] { h.check_shape(4, 2); }).has_value());

  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / "oscar-test-importance.heads";
  std::ofstream(path) << text;
  CHECK(imp::load_head_importance(path).scores.values == h.scores.values);
  std::filesystem::remove(path);
  CHECK(error_from([&] { (void)imp::load_head_importance(path); })->code() ==
        oscar::errc::invalid_argument);

  const std::string header = "oscar-head-importance 1\nlayers 1\nkv_heads 2\nscore taylor\nnormalization none\n";
  const struct {
    std::string text, message;
  } bad[] = {
      {"oscar-head-importance 2\n" + header.substr(24) + "0 0 1\n0 1 1\n", "line 1"},
      {header + "0 0 1\n", "1 score rows are not allowed"},
      {header + "0 0 1\n0 0 1\n", "appears twice"},
      {header + "0 0 1\n0 1 -1\n", "score -1 is not allowed"},
      {header + "0 0 1\n0 2 1\n", "head (0, 2) is not allowed"},
      {header + "0 0 1\n0 1 1 extra\n", "'0 1 1 extra' is not allowed"},
      {header + "0 0 1\n0 1 nan\n", "is not allowed"},
      {"oscar-head-importance 1\nkv_heads 2\nlayers 1\n", "allowed: 'layers <value>'"},
      {"oscar-head-importance 1\nlayers 0\n", "layers = 0 is not allowed"},
      {"oscar-head-importance 1\nlayers 1\nkv_heads 1\nscore Taylor!\nnormalization x\n0 0 1\n",
       "a word"},
  };
  for (const auto& b : bad) {
    INFO(b.text);
    const auto e = error_from([&] { (void)imp::parse_head_importance(b.text, "test"); });
    REQUIRE(e.has_value());
    CHECK(e->code() == oscar::errc::corrupt_data);
    CHECK_THAT(e->what(), Catch::Matchers::ContainsSubstring(b.message));
  }
}

TEST_CASE("online head scores: entropy, far-context mass and output norm by hand",
          "[policy][importance]") {
  oscar::attention::kv_head_stats uniform{0, std::log(4.0), {0.25, 0.25, 0.25, 0.25}};
  oscar::attention::kv_head_stats peaked{0, 0.0, {0.0, 1.0, 0.0, 0.0}};
  oscar::attention::kv_head_stats mixed{0, 0, {0.1, 0.2, 0.3, 0.4}};
  mixed.entropy = -(0.1 * std::log(0.1) + 0.2 * std::log(0.2) + 0.3 * std::log(0.3) + 0.4 * std::log(0.4));
  CHECK(imp::normalized_entropy(uniform) == Approx(1.0));
  CHECK(imp::normalized_entropy(peaked) == Approx(0.0));
  CHECK(imp::far_mass(mixed, 1, 1) == Approx(0.5));
  CHECK(imp::far_mass(mixed, 0, 0) == Approx(1.0));
  CHECK(error_from([&] { (void)imp::far_mass(mixed, 3, 2); }).has_value());

  imp::head_stats_accumulator acc(2, 2);
  const std::vector<index_t> sinks{1, 0}, window{1, 2};
  const std::vector<oscar::attention::kv_head_stats> q1{uniform, peaked}, q2{mixed, mixed};
  acc.add(1, q1, sinks, window);
  acc.add(1, q2, sinks, window);
  CHECK(acc.queries(1, 0) == 2);
  CHECK(acc.queries(0, 0) == 0);
  CHECK(acc.entropy()(1, 0) == Approx((std::log(4.0) + mixed.entropy) / 2));
  CHECK(acc.concentration()(1, 1) == Approx(1.0 - (0.0 + mixed.entropy / std::log(4.0)) / 2));
  CHECK(acc.far_context_mass()(1, 0) == Approx((0.5 + 0.5) / 2));
  CHECK(acc.far_context_mass()(1, 1) == Approx((1.0 + 0.3) / 2));  // first two tokens
  CHECK(acc.local_mass()(1, 1) == Approx(1.0 - 0.65));
  CHECK(acc.local_mass()(0, 1) == 0.0);

  // Output norm: query heads 0, 1 -> KV head 0; 2, 3 -> KV head 1.
  const std::vector<float> out{3, 4, 0, 1, 1, 0, 0, 0};  // [1, 4, 2]
  acc.add_output(0, oscar::make_kv_view(out.data(), 1, 4, 2));
  CHECK(acc.output_norm()(0, 0) == Approx((5.0 + 1.0) / 2));
  CHECK(acc.output_norm()(0, 1) == Approx(0.5));
  CHECK(error_from([&] { acc.add(2, q1, sinks, window); }).has_value());
  CHECK(error_from([&] { acc.add(0, std::span(q1).first(1), sinks, window); }).has_value());
}

TEST_CASE("token scores: H2O accumulation, ZipCache normalization, eviction and permutation",
          "[policy][importance]") {
  imp::token_scores s;
  s.observe(std::vector<double>{1.0});
  s.observe(std::vector<double>{0.5, 0.5});
  s.append(1);
  s.observe(std::vector<double>{0.2, 0.2, 0.2, 0.4});
  CHECK(s.size() == 4);
  CHECK(std::vector<double>(s.accumulated().begin(), s.accumulated().end()) ==
        std::vector<double>{1.7, 0.7, 0.2, 0.4});
  CHECK(std::vector<index_t>(s.queries().begin(), s.queries().end()) ==
        std::vector<index_t>{3, 2, 1, 1});
  const auto n = s.normalized();
  CHECK(n[0] == Approx(1.7 / 3));
  CHECK(n[1] == Approx(0.35));
  CHECK(n[2] == Approx(0.2));
  CHECK(error_from([&] { s.observe(std::vector<double>{1.0}); }).has_value());  // shrank
  CHECK(error_from([&] { s.observe(std::vector<double>{0, 0, 0, -1}); }).has_value());

  const std::vector<index_t> drop{1, 3};
  s.evict(drop);
  CHECK(std::vector<double>(s.accumulated().begin(), s.accumulated().end()) ==
        std::vector<double>{1.7, 0.2});
  const std::vector<index_t> order{1, 0};
  s.permute(order);
  CHECK(s.accumulated()[0] == Approx(0.2));
  CHECK(s.queries()[1] == 3);
  const std::vector<index_t> not_a_permutation{0, 0};
  CHECK(error_from([&] { s.permute(not_a_permutation); }).has_value());
  CHECK(error_from([&] { s.evict(drop); }).has_value());
}

TEST_CASE("SnapKV scores: window votes summed, then pooled", "[policy][importance]") {
  // Query 1 saw 3 tokens (zero-padded), query 2 all 7.
  const std::vector<std::vector<double>> window{{0, 1, 0}, {0, 0, 0, 0, 0, 0, 2}};
  const auto max3 = imp::snapkv_scores(window, 7, 3, imp::pooling::max);
  CHECK(max3 == std::vector<double>{1, 1, 1, 0, 0, 2, 2});
  const auto mean3 = imp::snapkv_scores(window, 7, 3, imp::pooling::mean);
  const double want[] = {0.5, 1.0 / 3, 1.0 / 3, 0, 0, 2.0 / 3, 1.0};
  for (int t = 0; t < 7; ++t) CHECK(mean3[t] == Approx(want[t]));
  CHECK(imp::snapkv_scores(window, 7, 1) == std::vector<double>{0, 1, 0, 0, 0, 0, 2});
  CHECK(error_from([&] { (void)imp::snapkv_scores(window, 7, 2); }).has_value());
  CHECK(error_from([&] { (void)imp::snapkv_scores(window, 5, 3); }).has_value());
}

TEST_CASE("thresholds select by relative max, top-k, cumulative mass and quantile",
          "[policy][importance]") {
  using th = imp::threshold;
  const std::vector<double> s{1, 5, 3, 4.9};
  CHECK(imp::select(s, th::relative_to_max(0.98)) == std::vector<bool>{false, true, false, false});
  CHECK(imp::select(s, th::relative_to_max(0.5)) == std::vector<bool>{false, true, true, true});
  CHECK(imp::select(s, th::relative_to_max(0.0)) == std::vector<bool>{true, true, true, true});
  CHECK(imp::select(std::vector<double>{2, 1, 2, 3}, th::top_k(2)) ==
        std::vector<bool>{true, false, false, true});
  CHECK(imp::select(std::vector<double>{2, 1, 2, 3}, th::top_k(3)) ==
        std::vector<bool>{true, false, true, true});  // tie: the earlier first
  CHECK(imp::select(s, th::top_k(9)) == std::vector<bool>{true, true, true, true});
  const std::vector<double> m{1, 4, 3, 2};
  CHECK(imp::select(m, th::cumulative_mass(0.7)) == std::vector<bool>{false, true, true, false});
  CHECK(imp::select(m, th::cumulative_mass(0.71)) == std::vector<bool>{false, true, true, true});
  CHECK(imp::select(m, th::cumulative_mass(0.0)) == std::vector<bool>{false, false, false, false});
  CHECK(imp::select(m, th::quantile(0.5)) == std::vector<bool>{false, true, true, false});  // > 2.5
  CHECK(imp::select(m, th::quantile(0.25)) == std::vector<bool>{false, true, true, true});  // > 1.75
  CHECK(imp::select(m, th::quantile(1.0)) == std::vector<bool>{false, false, false, false});
  CHECK(error_from([&] { (void)imp::select(s, th::relative_to_max(1.5)); }).has_value());
  CHECK(error_from([&] { (void)imp::select(s, th::top_k(-1)); }).has_value());
  CHECK(error_from([&] { (void)imp::select(std::vector<double>{1, -1}, th::cumulative_mass(0.5)); })
            .has_value());
  CHECK(error_from([&] { (void)imp::select(std::vector<double>{1, NAN}, th::quantile(0.5)); })
            ->code() == oscar::errc::non_finite);
}

TEST_CASE("select_heads keeps a floor of heads in every layer", "[policy][importance]") {
  imp::head_scores s = imp::head_scores::zeros(3, 2);
  s.values = {1.0, 0.9, 0.1, 0.2, 0.0, 0.0};
  using th = imp::threshold;
  CHECK(imp::select_heads(s, th::relative_to_max(0.5), 1) ==
        std::vector<bool>{true, true, false, true, true, false});
  CHECK(imp::select_heads(s, th::relative_to_max(0.5), 0) ==
        std::vector<bool>{true, true, false, false, false, false});
  CHECK(imp::select_heads(s, th::relative_to_max(0.95), 2) ==
        std::vector<bool>{true, true, true, true, true, true});
  CHECK(imp::select_heads(s, th::relative_to_max(0.6), 1, imp::threshold_scope::per_layer) ==
        std::vector<bool>{true, true, false, true, true, false});
  CHECK(error_from([&] { (void)imp::select_heads(s, th::top_k(1), 3); }).has_value());
}
