// SPDX-License-Identifier: Apache-2.0
/// \file
/// Options and statistics shared by every attention backend.
#pragma once

#include <vector>

#include "oscar/core/view.hpp"

namespace oscar::attention {

/// Parameters of one attention call.
struct options {
  int q_heads = 0;             ///< query heads; a multiple of the cache's KV heads (1 to 16 per group)
  float softmax_scale = 0.0f;  ///< multiplies q . k; 0 means 1 / sqrt(head_dim)
  bool want_stats = false;     ///< fill `kv_head_stats` for the importance scorers
};

/// Attention statistics of one (query, KV head), reduced over the KV head's query group.
/// Probabilities are per query head; the group's values are averaged (so `token_mass` sums
/// to 1, as each head's probabilities do).
struct kv_head_stats {
  double lse = 0.0;      ///< mean over the group of log(sum_t exp(scale * q . k_t))
  double entropy = 0.0;  ///< mean over the group of -sum_t p_t log p_t, in nats
  std::vector<double> token_mass;  ///< per token (entry order of the KV head), mean of p_t
};

}  // namespace oscar::attention
