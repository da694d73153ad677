// SPDX-License-Identifier: Apache-2.0
// Cache policies: the cache hooks they use (prune as a running mean, retier, compaction's
// order), the driver's bookkeeping, and each built-in policy's effect on the cache against a
// reference computed here.
#include <catch2/catch_approx.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>
#include <numeric>
#include <random>
#include <vector>

#include "oscar/attention/host.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/cache/serialize.hpp"
#include "oscar/importance/threshold.hpp"
#include "oscar/policy/policy.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/testing/synthetic_kv.hpp"
#include "support.hpp"

namespace c = oscar::cache;
namespace p = oscar::policy;
namespace q = oscar::quant;
namespace imp = oscar::importance;
using Catch::Approx;
using oscar::index_t;
using oscar_test::error_from;

namespace {

constexpr int kHeadDim = 64;
constexpr c::tier_budget kBudget{.full = 1 << 21, .mid = 1 << 21, .low = 1 << 21};

using lossless_cache = c::kv_cache<q::kv_fp32, q::kv_fp32, q::kv_fp32>;
using mixed_cache = c::kv_cache<q::fp2plus_kc, q::fp4plus, q::kv_fp16>;  // 64-token chunks
using token_cache = c::kv_cache<q::kv_fp16, q::kv_fp16, q::kv_fp16>;     // 1-token chunks

c::cache_config config(int layers, int kv_heads, int block_tokens, int sinks, int window) {
  return {.layers = layers, .kv_heads = kv_heads, .head_dim = kHeadDim,
          .block_tokens = block_tokens, .sink_tokens = sinks, .window_tokens = window};
}

/// Appends tokens [from, to) of k/v one at a time (as an engine's decode does).
template <class Cache>
void feed(Cache& cache, c::seq_id s, int layer, const oscar::testing::dense_kv& k,
          const oscar::testing::dense_kv& v, index_t from, index_t to) {
  for (index_t t = from; t < to; ++t)
    cache.append(s, layer, k.view().slice_tokens(t, 1), v.view().slice_tokens(t, 1));
}

/// Mean of head h's values over tokens [0, n) in float64.
std::vector<double> mean_values(const oscar::testing::dense_kv& v, int h, index_t n) {
  std::vector<double> m(kHeadDim, 0.0);
  for (index_t t = 0; t < n; ++t)
    for (int d = 0; d < kHeadDim; ++d) m[d] += v.view().row(t, h)[d];
  for (double& x : m) x /= static_cast<double>(n);
  return m;
}

}  // namespace

TEST_CASE("a pruned head's attention output is the running mean of its values", "[policy]") {
  const auto k = oscar::testing::synthetic_keys(150, 2, kHeadDim, 1);
  const auto v = oscar::testing::synthetic_values(150, 2, kHeadDim, 2);
  lossless_cache cache(config(1, 2, 16, 4, 8), kBudget);
  const c::seq_id s = cache.create();
  feed(cache, s, 0, k, v, 0, 100);
  const std::size_t used_before = cache.usage().tiers[2].used;  // the low tier
  cache.prune(s, 0, 0);
  CHECK(cache.pruned(s, 0, 0));
  CHECK_FALSE(cache.pruned(s, 0, 1));
  CHECK(cache.tokens(s, 0, 0) == 1);
  CHECK(cache.blocks(s, 0, 0).empty());
  CHECK(cache.usage().tiers[2].used < used_before);
  feed(cache, s, 0, k, v, 100, 150);  // the mean keeps running
  CHECK(cache.tokens(s, 0, 0) == 1);
  CHECK(cache.tokens(s, 0, 1) == 150);

  // Two query heads per KV head, random queries: heads 0, 1 read the pruned head.
  const auto qv = oscar::testing::gaussian_kv(1, 4, kHeadDim, 3, 2.0f);
  std::vector<float> out(4 * kHeadDim);
  std::vector<oscar::attention::kv_head_stats> stats;
  const c::seq_id seqs[] = {s};
  oscar::attention::decode(oscar::backend::host{}, cache, 0, seqs, qv.view(),
                           oscar::make_kv_view(out.data(), 1, 4, kHeadDim),
                           {.q_heads = 4, .want_stats = true}, &stats);
  const auto want = mean_values(v, 0, 150);
  for (int qh = 0; qh < 2; ++qh)
    for (int d = 0; d < kHeadDim; ++d) CHECK(out[qh * kHeadDim + d] == Approx(want[d]).margin(1e-5));
  CHECK(stats[0].token_mass == std::vector<double>{1.0});
  CHECK(stats[0].entropy == 0.0);

  // A fork keeps its own running mean.
  const c::seq_id f = cache.fork(s);
  feed(cache, f, 0, v, v, 0, 1);  // k is irrelevant for a pruned head
  CHECK(cache.gather(s, 0)[0].v[0] == Approx(want[0]).margin(1e-5));
  std::vector<double> forked(want);
  forked[0] = (want[0] * 150 + v.view().row(0, 0)[0]) / 151;
  CHECK(cache.gather(f, 0)[0].v[0] == Approx(forked[0]).margin(1e-5));

  // What a pruned head refuses.
  const index_t zero = 0;
  CHECK_THAT(error_from([&] { cache.evict(s, 0, 0, std::span(&zero, 1)); })->what(),
             Catch::Matchers::ContainsSubstring("pruned"));
  const float one = 1.0f;
  CHECK(error_from([&] { (void)cache.compact(s, 0, 0, std::span(&one, 1)); }).has_value());
  cache.prune(s, 0, 0);  // again: nothing changes
  CHECK(cache.tokens(s, 0, 0) == 1);
}

