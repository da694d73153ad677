// SPDX-License-Identifier: Apache-2.0
/// \file
/// Deterministic synthetic K/V data for tests, benchmarks and examples.
///
/// Real keys are not Gaussian: a few channels carry most of the magnitude (outlier channels,
/// a consequence of RoPE and the model's weights) and channels have a bias shared by all
/// tokens. Values are closer to Gaussian, with token norms that vary. These generators model
/// exactly that, from a seed, so every run of a test or benchmark sees the same numbers:
///
/// - keys:   `k[t, h, d] = bias[h, d] + gain[h, d] * N(0, 1)`, where 1 in 32 channels (chosen
///           per head from the seed) has gain `outlier_gain` and bias `outlier_gain / 2`, the
///           others gain 1 and bias `N(0, 0.5)`;
/// - values: `v[t, h, d] = s[t, h] * N(0, 1)` with token scale `s = exp(N(0, 0.5))`.
///
/// They are stand-ins: quality claims in the README come from real models' K/V.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "oscar/core/view.hpp"

namespace oscar::testing {

/// A dense `[tokens, heads, head_dim]` float tensor with its view.
struct dense_kv {
  index_t tokens = 0, heads = 0, head_dim = 0;
  std::vector<float> data;
  [[nodiscard]] kv_view<float> view() { return make_kv_view(data.data(), tokens, heads, head_dim); }
  [[nodiscard]] kv_view<const float> view() const {
    return make_kv_view(data.data(), tokens, heads, head_dim);
  }
};

/// Keys with outlier channels and per-channel bias (see the file comment).
inline dense_kv synthetic_keys(index_t tokens, index_t heads, index_t head_dim,
                               std::uint64_t seed, float outlier_gain = 10.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> bias(static_cast<std::size_t>(heads * head_dim));
  std::vector<float> gain(bias.size(), 1.0f);
  for (index_t h = 0; h < heads; ++h) {
    for (index_t d = 0; d < head_dim; ++d) bias[h * head_dim + d] = 0.5f * normal(rng);
    for (index_t k = 0; k < (head_dim + 31) / 32; ++k) {
      const auto d = static_cast<index_t>(rng() % static_cast<std::uint64_t>(head_dim));
      gain[h * head_dim + d] = outlier_gain;
      bias[h * head_dim + d] = 0.5f * outlier_gain;
    }
  }
  dense_kv k{tokens, heads, head_dim, std::vector<float>(static_cast<std::size_t>(tokens * heads * head_dim))};
  for (index_t t = 0; t < tokens; ++t)
    for (index_t i = 0; i < heads * head_dim; ++i)
      k.data[t * heads * head_dim + i] = bias[i] + gain[i] * normal(rng);
  return k;
}

/// Values: Gaussian with a log-normal scale per (token, head).
inline dense_kv synthetic_values(index_t tokens, index_t heads, index_t head_dim,
                                 std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  dense_kv v{tokens, heads, head_dim, std::vector<float>(static_cast<std::size_t>(tokens * heads * head_dim))};
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t h = 0; h < heads; ++h) {
      const float s = std::exp(0.5f * normal(rng));
      for (index_t d = 0; d < head_dim; ++d) v.data[(t * heads + h) * head_dim + d] = s * normal(rng);
    }
  }
  return v;
}

/// Gaussian data, N(0, sigma^2) per element.
inline dense_kv gaussian_kv(index_t tokens, index_t heads, index_t head_dim, std::uint64_t seed,
                            float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  dense_kv x{tokens, heads, head_dim, std::vector<float>(static_cast<std::size_t>(tokens * heads * head_dim))};
  for (float& e : x.data) e = normal(rng);
  return x;
}

}  // namespace oscar::testing
