// SPDX-License-Identifier: Apache-2.0
/// \file
/// Token importance of one (layer, KV head), from the per-token attention mass an attention
/// call returns (`attention::kv_head_stats::token_mass`, already averaged over the KV head's
/// query group):
///
/// - **H2O** (Zhang et al. 2023): accumulated attention, `sum over queries of p_t`;
/// - **ZipCache** (He et al. 2024): normalized attention, the accumulated mass divided by the
///   number of queries that could attend to the token (a causal query sees only earlier tokens,
///   so old tokens would otherwise win by age alone);
/// - **SnapKV** (Li et al. 2024): the attention of an observation window (the last queries of
///   the prompt) summed per token, then pooled over neighbouring tokens.
///
/// `token_scores` keeps its scores in the cache's *entry order* and follows the entry through
/// appends, evictions (`evict`, same positions as `kv_cache::evict`) and compaction (`permute`,
/// with the order `kv_cache::compact` returns).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"

namespace oscar::importance {

/// Accumulated (H2O) and normalized (ZipCache) attention per token of one (layer, KV head).
class token_scores {
 public:
  /// Tokens currently tracked.
  [[nodiscard]] index_t size() const noexcept { return static_cast<index_t>(sum_.size()); }

  /// Adds one query's attention: `mass[t]` for each token of the head in entry order. The head
  /// may have grown since the last call (appended tokens are tracked from here, with no mass
  /// yet), never shrunk. Every token covered gains one query that could attend to it.
  void observe(std::span<const double> mass) {
    OSCAR_CHECK(static_cast<index_t>(mass.size()) >= size(), errc::invalid_argument,
                "token_mass of ", mass.size(), " tokens is not allowed (allowed: at least the ",
                size(), " tokens tracked; evictions must be reported with evict)");
    for (std::size_t t = 0; t < mass.size(); ++t) {
      OSCAR_CHECK(std::isfinite(mass[t]) && mass[t] >= 0.0, errc::non_finite, "token_mass[", t,
                  "] = ", mass[t], " is not allowed (allowed: finite, >= 0)");
    }
    sum_.resize(mass.size(), 0.0);
    queries_.resize(mass.size(), 0);
    for (std::size_t t = 0; t < mass.size(); ++t) {
      sum_[t] += mass[t];
      ++queries_[t];
    }
  }

  /// Tracks `n` appended tokens that no query has seen yet.
  void append(index_t n) {
    OSCAR_CHECK_ARG(n >= 0, n, ">= 0");
    sum_.resize(sum_.size() + static_cast<std::size_t>(n), 0.0);
    queries_.resize(sum_.size(), 0);
  }

  /// Drops the tokens at `positions` (entry order, distinct), as `kv_cache::evict` does.
  void evict(std::span<const index_t> positions) {
    std::vector<char> drop(sum_.size(), 0);
    for (index_t p : positions) {
      OSCAR_CHECK_ARG(p >= 0 && p < size() && !drop[static_cast<std::size_t>(p)], p,
                      oscar::detail::concat("distinct positions in [0, ", size(), ")"));
      drop[static_cast<std::size_t>(p)] = 1;
    }
    std::size_t w = 0;
    for (std::size_t t = 0; t < sum_.size(); ++t) {
      if (drop[t]) continue;
      sum_[w] = sum_[t];
      queries_[w++] = queries_[t];
    }
    sum_.resize(w);
    queries_.resize(w);
  }

  /// Reorders the tokens: new position `i` takes old position `order[i]` (a permutation, as
  /// `kv_cache::compact` returns).
  void permute(std::span<const index_t> order) {
    OSCAR_CHECK(static_cast<index_t>(order.size()) == size(), errc::invalid_argument,
                "an order of ", order.size(), " positions is not allowed (allowed: ", size(),
                ", a permutation of the tokens)");
    std::vector<char> seen(sum_.size(), 0);
    for (index_t p : order) {
      OSCAR_CHECK_ARG(p >= 0 && p < size() && !seen[static_cast<std::size_t>(p)], p,
                      "each position of the permutation once");
      seen[static_cast<std::size_t>(p)] = 1;
    }
    std::vector<double> sum(sum_.size());
    std::vector<index_t> queries(sum_.size());
    for (std::size_t i = 0; i < order.size(); ++i) {
      sum[i] = sum_[static_cast<std::size_t>(order[i])];
      queries[i] = queries_[static_cast<std::size_t>(order[i])];
    }
    sum_ = std::move(sum);
    queries_ = std::move(queries);
  }

  /// Forgets everything and tracks `n` fresh tokens (e.g. a pruned head's single token).
  void reset(index_t n) {
    sum_.assign(static_cast<std::size_t>(n), 0.0);
    queries_.assign(static_cast<std::size_t>(n), 0);
  }

  /// H2O: attention accumulated per token.
  [[nodiscard]] std::span<const double> accumulated() const noexcept { return sum_; }
  /// Queries that could attend to each token (observed since it was tracked).
  [[nodiscard]] std::span<const index_t> queries() const noexcept { return queries_; }
  /// ZipCache: accumulated attention / queries that could attend (0 for unseen tokens).
  [[nodiscard]] std::vector<double> normalized() const {
    std::vector<double> out(sum_.size(), 0.0);
    for (std::size_t t = 0; t < sum_.size(); ++t)
      if (queries_[t] > 0) out[t] = sum_[t] / static_cast<double>(queries_[t]);
    return out;
  }

 private:
  std::vector<double> sum_;
  std::vector<index_t> queries_;
};

/// How SnapKV pools the observation window's votes over neighbouring tokens.
enum class pooling { max, mean };

/// SnapKV scores of `tokens` tokens: `window[j]` is the attention mass of observation query j
/// over the tokens in entry order (a vector shorter than `tokens` is zero-padded: the query
/// came before the later tokens existed); the masses are summed per token, then pooled over a
/// centred window of `kernel` tokens (odd, >= 1; clipped at both ends). Throws `oscar::error`
/// on a bad kernel or a vector longer than `tokens`.
inline std::vector<double> snapkv_scores(std::span<const std::vector<double>> window,
                                         index_t tokens, int kernel = 7,
                                         pooling pool = pooling::max) {
  OSCAR_CHECK_ARG(kernel >= 1 && kernel % 2 == 1, kernel, "an odd number >= 1");
  OSCAR_CHECK_ARG(tokens >= 0, tokens, ">= 0");
  std::vector<double> votes(static_cast<std::size_t>(tokens), 0.0);
  for (const std::vector<double>& m : window) {
    OSCAR_CHECK(static_cast<index_t>(m.size()) <= tokens, errc::invalid_argument,
                "an observation of ", m.size(), " tokens is not allowed (allowed: at most ", tokens,
                ")");
    for (std::size_t t = 0; t < m.size(); ++t) votes[t] += m[t];
  }
  const index_t half = kernel / 2;
  std::vector<double> out(votes.size(), 0.0);
  for (index_t t = 0; t < tokens; ++t) {
    const index_t lo = std::max<index_t>(0, t - half), hi = std::min<index_t>(tokens - 1, t + half);
    double acc = pool == pooling::max ? votes[static_cast<std::size_t>(lo)] : 0.0;
    for (index_t u = lo; u <= hi; ++u) {
      const double v = votes[static_cast<std::size_t>(u)];
      acc = pool == pooling::max ? std::max(acc, v) : acc + v;
    }
    out[static_cast<std::size_t>(t)] = pool == pooling::max ? acc : acc / static_cast<double>(hi - lo + 1);
  }
  return out;
}

}  // namespace oscar::importance