TEST_CASE("pruning with fp16 sinks and window and 2-bit blocks averages the decoded values",
          "[policy]") {
  const auto k = oscar::testing::synthetic_keys(200, 1, kHeadDim, 4);
  const auto v = oscar::testing::synthetic_values(200, 1, kHeadDim, 5);
  mixed_cache cache(config(1, 1, 64, 4, 32), kBudget);
  const c::seq_id s = cache.create();
  feed(cache, s, 0, k, v, 0, 180);
  const auto before = cache.gather(s, 0)[0];
  std::vector<double> want(kHeadDim, 0.0);
  for (index_t t = 0; t < before.tokens; ++t)
    for (int d = 0; d < kHeadDim; ++d) want[d] += before.v[t * kHeadDim + d];
  cache.prune(s, 0, 0);
  feed(cache, s, 0, k, v, 180, 200);
  for (index_t t = 180; t < 200; ++t)
    for (int d = 0; d < kHeadDim; ++d) want[d] += v.view().row(t, 0)[d];
  const auto after = cache.gather(s, 0)[0];
  REQUIRE(after.tokens == 1);
  CHECK(error_from([&] { (void)c::serialize(cache, s); })->code() == oscar::errc::unsupported);
  for (int d = 0; d < kHeadDim; ++d) {
    const double m = want[d] / static_cast<double>(before.tokens + 20);
    CHECK(after.v[d] == Approx(m).margin(std::abs(m) * 1e-3 + 1e-4));  // published in fp16
    CHECK(after.k[d] == 0.0f);
  }
}

