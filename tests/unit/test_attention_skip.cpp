// SPDX-License-Identifier: Apache-2.0
// Query-aware block skipping (attention/skip.hpp) in the host and oneDNN decode backends: the
// key bounds hold in the engine's space for plain and rotated formats, a threshold of 0 (or
// one too large to skip anything) changes nothing, and with skipping on the output stays
// within the documented bound of a float64 reference over every token.
#include <catch2/catch_test_macros.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "oscar/attention/host.hpp"
#include "oscar/attention/skip.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/testing/synthetic_kv.hpp"
#include "attention_reference.hpp"
#if defined(OSCAR_WITH_ONEDNN)
#include "oscar/attention/onednn.hpp"
#endif

namespace c = oscar::cache;
namespace a = oscar::attention;
namespace q = oscar::quant;
using oscar::index_t;

namespace {

constexpr int kHeadDim = 64;
constexpr int kHeads = 2;
constexpr int kGroup = 4;
constexpr c::tier_budget kBudget{.full = 1 << 21, .mid = 1 << 21, .low = 1 << 21};

/// Queries: per KV head, the group's heads are one direction plus a little noise.
oscar::testing::dense_kv make_queries(std::uint64_t seed) {
  auto qs = oscar::testing::gaussian_kv(1, kHeads * kGroup, kHeadDim, seed, 0.3f);
  for (int h = 0; h < kHeads; ++h)
    for (int j = 1; j < kGroup; ++j)
      for (int c = 0; c < kHeadDim; ++c)
        qs.view()(0, h * kGroup + j, c) = qs.view()(0, h * kGroup, c) + 0.02f * float(((c * 7 + j) % 5) - 2);
  return qs;
}

/// Keys where tokens [low_from, low_to) point away from their head's query (their scores are
/// far below everyone else's); synthetic elsewhere.
oscar::testing::dense_kv make_keys(const oscar::testing::dense_kv& qs, index_t tokens,
                                   index_t low_from, index_t low_to) {
  auto k = oscar::testing::synthetic_keys(tokens, kHeads, kHeadDim, 21, 3.0f);
  std::mt19937 rng(5);
  std::normal_distribution<float> noise(0.0f, 0.1f);
  for (int h = 0; h < kHeads; ++h) {
    const float* qh = qs.view().row(0, h * kGroup);
    double norm = 0;
    for (int c = 0; c < kHeadDim; ++c) norm += double(qh[c]) * qh[c];
    for (index_t t = low_from; t < low_to; ++t)
      for (int c = 0; c < kHeadDim; ++c)
        k.view()(t, h, c) = -40.0f * qh[c] / float(std::sqrt(norm)) + noise(rng);
  }
  return k;
}

template <class Cache>
void host_decode(const Cache& cache, std::span<const c::seq_id> seqs, oscar::kv_view<const float> qv,
                 oscar::kv_view<float> out, const a::options& opt,
                 std::vector<a::kv_head_stats>* stats) {
  a::decode(oscar::backend::host{}, cache, 0, seqs, qv, out, opt, stats);
}
#if defined(OSCAR_WITH_ONEDNN)
template <class Cache>
void cpu_decode(const Cache& cache, std::span<const c::seq_id> seqs, oscar::kv_view<const float> qv,
                oscar::kv_view<float> out, const a::options& opt,
                std::vector<a::kv_head_stats>* stats) {
  a::decode(oscar::backend::onednn{}, cache, 0, seqs, qv, out, opt, stats);
}
#endif

/// Both backends this build has, for a cache type.
template <class Cache>
std::vector<std::pair<const char*, void (*)(const Cache&, std::span<const c::seq_id>,
                                            oscar::kv_view<const float>, oscar::kv_view<float>,
                                            const a::options&, std::vector<a::kv_head_stats>*)>>
backends() {
  return {{"host", &host_decode<Cache>},
#if defined(OSCAR_WITH_ONEDNN)
          {"onednn", &cpu_decode<Cache>}
#endif
  };
}

}  // namespace

