// SPDX-License-Identifier: Apache-2.0
/// \file
/// Head importance: one score per (layer, KV head).
///
/// - `head_scores`: a `[layers, kv_heads]` table of scores, with per-layer normalization.
/// - `taylor_accumulator`: the gradient-based Taylor score of Michel et al. 2019,
///   `I_h = E_x |sum A_h * dL/dA_h|` (equivalently `|dL/d xi_h|` for a head mask `xi_h`), from
///   attention outputs and gradients the caller supplies (OSCAR does not train). Scores are per
///   KV head: the query heads of a group are summed inside the absolute value, which is the
///   derivative for one mask shared by the group (reduced, never expanded).
/// - `head_importance` and `parse_head_importance` / `load_head_importance` /
///   `format_head_importance`: the head-importance file a calibration script writes
///   (`examples/train/calibrate_heads.py`; format in `examples/models/README.md`).
/// - `head_stats_accumulator`: online scores that need no gradients, from the statistics an
///   attention call returns (`attention::kv_head_stats`): attention entropy, attention mass on
///   the far context versus sinks and recent window, and output norm.
///
/// Convention: a higher score means a more important head.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "oscar/attention/types.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"

namespace oscar::importance {

/// Scores of the KV heads of a model: `[layers, kv_heads]`, layer-major.
struct head_scores {
  int layers = 0;
  int kv_heads = 0;
  std::vector<double> values;  ///< [layers * kv_heads]

  /// A table of zeros. Throws `oscar::error` unless both counts are >= 1.
  static head_scores zeros(int layers, int kv_heads) {
    OSCAR_CHECK_ARG(layers >= 1, layers, ">= 1");
    OSCAR_CHECK_ARG(kv_heads >= 1, kv_heads, ">= 1");
    return {layers, kv_heads,
            std::vector<double>(static_cast<std::size_t>(layers) * kv_heads, 0.0)};
  }
  [[nodiscard]] double& operator()(int layer, int head) { return values[index(layer, head)]; }
  [[nodiscard]] double operator()(int layer, int head) const { return values[index(layer, head)]; }
  /// The scores of one layer.
  [[nodiscard]] std::span<const double> layer(int l) const {
    return std::span<const double>(values).subspan(index(l, 0), static_cast<std::size_t>(kv_heads));
  }

 private:
  [[nodiscard]] std::size_t index(int layer, int head) const {
    OSCAR_CHECK_ARG(layer >= 0 && layer < layers, layer, oscar::detail::concat("0 to ", layers - 1));
    OSCAR_CHECK_ARG(head >= 0 && head < kv_heads, head, oscar::detail::concat("0 to ", kv_heads - 1));
    return static_cast<std::size_t>(layer) * kv_heads + head;
  }
};

/// Divides each layer's scores by their L2 norm (Michel et al. normalize per layer before
/// comparing heads across layers). A layer whose scores are all zero stays zero.
inline head_scores normalize_per_layer(head_scores s) {
  for (int l = 0; l < s.layers; ++l) {
    double sq = 0.0;
    for (double x : s.layer(l)) sq += x * x;
    if (sq == 0.0) continue;
    const double norm = std::sqrt(sq);
    for (int h = 0; h < s.kv_heads; ++h) s(l, h) /= norm;
  }
  return s;
}

// ---- Taylor importance (gradients supplied by the caller) -----------------------------------

/// Accumulates the Taylor head importance `I_h = E_x |sum_{q in group(h), t, c} A * dL/dA|`
/// over examples `x`. Per example and layer, the caller passes the attention output `A` of the
/// layer's query heads (before the output projection) and the gradient of the example's loss
/// with respect to it, both `[tokens, q_heads, head_dim]`.
class taylor_accumulator {
 public:
  /// Throws `oscar::error` unless the counts are >= 1 and `q_heads` is a multiple of `kv_heads`.
  taylor_accumulator(int layers, int q_heads, int kv_heads, int head_dim)
      : q_heads_(q_heads), head_dim_(head_dim), sum_(head_scores::zeros(layers, kv_heads)),
        examples_(static_cast<std::size_t>(layers), 0) {
    OSCAR_CHECK_ARG(q_heads >= kv_heads && q_heads % kv_heads == 0, q_heads,
                    oscar::detail::concat("a multiple of kv_heads = ", kv_heads));
    OSCAR_CHECK_ARG(head_dim >= 1, head_dim, ">= 1");
  }