TEST_CASE("retier re-encodes a block in another tier in place", "[policy]") {
  const auto k = oscar::testing::synthetic_keys(300, 1, kHeadDim, 6);
  const auto v = oscar::testing::synthetic_values(300, 1, kHeadDim, 7);
  mixed_cache cache(config(1, 1, 64, 4, 64), kBudget, [](const c::block_request&) {
    return c::tier::full;
  });
  const c::seq_id s = cache.create();
  feed(cache, s, 0, k, v, 0, 300);
  REQUIRE(cache.blocks(s, 0, 0).size() == 3);
  const index_t drop[] = {4 + 70, 4 + 71};  // holes in block 1 stay holes
  cache.evict(s, 0, 0, drop);
  const auto before = cache.gather(s, 0)[0];
  const auto usage = cache.usage();

  cache.retier(s, 0, 0, 1, c::tier::low);
  const auto blocks = cache.blocks(s, 0, 0);
  CHECK(blocks[1].level == c::tier::low);
  CHECK(blocks[1].valid.count() == 62);
  CHECK(cache.usage().tiers[0].used == usage.tiers[0].used - 1);
  CHECK(cache.usage().tiers[2].used == usage.tiers[2].used + 1);

  // Reference: the block's fp16 tokens (holes included) through the low tier's own format,
  // with the per-head metadata the cache calibrated.
  using K = q::format_traits<q::fp2plus_channel_g64>;
  using V = q::format_traits<q::fp2plus_g16>;
  const auto& params = cache.params<2>(s, 0, 0);
  REQUIRE(params.calibrated);
  std::vector<float> bk(64 * kHeadDim), bv(64 * kHeadDim);
  for (int t = 0; t < 64; ++t) {
    for (int d = 0; d < kHeadDim; ++d) {
      bk[t * kHeadDim + d] = static_cast<float>(oscar::half(k.view().row(4 + 64 + t, 0)[d]));
      bv[t * kHeadDim + d] = static_cast<float>(oscar::half(v.view().row(4 + 64 + t, 0)[d]));
    }
  }
  std::vector<K::block> kb(q::blocks_per_tile<q::fp2plus_channel_g64>(kHeadDim));
  K::encode_tile(bk.data(), kHeadDim, params.key, kb.data());
  std::vector<float> rk(bk.size()), rv(bv.size());
  K::decode_tile(kb.data(), kHeadDim, params.key, rk.data());
  for (int t = 0; t < 64; ++t) {
    std::vector<V::block> vb(q::blocks_per_tile<q::fp2plus_g16>(kHeadDim));
    V::encode_tile(bv.data() + t * kHeadDim, kHeadDim, params.value, vb.data());
    V::decode_tile(vb.data(), kHeadDim, params.value, rv.data() + t * kHeadDim);
  }
  const auto after = cache.gather(s, 0)[0];
  REQUIRE(after.tokens == before.tokens);
  index_t row = 4 + 64;  // entry position of block 1's first valid token
  for (int t = 0; t < 64; ++t) {
    if (t == 6 || t == 7) continue;  // the evicted holes
    for (int d = 0; d < kHeadDim; d += 7) {
      CHECK(after.k[row * kHeadDim + d] == rk[t * kHeadDim + d]);
      CHECK(after.v[row * kHeadDim + d] == rv[t * kHeadDim + d]);
    }
    ++row;
  }
  // Blocks 0 and 2, sinks and window decode as before.
  for (index_t t = 0; t < 4 + 64; ++t) CHECK(after.k[t * kHeadDim] == before.k[t * kHeadDim]);
  for (index_t t = 4 + 126; t < after.tokens; ++t) CHECK(after.v[t * kHeadDim] == before.v[t * kHeadDim]);

  // Same tier: nothing; a full pool: nothing changes.
  cache.retier(s, 0, 0, 1, c::tier::low);
  CHECK(cache.blocks(s, 0, 0)[1].id == blocks[1].id);
  CHECK(error_from([&] { cache.retier(s, 0, 0, 3, c::tier::low); }).has_value());
  mixed_cache tight(config(1, 1, 64, 4, 64), {.full = 1 << 20, .mid = 0, .low = 1 << 20},
                    [](const c::block_request&) { return c::tier::full; });
  const c::seq_id t2 = tight.create();
  feed(tight, t2, 0, k, v, 0, 200);
  const auto u = tight.usage();
  CHECK(error_from([&] { tight.retier(t2, 0, 0, 0, c::tier::mid); })->code() ==
        oscar::errc::out_of_memory);
  CHECK(tight.usage() == u);
}

TEST_CASE("compact returns the new entry order", "[policy]") {
  const auto k = oscar::testing::synthetic_keys(120, 1, kHeadDim, 8);
  const auto v = oscar::testing::synthetic_values(120, 1, kHeadDim, 9);
  token_cache cache(config(1, 1, 16, 2, 8), kBudget);
  const c::seq_id s = cache.create();
  feed(cache, s, 0, k, v, 0, 120);
  std::vector<index_t> drop;
  for (index_t t = 5; t < 100; t += 3) drop.push_back(t);
  cache.evict(s, 0, 0, drop);
  const auto before = cache.gather(s, 0)[0];
  std::vector<float> importance(static_cast<std::size_t>(before.tokens));
  std::mt19937 rng(1);
  for (float& x : importance) x = static_cast<float>(rng() % 1000);
  const std::vector<index_t> order = cache.compact(s, 0, 0, importance);
  const auto after = cache.gather(s, 0)[0];
  REQUIRE(static_cast<index_t>(order.size()) == after.tokens);
  std::vector<index_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  std::vector<index_t> iota(sorted.size());
  std::iota(iota.begin(), iota.end(), index_t{0});
  CHECK(sorted == iota);
  for (index_t i = 0; i < after.tokens; ++i) {
    for (int d = 0; d < kHeadDim; ++d) {
      REQUIRE(after.k[i * kHeadDim + d] == before.k[order[i] * kHeadDim + d]);
      REQUIRE(after.v[i * kHeadDim + d] == before.v[order[i] * kHeadDim + d]);
    }
  }
}

