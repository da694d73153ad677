// SPDX-License-Identifier: Apache-2.0
/// \file
/// Options and statistics shared by every attention backend.
#pragma once

#include <cstdint>
#include <vector>

#include "oscar/core/view.hpp"

namespace oscar::attention {

/// What query-aware block skipping did in one call (see `oscar/attention/skip.hpp`), summed
/// over the batch and the KV heads.
struct skip_report {
  index_t blocks = 0;          ///< quantized blocks the call could read
  index_t blocks_skipped = 0;  ///< of those, blocks left out because their bound was too low
  index_t tokens_skipped = 0;  ///< valid tokens in the skipped blocks
};

/// Arithmetic of the matrix products where a backend has a choice (oneDNN prefill).
enum class compute_type : std::uint8_t {
  f32,   ///< fp32 products and accumulation
  bf16,  ///< bf16 operands, fp32 accumulation (about 3 significant digits per product)
};

/// Parameters of one attention call.
struct options {
  int q_heads = 0;             ///< query heads; a multiple of the cache's KV heads (1 to 16 per group)
  float softmax_scale = 0.0f;  ///< multiplies q . k; 0 means 1 / sqrt(head_dim)
  bool want_stats = false;     ///< fill `kv_head_stats` for the importance scorers
  /// Query-aware block skipping (decode only): a quantized block is left out when, for every
  /// query head of the group, the bound on its scores (`softmax_scale * q . k`, from the block's
  /// key min/max) is below the reference score minus `skip_threshold` (in nats). 0 turns
  /// skipping off; see `oscar/attention/skip.hpp` for the reference and the error bound.
  float skip_threshold = 0.0f;
  skip_report* skipped = nullptr;  ///< when set, receives what skipping did (zeros when off)
  int threads = 0;  ///< CPU backends: worker threads to use; 0 means one per hardware thread
  compute_type compute = compute_type::f32;  ///< oneDNN prefill's matrix products
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
