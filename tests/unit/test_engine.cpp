// SPDX-License-Identifier: Apache-2.0
// The mini LLaMA engine of examples/engine: the llama2.c checkpoint loader (exact weights back,
// malformed files rejected) and the session over an OSCAR cache against an independent float64
// forward pass (full causal attention recomputed over every position, no cache, run.c math).
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "engine/llama.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/formats.hpp"
#include "support.hpp"

namespace c = oscar::cache;
namespace q = oscar::quant;
using Catch::Matchers::ContainsSubstring;
using oscar_test::error_from;

namespace {

/// A tiny random model, every tensor stacked over layers exactly as the file stores it.
struct tiny_model {
  int dim = 128, hidden = 96, layers = 2, heads = 2, kv_heads = 1, vocab = 40, seq_len = 24;
  bool shared = true;
  std::vector<float> emb, attn_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final_norm, rope, cls;

  int hd() const { return dim / heads; }
  int kv_dim() const { return kv_heads * hd(); }
};

tiny_model make_tiny(bool shared, std::uint32_t seed = 7) {
  tiny_model t;
  t.shared = shared;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const auto fill = [&](std::vector<float>& x, std::size_t n, float scale, float offset = 0.0f) {
    x.resize(n);
    for (float& e : x) e = offset + scale * u(rng);
  };
  const auto D = static_cast<std::size_t>(t.dim), H = static_cast<std::size_t>(t.hidden),
             L = static_cast<std::size_t>(t.layers), KV = static_cast<std::size_t>(t.kv_dim()),
             V = static_cast<std::size_t>(t.vocab);
  // Uniform(-a, a) with a = sqrt(3 / fan_in): unit-variance activations through each matrix.
  const float in_dim = std::sqrt(3.0f / t.dim), in_hidden = std::sqrt(3.0f / t.hidden);
  fill(t.emb, V * D, 1.7f);
  fill(t.attn_norm, L * D, 0.2f, 1.0f);
  fill(t.wq, L * D * D, in_dim);
  fill(t.wk, L * KV * D, in_dim);
  fill(t.wv, L * KV * D, in_dim);
  fill(t.wo, L * D * D, in_dim);
  fill(t.ffn_norm, L * D, 0.2f, 1.0f);
  fill(t.w1, L * H * D, in_dim);
  fill(t.w2, L * D * H, in_hidden);
  fill(t.w3, L * H * D, in_dim);
  fill(t.final_norm, D, 0.2f, 1.0f);
  fill(t.rope, 2 * static_cast<std::size_t>(t.seq_len) * (t.hd() / 2), 1.0f);
  if (!shared) fill(t.cls, V * D, 1.0f);
  return t;
}

/// The llama2.c legacy checkpoint of `t`.
std::vector<std::byte> serialize(const tiny_model& t) {
  std::vector<std::byte> out;
  const auto put = [&](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    out.insert(out.end(), b, b + n);
  };
  const std::int32_t header[7] = {t.dim,      t.hidden, t.layers, t.heads, t.kv_heads,
                                  t.shared ? t.vocab : -t.vocab, t.seq_len};
  put(header, sizeof header);
  for (const auto* x : {&t.emb, &t.attn_norm, &t.wq, &t.wk, &t.wv, &t.wo, &t.ffn_norm, &t.w1,
                        &t.w2, &t.w3, &t.final_norm, &t.rope}) {
    put(x->data(), x->size() * sizeof(float));
  }
  if (!t.shared) put(t.cls.data(), t.cls.size() * sizeof(float));
  return out;
}

oscar_engine::model load(const std::vector<std::byte>& bytes) {
  return oscar_engine::model::from_bytes(bytes);
}

/// Layer `l` of a stacked tensor with `n` elements per layer.
std::vector<float> slice(const std::vector<float>& x, int l, std::size_t n) {
  return {x.begin() + static_cast<std::ptrdiff_t>(l * n),
          x.begin() + static_cast<std::ptrdiff_t>((l + 1) * n)};
}

// ---- float64 reference forward pass ------------------------------------------------------

using vec = std::vector<double>;

vec matvec(const std::vector<float>& w, std::size_t offset, int rows, int cols, const vec& x) {
  vec y(static_cast<std::size_t>(rows), 0.0);
  for (int r = 0; r < rows; ++r) {
    double s = 0;
    for (int k = 0; k < cols; ++k) s += double(w[offset + static_cast<std::size_t>(r) * cols + k]) * x[k];
    y[r] = s;
  }
  return y;
}

vec rmsnorm(const vec& x, const std::vector<float>& w, std::size_t offset) {
  double ss = 0;
  for (double e : x) ss += e * e;
  const double inv = 1.0 / std::sqrt(ss / double(x.size()) + 1e-5);
  vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * w[offset + i];
  return y;
}

void rope(vec& x, int heads, int hd, int pos) {
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < hd / 2; ++i) {
      const double theta = pos * std::pow(10000.0, -2.0 * i / hd);
      double& a = x[static_cast<std::size_t>(h * hd + 2 * i)];
      double& b = x[static_cast<std::size_t>(h * hd + 2 * i + 1)];
      const double a0 = a, b0 = b;
      a = a0 * std::cos(theta) - b0 * std::sin(theta);
      b = a0 * std::sin(theta) + b0 * std::cos(theta);
    }
  }
}