namespace {

/// Runs `policy` over a synthetic sequence through a driver, with host decode attention and
/// statistics for every step; also accumulates, by token identity, the attention each token
/// received (the independent reference of the driver's H2O scores).
template <class Cache, class P>
struct simulation {
  static constexpr int layers = 2, kv_heads = 2, q_heads = 4;
  P& policy;
  Cache cache;
  c::seq_id seq;
  p::driver<P, Cache> driver;
  oscar::testing::dense_kv k, v;
  bool track = true;  // accumulate by_token (needs keys that decode exactly: fp16 tiers)
  std::vector<std::map<std::pair<float, float>, double>> by_token;  // per (layer, head): K[0..1] -> mass

  simulation(P& pol, c::cache_config cfg, index_t tokens, p::driver_options opt)
      : policy(pol), cache(cfg, kBudget, p::tier_hook(pol)), seq(cache.create()),
        driver(pol, cache, seq, opt),
        k(oscar::testing::synthetic_keys(tokens, kv_heads, kHeadDim, 11)),
        v(oscar::testing::synthetic_values(tokens, kv_heads, kHeadDim, 12)),
        by_token(layers * kv_heads) {}

  void run(index_t from, index_t to) {
    std::vector<float> out(q_heads * kHeadDim);
    for (index_t t = from; t < to; ++t) {
      const auto qv = oscar::testing::gaussian_kv(1, q_heads, kHeadDim, 1000 + static_cast<std::uint64_t>(t), 0.3f);
      for (int l = 0; l < layers; ++l) {
        cache.append(seq, l, k.view().slice_tokens(t, 1), v.view().slice_tokens(t, 1));
        std::vector<oscar::attention::kv_head_stats> stats;
        const c::seq_id seqs[] = {seq};
        oscar::attention::decode(oscar::backend::host{}, cache, l, seqs, qv.view(),
                                 oscar::make_kv_view(out.data(), 1, q_heads, kHeadDim),
                                 {.q_heads = q_heads, .want_stats = true}, &stats);
        for (int h = 0; h < kv_heads && track; ++h) {
          const auto g = cache.gather(seq, l)[h];
          for (index_t i = 0; i < g.tokens; ++i)
            by_token[l * kv_heads + h][{g.k[i * kHeadDim], g.k[i * kHeadDim + 1]}] += stats[h].token_mass[i];
        }
        driver.observe(l, stats, oscar::make_kv_view<const float>(out.data(), 1, q_heads, kHeadDim));
      }
      driver.end_step();
    }
  }

  /// Block-region tokens of (layer, head) by the input token they hold (fp16 keys match).
  std::vector<index_t> block_tokens(int l, int h) const {
    const auto g = cache.gather(seq, l)[h];
    const auto view = cache.view(seq, l, h);
    const index_t sinks = static_cast<index_t>(view.sink_k.size()) / kHeadDim;
    const index_t window = static_cast<index_t>(view.window_k.size()) / kHeadDim;
    std::vector<index_t> ids;
    for (index_t i = sinks; i < g.tokens - window; ++i) {
      for (index_t t = 0; t < k.tokens; ++t) {
        if (static_cast<float>(oscar::half(k.view().row(t, h)[0])) == g.k[i * kHeadDim] &&
            static_cast<float>(oscar::half(k.view().row(t, h)[1])) == g.k[i * kHeadDim + 1]) {
          ids.push_back(t);
          break;
        }
      }
    }
    return ids;
  }
};

}  // namespace