  /// Adds one example of `layer`. Throws `oscar::error` on a shape mismatch or non-finite data,
  /// changing nothing.
  void add(int layer, kv_view<const float> activation, kv_view<const float> gradient) {
    OSCAR_CHECK_ARG(layer >= 0 && layer < sum_.layers, layer,
                    oscar::detail::concat("0 to ", sum_.layers - 1));
    for (const auto* x : {&activation, &gradient}) {
      OSCAR_CHECK(x->heads == q_heads_ && x->head_dim == head_dim_ &&
                      x->tokens == activation.tokens,
                  errc::invalid_argument, "shape [", x->tokens, ", ", x->heads, ", ",
                  x->head_dim, "] is not allowed (allowed: [", activation.tokens, ", ", q_heads_,
                  ", ", head_dim_, "], the activation's tokens, q_heads, head_dim)");
    }
    const int group = q_heads_ / sum_.kv_heads;
    std::vector<double> dot(static_cast<std::size_t>(sum_.kv_heads), 0.0);
    for (index_t t = 0; t < activation.tokens; ++t) {
      for (int q = 0; q < q_heads_; ++q) {
        const float* a = activation.row(t, q);
        const float* g = gradient.row(t, q);
        double s = 0.0;
        for (int c = 0; c < head_dim_; ++c) s += static_cast<double>(a[c]) * g[c];
        dot[static_cast<std::size_t>(q / group)] += s;
      }
    }
    for (int h = 0; h < sum_.kv_heads; ++h) {
      OSCAR_CHECK(std::isfinite(dot[h]), errc::non_finite, "the Taylor term of layer ", layer,
                  " KV head ", h, " = ", dot[h],
                  " is not allowed (allowed: finite activations and gradients)");
    }
    for (int h = 0; h < sum_.kv_heads; ++h) sum_(layer, h) += std::abs(dot[h]);
    ++examples_[static_cast<std::size_t>(layer)];
  }

  /// `E_x |...|` per KV head (0 for a layer with no example).
  [[nodiscard]] head_scores mean() const {
    head_scores m = sum_;
    for (int l = 0; l < m.layers; ++l) {
      const auto n = examples_[static_cast<std::size_t>(l)];
      for (int h = 0; h < m.kv_heads; ++h) m(l, h) = n ? m(l, h) / static_cast<double>(n) : 0.0;
    }
    return m;
  }
  /// `mean()` normalized per layer to unit L2 norm.
  [[nodiscard]] head_scores normalized() const { return normalize_per_layer(mean()); }

 private:
  int q_heads_;
  int head_dim_;
  head_scores sum_;
  std::vector<index_t> examples_;
};

// ---- the head-importance file -----------------------------------------------------------------

/// Scores of a head-importance file, with what they are.
struct head_importance {
  head_scores scores;
  std::string score = "taylor";                 ///< what was measured (a word)
  std::string normalization = "l2-per-layer";  ///< how it was normalized (a word)

  /// Throws `oscar::error` unless the file covers exactly `layers` x `kv_heads` heads.
  void check_shape(int layers, int kv_heads) const {
    OSCAR_CHECK(scores.layers == layers && scores.kv_heads == kv_heads, errc::invalid_argument,
                "head importance for ", scores.layers, " layers x ", scores.kv_heads,
                " KV heads is not allowed (allowed: the model's ", layers, " x ", kv_heads, ")");
  }
};

namespace detail {

inline bool is_word(std::string_view w) {
  return !w.empty() && std::all_of(w.begin(), w.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
  });
}

}  // namespace detail

