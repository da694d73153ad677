// SPDX-License-Identifier: Apache-2.0
/// \file
/// A mini inference engine for LLaMA-style models over an OSCAR `kv_cache`, header-only.
///
/// - `oscar_engine::model`: the weights of a llama2.c legacy checkpoint (the format `run.c`
///   reads), loaded with `model::load(path)` or `model::from_bytes(bytes)`, validated.
/// - `oscar_engine::session<Cache>`: runs the model token by token (`step`), appending each
///   layer's K and V to its own sequence of the cache and attending with
///   `oscar::attention::decode(backend::host{}, ...)`.
/// - `cache_config_for(model, sinks, window)` and `pool_budget_for<Cache>(model, config)`:
///   a cache shaped and sized for the model.
/// - `session::observe_attention(f)`: attention runs with statistics and `f` sees each layer's
///   (per-KV-head statistics, attention output), e.g. to feed `oscar::policy::driver::observe`.
///
/// The math is run.c's: RMSNorm (eps 1e-5), RoPE over adjacent pairs (2i, 2i+1) of each head
/// with theta = pos * 10000^(-2i / head_dim), grouped-query attention, a SwiGLU FFN, and a
/// classifier that is the token embedding unless the checkpoint stores its own. Matrix-vector
/// products are Eigen, in float.
///
/// ## Checkpoint layout (little-endian)
/// Seven int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len` (a
/// negative vocab_size means the classifier is not shared: |vocab_size| tokens, classifier at
/// the end), then fp32 arrays, row-major [out, in] (y = W x):
/// token embedding [vocab, dim]; attention RMSNorm [layers, dim]; wq [layers, n_heads*hd, dim];
/// wk, wv [layers, n_kv_heads*hd, dim]; wo [layers, dim, n_heads*hd]; FFN RMSNorm
/// [layers, dim]; w1 [layers, hidden, dim]; w2 [layers, dim, hidden]; w3 [layers, hidden, dim];
/// final RMSNorm [dim]; two unused RoPE tables of seq_len*hd/2 floats each; the classifier
/// [vocab, dim] only when not shared. hd = dim / n_heads.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include <Eigen/Dense>

#include "oscar/attention/host.hpp"
#include "oscar/attention/types.hpp"
#include "oscar/backend/tags.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"

namespace oscar_engine {

static_assert(std::endian::native == std::endian::little,
              "llama2.c checkpoints are little-endian; this loader reads them in place");

/// The shape of a model, from the checkpoint header.
struct model_config {
  int dim = 0;         ///< residual stream width
  int hidden_dim = 0;  ///< FFN width
  int n_layers = 0;
  int n_heads = 0;     ///< query heads
  int n_kv_heads = 0;  ///< key/value heads (grouped-query attention)
  int vocab_size = 0;  ///< tokens (|vocab_size| of the file)
  int seq_len = 0;     ///< context length: positions 0 to seq_len - 1
  bool shared_classifier = true;  ///< the classifier is the token embedding (file vocab_size > 0)