TEST_CASE("the driver's token scores follow evictions and compactions", "[policy]") {
  p::h2o policy{.bits_budget = 4.0, .interval = 8};
  simulation<token_cache, p::h2o> sim(policy, config(2, 2, 16, 2, 8), 90, {.prefill_tokens = 40});
  sim.run(0, 90);
  CHECK(sim.driver.prefilled());
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      const auto g = sim.cache.gather(sim.seq, l)[h];
      const auto& scores = sim.driver.scores(l, h);
      REQUIRE(scores.size() == g.tokens);
      for (index_t i = 0; i < g.tokens; ++i) {
        CHECK(scores.accumulated()[static_cast<std::size_t>(i)] ==
              Approx(sim.by_token[l * 2 + h].at({g.k[i * kHeadDim], g.k[i * kHeadDim + 1]})).epsilon(1e-9));
      }
    }
  }
}

TEST_CASE("h2o keeps the budget's share of heavy hitters, streaming the newest", "[policy]") {
  // H2O: after a hook, the block region holds floor(region * 4/16) tokens, the evicted ones
  // scoring no more than any kept one at that hook (checked through a hook run by hand).
  p::h2o policy{.bits_budget = 4.0, .interval = 1000};
  simulation<token_cache, p::h2o> sim(policy, config(2, 2, 16, 2, 8), 80, {.prefill_tokens = 1000});
  sim.run(0, 80);
  const p::context ctx = sim.driver.make_context();
  const p::decision d = policy.on_decode(ctx);
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      const p::head_view& hv = ctx.at(l, h);
      const index_t n = hv.block_tokens();
      const index_t keep = static_cast<index_t>(std::floor(n * 0.25));
      std::vector<double> region(hv.scores->accumulated().begin() + hv.sinks,
                                 hv.scores->accumulated().begin() + hv.sinks + n);
      std::vector<double> sorted = region;
      std::sort(sorted.rbegin(), sorted.rend());
      index_t evicted = 0;
      for (const p::range_action& r : d.ranges) {
        if (r.layer != l || r.head != h) continue;
        CHECK(r.what == p::action::evict);
        for (index_t pos = r.first; pos < r.first + r.count; ++pos) {
          CHECK(region[static_cast<std::size_t>(pos - hv.sinks)] <= sorted[static_cast<std::size_t>(keep - 1)]);
          ++evicted;
        }
      }
      CHECK(evicted == n - keep);
    }
  }
  sim.driver.apply(d);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h)
      CHECK(sim.cache.tokens(sim.seq, l, h) == 2 + static_cast<index_t>(std::floor((80 - 2 - 8) * 0.25)) + 8);
  CHECK(sim.driver.usage().bits_per_element() <= 4.0 + 1e-9);
  CHECK(sim.driver.usage().bits_per_element() > 3.5);

  // StreamingLLM: the kept block tokens are the newest ones, in order.
  p::streaming st{.bits_budget = 4.0, .interval = 5};
  simulation<token_cache, p::streaming> ss(st, config(2, 2, 16, 2, 8), 100, {.prefill_tokens = 20});
  ss.run(0, 100);
  ss.driver.finish();
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      const auto ids = ss.block_tokens(l, h);
      const index_t region = 100 - 2 - 8;
      const auto keep = static_cast<index_t>(std::floor(region * 0.25));
      REQUIRE(static_cast<index_t>(ids.size()) == keep);
      for (index_t i = 0; i < keep; ++i) CHECK(ids[static_cast<std::size_t>(i)] == 2 + region - keep + i);
    }
  }
  // Blocks emptied by eviction went back to the pool: the kept tokens fit in few blocks.
  CHECK(ss.cache.usage().tiers[0].used <= 4 * ((22 + 15) / 16 + 1));
}