/// Parses a head-importance file (text, UTF-8/ASCII):
///
///     oscar-head-importance 1          first line: magic and version
///     # comment                        '#' lines and blank lines anywhere after it are ignored
///     layers 4                         then these four keys, once each, in this order
///     kv_heads 2
///     score taylor                     a word: [a-z0-9_-]+
///     normalization l2-per-layer       a word
///     0 0 0.812                        then layers * kv_heads rows "layer kv_head score",
///     ...                              any order, each (layer, kv_head) exactly once
///
/// Scores are finite and >= 0. Throws `oscar::error` (`corrupt_data`) naming the line and what
/// was expected; `origin` names the source in messages.
inline head_importance parse_head_importance(std::string_view text,
                                             std::string_view origin = "head importance") {
  std::istringstream in{std::string(text)};
  std::string line;
  int number = 0;
  const auto next = [&](bool skip_comments) {
    while (std::getline(in, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!skip_comments) return true;
      const auto first = line.find_first_not_of(" \t");
      if (first == std::string::npos || line[first] == '#') continue;
      return true;
    }
    return false;
  };
  const auto fail = [&](const std::string& what) {
    oscar::detail::fail(errc::corrupt_data,
                        oscar::detail::concat(origin, ": line ", number, ": ", what));
  };
  if (!next(false) || line != "oscar-head-importance 1") {
    fail("'" + line + "' is not allowed (allowed: the first line 'oscar-head-importance 1')");
  }
  head_importance out;
  const auto key = [&](const char* name) {
    if (!next(true)) fail(oscar::detail::concat("the file ended before the key '", name, "'"));
    std::istringstream words(line);
    std::string k, value, extra;
    words >> k >> value;
    if (k != name || value.empty() || (words >> extra)) {
      fail(oscar::detail::concat("'", line, "' is not allowed (allowed: '", name, " <value>')"));
    }
    return value;
  };
  const auto count = [&](const char* name) {
    const std::string v = key(name);
    int n = 0;
    if (v.size() > 6 || !std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        (n = std::stoi(v)) < 1) {
      fail(oscar::detail::concat(name, " = ", v, " is not allowed (allowed: an integer from 1 to 999999)"));
    }
    return n;
  };
  const int layers = count("layers");
  const int kv_heads = count("kv_heads");
  OSCAR_CHECK(static_cast<long long>(layers) * kv_heads <= 1 << 20, errc::corrupt_data, origin,
              ": ", layers, " x ", kv_heads, " heads is not allowed (allowed: at most 2^20)");
  out.score = key("score");
  out.normalization = key("normalization");
  for (const std::string* w : {&out.score, &out.normalization}) {
    if (!detail::is_word(*w)) fail("'" + *w + "' is not allowed (allowed: a word of [a-z0-9_-])");
  }
  out.scores = head_scores::zeros(layers, kv_heads);
  std::vector<bool> seen(out.scores.values.size(), false);
  std::size_t rows = 0;
  while (next(true)) {
    std::istringstream words(line);
    long long l = -1, h = -1;
    double value = 0.0;
    std::string extra;
    if (!(words >> l >> h >> value) || (words >> extra)) {
      fail("'" + line + "' is not allowed (allowed: 'layer kv_head score')");
    }
    if (l < 0 || l >= layers || h < 0 || h >= kv_heads) {
      fail(oscar::detail::concat("head (", l, ", ", h, ") is not allowed (allowed: layer 0 to ",
                                 layers - 1, ", kv_head 0 to ", kv_heads - 1, ")"));
    }
    if (!std::isfinite(value) || value < 0.0) {
      fail(oscar::detail::concat("score ", value, " is not allowed (allowed: finite, >= 0)"));
    }
    const auto i = static_cast<std::size_t>(l * kv_heads + h);
    if (seen[i]) fail(oscar::detail::concat("head (", l, ", ", h, ") appears twice (allowed: once)"));
    seen[i] = true;
    out.scores.values[i] = value;
    ++rows;
  }
  OSCAR_CHECK(rows == seen.size(), errc::corrupt_data, origin, ": ", rows,
              " score rows are not allowed (allowed: exactly layers x kv_heads = ", seen.size(), ")");
  return out;
}