double to_fp16(double x) { return static_cast<float>(oscar::half(static_cast<float>(x))); }

struct reference_run {
  std::vector<vec> logits;                  // [tokens][vocab]
  std::vector<std::vector<vec>> attention;  // [tokens][layers][heads * hd]
};

/// The whole sequence at once: every layer's q, k, v for all positions, then causal attention
/// recomputed for each position over positions 0..t. `fp16_kv` rounds K and V to fp16 as they
/// would be stored.
reference_run reference_forward(const tiny_model& t, const std::vector<int>& tokens, bool fp16_kv) {
  const int T = static_cast<int>(tokens.size()), D = t.dim, hd = t.hd(), KV = t.kv_dim(),
            H = t.hidden, Q = t.heads * hd;
  const int group = t.heads / t.kv_heads;
  std::vector<vec> x(static_cast<std::size_t>(T));
  for (int p = 0; p < T; ++p) {
    x[p].resize(static_cast<std::size_t>(D));
    for (int i = 0; i < D; ++i) x[p][i] = t.emb[static_cast<std::size_t>(tokens[p] * D + i)];
  }
  reference_run r;
  r.attention.assign(static_cast<std::size_t>(T), std::vector<vec>(static_cast<std::size_t>(t.layers)));
  for (int l = 0; l < t.layers; ++l) {
    const auto L = static_cast<std::size_t>(l);
    std::vector<vec> qs(T), ks(T), vs(T);
    for (int p = 0; p < T; ++p) {
      const vec xb = rmsnorm(x[p], t.attn_norm, L * D);
      qs[p] = matvec(t.wq, L * Q * D, Q, D, xb);
      ks[p] = matvec(t.wk, L * KV * D, KV, D, xb);
      vs[p] = matvec(t.wv, L * KV * D, KV, D, xb);
      rope(qs[p], t.heads, hd, p);
      rope(ks[p], t.kv_heads, hd, p);
      if (fp16_kv) {
        for (double& e : ks[p]) e = to_fp16(e);
        for (double& e : vs[p]) e = to_fp16(e);
      }
    }
    for (int p = 0; p < T; ++p) {
      vec att(static_cast<std::size_t>(Q), 0.0);
      for (int h = 0; h < t.heads; ++h) {
        const int kvh = h / group;
        vec score(static_cast<std::size_t>(p + 1));
        for (int u = 0; u <= p; ++u) {
          double s = 0;
          for (int d = 0; d < hd; ++d) s += qs[p][h * hd + d] * ks[u][kvh * hd + d];
          score[u] = s / std::sqrt(double(hd));
        }
        const double m = *std::max_element(score.begin(), score.end());
        double z = 0;
        for (double& s : score) z += (s = std::exp(s - m));
        for (int u = 0; u <= p; ++u)
          for (int d = 0; d < hd; ++d) att[h * hd + d] += score[u] / z * vs[u][kvh * hd + d];
      }
      r.attention[p][L] = att;
      const vec o = matvec(t.wo, L * D * Q, D, Q, att);
      for (int i = 0; i < D; ++i) x[p][i] += o[i];
      const vec xb = rmsnorm(x[p], t.ffn_norm, L * D);
      vec a = matvec(t.w1, L * H * D, H, D, xb);
      const vec b = matvec(t.w3, L * H * D, H, D, xb);
      for (int i = 0; i < H; ++i) a[i] = a[i] / (1.0 + std::exp(-a[i])) * b[i];
      const vec f = matvec(t.w2, L * D * H, D, H, a);
      for (int i = 0; i < D; ++i) x[p][i] += f[i];
    }
  }
  const std::vector<float>& cls = t.shared ? t.emb : t.cls;
  for (int p = 0; p < T; ++p) r.logits.push_back(matvec(cls, 0, t.vocab, D, rmsnorm(x[p], t.final_norm, 0)));
  return r;
}