  [[nodiscard]] int head_dim() const noexcept { return dim / n_heads; }
  [[nodiscard]] int q_dim() const noexcept { return n_heads * head_dim(); }
  [[nodiscard]] int kv_dim() const noexcept { return n_kv_heads * head_dim(); }
};

/// The weights of one transformer layer, row-major [out, in].
struct layer_weights {
  std::vector<float> attention_norm;  ///< [dim]
  std::vector<float> wq;              ///< [n_heads * hd, dim]
  std::vector<float> wk;              ///< [n_kv_heads * hd, dim]
  std::vector<float> wv;              ///< [n_kv_heads * hd, dim]
  std::vector<float> wo;              ///< [dim, n_heads * hd]
  std::vector<float> ffn_norm;        ///< [dim]
  std::vector<float> w1;              ///< [hidden, dim]
  std::vector<float> w2;              ///< [dim, hidden]
  std::vector<float> w3;              ///< [hidden, dim]
};

namespace detail {

inline constexpr std::size_t header_bytes = 7 * sizeof(std::int32_t);

/// `a * b` or `a + b` in uint64, throwing corrupt_data on overflow (the header's sizes come
/// from an untrusted file).
struct size_math {
  const std::string& origin;
  std::uint64_t mul(std::uint64_t a, std::uint64_t b) const {
    OSCAR_CHECK(b == 0 || a <= std::numeric_limits<std::uint64_t>::max() / b,
                oscar::errc::corrupt_data, origin,
                ": the header's sizes overflow 64 bits (allowed: a header whose arrays fit in "
                "memory)");
    return a * b;
  }
  std::uint64_t add(std::uint64_t a, std::uint64_t b) const {
    OSCAR_CHECK(a <= std::numeric_limits<std::uint64_t>::max() - b, oscar::errc::corrupt_data,
                origin,
                ": the header's sizes overflow 64 bits (allowed: a header whose arrays fit in "
                "memory)");
    return a + b;
  }
};

/// Reads from memory.
struct span_source {
  std::span<const std::byte> bytes;
  std::size_t at = 0;
  bool read(void* dst, std::size_t n) {
    if (n > bytes.size() - at) return false;
    if (n) std::memcpy(dst, bytes.data() + at, n);
    at += n;
    return true;
  }
  bool skip(std::uint64_t n) {
    if (n > bytes.size() - at) return false;
    at += static_cast<std::size_t>(n);
    return true;
  }
};

/// Reads from a file.
struct file_source {
  std::ifstream in;
  bool read(void* dst, std::size_t n) {
    if (n == 0) return true;
    in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    return static_cast<std::size_t>(in.gcount()) == n;
  }
  bool skip(std::uint64_t n) {
    in.seekg(static_cast<std::streamoff>(n), std::ios::cur);
    return static_cast<bool>(in);
  }
};

/// y = W x for row-major W [rows, cols].
inline void matvec(const std::vector<float>& w, int rows, int cols, const float* x, float* y) {
  using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const matrix> m(w.data(), rows, cols);
  Eigen::Map<Eigen::VectorXf>(y, rows).noalias() = m * Eigen::Map<const Eigen::VectorXf>(x, cols);
}

/// out = x * (1 / sqrt(mean(x^2) + 1e-5)) * w, as run.c.
inline void rmsnorm(float* out, const float* x, const float* w, int n) {
  float ss = 0.0f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  ss = 1.0f / std::sqrt(ss / static_cast<float>(n) + 1e-5f);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (ss * x[i]);
}

}  // namespace detail

/// The weights of a LLaMA-style model from a llama2.c legacy checkpoint.
class model {
 public:
  /// Loads a checkpoint file. Throws `oscar::error`: `invalid_argument` when the path is not a
  /// readable regular file, `corrupt_data` when its contents are malformed (header fields,
  /// size, non-finite weights; the message names the field or tensor and what was expected).
  static model load(const std::filesystem::path& path) {
    const std::string origin = "llama2.c checkpoint '" + path.string() + "'";
    std::error_code ec;
    const bool regular = std::filesystem::is_regular_file(path, ec);
    OSCAR_CHECK(regular && !ec, oscar::errc::invalid_argument, "path = '", path.string(),
                "' is not allowed (allowed: a readable regular file)");
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    OSCAR_CHECK(!ec, oscar::errc::invalid_argument, "path = '", path.string(),
                "' is not allowed (allowed: a readable regular file; file_size: ", ec.message(),
                ")");
    detail::file_source src{std::ifstream(path, std::ios::binary)};
    OSCAR_CHECK(src.in.is_open(), oscar::errc::invalid_argument, "path = '", path.string(),
                "' is not allowed (allowed: a readable regular file; it cannot be opened)");
    return parse(src, static_cast<std::uint64_t>(size), origin);
  }

  /// Parses a checkpoint held in memory; throws `oscar::error` (`corrupt_data`) as `load`.
  static model from_bytes(std::span<const std::byte> bytes) {
    detail::span_source src{bytes};
    return parse(src, bytes.size(), "llama2.c checkpoint (bytes)");
  }

  /// The exact file size a header implies (`c` as `config()` reports it).
  static std::uint64_t file_bytes(const model_config& c) {
    OSCAR_CHECK(c.n_heads > 0 && c.dim > 0 && c.n_kv_heads > 0 && c.hidden_dim > 0 &&
                    c.n_layers > 0 && c.vocab_size > 0 && c.seq_len > 0,
                oscar::errc::invalid_argument,
                "a model_config with a field <= 0 is not allowed (allowed: every field > 0)");
    const std::string origin = "llama2.c checkpoint";
    return expected_bytes(c, detail::size_math{origin});
  }