/// Reads and parses a head-importance file; throws `oscar::error` (`invalid_argument` when the
/// file cannot be read, `corrupt_data` when it is malformed).
inline head_importance load_head_importance(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  OSCAR_CHECK(in.is_open(), errc::invalid_argument, "path = '", path.string(),
              "' is not allowed (allowed: a readable head-importance file)");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  OSCAR_CHECK(text.size() <= (std::size_t{64} << 20), errc::corrupt_data, "head importance '",
              path.string(), "': ", text.size(), " bytes is not allowed (allowed: at most 64 MiB)");
  return parse_head_importance(text, "head importance '" + path.string() + "'");
}

/// Writes `h` in the file format `parse_head_importance` reads (scores with 9 significant
/// digits, rows layer-major).
inline std::string format_head_importance(const head_importance& h) {
  OSCAR_CHECK(detail::is_word(h.score) && detail::is_word(h.normalization), errc::invalid_argument,
              "score '", h.score, "' / normalization '", h.normalization,
              "' is not allowed (allowed: words of [a-z0-9_-])");
  std::ostringstream out;
  out.precision(9);
  out << "oscar-head-importance 1\nlayers " << h.scores.layers << "\nkv_heads "
      << h.scores.kv_heads << "\nscore " << h.score << "\nnormalization " << h.normalization
      << "\n# layer kv_head importance\n";
  for (int l = 0; l < h.scores.layers; ++l)
    for (int k = 0; k < h.scores.kv_heads; ++k) out << l << ' ' << k << ' ' << h.scores(l, k) << '\n';
  return out.str();
}

// ---- online scores from attention statistics ------------------------------------------------

/// Entropy of one query's attention over `n` tokens divided by its largest value `log n`:
/// 1 for uniform attention (what a pruned head does anyway), 0 for attention on one token.
/// Defined as 1 for `n <= 1`.
inline double normalized_entropy(const attention::kv_head_stats& s) {
  const auto n = s.token_mass.size();
  return n <= 1 ? 1.0 : std::clamp(s.entropy / std::log(static_cast<double>(n)), 0.0, 1.0);
}

/// Attention mass of one query on the far context: every token except the first `sinks` and
/// the last `window` of the head, in entry order (the cache's sinks, then blocks, then
/// window). Throws `oscar::error` when sinks + window exceed the tokens.
inline double far_mass(const attention::kv_head_stats& s, index_t sinks, index_t window) {
  const auto n = static_cast<index_t>(s.token_mass.size());
  OSCAR_CHECK(sinks >= 0 && window >= 0 && sinks + window <= n, errc::invalid_argument,
              "sinks = ", sinks, " and window = ", window,
              " are not allowed (allowed: >= 0, together at most the ", n, " tokens attended)");
  double far = 0.0;
  for (index_t t = sinks; t < n - window; ++t) far += s.token_mass[static_cast<std::size_t>(t)];
  return far;
}

/// Online head scores over the queries of a batch (steps of a sequence, or sequences of a
/// decode batch): per (layer, KV head), the mean over queries of the attention entropy, its
/// normalized form, the far-context mass, and the output norm.
class head_stats_accumulator {
 public:
  head_stats_accumulator(int layers, int kv_heads)
      : entropy_(head_scores::zeros(layers, kv_heads)), normalized_entropy_(entropy_),
        far_(entropy_), norm_(entropy_), queries_(entropy_.values.size(), 0),
        outputs_(entropy_.values.size(), 0) {}

  [[nodiscard]] int layers() const noexcept { return entropy_.layers; }
  [[nodiscard]] int kv_heads() const noexcept { return entropy_.kv_heads; }