/// max |got - want| / max |want|.
double rel_max_err(std::span<const float> got, const vec& want) {
  REQUIRE(got.size() == want.size());
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

std::vector<int> some_tokens(int n, int vocab) {
  std::mt19937 rng(3);
  std::vector<int> out(static_cast<std::size_t>(n));
  for (int& x : out) x = static_cast<int>(rng() % static_cast<unsigned>(vocab));
  return out;
}

/// Runs the engine over `tokens` with a fresh `Cache` and compares it with `want`.
template <class Cache>
void check_engine(const tiny_model& t, const std::vector<int>& tokens, const reference_run& want,
                  int sinks, int window, double logits_tolerance, double attention_tolerance) {
  const oscar_engine::model m = load(serialize(t));
  const c::cache_config cfg = oscar_engine::cache_config_for(m, sinks, window);
  Cache cache(cfg, oscar_engine::pool_budget_for<Cache>(m, cfg));
  oscar_engine::session<Cache> s(m, cache);
  double worst_logits = 0, worst_attention = 0;
  for (std::size_t p = 0; p < tokens.size(); ++p) {
    REQUIRE(s.position() == static_cast<int>(p));
    const auto logits = s.step(tokens[p]);
    worst_logits = std::max(worst_logits, rel_max_err(logits, want.logits[p]));
    for (int l = 0; l < t.layers; ++l) {
      worst_attention = std::max(worst_attention,
                                 rel_max_err(s.attention_output(l), want.attention[p][l]));
    }
  }
  INFO("worst logits error " << worst_logits << ", attention " << worst_attention);
  CHECK(worst_logits < logits_tolerance);
  CHECK(worst_attention < attention_tolerance);
  CHECK(s.position() == static_cast<int>(tokens.size()));
  CHECK(cache.tokens(s.sequence(), t.layers - 1, 0) == static_cast<oscar::index_t>(tokens.size()));
}

using fp32_cache = c::kv_cache<q::kv_fp32, q::kv_fp32, q::kv_fp32>;

}  // namespace

// ---- loader --------------------------------------------------------------------------------