  [[nodiscard]] const model_config& config() const noexcept { return config_; }
  [[nodiscard]] std::span<const float> token_embedding() const noexcept { return embedding_; }
  [[nodiscard]] const layer_weights& layer(int l) const {
    OSCAR_CHECK_ARG(l >= 0 && l < config_.n_layers, l,
                    oscar::detail::concat("0 to ", config_.n_layers - 1));
    return layers_[static_cast<std::size_t>(l)];
  }
  [[nodiscard]] std::span<const float> final_norm() const noexcept { return final_norm_; }
  /// [vocab, dim]: the token embedding when shared.
  [[nodiscard]] std::span<const float> classifier() const noexcept {
    return config_.shared_classifier ? std::span<const float>(embedding_)
                                     : std::span<const float>(classifier_);
  }
  /// The classifier as a vector (the embedding's when shared), for matrix-vector products.
  [[nodiscard]] const std::vector<float>& classifier_weights() const noexcept {
    return config_.shared_classifier ? embedding_ : classifier_;
  }

 private:
  model_config config_;
  std::vector<float> embedding_;
  std::vector<layer_weights> layers_;
  std::vector<float> final_norm_;
  std::vector<float> classifier_;  // empty when shared

  static std::uint64_t expected_bytes(const model_config& c, const detail::size_math& m) {
    const std::uint64_t dim = static_cast<std::uint64_t>(c.dim);
    const std::uint64_t layers = static_cast<std::uint64_t>(c.n_layers);
    const std::uint64_t hd = static_cast<std::uint64_t>(c.dim / c.n_heads);
    const std::uint64_t kv_dim = m.mul(static_cast<std::uint64_t>(c.n_kv_heads), hd);
    const std::uint64_t q_dim = m.mul(static_cast<std::uint64_t>(c.n_heads), hd);
    const std::uint64_t vocab_dim = m.mul(static_cast<std::uint64_t>(c.vocab_size), dim);
    const std::uint64_t hidden_dim = m.mul(static_cast<std::uint64_t>(c.hidden_dim), dim);
    std::uint64_t per_layer = m.add(dim, dim);                          // two RMSNorms
    per_layer = m.add(per_layer, m.mul(2, m.mul(q_dim, dim)));          // wq, wo
    per_layer = m.add(per_layer, m.mul(2, m.mul(kv_dim, dim)));         // wk, wv
    per_layer = m.add(per_layer, m.mul(3, hidden_dim));                 // w1, w2, w3
    std::uint64_t floats = m.add(vocab_dim, m.mul(layers, per_layer));
    floats = m.add(floats, dim);                                        // final RMSNorm
    floats = m.add(floats, m.mul(2, m.mul(static_cast<std::uint64_t>(c.seq_len), hd / 2)));
    if (!c.shared_classifier) floats = m.add(floats, vocab_dim);
    return m.add(detail::header_bytes, m.mul(sizeof(float), floats));
  }

