// SPDX-License-Identifier: Apache-2.0
// The oneDNN (CPU) attention backend against an independent float64 computation with Eigen on
// the cache's gathered (decoded) K/V: every KV format, GQA 1/4/8, sinks and window on and off,
// every instruction-set path this machine has, split-K, forks, eviction and compaction,
// prefill in f32 and bf16, statistics, and the errors.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#if defined(OSCAR_WITH_ONEDNN)

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "oscar/attention/host.hpp"
#include "oscar/attention/onednn.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/testing/synthetic_kv.hpp"
#include "attention_reference.hpp"
#include "support.hpp"

namespace c = oscar::cache;
namespace a = oscar::attention;
namespace q = oscar::quant;
using oscar::index_t;
using oscar_test::as_matrix;
using oscar_test::as_vector;
using oscar_test::error_from;
using oscar_test::reference_attention;
using oscar_test::relative_error;

namespace {

constexpr c::tier_budget kBudget{.full = 1 << 21, .mid = 1 << 21, .low = 1 << 21};

/// Every shipped KV format, and FP2+ with per-channel keys.
using formats = decltype(std::tuple_cat(std::declval<q::all_kv_formats>(),
                                        std::declval<std::tuple<q::fp2plus_kc>>()));

/// The instruction sets this machine runs, lowest first; restores the limit when done.
struct isa_paths {
  std::vector<a::cpu_isa> list;
  isa_paths() {
    for (a::cpu_isa isa : {a::cpu_isa::scalar, a::cpu_isa::avx2, a::cpu_isa::avx512})
      if (isa <= a::supported_cpu_isa()) list.push_back(isa);
  }
  ~isa_paths() { a::set_cpu_isa_limit(a::cpu_isa::avx512); }
};

template <class Cache>
void fill(Cache& cache, c::seq_id id, index_t tokens, std::uint64_t seed) {
  const auto& cfg = cache.config();
  const auto k = oscar::testing::synthetic_keys(tokens, cfg.kv_heads, cfg.head_dim, seed);
  const auto v = oscar::testing::synthetic_values(tokens, cfg.kv_heads, cfg.head_dim, seed + 1);
  for (int l = 0; l < cfg.layers; ++l) cache.append(id, l, k.view(), v.view());
}

/// Statistics of the oneDNN backend against the reference's (`tolerance` relative on lse and
/// entropy, absolute on each token's mass).
void check_stats(const a::kv_head_stats& s, double lse, double entropy,
                 const Eigen::VectorXd& mass, double tolerance) {
  CHECK(std::abs(s.lse - lse) <= tolerance * std::max(1.0, std::abs(lse)));
  CHECK(std::abs(s.entropy - entropy) <= tolerance * std::max(1.0, entropy));
  REQUIRE(s.token_mass.size() == static_cast<std::size_t>(mass.size()));
  double worst = 0, total = 0;
  for (Eigen::Index t = 0; t < mass.size(); ++t) {
    worst = std::max(worst, std::abs(s.token_mass[static_cast<std::size_t>(t)] - mass(t)));
    total += s.token_mass[static_cast<std::size_t>(t)];
  }
  CHECK(worst <= tolerance);
  CHECK(std::abs(total - 1.0) <= 1e-6);
}

/// oneDNN decode of `seqs` (stats on) against the reference; returns the relative error.
template <class Cache>
double check_decode(const Cache& cache, int layer, const std::vector<c::seq_id>& seqs,
                    int q_heads, int threads, std::uint64_t seed = 99) {
  const auto& cfg = cache.config();
  const int d = cfg.head_dim;
  const auto batch = static_cast<index_t>(seqs.size());
  const auto qs = oscar::testing::gaussian_kv(batch, q_heads, d, seed, 0.3f);
  std::vector<float> out(static_cast<std::size_t>(batch * q_heads * d),
                         std::numeric_limits<float>::quiet_NaN());
  std::vector<a::kv_head_stats> stats;
  const a::options opt{.q_heads = q_heads, .want_stats = true, .threads = threads};
  a::decode(oscar::backend::onednn{}, cache, layer, seqs, qs.view(),
            oscar::make_kv_view(out.data(), batch, q_heads, d), opt, &stats);
  REQUIRE(stats.size() == static_cast<std::size_t>(batch * cfg.kv_heads));
  const int group = q_heads / cfg.kv_heads;
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> want(out.size());
  for (index_t b = 0; b < batch; ++b) {
    const auto g = cache.gather(seqs[static_cast<std::size_t>(b)], layer);
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const Eigen::MatrixXd k = as_matrix(g[h].k, g[h].tokens, d), v = as_matrix(g[h].v, g[h].tokens, d);
      double lse = 0, entropy = 0;
      Eigen::VectorXd mass = Eigen::VectorXd::Zero(g[h].tokens);
      for (int j = 0; j < group; ++j) {
        const int qh = h * group + j;
        const auto r = reference_attention(as_vector(qs.view().row(b, qh), d), k, v, scale);
        for (int c = 0; c < d; ++c) want[static_cast<std::size_t>((b * q_heads + qh) * d + c)] = r.out(c);
        lse += r.lse / group;
        entropy += r.entropy / group;
        mass += r.p / group;
      }
      check_stats(stats[static_cast<std::size_t>(b * cfg.kv_heads + h)], lse, entropy, mass, 1e-4);
    }
  }
  const double err = relative_error(out, want);
  CHECK(err < 1e-3);
  return err;
}