TEST_CASE("engine loader: reads back the exact weights, shared and unshared classifier",
          "[quality][engine]") {
  const bool shared = GENERATE(true, false);
  const tiny_model t = make_tiny(shared);
  const auto bytes = serialize(t);
  const oscar_engine::model m = load(bytes);
  const oscar_engine::model_config& cfg = m.config();
  CHECK(cfg.dim == t.dim);
  CHECK(cfg.hidden_dim == t.hidden);
  CHECK(cfg.n_layers == t.layers);
  CHECK(cfg.n_heads == t.heads);
  CHECK(cfg.n_kv_heads == t.kv_heads);
  CHECK(cfg.vocab_size == t.vocab);
  CHECK(cfg.seq_len == t.seq_len);
  CHECK(cfg.shared_classifier == shared);
  CHECK(cfg.head_dim() == 64);
  CHECK(oscar_engine::model::file_bytes(cfg) == bytes.size());

  const auto same = [](std::span<const float> a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), b.size() * sizeof(float)) == 0;
  };
  CHECK(same(m.token_embedding(), t.emb));
  CHECK(same(m.final_norm(), t.final_norm));
  CHECK(same(m.classifier(), shared ? t.emb : t.cls));
  const auto D = static_cast<std::size_t>(t.dim), H = static_cast<std::size_t>(t.hidden),
             KV = static_cast<std::size_t>(t.kv_dim());
  for (int l = 0; l < t.layers; ++l) {
    const oscar_engine::layer_weights& w = m.layer(l);
    CHECK(same(w.attention_norm, slice(t.attn_norm, l, D)));
    CHECK(same(w.wq, slice(t.wq, l, D * D)));
    CHECK(same(w.wk, slice(t.wk, l, KV * D)));
    CHECK(same(w.wv, slice(t.wv, l, KV * D)));
    CHECK(same(w.wo, slice(t.wo, l, D * D)));
    CHECK(same(w.ffn_norm, slice(t.ffn_norm, l, D)));
    CHECK(same(w.w1, slice(t.w1, l, H * D)));
    CHECK(same(w.w2, slice(t.w2, l, D * H)));
    CHECK(same(w.w3, slice(t.w3, l, H * D)));
  }
  CHECK(error_from([&] { (void)m.layer(t.layers); })->code() == oscar::errc::invalid_argument);

  // The same file from disk.
  const auto path = std::filesystem::temp_directory_path() /
                    ("oscar-test-engine-" + std::to_string(shared) + ".bin");
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  const oscar_engine::model from_file = oscar_engine::model::load(path);
  std::filesystem::remove(path);
  CHECK(same(from_file.token_embedding(), t.emb));
  CHECK(same(from_file.layer(1).w2, slice(t.w2, 1, D * H)));
  CHECK(same(from_file.classifier(), shared ? t.emb : t.cls));
}

TEST_CASE("engine loader: unreadable paths are invalid arguments", "[quality][engine]") {
  const auto missing = std::filesystem::temp_directory_path() / "oscar-test-engine-missing.bin";
  std::filesystem::remove(missing);
  for (const auto& path : {missing, std::filesystem::temp_directory_path()}) {
    const auto e = error_from([&] { (void)oscar_engine::model::load(path); });
    REQUIRE(e);
    CHECK(e->code() == oscar::errc::invalid_argument);
    CHECK_THAT(e->what(), ContainsSubstring("path = '" + path.string() + "'"));
  }
}