  template <class Source>
  static model parse(Source& src, std::uint64_t total, const std::string& origin) {
    using oscar::errc;
    OSCAR_CHECK(total >= detail::header_bytes, errc::corrupt_data, origin, ": file size = ",
                total, " bytes is not allowed (allowed: at least the ", detail::header_bytes,
                "-byte header of seven int32)");
    std::int32_t h[7];
    OSCAR_CHECK(src.read(h, sizeof h), errc::corrupt_data, origin,
                ": the file ended inside the header");
    static constexpr const char* names[7] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                                             "n_kv_heads", "vocab_size", "seq_len"};
    for (int i = 0; i < 7; ++i) {
      if (i == 5) {
        OSCAR_CHECK(h[i] != 0 && h[i] != std::numeric_limits<std::int32_t>::min(),
                    errc::corrupt_data, origin, ": header field ", names[i], " = ", h[i],
                    " is not allowed (allowed: nonzero, |vocab_size| <= 2^31 - 1; negative "
                    "means an unshared classifier)");
      } else {
        OSCAR_CHECK(h[i] > 0, errc::corrupt_data, origin, ": header field ", names[i], " = ",
                    h[i], " is not allowed (allowed: > 0)");
      }
    }
    model_config c;
    c.dim = h[0];
    c.hidden_dim = h[1];
    c.n_layers = h[2];
    c.n_heads = h[3];
    c.n_kv_heads = h[4];
    c.shared_classifier = h[5] > 0;
    c.vocab_size = h[5] > 0 ? h[5] : -h[5];
    c.seq_len = h[6];
    OSCAR_CHECK(c.dim % c.n_heads == 0, errc::corrupt_data, origin, ": header field dim = ",
                c.dim, " is not allowed (allowed: a multiple of n_heads = ", c.n_heads, ")");
    OSCAR_CHECK(c.n_heads % c.n_kv_heads == 0, errc::corrupt_data, origin,
                ": header field n_kv_heads = ", c.n_kv_heads,
                " is not allowed (allowed: a divisor of n_heads = ", c.n_heads, ")");
    OSCAR_CHECK(c.head_dim() % 2 == 0, errc::corrupt_data, origin, ": head_dim = dim / n_heads = ",
                c.head_dim(), " is not allowed (allowed: even, RoPE rotates pairs)");
    const std::uint64_t expected = expected_bytes(c, detail::size_math{origin});
    OSCAR_CHECK(total == expected, errc::corrupt_data, origin, ": file size = ", total,
                " bytes is not allowed (allowed: exactly ", expected,
                " bytes, what the header implies: dim ", c.dim, ", hidden_dim ", c.hidden_dim,
                ", n_layers ", c.n_layers, ", n_heads ", c.n_heads, ", n_kv_heads ", c.n_kv_heads,
                ", vocab_size ", h[5], ", seq_len ", c.seq_len, "; ",
                total < expected ? "truncated" : "extra bytes at the end", ")");

    const auto D = static_cast<std::size_t>(c.dim);
    const auto H = static_cast<std::size_t>(c.hidden_dim);
    const auto Q = static_cast<std::size_t>(c.q_dim());
    const auto KV = static_cast<std::size_t>(c.kv_dim());
    const auto V = static_cast<std::size_t>(c.vocab_size);
    const auto read = [&](std::vector<float>& dst, std::size_t n, const char* name, int layer) {
      dst.resize(n);
      OSCAR_CHECK(src.read(dst.data(), n * sizeof(float)), errc::corrupt_data, origin,
                  ": the file ended while reading ", name, " (it shrank while being read?)");
      for (std::size_t i = 0; i < n; ++i) {
        if (!std::isfinite(dst[i])) {
          if (layer >= 0) {
            oscar::detail::fail(errc::corrupt_data,
                                oscar::detail::concat(origin, ": weight ", name, "[layer ", layer,
                                                      "][", i, "] = ", dst[i],
                                                      " is not allowed (allowed: finite weights)"));
          }
          oscar::detail::fail(errc::corrupt_data,
                              oscar::detail::concat(origin, ": weight ", name, "[", i, "] = ",
                                                    dst[i],
                                                    " is not allowed (allowed: finite weights)"));
        }
      }
    };
    model m;
    m.config_ = c;
    m.layers_.resize(static_cast<std::size_t>(c.n_layers));
    read(m.embedding_, V * D, "token_embedding", -1);
    const auto each_layer = [&](std::vector<float> layer_weights::*member, std::size_t n,
                                const char* name) {
      for (int l = 0; l < c.n_layers; ++l) read(m.layers_[static_cast<std::size_t>(l)].*member, n, name, l);
    };
    each_layer(&layer_weights::attention_norm, D, "attention_norm");
    each_layer(&layer_weights::wq, Q * D, "wq");
    each_layer(&layer_weights::wk, KV * D, "wk");
    each_layer(&layer_weights::wv, KV * D, "wv");
    each_layer(&layer_weights::wo, D * Q, "wo");
    each_layer(&layer_weights::ffn_norm, D, "ffn_norm");
    each_layer(&layer_weights::w1, H * D, "w1");
    each_layer(&layer_weights::w2, D * H, "w2");
    each_layer(&layer_weights::w3, H * D, "w3");
    read(m.final_norm_, D, "final_norm", -1);
    const std::uint64_t rope_bytes =
        2 * static_cast<std::uint64_t>(c.seq_len) * static_cast<std::uint64_t>(c.head_dim() / 2) *
        sizeof(float);
    OSCAR_CHECK(src.skip(rope_bytes), errc::corrupt_data, origin,
                ": the file ended inside the RoPE tables");
    if (!c.shared_classifier) read(m.classifier_, V * D, "classifier", -1);
    return m;
  }
};