TEST_CASE("snapkv keeps the tokens the observation window votes for", "[policy]") {
  // A hand-made context: one head, 2 sinks, 10 block tokens, 2 window tokens.
  p::head_view h;
  h.tokens = 14;
  h.sinks = 2;
  h.window = 2;
  const std::vector<std::vector<double>> obs{{0, 0, 0, 0, 0.9, 0, 0, 0, 0, 0, 0, 0, 0, 0.1},
                                             {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.8, 0, 0, 0.2}};
  h.observation = obs;
  const p::head_view heads[] = {h};
  p::context ctx;
  ctx.layers = ctx.kv_heads = 1;
  ctx.tier_bits = {16, 4.5, 2.5};
  ctx.heads = heads;
  const p::snapkv sk{.bits_budget = 16.0 * 6 / 10, .kernel = 3};  // keep 6 of 10
  const p::decision d = sk.on_prefill(ctx);
  std::vector<bool> kept(14, true);
  for (const p::range_action& r : d.ranges) {
    CHECK(r.what == p::action::evict);
    for (index_t i = r.first; i < r.first + r.count; ++i) kept[static_cast<std::size_t>(i)] = false;
  }
  // Votes pooled with kernel 3 around positions 4 and 10: 3,4,5 and 9,10,11 are kept of the
  // block tokens 2..11; sinks (0, 1) and window (12, 13) stay.
  CHECK(kept == std::vector<bool>{true, true, false, true, true, true, false, false, false, true,
                                  true, true, true, true});
  REQUIRE(d.compactions.size() == 1);
  CHECK(d.compactions[0].importance.size() == 14 - 4);
}

TEST_CASE("uniform prunes the heads a threshold drops, keeping a floor per layer", "[policy]") {
  imp::head_scores grads = imp::head_scores::zeros(2, 2);
  grads.values = {0.2, 1.0, 0.1, 0.05};
  for (const double t : {0.5, 0.8, 0.95}) {
    p::uniform u{.prune = imp::threshold::relative_to_max(t), .prune_floor = 1};
    mixed_cache cache(config(2, 2, 64, 4, 16), kBudget, p::tier_hook(u));
    const c::seq_id s = cache.create();
    p::driver<p::uniform, mixed_cache, p::capabilities{.attention_stats = false, .gradients = true}>
        d(u, cache, s, grads, {.prefill_tokens = 100});
    const auto k = oscar::testing::synthetic_keys(120, 2, kHeadDim, 13);
    for (index_t i = 0; i < 120; ++i) {
      for (int l = 0; l < 2; ++l) cache.append(s, l, k.view().slice_tokens(i, 1), k.view().slice_tokens(i, 1));
      d.end_step();
    }
    const auto keep = imp::select_heads(grads, imp::threshold::relative_to_max(t), 1);
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) CHECK(cache.pruned(s, l, h) == !keep[l * 2 + h]);
    CHECK(d.usage().pruned_heads == 2);  // (0, 0) below every t; layer 1 keeps its best head
    for (int l = 0; l < 2; ++l)
      CHECK((!cache.pruned(s, l, 0) || !cache.pruned(s, l, 1)));
  }
}

namespace {

/// attention_aware over a synthetic sequence on `Cache` with blocks of `block_tokens`: the
/// budget is met and spent.
template <class Cache>
void check_budget(int block_tokens, index_t tokens) {
  for (const double budget : {3.0, 2.0}) {
    INFO("budget " << budget << ", blocks of " << block_tokens);
    p::attention_aware aa;
    aa.bits_budget = budget;
    aa.evict_threshold = 0.0;  // the budget alone decides here
    simulation<Cache, p::attention_aware> sim(aa, config(2, 2, block_tokens, 4, 32), tokens,
                                              {.prefill_tokens = 100});
    sim.track = false;
    sim.run(0, tokens);
    sim.driver.finish();
    const p::region_usage u = sim.driver.usage();
    CHECK(u.bits_per_element() <= budget + 1e-9);
    CHECK(u.bits_per_element() > budget - 0.5);  // the budget is spent, not left over
    if (budget >= 2.5) {
      CHECK(u.block_tokens[1] > 0);  // budget above 2-bit: some blocks at 4 bits
      CHECK(u.evicted_tokens == 0);
    } else {
      CHECK(u.evicted_tokens > 0);  // below 2.5 bits, eviction pays
    }
  }
}

}  // namespace