/// A tier policy that spreads blocks over all three tiers.
c::tier_policy rotating_tiers() {
  return [](const c::block_request& r) { return static_cast<c::tier>(r.block_index % 3); };
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("attention onednn decode: every format, GQA 1/4/8, every kernel path",
                        "[attention][onednn]", formats) {
  isa_paths paths;
  for (const int sinks : {0, 4}) {
    for (const int window : {0, 64}) {
      const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 128,
                                .sink_tokens = sinks, .window_tokens = window};
      c::kv_cache<TestType, TestType, TestType> cache(cfg, kBudget);
      const c::seq_id a_seq = cache.create(), b_seq = cache.create();
      fill(cache, a_seq, 330, 1);
      fill(cache, b_seq, 70, 2);
      for (const a::cpu_isa isa : paths.list) {
        a::set_cpu_isa_limit(isa);
        for (const int group : {1, 4, 8}) {
          CAPTURE(TestType::name, sinks, window, a::to_string(isa), group);
          check_decode(cache, 0, {a_seq, b_seq}, 2 * group, group == 4 ? 3 : 1);
        }
      }
    }
  }
}

TEST_CASE("attention onednn decode: blocks of all three tiers, head_dim 128 and 256",
          "[attention][onednn]") {
  isa_paths paths;
  for (const int d : {128, 256}) {
    const c::cache_config cfg{.layers = 2, .kv_heads = 2, .head_dim = d, .block_tokens = 128,
                              .sink_tokens = 4, .window_tokens = 64};
    c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16> cache(cfg, {.full = 1 << 22, .mid = 1 << 22, .low = 1 << 22},
                                                          rotating_tiers());
    c::kv_cache<q::fp2plus_kc, q::kivi2, q::kv_bf16> other(cfg, {.full = 1 << 22, .mid = 1 << 22, .low = 1 << 22},
                                                           rotating_tiers());
    const c::seq_id id = cache.create(), id2 = other.create();
    fill(cache, id, 500, 3);
    fill(other, id2, 500, 3);
    for (const a::cpu_isa isa : paths.list) {
      a::set_cpu_isa_limit(isa);
      CAPTURE(d, a::to_string(isa));
      check_decode(cache, 1, {id}, 8, 2);
      check_decode(other, 1, {id2}, 6, 2);  // 3 query heads per KV head
    }
  }
}