/// A cache configuration shaped for `m`: its layers, KV heads and head_dim, with `sinks` fp16
/// sink tokens and a fp16 window of `window` tokens per (layer, KV head). The default 128-token
/// blocks hold one tile of the default FP2+ keys (per-channel groups of 128 tokens).
inline oscar::cache::cache_config cache_config_for(const model& m, int sinks, int window,
                                                   int block_tokens = 128) {
  const model_config& c = m.config();
  oscar::cache::cache_config cfg;
  cfg.layers = c.n_layers;
  cfg.kv_heads = c.n_kv_heads;
  cfg.head_dim = c.head_dim();
  cfg.block_tokens = block_tokens;
  cfg.sink_tokens = sinks;
  cfg.window_tokens = window;
  return cfg;
}

/// Pool budgets of a `Cache` with configuration `cfg` such that every tier alone can hold
/// `sequences` full contexts of `m` (seq_len tokens per layer and KV head):
/// sequences * layers * kv_heads * ceil(seq_len / block_tokens) blocks per tier, at the block
/// size a probe cache of that configuration reports. Enough for sessions that only append;
/// evicting tokens out of blocks (holes) or forking (copy-on-write) may need more.
template <class Cache>
oscar::cache::tier_budget pool_budget_for(const model& m, const oscar::cache::cache_config& cfg,
                                          int sequences = 1) {
  OSCAR_CHECK_ARG(sequences >= 1, sequences, ">= 1");
  const Cache probe(cfg, oscar::cache::tier_budget{0, 0, 0});
  const oscar::cache::cache_usage u = probe.usage();
  const auto seq_len = static_cast<std::size_t>(m.config().seq_len);
  const auto bt = static_cast<std::size_t>(cfg.block_tokens);
  const std::size_t blocks = static_cast<std::size_t>(sequences) *
                             static_cast<std::size_t>(cfg.layers) *
                             static_cast<std::size_t>(cfg.kv_heads) * ((seq_len + bt - 1) / bt);
  oscar::cache::tier_budget b;
  b.full = blocks * u.tiers[static_cast<int>(oscar::cache::tier::full)].block_bytes;
  b.mid = blocks * u.tiers[static_cast<int>(oscar::cache::tier::mid)].block_bytes;
  b.low = blocks * u.tiers[static_cast<int>(oscar::cache::tier::low)].block_bytes;
  return b;
}

/// One sequence of `model` running over `Cache` (an `oscar::cache::kv_cache`), token by token.
/// Creates its sequence in the cache on construction and frees it on destruction; the model
/// and the cache must outlive the session.
template <class Cache>
class session {
 public:
  /// Throws `oscar::error` (invalid_argument) when the cache's layers, KV heads or head_dim
  /// differ from the model's, or the model has more than 16 query heads per KV head.
  session(const model& m, Cache& cache) : model_(m), cache_(cache) {
    const model_config& c = m.config();
    const oscar::cache::cache_config& cfg = cache.config();
    OSCAR_CHECK(cfg.layers == c.n_layers && cfg.kv_heads == c.n_kv_heads &&
                    cfg.head_dim == c.head_dim(),
                oscar::errc::invalid_argument, "cache shape (layers ", cfg.layers,
                ", kv_heads ", cfg.kv_heads, ", head_dim ", cfg.head_dim,
                ") is not allowed (allowed: the model's: layers ", c.n_layers, ", kv_heads ",
                c.n_kv_heads, ", head_dim ", c.head_dim(), "; see cache_config_for)");
    OSCAR_CHECK(c.n_heads / c.n_kv_heads <= 16, oscar::errc::unsupported, "n_heads / n_kv_heads = ",
                c.n_heads / c.n_kv_heads,
                " is not allowed (allowed: at most 16 query heads per KV head, attention::decode)");
    const auto D = static_cast<std::size_t>(c.dim);
    x_.resize(D);
    xb_.resize(D);
    xb2_.resize(D);
    q_.resize(static_cast<std::size_t>(c.q_dim()));
    k_.resize(static_cast<std::size_t>(c.kv_dim()));
    v_.resize(static_cast<std::size_t>(c.kv_dim()));
    hb_.resize(static_cast<std::size_t>(c.hidden_dim));
    hb2_.resize(static_cast<std::size_t>(c.hidden_dim));
    logits_.resize(static_cast<std::size_t>(c.vocab_size));
    attention_.assign(static_cast<std::size_t>(c.n_layers),
                      std::vector<float>(static_cast<std::size_t>(c.q_dim()), 0.0f));
    next_attention_ = attention_;
    cos_.resize(static_cast<std::size_t>(c.head_dim() / 2));
    sin_.resize(cos_.size());
    seq_ = cache_.create();
  }

