// SPDX-License-Identifier: Apache-2.0
// oscar-custom-policy (examples/custom_policy.cpp): a cache policy written by a user, plugged into
// the mini engine. The policy, `hot_blocks`, stores each new block at 4 bits and, every 32
// steps, moves the complete blocks that get less than their head's average attention to 2 bits.
// The program runs the shipped model over held-out text with a lossless fp32 cache and with
// the policy, and prints the bits the policy stored and what they cost the model.
//
//   oscar-custom-policy [--max-tokens N] [--model PATH] [--text PATH]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "engine/llama.hpp"
#include "oscar/oscar.hpp"

#ifndef OSCAR_SOURCE_DIR
#define OSCAR_SOURCE_DIR "."
#endif

namespace pol = oscar::policy;
namespace c = oscar::cache;

// ---- the user's policy: every hook of oscar::policy::cache_policy -----------------------------
struct hot_blocks {
  static constexpr bool needs_attention_stats = true;  // it reads h.scores

  c::tier on_append(const c::block_request&) const { return c::tier::mid; }
  pol::decision on_prefill(const pol::context& ctx) const { return on_decode(ctx); }
  pol::decision on_decode(const pol::context& ctx) const {
    pol::decision d;
    for (const pol::head_view& h : ctx.heads) {
      const std::vector<double> a = h.scores->normalized();  // ZipCache-normalized attention
      double head_mean = 0.0;
      for (oscar::index_t t = h.sinks; t < h.tokens - h.window; ++t) head_mean += a[t];
      head_mean /= std::max<double>(1.0, static_cast<double>(h.block_tokens()));
      for (const pol::block_info& b : h.blocks) {
        if (b.level != c::tier::mid || b.fill < ctx.block_tokens || b.valid == 0) continue;
        double block_mean = 0.0;
        for (oscar::index_t t = b.first; t < b.first + b.valid; ++t) block_mean += a[t];
        if (block_mean / static_cast<double>(b.valid) < head_mean)
          d.ranges.push_back({h.layer, h.head, b.first, b.valid, pol::action::store_low});
      }
    }
    return d;
  }
  oscar::index_t decode_interval() const { return 32; }
};
static_assert(pol::cache_policy<hot_blocks>);

// ---- running it ---------------------------------------------------------------------------------
int main(int argc, char** argv) {
  std::string model_path = OSCAR_SOURCE_DIR "/examples/models/kjv-byte.bin";
  std::string text_path = OSCAR_SOURCE_DIR "/examples/data/kjv-heldout.txt";
  int max_tokens = 512;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--max-tokens") max_tokens = std::atoi(argv[i + 1]);
    else if (flag == "--model") model_path = argv[i + 1];
    else if (flag == "--text") text_path = argv[i + 1];
    else {
      std::fprintf(stderr, "usage: oscar-custom-policy [--max-tokens N] [--model PATH] [--text PATH]\n");
      return 2;
    }
  }
  try {
    const oscar_engine::model model = oscar_engine::model::load(model_path);
    std::vector<int> tokens;
    std::ifstream in(text_path, std::ios::binary);
    for (char ch; static_cast<int>(tokens.size()) < std::min(max_tokens, model.config().seq_len) && in.get(ch);)
      tokens.push_back(static_cast<unsigned char>(ch));
    if (tokens.size() < 2) throw oscar::error(oscar::errc::invalid_argument, "need at least 2 tokens of text");

    // Reference: the lossless fp32 cache.
    using ref_cache = c::kv_cache<oscar::quant::kv_fp32, oscar::quant::kv_fp32, oscar::quant::kv_fp32>;
    const c::cache_config ref_cfg = oscar_engine::cache_config_for(model, 0, 0);
    ref_cache reference(ref_cfg, oscar_engine::pool_budget_for<ref_cache>(model, ref_cfg));
    oscar_engine::session<ref_cache> ref(model, reference);

    // The policy: FP2+ (low), FP4+ (mid), fp16 (full) tiers; the tier hook is the policy's.
    using cache_type = c::kv_cache<oscar::quant::fp2plus, oscar::quant::fp4plus, oscar::quant::kv_fp16>;
    hot_blocks policy;
    const c::cache_config cfg = oscar_engine::cache_config_for(model, 4, 64);
    cache_type cache(cfg, oscar_engine::pool_budget_for<cache_type>(model, cfg), pol::tier_hook(policy));
    oscar_engine::session<cache_type> s(model, cache);
    pol::driver driver(policy, cache, s.sequence(), {.prefill_tokens = 128});
    s.observe_attention([&](int layer, std::span<const oscar::attention::kv_head_stats> stats,
                            oscar::kv_view<const float> out) { driver.observe(layer, stats, out); });

    double kl = 0.0;
    int agree = 0;
    for (int token : tokens) {
      const auto p = ref.step(token);
      const auto q = s.step(token);
      driver.end_step();
      const auto log_z = [](std::span<const float> x) {
        const float m = *std::max_element(x.begin(), x.end());
        double z = 0.0;
        for (float v : x) z += std::exp(double(v) - m);
        return m + std::log(z);
      };
      const double lp = log_z(p), lq = log_z(q);
      for (std::size_t v = 0; v < p.size(); ++v)
        kl += std::exp(p[v] - lp) * ((p[v] - lp) - (q[v] - lq));
      agree += std::max_element(p.begin(), p.end()) - p.begin() ==
               std::max_element(q.begin(), q.end()) - q.begin();
    }
    driver.finish();
    const pol::region_usage u = driver.usage();
    std::printf("oscar-custom-policy: hot_blocks over %zu held-out bytes (sinks 4, window 64)\n",
                tokens.size());
    std::printf("  stored: %.3f bits/element of the quantized region (%lld tokens at 4 bits, %lld at 2 bits)\n",
                u.bits_per_element(), static_cast<long long>(u.block_tokens[1]),
                static_cast<long long>(u.block_tokens[2]));
    std::printf("  vs the fp32 cache: KL %.3e nats/token, top-1 agreement %.4f\n",
                kl / static_cast<double>(tokens.size()), agree / static_cast<double>(tokens.size()));
  } catch (const oscar::error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