TEST_CASE("attention skip: block key bounds hold in the engine's space, rotated or not",
          "[attention][skip]") {
  const c::cache_config cfg{.layers = 1, .kv_heads = kHeads, .head_dim = kHeadDim,
                            .block_tokens = 128, .sink_tokens = 4, .window_tokens = 16};
  const auto qs = oscar::testing::gaussian_kv(1, kHeads, kHeadDim, 31, 1.0f);
  const auto check = [&](const auto& cache, c::seq_id id) {
    const auto g = cache.gather(id, 0);
    for (int h = 0; h < kHeads; ++h) {
      const auto ev = cache.view(id, 0, h);
      index_t pos = static_cast<index_t>(ev.sink_k.size()) / kHeadDim;
      for (const c::block_slot& s : ev.slots) {
        const double bound = a::key_score_bound(qs.view().row(0, h), cache.pool(s.level).key_min(s.id),
                                                cache.pool(s.level).key_max(s.id));
        for (index_t t = 0; t < static_cast<index_t>(s.valid.count()); ++t, ++pos) {
          double dot = 0;
          for (int c = 0; c < kHeadDim; ++c)
            dot += double(qs.view()(0, h, c)) * g[h].k[static_cast<std::size_t>(pos * kHeadDim + c)];
          REQUIRE(dot <= bound + 1e-9 * std::abs(bound));
        }
      }
    }
  };
  c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16> rotated(cfg, kBudget,
      [](const c::block_request& r) { return static_cast<c::tier>(r.block_index % 3); });
  c::kv_cache<q::fp2plus_kc, q::kivi2, q::kv_q8_0> plain(cfg, kBudget,
      [](const c::block_request& r) { return static_cast<c::tier>(r.block_index % 3); });
  const auto k = oscar::testing::synthetic_keys(500, kHeads, kHeadDim, 32);
  const auto v = oscar::testing::synthetic_values(500, kHeads, kHeadDim, 33);
  const c::seq_id r_id = rotated.create(), p_id = plain.create();
  rotated.append(r_id, 0, k.view(), v.view());
  plain.append(p_id, 0, k.view(), v.view());
  check(rotated, r_id);
  check(plain, p_id);
}

TEST_CASE("attention skip: threshold 0, or too large to skip anything, changes nothing",
          "[attention][skip]") {
  using cache_type = c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16>;
  const c::cache_config cfg{.layers = 1, .kv_heads = kHeads, .head_dim = kHeadDim,
                            .block_tokens = 128, .sink_tokens = 4, .window_tokens = 64};
  cache_type cache(cfg, kBudget);
  const auto qs = make_queries(41);
  const auto k = make_keys(qs, 600, 68, 388);
  const auto v = oscar::testing::synthetic_values(600, kHeads, kHeadDim, 42);
  const c::seq_id id = cache.create();
  cache.append(id, 0, k.view(), v.view());
  const std::vector<c::seq_id> seqs{id};
  const int qh = kHeads * kGroup;
  for (const auto& [name, decode] : backends<cache_type>()) {
    CAPTURE(name);
    std::vector<float> plain(qh * kHeadDim), off(plain.size()), huge(plain.size());
    std::vector<a::kv_head_stats> s_plain, s_off, s_huge;
    a::skip_report r_off{1, 1, 1}, r_huge;
    decode(cache, seqs, qs.view(), oscar::make_kv_view(plain.data(), 1, qh, kHeadDim),
           {.q_heads = qh, .want_stats = true}, &s_plain);
    decode(cache, seqs, qs.view(), oscar::make_kv_view(off.data(), 1, qh, kHeadDim),
           {.q_heads = qh, .want_stats = true, .skip_threshold = 0.0f, .skipped = &r_off}, &s_off);
    decode(cache, seqs, qs.view(), oscar::make_kv_view(huge.data(), 1, qh, kHeadDim),
           {.q_heads = qh, .want_stats = true, .skip_threshold = 1e30f, .skipped = &r_huge},
           &s_huge);
    CHECK(off == plain);
    CHECK(huge == plain);
    CHECK(r_off.blocks == 0);  // skipping off: nothing considered
    CHECK(r_off.blocks_skipped == 0);
    CHECK(r_huge.blocks == static_cast<index_t>(2 * cache.blocks(id, 0, 0).size()));
    CHECK(r_huge.blocks_skipped == 0);
    for (std::size_t i = 0; i < s_plain.size(); ++i) {
      CHECK(s_off[i].token_mass == s_plain[i].token_mass);
      CHECK(s_huge[i].token_mass == s_plain[i].token_mass);
      CHECK(s_huge[i].lse == s_plain[i].lse);
    }
  }
}