  /// Adds one query of `layer`: `stats` has one entry per KV head (what `attention::decode`
  /// returns for one sequence), `sinks[h]` and `window[h]` how many of head h's first and last
  /// tokens are sinks and recent window.
  void add(int layer, std::span<const attention::kv_head_stats> stats,
           std::span<const index_t> sinks, std::span<const index_t> window) {
    check_layer(layer);
    const auto heads = static_cast<std::size_t>(kv_heads());
    OSCAR_CHECK(stats.size() == heads && sinks.size() == heads && window.size() == heads,
                errc::invalid_argument, "stats, sinks, window of sizes ", stats.size(), ", ",
                sinks.size(), ", ", window.size(), " are not allowed (allowed: ", heads,
                " each, one per KV head)");
    std::vector<double> far(heads);
    for (std::size_t h = 0; h < heads; ++h) far[h] = far_mass(stats[h], sinks[h], window[h]);
    for (int h = 0; h < kv_heads(); ++h) {
      entropy_(layer, h) += stats[h].entropy;
      normalized_entropy_(layer, h) += normalized_entropy(stats[h]);
      far_(layer, h) += far[h];
      ++queries_[index(layer, h)];
    }
  }

  /// Adds one query's attention output of `layer`: `out` is `[1, q_heads, head_dim]`; each
  /// KV head scores the mean L2 norm of its query heads' outputs.
  void add_output(int layer, kv_view<const float> out) {
    check_layer(layer);
    OSCAR_CHECK(out.tokens == 1 && out.heads >= kv_heads() && out.heads % kv_heads() == 0,
                errc::invalid_argument, "out shape [", out.tokens, ", ", out.heads, ", ",
                out.head_dim, "] is not allowed (allowed: [1, a multiple of ", kv_heads(),
                ", head_dim])");
    const int group = static_cast<int>(out.heads) / kv_heads();
    for (int q = 0; q < out.heads; ++q) {
      double sq = 0.0;
      for (index_t c = 0; c < out.head_dim; ++c) sq += double(out.row(0, q)[c]) * out.row(0, q)[c];
      norm_(layer, q / group) += std::sqrt(sq) / group;
    }
    for (int h = 0; h < kv_heads(); ++h) ++outputs_[index(layer, h)];
  }

  /// Mean attention entropy in nats.
  [[nodiscard]] head_scores entropy() const { return mean(entropy_, queries_); }
  /// Concentration: 1 - mean normalized entropy. High for heads that attend to few tokens;
  /// 0 for uniform attention, which pruning reproduces exactly.
  [[nodiscard]] head_scores concentration() const {
    head_scores s = mean(normalized_entropy_, queries_);
    for (double& x : s.values) x = 1.0 - x;
    return s;
  }
  /// Mean attention mass on the far context (outside sinks and window): what a head loses
  /// when its far context is evicted (StreamingLLM) or compressed.
  [[nodiscard]] head_scores far_context_mass() const { return mean(far_, queries_); }
  /// Mean attention mass on sinks and recent window: 1 - far_context_mass.
  [[nodiscard]] head_scores local_mass() const {
    head_scores s = far_context_mass();
    for (std::size_t i = 0; i < s.values.size(); ++i) s.values[i] = queries_[i] ? 1.0 - s.values[i] : 0.0;
    return s;
  }
  /// Mean L2 norm of the output of the head's query heads.
  [[nodiscard]] head_scores output_norm() const { return mean(norm_, outputs_); }
  /// Queries added for (layer, head).
  [[nodiscard]] index_t queries(int layer, int head) const { return queries_[index(layer, head)]; }

 private:
  void check_layer(int layer) const {
    OSCAR_CHECK_ARG(layer >= 0 && layer < layers(), layer, oscar::detail::concat("0 to ", layers() - 1));
  }
  [[nodiscard]] std::size_t index(int layer, int head) const {
    return static_cast<std::size_t>(layer) * kv_heads() + head;
  }
  static head_scores mean(head_scores s, const std::vector<index_t>& n) {
    for (std::size_t i = 0; i < s.values.size(); ++i) s.values[i] = n[i] ? s.values[i] / static_cast<double>(n[i]) : 0.0;
    return s;
  }

  head_scores entropy_, normalized_entropy_, far_, norm_;
  std::vector<index_t> queries_, outputs_;
};

}  // namespace oscar::importance