TEST_CASE("attention onednn decode: one long sequence split over threads (split-K)",
          "[attention][onednn]") {
  // One KV head and 6 threads: the entry's blocks are split into several tasks whose
  // online-softmax partials are combined.
  isa_paths paths;
  const c::cache_config cfg{.layers = 1, .kv_heads = 1, .head_dim = 64, .block_tokens = 128,
                            .sink_tokens = 4, .window_tokens = 600};
  c::kv_cache<q::fp2plus_kc, q::fp4plus, q::kv_fp16> cache(cfg, kBudget, rotating_tiers());
  const c::seq_id id = cache.create();
  fill(cache, id, 1500, 4);  // 13 blocks and a window longer than one 256-row piece
  for (const a::cpu_isa isa : paths.list) {
    a::set_cpu_isa_limit(isa);
    for (const int threads : {1, 2, 6}) {
      CAPTURE(a::to_string(isa), threads);
      check_decode(cache, 0, {id}, 4, threads);
    }
  }
}

TEST_CASE("attention onednn decode: after fork, evict and compaction", "[attention][onednn]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 128,
                            .sink_tokens = 4, .window_tokens = 16};
  c::kv_cache<q::fp2plus_kc, q::fp4plus, q::kv_fp16> cache(cfg, kBudget, rotating_tiers());
  const c::seq_id parent = cache.create();
  fill(cache, parent, 400, 5);
  const c::seq_id child = cache.fork(parent);
  fill(cache, child, 100, 6);
  const std::vector<index_t> drop{0, 7, 100, 101, 250};
  cache.evict(child, 0, 1, drop);  // sinks, block tokens (partly valid blocks)
  check_decode(cache, 0, {parent, child}, 8, 2);
  for (int h = 0; h < 2; ++h) {
    std::vector<float> importance(static_cast<std::size_t>(cache.tokens(child, 0, h)));
    for (std::size_t i = 0; i < importance.size(); ++i) importance[i] = float((i * 37) % 11);
    cache.compact(child, 0, h, importance);
  }
  check_decode(cache, 0, {parent, child}, 8, 2);
  check_decode(cache, 0, {child, parent, child}, 2, 3);
}

TEST_CASE("attention onednn: the kernels' rotation is oscar::rotate, bit for bit",
          "[attention][onednn]") {
  // Queries are rotated and outputs unrotated by the vectorized transform of each path.
  isa_paths paths;
  for (const int d : {64, 128, 256}) {
    const auto x = oscar::testing::gaussian_kv(3, 1, d, 71);
    for (const a::cpu_isa isa : paths.list) {
      for (const bool inverse : {false, true}) {
        CAPTURE(d, a::to_string(isa), inverse);
        std::vector<float> got = x.data, want = x.data;
        a::detail::rotate_rows_on(isa, got.data(), 3, d, inverse);
        for (int r = 0; r < 3; ++r) {
          if (inverse) oscar::unrotate(want.data() + r * d, d);
          else oscar::rotate(want.data() + r * d, d);
        }
        CHECK(got == want);
      }
    }
  }
}

TEST_CASE("attention onednn decode: agrees with the host backend", "[attention][onednn]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = 4, .head_dim = 128, .block_tokens = 128,
                            .sink_tokens = 4, .window_tokens = 64};
  c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16> cache(cfg, kBudget, rotating_tiers());
  const c::seq_id id = cache.create();
  fill(cache, id, 700, 7);
  const auto qs = oscar::testing::gaussian_kv(1, 16, 128, 8, 0.3f);
  std::vector<float> host(16 * 128), cpu(16 * 128);
  const std::vector<c::seq_id> one{id};
  const a::options opt{.q_heads = 16, .softmax_scale = 0.05f};
  a::decode(oscar::backend::host{}, cache, 0, one, qs.view(),
            oscar::make_kv_view(host.data(), 1, 16, 128), opt);
  a::decode(oscar::backend::onednn{}, cache, 0, one, qs.view(),
            oscar::make_kv_view(cpu.data(), 1, 16, 128), opt);
  CHECK(relative_error(cpu, std::vector<double>(host.begin(), host.end())) < 1e-5);
}