TEST_CASE("engine loader: malformed files are rejected with the field named",
          "[quality][engine]") {
  const tiny_model good = make_tiny(GENERATE(true, false));
  const auto bytes = serialize(good);
  const auto expect = [](const std::vector<std::byte>& b, const std::string& named) {
    const auto e = error_from([&] { (void)load(b); });
    REQUIRE(e);
    INFO(e->what());
    CHECK(e->code() == oscar::errc::corrupt_data);
    CHECK_THAT(e->what(), ContainsSubstring(named));
  };

  SECTION("truncated") {
    for (std::size_t n : {std::size_t{0}, std::size_t{13}, std::size_t{27}, std::size_t{28},
                          std::size_t{32}, bytes.size() / 2, bytes.size() - 4, bytes.size() - 1}) {
      INFO("truncated at " << n);
      expect({bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n)}, "file size = " + std::to_string(n));
    }
    expect({bytes.begin(), bytes.end() - 1}, "truncated");
  }
  SECTION("one extra byte") {
    auto b = bytes;
    b.push_back(std::byte{0});
    expect(b, "extra bytes");
    expect(b, "file size = " + std::to_string(bytes.size() + 1));
  }
  const auto with_field = [&](int index, std::int32_t value) {
    auto b = bytes;
    std::memcpy(b.data() + 4 * index, &value, 4);
    return b;
  };
  SECTION("zero and negative header fields") {
    const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                            "vocab_size", "seq_len"};
    for (int i = 0; i < 7; ++i) {
      INFO(names[i]);
      expect(with_field(i, 0), std::string("header field ") + names[i] + " = 0");
      if (i != 5) expect(with_field(i, -3), std::string("header field ") + names[i] + " = -3");
    }
    expect(with_field(5, std::numeric_limits<std::int32_t>::min()), "vocab_size = -2147483648");
    // A flipped vocab_size sign is a valid header: the classifier's presence changes the size.
    expect(with_field(5, good.shared ? -good.vocab : good.vocab), "file size");
  }
  SECTION("dim not divisible by n_heads, n_heads not divisible by n_kv_heads, odd head_dim") {
    expect(with_field(3, 3), "dim = 128 is not allowed (allowed: a multiple of n_heads = 3)");
    expect(with_field(4, 3), "n_kv_heads = 3 is not allowed (allowed: a divisor of n_heads = 2)");
    auto b = with_field(3, 4);
    const std::int32_t three = 3;
    std::memcpy(b.data() + 4 * 4, &three, 4);  // n_kv_heads
    expect(b, "n_kv_heads = 3 is not allowed (allowed: a divisor of n_heads = 4)");
    expect(with_field(3, 128), "head_dim = dim / n_heads = 1");
  }
  SECTION("sizes that overflow") {
    auto b = bytes;
    const std::int32_t big[7] = {1 << 30, std::numeric_limits<std::int32_t>::max(), 1 << 30, 1, 1,
                                 1 << 30, 1};
    std::memcpy(b.data(), big, sizeof big);
    expect(b, "overflow");
  }
  SECTION("non-finite weights") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    tiny_model t = good;
    t.wk[static_cast<std::size_t>(t.kv_dim() * t.dim) + 5] = nan;
    expect(serialize(t), "wk[layer 1][5] = nan");
    t = good;
    t.emb[17] = -inf;
    expect(serialize(t), "token_embedding[17] = -inf");
    t = good;
    t.final_norm.back() = inf;
    expect(serialize(t), "final_norm[127] = inf");
    t = good;
    t.w2[3] = nan;
    expect(serialize(t), "w2[layer 0][3]");
    if (!good.shared) {
      t = good;
      t.cls[100] = nan;
      expect(serialize(t), "classifier[100] = nan");
    }
    // The RoPE tables are not read.
    t = good;
    t.rope[0] = nan;
    CHECK_FALSE(error_from([&] { (void)load(serialize(t)); }));
  }
}

// ---- session -------------------------------------------------------------------------------

TEST_CASE("engine session: the fp32 cache path equals a float64 full-attention reference",
          "[quality][engine]") {
  const bool shared = GENERATE(true, false);
  const tiny_model t = make_tiny(shared, shared ? 11u : 12u);
  const std::vector<int> tokens = some_tokens(20, t.vocab);
  // A cache whose full tier is kv_fp32 keeps its window in fp32 and stores blocks in fp32:
  // nothing is rounded, so the engine matches the unrounded float64 reference to float
  // accuracy, logits and attention outputs alike.
  check_engine<fp32_cache>(t, tokens, reference_forward(t, tokens, /*fp16_kv=*/false), 0, 0, 1e-4,
                           1e-4);
  // With sinks and a window (fp32 too) the result is the same.
  check_engine<fp32_cache>(t, tokens, reference_forward(t, tokens, /*fp16_kv=*/false), 2, 5, 1e-4,
                           1e-4);
}

TEST_CASE("engine session: the default cache with every token in the fp16 window",
          "[quality][engine]") {
  const tiny_model t = make_tiny(GENERATE(true, false));
  const std::vector<int> tokens = some_tokens(20, t.vocab);
  const reference_run exact = reference_forward(t, tokens, /*fp16_kv=*/false);
  check_engine<c::kv_cache<>>(t, tokens, exact, 0, t.seq_len, 1e-2, 1e-2);
  // Sinks and window are both fp16: the same values as the rounded reference.
  check_engine<c::kv_cache<>>(t, tokens, reference_forward(t, tokens, true), 4, t.seq_len, 1e-4,
                              1e-3);
}