TEST_CASE("attention_aware stages blocks, then stores them under the bits budget", "[policy]") {
  check_budget<mixed_cache>(64, 360);     // FP2+ with 64-token per-channel keys
  check_budget<c::kv_cache<>>(128, 300);  // the default FP2+ (128-token key groups)

  // The decision on a hand-made state: three staged blocks of one head and a budget of
  // (4.5 + 2.5 + 0) / 3 bits: the best block at 4 bits, the next at 2, the least evicted.
  {
    imp::token_scores s;
    std::vector<double> mass(4 + 192 + 8, 0.0);
    for (int t = 0; t < 64; ++t) {
      mass[4 + t] = 0.002;         // block 0: middling
      mass[4 + 64 + t] = 0.0001;   // block 1: least
      mass[4 + 128 + t] = 0.004;   // block 2: most
    }
    s.observe(mass);
    p::head_view h;
    h.tokens = 4 + 192 + 8;
    h.sinks = 4;
    h.window = 8;
    h.appended = h.tokens;
    h.scores = &s;
    for (int b = 0; b < 3; ++b) h.blocks.push_back({c::tier::full, 4 + 64 * b, 64, 64});
    const p::head_view heads[] = {h};
    p::context ctx;
    ctx.layers = ctx.kv_heads = 1;
    ctx.block_tokens = 64;
    ctx.tier_bits = {16, 4.5, 2.5};
    ctx.heads = heads;
    p::attention_aware a;
    a.bits_budget = 7.0 / 3.0;
    const p::decision d = a.on_decode(ctx);
    std::map<index_t, p::action> by_block;
    for (const p::range_action& r : d.ranges) by_block[r.first] = r.what;
    CHECK(by_block.at(4) == p::action::store_low);
    CHECK(by_block.at(4 + 64) == p::action::evict);
    CHECK(by_block.at(4 + 128) == p::action::store_mid);

    // Budget for the best block at full precision and the next at 4 bits: 16 + 4.5 + 0.
    a.bits_budget = (16.0 + 4.5) / 3;
    by_block.clear();
    for (const p::range_action& r : a.on_decode(ctx).ranges) by_block[r.first] = r.what;
    CHECK(by_block.at(4) == p::action::store_mid);
    CHECK(by_block.at(4 + 64) == p::action::evict);
    CHECK(by_block.count(4 + 128) == 0);  // kept at full precision: no action, still staged

    // The relative threshold evicts whatever scores below it, budget or not.
    a.bits_budget = 16.0;
    a.evict_threshold = 0.6;  // cut 0.0024: blocks 0 and 1
    by_block.clear();
    for (const p::range_action& r : a.on_decode(ctx).ranges) by_block[r.first] = r.what;
    CHECK(by_block.at(4) == p::action::evict);
    CHECK(by_block.at(4 + 64) == p::action::evict);
    CHECK(by_block.count(4 + 128) == 0);
  }
}

TEST_CASE("the driver refuses malformed decisions before applying any", "[policy]") {
  p::uniform u;
  mixed_cache cache(config(1, 2, 64, 4, 16), kBudget, p::tier_hook(u));
  const c::seq_id s = cache.create();
  p::driver d(u, cache, s);
  const auto k = oscar::testing::synthetic_keys(100, 2, kHeadDim, 14);
  for (index_t i = 0; i < 100; ++i) cache.append(s, 0, k.view().slice_tokens(i, 1), k.view().slice_tokens(i, 1));
  const auto before = cache.usage();
  p::decision bad;
  bad.heads.push_back({0, 1, p::action::prune});
  bad.ranges.push_back({0, 0, 90, 20, p::action::evict});  // past the end
  CHECK(error_from([&] { d.apply(bad); }).has_value());
  CHECK(cache.usage() == before);
  CHECK_FALSE(cache.pruned(s, 0, 1));
  p::decision range_prune;
  range_prune.ranges.push_back({0, 0, 0, 1, p::action::prune});
  CHECK_THAT(error_from([&] { d.apply(range_prune); })->what(),
             Catch::Matchers::ContainsSubstring("prune is a head action"));
  p::decision head_evict;
  head_evict.heads.push_back({0, 0, p::action::evict});
  CHECK(error_from([&] { d.apply(head_evict); }).has_value());
  p::decision bad_head;
  bad_head.heads.push_back({1, 0, p::action::prune});
  CHECK(error_from([&] { d.apply(bad_head); }).has_value());
  CHECK(cache.usage() == before);
}