namespace {

/// oneDNN prefill (stats on) against the reference over gathered K/V plus the causal chunk.
template <class Cache>
void check_prefill(const Cache& cache, c::seq_id id, index_t chunk, int q_heads,
                   a::compute_type compute, double tolerance) {
  const auto& cfg = cache.config();
  const int d = cfg.head_dim;
  const int group = q_heads / cfg.kv_heads;
  const auto qs = oscar::testing::gaussian_kv(chunk, q_heads, d, 17, 0.3f);
  const auto k = oscar::testing::synthetic_keys(chunk, cfg.kv_heads, d, 18);
  const auto v = oscar::testing::synthetic_values(chunk, cfg.kv_heads, d, 19);
  std::vector<float> out(static_cast<std::size_t>(chunk * q_heads * d),
                         std::numeric_limits<float>::quiet_NaN());
  std::vector<a::kv_head_stats> stats;
  a::prefill(oscar::backend::onednn{}, cache, 0, id, qs.view(), k.view(), v.view(),
             oscar::make_kv_view(out.data(), chunk, q_heads, d),
             a::options{.q_heads = q_heads, .want_stats = true, .compute = compute}, &stats);
  REQUIRE(stats.size() == static_cast<std::size_t>(chunk * cfg.kv_heads));
  const auto g = cache.gather(id, 0);
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> want(out.size());
  for (int h = 0; h < cfg.kv_heads; ++h) {
    // Cached rows, then the chunk's rows; query i sees the first cached + i + 1.
    Eigen::MatrixXd km(g[h].tokens + chunk, d), vm(g[h].tokens + chunk, d);
    km.topRows(g[h].tokens) = as_matrix(g[h].k, g[h].tokens, d);
    vm.topRows(g[h].tokens) = as_matrix(g[h].v, g[h].tokens, d);
    for (index_t t = 0; t < chunk; ++t) {
      for (int c = 0; c < d; ++c) {
        km(g[h].tokens + t, c) = k.view()(t, h, c);
        vm(g[h].tokens + t, c) = v.view()(t, h, c);
      }
    }
    for (index_t i = 0; i < chunk; ++i) {
      const index_t n = g[h].tokens + i + 1;
      double lse = 0, entropy = 0;
      Eigen::VectorXd mass = Eigen::VectorXd::Zero(n);
      for (int j = 0; j < group; ++j) {
        const int qh = h * group + j;
        const auto r = reference_attention(as_vector(qs.view().row(i, qh), d), km.topRows(n),
                                           vm.topRows(n), scale);
        for (int c = 0; c < d; ++c) want[static_cast<std::size_t>((i * q_heads + qh) * d + c)] = r.out(c);
        lse += r.lse / group;
        entropy += r.entropy / group;
        mass += r.p / group;
      }
      check_stats(stats[static_cast<std::size_t>(i * cfg.kv_heads + h)], lse, entropy, mass,
                  compute == a::compute_type::bf16 ? 1e-2 : 1e-4);
    }
  }
  CHECK(relative_error(out, want) < tolerance);
}

}  // namespace

TEST_CASE("attention onednn prefill: f32 and bf16 matmuls against the reference",
          "[attention][onednn]") {
  isa_paths paths;
  const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 128,
                            .sink_tokens = 4, .window_tokens = 32};
  c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16> cache(cfg, kBudget, rotating_tiers());
  c::kv_cache<q::fp2plus_kc, q::kv_q4_0, q::kv_fp8> other(cfg, kBudget, rotating_tiers());
  const c::seq_id id = cache.create(), id2 = other.create(), empty = cache.create();
  fill(cache, id, 600, 9);  // more than two 256-token tiles of cached context
  fill(other, id2, 420, 9);
  // Every path decodes tiles and runs the softmax (the matmuls are oneDNN's own).
  for (const a::cpu_isa isa : paths.list) {
    a::set_cpu_isa_limit(isa);
    CAPTURE(a::to_string(isa));
    check_prefill(cache, id, 37, 8, a::compute_type::f32, 1e-3);
    check_prefill(other, id2, 9, 8, a::compute_type::f32, 1e-3);
  }
  a::set_cpu_isa_limit(a::cpu_isa::avx512);
  for (const int group : {1, 4, 8}) {
    CAPTURE(group);
    check_prefill(cache, id, 37, 2 * group, a::compute_type::f32, 1e-3);
    check_prefill(cache, id, 37, 2 * group, a::compute_type::bf16, 1e-2);
  }
  check_prefill(other, id2, 120, 4, a::compute_type::f32, 1e-3);  // the chunk spans tiles
  check_prefill(cache, empty, 20, 4, a::compute_type::f32, 1e-3);  // nothing cached yet
}

