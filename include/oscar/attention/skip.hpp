// SPDX-License-Identifier: Apache-2.0
/// \file
/// Query-aware block skipping (as in Quest, Tang et al. 2024), shared by the decode backends.
///
/// Every quantized block keeps, per channel, the min and max of its decoded keys
/// (`block_pool::key_min/key_max`, fp16 rounded outward). They bound the score of every key in
/// the block for a query `q`:
///
///     q . k  <=  U(q) = sum_c max(q_c * min_c, q_c * max_c).
///
/// The bounds are of the *decoded* keys in the model's own space: `update_summary` decodes with
/// `decode_tile`, which undoes a format's Hadamard rotation, so `U` takes the query as the
/// engine passed it, never the rotated query a backend may use for its dot products (the two
/// give the same `q . k`, up to float rounding).
///
/// ## The rule
/// With `options::skip_threshold = tau > 0`, decode computes for each (sequence, KV head) and
/// each query head `j` of the group a *reference score* `r_j`: the largest
/// `softmax_scale * q_j . k` over the entry's fp16 sinks and recent window (exact, and always
/// attended). A block is skipped when, for every query head of the group,
///
///     softmax_scale * U(q_j)  <  r_j - tau.
///
/// An entry without sinks and window has no reference and skips nothing. Sinks and window are
/// never skipped. Skipping is per call and changes nothing in the cache. `tau = 0` turns it
/// off; prefill never skips. The host backend evaluates the rule in float64
/// (`plan_block_skips`); the oneDNN backend sums the bounds in float with its vector kernels
/// and skips only when the inequality holds with a relative margin of 1e-4, so float rounding
/// never skips a block the exact rule would keep. The bound costs about 2.5 vector operations
/// per token of a 64-token block, against about 150 to attend to it.
///
/// ## Error bound
/// Every skipped token `t` has `s_t = softmax_scale * q_j . k_t < r_j - tau`, and the kept
/// token with score `r_j` contributes `e^{r_j}` to the softmax denominator, so the probability
/// mass the skipped tokens would have had in the full softmax is, per query head,
///
///     eps_j  <=  n_skipped * e^{-tau}        (n_skipped: tokens in the skipped blocks).
///
/// The full output is `o = (1 - eps_j) o_kept + eps_j o_skipped`, so the output computed
/// without the skipped blocks is off by
///
///     || o_kept - o ||  =  eps_j * || o_kept - o_skipped ||
///                      <=  n_skipped * e^{-tau} * (|| o_kept || + max_{t skipped} || v_t ||).
///
/// `tau = 20` keeps that below 2e-9 * n_skipped * (the value norms), below fp32 resolution for
/// any realistic context. With skipping, the statistics describe the softmax over the kept
/// tokens (a skipped token's `token_mass` is 0).
#pragma once

#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "oscar/attention/types.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/numeric.hpp"

namespace oscar::attention {

/// Upper bound of `q . k` over every key whose per-channel bounds are `lo`/`hi` (fp16, as the
/// block pool stores them): `sum_c max(q_c * lo_c, q_c * hi_c)`, in double (each product of a
/// float and an fp16 value is exact in double).
inline double key_score_bound(const float* q, std::span<const half> lo, std::span<const half> hi) {
  double bound = 0.0;
  for (std::size_t c = 0; c < lo.size(); ++c) {
    const double a = double(q[c]) * double(static_cast<float>(lo[c]));
    const double b = double(q[c]) * double(static_cast<float>(hi[c]));
    bound += a > b ? a : b;
  }
  return bound;
}

namespace detail {

/// Marks in `skip` (one entry per slot) the blocks of one entry that the rule above leaves
/// out, for the query heads `q[0..group)` (head_dim floats each, as the engine passed them).
/// `ref[j]` is query head j's reference score (softmax-scaled, natural log units), `scale` the
/// softmax scale and `tau` the threshold. Adds the entry's blocks to `report`.
template <class Cache>
void plan_block_skips(const Cache& cache, std::span<const cache::block_slot> slots,
                      const float* const* q, int group, double scale, const double* ref,
                      double tau, std::vector<unsigned char>& skip, skip_report& report) {
  skip.assign(slots.size(), 0);
  for (std::size_t i = 0; i < slots.size(); ++i) {
    const cache::block_slot& s = slots[i];
    const auto& pool = cache.pool(s.level);
    bool all_low = true;
    for (int j = 0; j < group && all_low; ++j) {
      all_low = scale * key_score_bound(q[j], pool.key_min(s.id), pool.key_max(s.id)) <
                ref[j] - tau;
    }
    ++report.blocks;
    if (all_low) {
      skip[i] = 1;
      ++report.blocks_skipped;
      report.tokens_skipped += static_cast<index_t>(s.valid.count());
    }
  }
}

}  // namespace detail
}  // namespace oscar::attention