  ~session() {
    try {
      if (cache_.contains(seq_)) cache_.free(seq_);
    } catch (...) {  // NOLINT: a destructor must not throw
    }
  }

  session(const session&) = delete;
  session& operator=(const session&) = delete;

  /// Feeds `token` at position `position()` and returns the logits of the next token
  /// ([vocab], valid until the next step). Throws `oscar::error` (invalid_argument) for a token
  /// outside [0, vocab) or a step past seq_len, before anything changes. Errors from the cache
  /// or attention (e.g. out_of_memory) propagate after the token is evicted again from the
  /// layers it had reached, so `position()`, every layer's token count, `logits()` and
  /// `attention_output()` stay as before (the cache's count of tokens ever appended, which
  /// decides what goes to the sinks, does advance).
  std::span<const float> step(int token) {
    const model_config& c = model_.config();
    OSCAR_CHECK_ARG(token >= 0 && token < c.vocab_size, token,
                    oscar::detail::concat("0 to vocab_size - 1 = ", c.vocab_size - 1));
    OSCAR_CHECK(pos_ < c.seq_len, oscar::errc::invalid_argument, "position = ", pos_,
                " is not allowed (allowed: 0 to seq_len - 1 = ", c.seq_len - 1,
                ", the model's context; the session is full)");
    const int dim = c.dim, hd = c.head_dim(), hidden = c.hidden_dim;
    const auto emb = model_.token_embedding().subspan(static_cast<std::size_t>(token) * dim,
                                                      static_cast<std::size_t>(dim));
    std::copy(emb.begin(), emb.end(), x_.begin());
    for (int i = 0; i < hd / 2; ++i) {
      const double theta =
          static_cast<double>(pos_) * std::pow(10000.0, -2.0 * i / static_cast<double>(hd));
      cos_[static_cast<std::size_t>(i)] = static_cast<float>(std::cos(theta));
      sin_[static_cast<std::size_t>(i)] = static_cast<float>(std::sin(theta));
    }
    int appended = 0;  // layers holding this token
    try {
      for (int l = 0; l < c.n_layers; ++l) {
        const layer_weights& w = model_.layer(l);
        detail::rmsnorm(xb_.data(), x_.data(), w.attention_norm.data(), dim);
        detail::matvec(w.wq, c.q_dim(), dim, xb_.data(), q_.data());
        detail::matvec(w.wk, c.kv_dim(), dim, xb_.data(), k_.data());
        detail::matvec(w.wv, c.kv_dim(), dim, xb_.data(), v_.data());
        rope(q_.data(), c.n_heads, hd);
        rope(k_.data(), c.n_kv_heads, hd);
        cache_.append(seq_, l, oscar::make_kv_view<const float>(k_.data(), 1, c.n_kv_heads, hd),
                      oscar::make_kv_view<const float>(v_.data(), 1, c.n_kv_heads, hd));
        appended = l + 1;
        std::vector<float>& att = next_attention_[static_cast<std::size_t>(l)];
        oscar::attention::decode(oscar::backend::host{}, cache_, l, std::span(&seq_, 1),
                                 oscar::make_kv_view<const float>(q_.data(), 1, c.n_heads, hd),
                                 oscar::make_kv_view(att.data(), 1, c.n_heads, hd),
                                 oscar::attention::options{.q_heads = c.n_heads,
                                                           .want_stats = observer_ != nullptr},
                                 observer_ ? &stats_ : nullptr);
        if (observer_) {
          observer_(l, stats_, oscar::make_kv_view<const float>(att.data(), 1, c.n_heads, hd));
        }
        detail::matvec(w.wo, dim, c.q_dim(), att.data(), xb2_.data());
        for (int i = 0; i < dim; ++i) x_[i] += xb2_[i];

        detail::rmsnorm(xb_.data(), x_.data(), w.ffn_norm.data(), dim);
        detail::matvec(w.w1, hidden, dim, xb_.data(), hb_.data());
        detail::matvec(w.w3, hidden, dim, xb_.data(), hb2_.data());
        for (int i = 0; i < hidden; ++i) {
          const float a = hb_[i];
          hb_[i] = a / (1.0f + std::exp(-a)) * hb2_[i];
        }
        detail::matvec(w.w2, dim, hidden, hb_.data(), xb2_.data());
        for (int i = 0; i < dim; ++i) x_[i] += xb2_[i];
      }
    } catch (...) {
      roll_back(appended);
      throw;
    }
    detail::rmsnorm(x_.data(), x_.data(), model_.final_norm().data(), dim);
    detail::matvec(model_.classifier_weights(), c.vocab_size, dim, x_.data(), logits_.data());
    attention_.swap(next_attention_);
    ++pos_;
    return logits_;
  }