TEST_CASE("attention skip: skipped blocks stay within the documented error bound",
          "[attention][skip]") {
  using cache_type = c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16>;
  const c::cache_config cfg{.layers = 1, .kv_heads = kHeads, .head_dim = kHeadDim,
                            .block_tokens = 128, .sink_tokens = 4, .window_tokens = 64};
  cache_type cache(cfg, kBudget, [](const c::block_request& r) {
    return r.block_index == 2 ? c::tier::mid : c::tier::low;  // a rotated FP4+ block too
  });
  const auto qs = make_queries(51);
  // Blocks hold tokens [4, 4 + 128 n): blocks 1-2 (tokens 132-387) point away from the queries.
  const auto k = make_keys(qs, 700, 132, 388);
  const auto v = oscar::testing::synthetic_values(700, kHeads, kHeadDim, 52);
  const c::seq_id id = cache.create();
  cache.append(id, 0, k.view(), v.view());
  const std::vector<c::seq_id> seqs{id};
  const int qh = kHeads * kGroup;
  const double scale = 1.0 / std::sqrt(double(kHeadDim));
  const auto g = cache.gather(id, 0);
  for (const float tau : {3.0f, 6.0f}) {
    for (const auto& [name, decode] : backends<cache_type>()) {
      CAPTURE(name, tau);
      std::vector<float> out(qh * kHeadDim);
      std::vector<a::kv_head_stats> stats;
      a::skip_report report;
      decode(cache, seqs, qs.view(), oscar::make_kv_view(out.data(), 1, qh, kHeadDim),
             {.q_heads = qh, .want_stats = true, .skip_threshold = tau, .skipped = &report},
             &stats);
      CHECK(report.blocks == static_cast<index_t>(kHeads * cache.blocks(id, 0, 0).size()));
      CHECK(report.blocks_skipped == 2 * 2);  // the two far blocks of both heads
      CHECK(report.tokens_skipped == 2 * 2 * 128);
      for (int h = 0; h < kHeads; ++h) {
        // Skipped tokens get no mass; the rest sums to 1.
        const a::kv_head_stats& s = stats[static_cast<std::size_t>(h)];
        double total = 0;
        for (index_t t = 0; t < g[h].tokens; ++t) {
          if (t >= 132 && t < 388) CHECK(s.token_mass[static_cast<std::size_t>(t)] == 0.0);
          total += s.token_mass[static_cast<std::size_t>(t)];
        }
        CHECK(std::abs(total - 1.0) < 1e-6);
        // Against every token: || o_kept - o || <= n_skipped e^-tau (|| o_kept || + max || v ||).
        const Eigen::MatrixXd km = oscar_test::as_matrix(g[h].k, g[h].tokens, kHeadDim);
        const Eigen::MatrixXd vm = oscar_test::as_matrix(g[h].v, g[h].tokens, kHeadDim);
        const double max_v = vm.rowwise().norm().maxCoeff();
        for (int j = 0; j < kGroup; ++j) {
          const int head = h * kGroup + j;
          const auto want = oscar_test::reference_attention(
              oscar_test::as_vector(qs.view().row(0, head), kHeadDim), km, vm, scale);
          const Eigen::Map<const Eigen::VectorXf> got(out.data() + head * kHeadDim, kHeadDim);
          const double err = (got.cast<double>() - want.out).norm();
          const double norm = got.cast<double>().norm();
          const double bound = 256.0 * std::exp(-double(tau)) * (norm + max_v);
          CHECK(err <= bound + 1e-5 * norm);
        }
      }
    }
  }
}

TEST_CASE("attention skip: without sinks and window there is no reference, nothing is skipped",
          "[attention][skip]") {
  using cache_type = c::kv_cache<q::fp2plus, q::fp4plus, q::kv_fp16>;
  const c::cache_config cfg{.layers = 1, .kv_heads = kHeads, .head_dim = kHeadDim,
                            .block_tokens = 128, .sink_tokens = 0, .window_tokens = 0};
  cache_type cache(cfg, kBudget);
  const auto qs = make_queries(61);
  const auto k = make_keys(qs, 512, 128, 384);  // exactly four blocks, no window left
  const auto v = oscar::testing::synthetic_values(512, kHeads, kHeadDim, 62);
  const c::seq_id id = cache.create();
  cache.append(id, 0, k.view(), v.view());
  REQUIRE(cache.view(id, 0, 0).window_k.empty());
  const std::vector<c::seq_id> seqs{id};
  const int qh = kHeads * kGroup;
  for (const auto& [name, decode] : backends<cache_type>()) {
    CAPTURE(name);
    std::vector<float> out(qh * kHeadDim);
    a::skip_report report;
    decode(cache, seqs, qs.view(), oscar::make_kv_view(out.data(), 1, qh, kHeadDim),
           {.q_heads = qh, .skip_threshold = 1.0f, .skipped = &report}, nullptr);
    CHECK(report.blocks == 2 * 4);
    CHECK(report.blocks_skipped == 0);
  }
}
