// SPDX-License-Identifier: Apache-2.0
/// \file
/// The host reference backend of attention over a `kv_cache`: `decode` (one query token per
/// sequence, a batch of sequences) and `prefill` (a causal chunk of query tokens against the
/// cache plus the chunk). Plain scalar code with float64 accumulation, written to be read and
/// to be what every other backend is tested against; it decodes the cache with `gather`.
///
/// Grouped-query attention: query head `qh` reads KV head `qh / (q_heads / kv_heads)`. One
/// softmax covers everything the KV head holds, fp16 sinks and window included, in entry order.
/// Decode can skip blocks by their key bounds (`options::skip_threshold`, `attention/skip.hpp`).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "oscar/attention/skip.hpp"
#include "oscar/attention/types.hpp"
#include "oscar/backend/tags.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"
#include "oscar/quant/tensor.hpp"

namespace oscar::attention {

namespace detail {

/// Checks what every call needs; returns the resolved softmax scale.
template <class Cache>
float check_common(const Cache& cache, int layer, const options& opt) {
  const auto& cfg = cache.config();
  OSCAR_CHECK_ARG(layer >= 0 && layer < cfg.layers, layer,
                  oscar::detail::concat("0 to ", cfg.layers - 1));
  OSCAR_CHECK_ARG(opt.q_heads >= cfg.kv_heads && opt.q_heads % cfg.kv_heads == 0 &&
                      opt.q_heads / cfg.kv_heads <= 16,
                  opt.q_heads,
                  oscar::detail::concat("a multiple of the cache's ", cfg.kv_heads,
                                        " KV heads, 1 to 16 query heads per KV head"));
  OSCAR_CHECK_ARG(std::isfinite(opt.softmax_scale) && opt.softmax_scale >= 0.0f,
                  opt.softmax_scale, "a finite value > 0, or 0 for 1 / sqrt(head_dim)");
  OSCAR_CHECK_ARG(std::isfinite(opt.skip_threshold) && opt.skip_threshold >= 0.0f,
                  opt.skip_threshold, "a finite value >= 0 (0: no block skipping)");
  OSCAR_CHECK_ARG(opt.threads >= 0, opt.threads, ">= 0 (0: one per hardware thread)");
  return opt.softmax_scale > 0.0f ? opt.softmax_scale
                                  : 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
}

template <class T>
void check_view(kv_view<T> x, index_t tokens, index_t heads, index_t head_dim, const char* name) {
  OSCAR_CHECK(x.tokens == tokens && x.heads == heads && x.head_dim == head_dim,
              errc::invalid_argument, name, " shape [", x.tokens, ", ", x.heads, ", ", x.head_dim,
              "] is not allowed (allowed: [", tokens, ", ", heads, ", ", head_dim, "])");
}

/// Checks a decode call (everything but what only the cache knows: sequences, empty heads);
/// returns the softmax scale. Shared by every backend, so they reject the same calls.
template <class Cache>
float check_decode(const Cache& cache, int layer, std::span<const cache::seq_id> seqs,
                   kv_view<const float> q, kv_view<const float> out, const options& opt,
                   const std::vector<kv_head_stats>* stats) {
  const auto& cfg = cache.config();
  const float scale = check_common(cache, layer, opt);
  const auto batch = static_cast<index_t>(seqs.size());
  check_view(q, batch, opt.q_heads, cfg.head_dim, "q");
  check_view(out, batch, opt.q_heads, cfg.head_dim, "out");
  OSCAR_CHECK(!opt.want_stats || stats != nullptr, errc::invalid_argument,
              "stats = nullptr is not allowed (allowed: a vector to fill when want_stats)");
  quant::check_finite(q);
  return scale;
}

/// Checks a prefill call (everything but the sequence); returns the softmax scale.
template <class Cache, class T>
float check_prefill(const Cache& cache, int layer, kv_view<const float> q, kv_view<const T> k,
                    kv_view<const T> v, kv_view<const float> out, const options& opt,
                    const std::vector<kv_head_stats>* stats) {
  const auto& cfg = cache.config();
  const float scale = check_common(cache, layer, opt);
  const index_t chunk = q.tokens;
  check_view(q, chunk, opt.q_heads, cfg.head_dim, "q");
  check_view(k, chunk, cfg.kv_heads, cfg.head_dim, "k");
  check_view(v, chunk, cfg.kv_heads, cfg.head_dim, "v");
  check_view(out, chunk, opt.q_heads, cfg.head_dim, "out");
  OSCAR_CHECK(!opt.want_stats || stats != nullptr, errc::invalid_argument,
              "stats = nullptr is not allowed (allowed: a vector to fill when want_stats)");
  quant::check_finite(q);
  quant::check_finite(k);
  quant::check_finite(v);
  return scale;
}

/// Keys and values one query attends to: `[tokens, head_dim]` row-major each.
struct kv_rows {
  const float* k;
  const float* v;
  index_t tokens;
};

/// softmax(scale * q . k) v over `parts` (concatenated), in float64. Writes `out` (head_dim)
/// and, when asked, adds this query's probabilities / group to `mass`, lse and entropy.
inline void attend(const float* q, std::span<const kv_rows> parts, int head_dim, double scale,
                   float* out, kv_head_stats* stats, double group_weight) {
  std::vector<double> score;
  for (const kv_rows& p : parts) {
    for (index_t t = 0; t < p.tokens; ++t) {
      double dot = 0.0;
      for (int d = 0; d < head_dim; ++d) dot += double(q[d]) * p.k[t * head_dim + d];
      score.push_back(scale * dot);
    }
  }
  const double max_score = *std::max_element(score.begin(), score.end());
  double sum = 0.0, weighted_shift = 0.0;
  for (double& s : score) {
    const double shifted = s - max_score;
    s = std::exp(shifted);
    sum += s;
    weighted_shift += s * shifted;
  }
  std::vector<double> acc(static_cast<std::size_t>(head_dim), 0.0);
  std::size_t i = 0;
  for (const kv_rows& p : parts) {
    for (index_t t = 0; t < p.tokens; ++t, ++i) {
      for (int d = 0; d < head_dim; ++d) acc[d] += score[i] * p.v[t * head_dim + d];
    }
  }
  for (int d = 0; d < head_dim; ++d) out[d] = static_cast<float>(acc[d] / sum);
  if (stats) {
    // lse = max + log(sum); entropy = -sum p log p = log(sum) - sum p * (s - max).
    stats->lse += group_weight * (max_score + std::log(sum));
    stats->entropy += group_weight * (std::log(sum) - weighted_shift / sum);
    stats->token_mass.resize(score.size(), 0.0);
    for (std::size_t t = 0; t < score.size(); ++t) stats->token_mass[t] += group_weight * score[t] / sum;
  }
}

/// The runs of an entry's gathered rows that decode attends to: all of them (one part), or,
/// with a skip threshold, everything but the blocks `plan_block_skips` leaves out. `first`
/// receives each part's entry position.
template <class Cache>
void kept_parts(const Cache& cache, cache::seq_id seq, int layer, int h,
                const cache::gathered_head& g, kv_view<const float> q, index_t b, int group,
                double scale, float threshold, std::vector<kv_rows>& parts,
                std::vector<index_t>& first, skip_report& report) {
  const int d = cache.config().head_dim;
  parts.assign(1, kv_rows{g.k.data(), g.v.data(), g.tokens});
  first.assign(1, 0);
  if (threshold <= 0.0f) return;
  const auto ev = cache.view(seq, layer, h);
  const auto sinks = static_cast<index_t>(ev.sink_k.size()) / d;
  const auto window = static_cast<index_t>(ev.window_k.size()) / d;
  std::vector<const float*> qs(static_cast<std::size_t>(group));
  std::vector<double> ref(static_cast<std::size_t>(group), -HUGE_VAL);
  const auto reference = [&](int j, index_t from, index_t to) {  // over gathered rows
    for (index_t t = from; t < to; ++t) {
      double dot = 0.0;
      for (int c = 0; c < d; ++c) dot += double(qs[j][c]) * g.k[static_cast<std::size_t>(t * d + c)];
      ref[j] = std::max(ref[j], scale * dot);
    }
  };
  for (int j = 0; j < group; ++j) {
    qs[j] = q.row(b, h * group + j);
    reference(j, 0, sinks);
    reference(j, g.tokens - window, g.tokens);
  }
  if (sinks + window == 0) {  // no reference score: nothing is skipped
    report.blocks += static_cast<index_t>(ev.slots.size());
    return;
  }
  std::vector<unsigned char> skip;
  plan_block_skips(cache, ev.slots, qs.data(), group, scale, ref.data(), threshold, skip, report);
  parts.clear();
  first.clear();
  const auto add = [&](index_t from, index_t count) {
    if (count == 0) return;
    if (!parts.empty() && first.back() + parts.back().tokens == from) {
      parts.back().tokens += count;
      return;
    }
    parts.push_back(kv_rows{g.k.data() + from * d, g.v.data() + from * d, count});
    first.push_back(from);
  };
  add(0, sinks);
  index_t pos = sinks;
  for (std::size_t i = 0; i < ev.slots.size(); ++i) {
    const auto count = static_cast<index_t>(ev.slots[i].valid.count());
    if (!skip[i]) add(pos, count);
    pos += count;
  }
  add(pos, window);
}

}  // namespace detail

/// Decode attention for a batch: `q` is `[batch, q_heads, head_dim]` (one query token of
/// sequence `seqs[b]` per row), `out` the same shape. With `opt.want_stats`, `stats` receives
/// `batch * kv_heads` entries (batch-major). Throws `oscar::error` on shapes, head counts, an
/// unknown sequence, non-finite queries, or a KV head with no tokens; `out` is written only
/// after every check passed. With `opt.skip_threshold > 0`, blocks are skipped by their key
/// bounds (`attention/skip.hpp`); `opt.skipped` receives the counts.
template <class Cache>
void decode(backend::host, const Cache& cache, int layer, std::span<const cache::seq_id> seqs,
            kv_view<const float> q, kv_view<float> out, const options& opt,
            std::vector<kv_head_stats>* stats = nullptr) {
  const auto& cfg = cache.config();
  const double scale = detail::check_decode(cache, layer, seqs, q, out, opt, stats);
  const auto batch = static_cast<index_t>(seqs.size());
  std::vector<std::vector<cache::gathered_head>> kv;
  kv.reserve(seqs.size());
  for (index_t b = 0; b < batch; ++b) {
    kv.push_back(cache.gather(seqs[b], layer));  // throws for an unknown sequence
    for (int h = 0; h < cfg.kv_heads; ++h) {
      OSCAR_CHECK(kv.back()[h].tokens > 0, errc::invalid_argument, "sequence ", seqs[b],
                  " has no tokens in layer ", layer, " KV head ", h,
                  " (allowed: decode over at least one cached token)");
    }
  }
  const int group = opt.q_heads / cfg.kv_heads;
  if (stats) stats->assign(static_cast<std::size_t>(batch * cfg.kv_heads), kv_head_stats{});
  skip_report report;
  std::vector<detail::kv_rows> parts;
  std::vector<index_t> first;  // entry position of each part's first token
  for (index_t b = 0; b < batch; ++b) {
    for (int h = 0; h < cfg.kv_heads; ++h) {
      const cache::gathered_head& g = kv[b][h];
      kv_head_stats* s = opt.want_stats ? &(*stats)[b * cfg.kv_heads + h] : nullptr;
      detail::kept_parts(cache, seqs[b], layer, h, g, q, b, group, scale, opt.skip_threshold,
                         parts, first, report);
      kv_head_stats kept;  // statistics over the kept tokens when skipping
      kv_head_stats* target = s && (parts.size() != 1 || parts[0].tokens != g.tokens) ? &kept : s;
      for (int j = 0; j < group; ++j) {
        const int qh = h * group + j;
        detail::attend(q.row(b, qh), parts, cfg.head_dim, scale, out.row(b, qh), target,
                       1.0 / group);
      }
      if (target == &kept) {  // spread the kept tokens' mass over the entry order
        s->lse = kept.lse;
        s->entropy = kept.entropy;
        s->token_mass.assign(static_cast<std::size_t>(g.tokens), 0.0);
        std::size_t i = 0;
        for (std::size_t p = 0; p < parts.size(); ++p)
          for (index_t t = 0; t < parts[p].tokens; ++t)
            s->token_mass[static_cast<std::size_t>(first[p] + t)] = kept.token_mass[i++];
      }
    }
  }
  if (opt.skipped) *opt.skipped = report;
}

/// Prefill attention for one sequence: `q` is `[chunk, q_heads, head_dim]`, `k`/`v` the
/// chunk's own keys and values `[chunk, kv_heads, head_dim]` (full precision, not yet in the
/// cache), `out` like `q`. Query `i` attends to every token the cache holds for the sequence
/// and to chunk tokens `0..i` (causal). With `opt.want_stats`, `stats` receives
/// `chunk * kv_heads` entries (query-major); token_mass covers cached tokens, then the chunk.
template <class Cache, class T>
void prefill(backend::host, const Cache& cache, int layer, cache::seq_id seq,
             kv_view<const float> q, kv_view<const T> k, kv_view<const T> v, kv_view<float> out,
             const options& opt, std::vector<kv_head_stats>* stats = nullptr) {
  const auto& cfg = cache.config();
  const double scale = detail::check_prefill(cache, layer, q, k, v, out, opt, stats);
  const index_t chunk = q.tokens;
  const std::vector<cache::gathered_head> cached = cache.gather(seq, layer);
  if (opt.skipped) *opt.skipped = skip_report{};  // prefill attends to every block
  const int group = opt.q_heads / cfg.kv_heads;
  const int d = cfg.head_dim;
  if (stats) stats->assign(static_cast<std::size_t>(chunk * cfg.kv_heads), kv_head_stats{});
  std::vector<float> chunk_k, chunk_v;
  for (int h = 0; h < cfg.kv_heads; ++h) {
    chunk_k.resize(static_cast<std::size_t>(chunk * d));
    chunk_v.resize(static_cast<std::size_t>(chunk * d));
    for (index_t t = 0; t < chunk; ++t) {
      for (int c = 0; c < d; ++c) {
        chunk_k[t * d + c] = static_cast<float>(k.row(t, h)[c]);
        chunk_v[t * d + c] = static_cast<float>(v.row(t, h)[c]);
      }
    }
    const cache::gathered_head& g = cached[h];
    for (index_t i = 0; i < chunk; ++i) {
      const detail::kv_rows parts[2] = {{g.k.data(), g.v.data(), g.tokens},
                                        {chunk_k.data(), chunk_v.data(), i + 1}};
      kv_head_stats* s = opt.want_stats ? &(*stats)[i * cfg.kv_heads + h] : nullptr;
      for (int j = 0; j < group; ++j) {
        const int qh = h * group + j;
        detail::attend(q.row(i, qh), parts, d, scale, out.row(i, qh), s, 1.0 / group);
      }
    }
  }
}

}  // namespace oscar::attention