TEST_CASE("engine session: errors, lifetime and budget", "[quality][engine]") {
  const tiny_model t = make_tiny(true);
  const oscar_engine::model m = load(serialize(t));
  const c::cache_config cfg = oscar_engine::cache_config_for(m, 0, 0, 16);
  CHECK(cfg.layers == 2);
  CHECK(cfg.kv_heads == 1);
  CHECK(cfg.head_dim == 64);
  CHECK(cfg.block_tokens == 16);
  const c::tier_budget budget = oscar_engine::pool_budget_for<fp32_cache>(m, cfg);
  fp32_cache cache(cfg, budget);
  // 24 tokens in blocks of 16: 2 blocks per (layer, KV head) in every tier.
  for (const c::tier_usage& u : cache.usage().tiers) CHECK(u.capacity == 4);

  {
    oscar_engine::session<fp32_cache> s(m, cache);
    CHECK(cache.sequence_count() == 1);
    CHECK(error_from([&] { (void)s.attention_output(0); })->code() ==
          oscar::errc::invalid_argument);
    for (int bad : {-1, t.vocab}) {
      const auto e = error_from([&] { (void)s.step(bad); });
      REQUIRE(e);
      CHECK(e->code() == oscar::errc::invalid_argument);
      CHECK_THAT(e->what(), ContainsSubstring("token = " + std::to_string(bad)));
    }
    CHECK(s.position() == 0);
    // A whole context fits the budget with window 0 (every token in low-tier blocks).
    for (int p = 0; p < t.seq_len; ++p) (void)s.step(p % t.vocab);
    CHECK(s.position() == t.seq_len);
    const auto e = error_from([&] { (void)s.step(1); });
    REQUIRE(e);
    CHECK(e->code() == oscar::errc::invalid_argument);
    CHECK_THAT(e->what(), ContainsSubstring("seq_len - 1 = 23"));
    CHECK(s.position() == t.seq_len);
    CHECK(error_from([&] { (void)s.attention_output(2); })->code() ==
          oscar::errc::invalid_argument);
  }
  CHECK(cache.sequence_count() == 0);  // the session freed its sequence
  CHECK(cache.usage().tiers[2].used == 0);

  // A cache of another shape.
  c::cache_config other = cfg;
  other.layers = 1;
  fp32_cache wrong(other, c::tier_budget{0, 0, 0});
  const auto e = error_from([&] { oscar_engine::session<fp32_cache> s(m, wrong); });
  REQUIRE(e);
  CHECK(e->code() == oscar::errc::invalid_argument);
  CHECK_THAT(e->what(), ContainsSubstring("layers 1"));
  CHECK(wrong.sequence_count() == 0);
}

TEST_CASE("engine session: out of memory mid-step leaves the sequence as before",
          "[quality][engine]") {
  const tiny_model t = make_tiny(true);
  const oscar_engine::model m = load(serialize(t));
  const c::cache_config cfg = oscar_engine::cache_config_for(m, 0, 0, 16);
  // Three low-tier blocks of 16 tokens for 2 layers: token 16 gets a block in layer 0, then
  // finds none for layer 1.
  const std::size_t block = fp32_cache(cfg, c::tier_budget{0, 0, 0}).usage().tiers[2].block_bytes;
  fp32_cache cache(cfg, c::tier_budget{0, 0, 3 * block});
  oscar_engine::session<fp32_cache> s(m, cache);
  for (int p = 0; p < 16; ++p) (void)s.step(p);
  const std::vector<float> logits(s.logits().begin(), s.logits().end());
  const std::vector<float> attention(s.attention_output(0).begin(), s.attention_output(0).end());
  for (int attempt = 0; attempt < 2; ++attempt) {
    const auto e = error_from([&] { (void)s.step(3); });
    REQUIRE(e);
    CHECK(e->code() == oscar::errc::out_of_memory);
    CHECK(s.position() == 16);
    for (int l = 0; l < t.layers; ++l) CHECK(cache.tokens(s.sequence(), l, 0) == 16);
    CHECK(cache.usage().tiers[2].used == 2);
  }
  CHECK(std::equal(logits.begin(), logits.end(), s.logits().begin()));
  CHECK(std::equal(attention.begin(), attention.end(), s.attention_output(0).begin()));
}