TEST_CASE("attention onednn: bad calls are rejected before any output is written",
          "[attention][onednn][errors]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 128,
                            .sink_tokens = 0, .window_tokens = 0};
  c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16> cache(cfg, kBudget);
  const c::seq_id full = cache.create(), empty = cache.create();
  fill(cache, full, 130, 10);
  auto qs = oscar::testing::gaussian_kv(1, 8, 64, 11);
  std::vector<float> out(8 * 64, 123.0f);
  const auto out_view = oscar::make_kv_view(out.data(), 1, 8, 64);
  const auto expect = [&](const std::vector<c::seq_id>& seqs, const a::options& opt,
                          const char* fragment) {
    const auto e = error_from([&] {
      a::decode(oscar::backend::onednn{}, cache, 0, seqs, qs.view(), out_view, opt);
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
  expect({full}, {.q_heads = 8, .skip_threshold = -1.0f}, "skip_threshold");
  expect({full}, {.q_heads = 8, .threads = -2}, "threads");
  expect({full}, {.q_heads = 8, .want_stats = true}, "stats = nullptr");
  const std::vector<c::seq_id> no_seqs;
  expect(no_seqs, {.q_heads = 8}, "q shape [1, 8, 64]");
  qs.view()(0, 3, 5) = std::numeric_limits<float>::quiet_NaN();
  expect({full}, {.q_heads = 8}, "token 0, head 3, channel 5");

  // Prefill: shapes and the sequence.
  const auto pq = oscar::testing::gaussian_kv(4, 8, 64, 12);
  const auto pk = oscar::testing::gaussian_kv(4, 2, 64, 13);
  const auto pk3 = oscar::testing::gaussian_kv(3, 2, 64, 14);
  std::vector<float> pout(4 * 8 * 64, 123.0f);
  const auto expect_prefill = [&](c::seq_id id, oscar::kv_view<const float> k,
                                  const a::options& opt, const char* fragment) {
    const auto e = error_from([&] {
      a::prefill(oscar::backend::onednn{}, cache, 0, id, pq.view(), k, pk.view(),
                 oscar::make_kv_view(pout.data(), 4, 8, 64), opt);
    });
    REQUIRE(e.has_value());
    CHECK_THAT(e->what(), Catch::Matchers::ContainsSubstring(fragment));
    for (float x : pout) REQUIRE(x == 123.0f);
  };
  expect_prefill(full, pk3.view(), {.q_heads = 8}, "k shape [3, 2, 64]");
  expect_prefill(full + 100, pk.view(), {.q_heads = 8}, "sequence id");
  expect_prefill(full, pk.view(), {.q_heads = 6}, "q shape [4, 8, 64]");
  const auto e = error_from([&] {
    a::prefill(oscar::backend::onednn{}, cache, 1, full, pq.view(), pk.view(), pk.view(),
               oscar::make_kv_view(pout.data(), 4, 8, 64), a::options{.q_heads = 8});
  });
  REQUIRE(e.has_value());
  CHECK_THAT(e->what(), Catch::Matchers::ContainsSubstring("layer = 1 is not allowed"));
}

#endif  // OSCAR_WITH_ONEDNN