  /// The last step's attention output of `layer` before wo, [n_heads * hd] (head after head).
  /// Throws `oscar::error` (invalid_argument) for a bad layer or before the first step.
  [[nodiscard]] std::span<const float> attention_output(int layer) const {
    OSCAR_CHECK_ARG(layer >= 0 && layer < model_.config().n_layers, layer,
                    oscar::detail::concat("0 to ", model_.config().n_layers - 1));
    OSCAR_CHECK(pos_ > 0, oscar::errc::invalid_argument,
                "attention_output before the first step is not allowed (allowed: after step)");
    return attention_[static_cast<std::size_t>(layer)];
  }

  /// Per layer and step, after attention: the layer's statistics (one per KV head) and its
  /// attention output `[1, n_heads, head_dim]`.
  using attention_observer = std::function<void(
      int layer, std::span<const oscar::attention::kv_head_stats>, oscar::kv_view<const float>)>;
  /// From the next step on, attention runs with statistics and `f` sees them (an empty `f`
  /// stops it). An exception from `f` propagates from `step` like a cache error.
  void observe_attention(attention_observer f) { observer_ = std::move(f); }

  /// The last step's logits ([vocab]; zeros before the first step).
  [[nodiscard]] std::span<const float> logits() const noexcept { return logits_; }
  /// Tokens fed so far: the position of the next token.
  [[nodiscard]] int position() const noexcept { return pos_; }
  /// The session's sequence in the cache.
  [[nodiscard]] oscar::cache::seq_id sequence() const noexcept { return seq_; }
  [[nodiscard]] const model& get_model() const noexcept { return model_; }

 private:
  /// RoPE over adjacent pairs (2i, 2i+1) of each of `heads` heads of `hd` values.
  void rope(float* x, int heads, int hd) const {
    for (int h = 0; h < heads; ++h) {
      float* v = x + static_cast<std::ptrdiff_t>(h) * hd;
      for (int i = 0; i < hd / 2; ++i) {
        const float c = cos_[static_cast<std::size_t>(i)], s = sin_[static_cast<std::size_t>(i)];
        const float v0 = v[2 * i], v1 = v[2 * i + 1];
        v[2 * i] = v0 * c - v1 * s;
        v[2 * i + 1] = v0 * s + v1 * c;
      }
    }
  }

  /// Removes this step's token from the first `layers` layers: the newest token of a
  /// (layer, head) is its last in entry order. The cache's count of tokens ever appended (for
  /// sinks) is not rolled back.
  void roll_back(int layers) noexcept {
    try {
      for (int l = 0; l < layers; ++l) {
        for (int h = 0; h < model_.config().n_kv_heads; ++h) {
          // An append either adds the token to every head or changes nothing. A pruned head
          // (oscar::policy) has folded the token into its running mean for good.
          if (cache_.pruned(seq_, l, h)) continue;
          const oscar::index_t last = cache_.tokens(seq_, l, h) - 1;
          cache_.evict(seq_, l, h, std::span(&last, 1));
        }
      }
    } catch (...) {  // NOLINT: best effort; the original error is what the caller needs
    }
  }

  const model& model_;
  Cache& cache_;
  oscar::cache::seq_id seq_ = 0;
  int pos_ = 0;
  std::vector<float> x_, xb_, xb2_, q_, k_, v_, hb_, hb2_, logits_, cos_, sin_;
  std::vector<std::vector<float>> attention_;       // [layers][q_dim], of the last step
  std::vector<std::vector<float>> next_attention_;  // the step in progress
  attention_observer observer_;
  std::vector<oscar::attention::kv_head_stats> stats_;
};

}  // namespace oscar_engine