TEST_CASE("a decision that might not fit the pools changes nothing", "[policy]") {
  // Room for exactly one block in the mid tier: a decision that prunes head 1 and retiers two
  // blocks of head 0 to mid would run out of memory at its second retier. The driver counts the
  // blocks first, so neither the prune nor the first retier happens.
  const std::size_t mid_block = mixed_cache(config(1, 2, 64, 4, 16), kBudget).usage().tiers[1].block_bytes;
  p::uniform u;
  mixed_cache cache(config(1, 2, 64, 4, 16), {.full = 1 << 21, .mid = mid_block, .low = 1 << 21},
                    [](const c::block_request&) { return c::tier::full; });
  const c::seq_id s = cache.create();
  const auto k = oscar::testing::synthetic_keys(160, 2, kHeadDim, 21);
  const auto v = oscar::testing::synthetic_values(160, 2, kHeadDim, 22);
  feed(cache, s, 0, k, v, 0, 160);
  REQUIRE(cache.blocks(s, 0, 0).size() == 2);
  p::driver d(u, cache, s);
  const auto usage = cache.usage();
  const auto before = cache.gather(s, 0);

  p::decision two;
  two.heads.push_back({0, 1, p::action::prune});
  two.ranges.push_back({0, 0, 4, 128, p::action::store_mid});
  const auto err = error_from([&] { d.apply(two); });
  REQUIRE(err.has_value());
  CHECK(err->code() == oscar::errc::out_of_memory);
  CHECK_THAT(err->what(), Catch::Matchers::ContainsSubstring("nothing was changed"));
  CHECK(cache.usage() == usage);
  CHECK_FALSE(cache.pruned(s, 0, 1));
  const auto after = cache.gather(s, 0);
  for (int h = 0; h < 2; ++h) {
    CHECK(after[h].k == before[h].k);
    CHECK(after[h].v == before[h].v);
  }
  CHECK(cache.blocks(s, 0, 0)[0].level == c::tier::full);

  // One block fits: the same decision for one block applies whole.
  p::decision one;
  one.heads.push_back({0, 1, p::action::prune});
  one.ranges.push_back({0, 0, 4, 64, p::action::store_mid});
  d.apply(one);
  CHECK(cache.pruned(s, 0, 1));
  CHECK(cache.blocks(s, 0, 0)[0].level == c::tier::mid);
  CHECK(cache.blocks(s, 0, 0)[1].level == c::tier::full);

  // Retiering a block back and forth in one decision releases what it takes: mid -> low frees
  // the mid block, so a later full -> mid fits.
  p::decision swap;
  swap.ranges.push_back({0, 0, 4, 64, p::action::store_low});
  swap.ranges.push_back({0, 0, 68, 64, p::action::store_mid});
  d.apply(swap);
  CHECK(cache.blocks(s, 0, 0)[0].level == c::tier::low);
  CHECK(cache.blocks(s, 0, 0)[1].level == c::tier::mid);

  // A compaction whose importance does not match the tokens left after the decision's
  // evictions is refused before the evictions run.
  const index_t n = cache.tokens(s, 0, 0);
  p::decision compaction;
  compaction.ranges.push_back({0, 0, 10, 5, p::action::evict});
  compaction.compactions.push_back({0, 0, std::vector<float>(static_cast<std::size_t>(n), 1.0f)});
  CHECK_THAT(error_from([&] { d.apply(compaction); })->what(),
             Catch::Matchers::ContainsSubstring("one per token left after the decision's evictions"));
  CHECK(cache.tokens(s, 0, 0) == n);
  compaction.compactions[0].importance.resize(static_cast<std::size_t>(n - 5));
  d.apply(compaction);
  CHECK(cache.tokens(s, 0, 0) == n - 5);
}

TEST_CASE("policy traits and the concept", "[policy]") {
  static_assert(p::cache_policy<p::uniform>);
  static_assert(p::cache_policy<p::streaming>);
  static_assert(p::cache_policy<p::h2o>);
  static_assert(p::cache_policy<p::snapkv>);
  static_assert(p::cache_policy<p::attention_aware>);
  static_assert(!p::policy_traits<p::uniform>::needs_attention_stats);
  static_assert(p::policy_traits<p::h2o>::needs_attention_stats);
  static_assert(!p::policy_traits<p::attention_aware>::needs_gradients);
  struct no_decode {
    c::tier on_append(const c::block_request&) { return c::tier::low; }
    p::decision on_prefill(const p::context&) { return {}; }
    index_t decode_interval() const { return 0; }
  };
  static_assert(!p::cache_policy<no_decode>);
  static_assert(p::has_on_prefill<no_decode> && !p::has_on_decode<no_decode>);
  SUCCEED("checked at compile time");
}
