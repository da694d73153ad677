// SPDX-License-Identifier: Apache-2.0
/// \file
/// Thresholds that turn scores into a keep mask, applied per batch (dynamic: the cut follows
/// the batch's own scores, as in `mask = scores > threshold * scores.max()`):
///
/// - `relative_to_max(t)`: keep `s > t * max(s)`, t in [0, 1];
/// - `top_k(k)`: keep the k highest (ties: the earlier one first);
/// - `cumulative_mass(p)`: keep the fewest highest scores whose sum reaches `p * sum(s)`
///   (scores >= 0), p in [0, 1];
/// - `quantile(q)`: keep `s > Q_q(s)`, the q-quantile with linear interpolation between order
///   statistics (numpy's default), q in [0, 1].
///
/// `select_heads` applies one to a `[layers, kv_heads]` table with a per-layer floor, so no
/// layer loses all its heads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include "oscar/core/error.hpp"
#include "oscar/importance/head.hpp"

namespace oscar::importance {

/// A threshold rule and its parameter.
struct threshold {
  enum class kind { relative_to_max, top_k, cumulative_mass, quantile };
  kind rule = kind::relative_to_max;
  double value = 0.5;

  static constexpr threshold relative_to_max(double t) { return {kind::relative_to_max, t}; }
  static constexpr threshold top_k(int k) { return {kind::top_k, static_cast<double>(k)}; }
  static constexpr threshold cumulative_mass(double p) { return {kind::cumulative_mass, p}; }
  static constexpr threshold quantile(double q) { return {kind::quantile, q}; }
};

constexpr std::string_view to_string(threshold::kind k) noexcept {
  switch (k) {
    case threshold::kind::relative_to_max: return "relative_to_max";
    case threshold::kind::top_k: return "top_k";
    case threshold::kind::cumulative_mass: return "cumulative_mass";
    case threshold::kind::quantile: return "quantile";
  }
  return "unknown";
}

namespace detail {

/// Indices by descending score, ties by index.
inline std::vector<std::size_t> order_desc(std::span<const double> s) {
  std::vector<std::size_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), std::size_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return s[a] > s[b]; });
  return idx;
}

}  // namespace detail

/// The keep mask of `scores` under `t` (true: keep). Throws `oscar::error` for non-finite
/// scores, a parameter out of range, or negative scores under `cumulative_mass`.
inline std::vector<bool> select(std::span<const double> scores, const threshold& t) {
  for (std::size_t i = 0; i < scores.size(); ++i) {
    OSCAR_CHECK(std::isfinite(scores[i]), errc::non_finite, "scores[", i, "] = ", scores[i],
                " is not allowed (allowed: finite)");
  }
  std::vector<bool> keep(scores.size(), false);
  if (scores.empty()) return keep;
  switch (t.rule) {
    case threshold::kind::relative_to_max: {
      OSCAR_CHECK_ARG(t.value >= 0.0 && t.value <= 1.0, t.value, "0 to 1 for relative_to_max");
      const double cut = t.value * *std::max_element(scores.begin(), scores.end());
      for (std::size_t i = 0; i < scores.size(); ++i) keep[i] = scores[i] > cut;
      break;
    }
    case threshold::kind::top_k: {
      OSCAR_CHECK_ARG(t.value >= 0.0 && t.value == std::floor(t.value), t.value,
                      "an integer >= 0 for top_k");
      const auto order = detail::order_desc(scores);
      const auto k = std::min(order.size(), static_cast<std::size_t>(t.value));
      for (std::size_t i = 0; i < k; ++i) keep[order[i]] = true;
      break;
    }
    case threshold::kind::cumulative_mass: {
      OSCAR_CHECK_ARG(t.value >= 0.0 && t.value <= 1.0, t.value, "0 to 1 for cumulative_mass");
      double total = 0.0;
      for (std::size_t i = 0; i < scores.size(); ++i) {
        OSCAR_CHECK(scores[i] >= 0.0, errc::invalid_argument, "scores[", i, "] = ", scores[i],
                    " is not allowed (allowed: >= 0 for cumulative_mass)");
        total += scores[i];
      }
      const double target = t.value * total;
      double acc = 0.0;
      for (std::size_t i : detail::order_desc(scores)) {
        if (acc >= target) break;
        keep[i] = true;
        acc += scores[i];
      }
      break;
    }
    case threshold::kind::quantile: {
      OSCAR_CHECK_ARG(t.value >= 0.0 && t.value <= 1.0, t.value, "0 to 1 for quantile");
      std::vector<double> sorted(scores.begin(), scores.end());
      std::sort(sorted.begin(), sorted.end());
      const double pos = t.value * static_cast<double>(sorted.size() - 1);
      const auto lo = static_cast<std::size_t>(std::floor(pos));
      const std::size_t hi = std::min(lo + 1, sorted.size() - 1);
      const double cut = sorted[lo] + (pos - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
      for (std::size_t i = 0; i < scores.size(); ++i) keep[i] = scores[i] > cut;
      break;
    }
  }
  return keep;
}

/// Where a head threshold looks for its reference (the max, the top k, ...).
enum class threshold_scope {
  global,     ///< one selection over every head of every layer
  per_layer,  ///< one selection per layer
};

/// The keep mask of a `[layers, kv_heads]` table, layer-major like `s.values`: `t` applied over
/// all heads (or per layer), then, in every layer that keeps fewer than `floor` heads, its
/// highest-scoring heads are kept up to `floor`. Throws `oscar::error` for a floor outside
/// [0, kv_heads] or what `select` rejects.
inline std::vector<bool> select_heads(const head_scores& s, const threshold& t, int floor = 1,
                                      threshold_scope scope = threshold_scope::global) {
  OSCAR_CHECK_ARG(floor >= 0 && floor <= s.kv_heads, floor,
                  oscar::detail::concat("0 to kv_heads = ", s.kv_heads));
  std::vector<bool> keep;
  if (scope == threshold_scope::global) {
    keep = select(s.values, t);
  } else {
    for (int l = 0; l < s.layers; ++l) {
      const auto k = select(s.layer(l), t);
      keep.insert(keep.end(), k.begin(), k.end());
    }
  }
  for (int l = 0; l < s.layers; ++l) {
    const auto first = static_cast<std::size_t>(l) * s.kv_heads;
    int kept = 0;
    for (int h = 0; h < s.kv_heads; ++h) kept += keep[first + h] ? 1 : 0;
    for (std::size_t i : detail::order_desc(s.layer(l))) {
      if (kept >= floor) break;
      if (!keep[first + i]) {
        keep[first + i] = true;
        ++kept;
      }
    }
  }
  return keep;
}

}  // namespace oscar::importance
