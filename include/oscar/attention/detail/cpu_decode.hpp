// SPDX-License-Identifier: Apache-2.0
/// \file
/// Decode attention on the CPU, straight from the cache's blocks: planning, work split,
/// the per-instruction-set kernels (`cpu_kernels.hpp`), and the final combine. The public
/// entry point is `decode(backend::onednn, ...)` in `attention/onednn.hpp`.
///
/// ## Plan
/// 1. Per (sequence, KV head) *entry*: its segments in entry order (sinks, each block, the
///    window in pieces of at most 256 rows), its queries scaled by `softmax_scale * log2(e)`
///    (the kernels use base-2 exponentials), and a rotated copy when a tier's keys are rotated.
/// 2. With `skip_threshold > 0`: per entry, the reference scores (sinks and window) and the
///    skipped blocks (`attention/skip.hpp`), their bounds vectorized like the scores.
/// 3. Tasks: each entry, or, when there are fewer entries than 4x the threads (one long
///    sequence), contiguous runs of its segments with about equal token counts (split-K).
///    Each task keeps per query head a running max `m`, sum `l` and accumulators (plain and
///    rotated space), the online-softmax state of FlashDecoding.
/// 4. Combine: per entry, partials are rescaled to the common max and summed; the rotated
///    accumulator is unrotated once; `out = acc / l`. Statistics come from the raw scores the
///    tasks stored, in float64.
#pragma once

#include <algorithm>
#include <array>
#include <bitset>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <tuple>
#include <type_traits>
#include <vector>

#include "oscar/attention/detail/cpu_isa.hpp"
#include "oscar/attention/detail/cpu_simd.hpp"
#include "oscar/attention/detail/thread_pool.hpp"
#include "oscar/attention/skip.hpp"
#include "oscar/attention/types.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/core/view.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/formats.hpp"

namespace oscar::attention::detail {

/// Most tokens the kernels score at once: a block (`cache::max_block_tokens`) or a window piece.
inline constexpr int max_segment_tokens = cache::max_block_tokens;

/// e4m3 byte -> float.
inline const std::array<float, 256>& e4m3_table() noexcept {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = e4m3_bits_to_float(static_cast<std::uint8_t>(i));
    return t;
  }();
  return table;
}

/// The rotation's sign diagonal (`oscar::rotation_sign`), for head_dim up to 256.
inline const float* rotation_signs() noexcept {
  static const std::array<float, 256> signs = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[static_cast<std::size_t>(i)] = rotation_sign(i);
    return t;
  }();
  return signs.data();
}

enum class segment_kind : std::uint8_t { sinks, block, window };

/// A run of an entry's tokens the kernels attend to in one go.
struct segment {
  segment_kind kind = segment_kind::block;
  int tier = 0;                    ///< block: tier index (0 full, 1 mid, 2 low)
  bool skipped = false;            ///< block: left out by block skipping
  const std::byte* data = nullptr; ///< block: its bytes
  const std::bitset<cache::max_block_tokens>* valid = nullptr;  ///< block: live tokens
  const half* key_min = nullptr;   ///< block: per-channel bounds of its keys (head_dim each)
  const half* key_max = nullptr;
  int first_row = 0;               ///< sinks / window: first row of this piece
  int count = 0;                   ///< rows (sinks / window) or fill (block)
  index_t position = 0;            ///< entry position of the first live token
  index_t live = 0;                ///< live tokens
};

/// One (sequence, KV head) of a decode call.
template <class Cache>
struct entry_work {
  template <int I>
  using params_type = cache::detail::tier_params<typename Cache::template tier_format<I>>;

  index_t b = 0;
  int h = 0;
  typename Cache::entry_view view;
  std::tuple<const params_type<0>*, const params_type<1>*, const params_type<2>*> params;
  std::vector<segment> segments;
  index_t tokens = 0;
  std::vector<float> q_plain, q_rot;  ///< [group][d], times softmax_scale * log2(e)
  skip_report report;
};

/// What one task works with: its queries, its partial (in the job's buffers), scratch.
struct task_state {
  int d = 0;
  int group = 0;
  const float* q_plain = nullptr;
  const float* q_rot = nullptr;
  float* m = nullptr;           ///< [group] running max (base 2)
  double* l = nullptr;          ///< [group] running sum of 2^(s - m)
  float* acc_plain = nullptr;   ///< [group][d]
  float* acc_rot = nullptr;     ///< [group][d], or null when no value format is rotated
  std::array<cache::detail::tier_layout, cache::tier_count> layouts{};
  std::vector<float> s, p;      ///< [group][max_segment_tokens] scores and probabilities
  std::vector<float> w;         ///< [8][d] per-channel weights of tokens-axis keys
  std::vector<float> scratch_k, scratch_v;  ///< a decoded block, for formats without a kernel

  void prepare(int head_dim, int group_size, bool fallback) {
    d = head_dim;
    group = group_size;
    s.assign(static_cast<std::size_t>(group) * max_segment_tokens, 0.0f);
    p.assign(s.size(), 0.0f);
    w.assign(static_cast<std::size_t>(8) * d, 0.0f);
    if (fallback) {
      scratch_k.assign(static_cast<std::size_t>(max_segment_tokens) * d, 0.0f);
      scratch_v.assign(scratch_k.size(), 0.0f);
    }
  }
};

}  // namespace oscar::attention::detail

// ---- the kernels, once per instruction set -----------------------------------------------------
#define OSCAR_DETAIL_CPU_NS cpu_scalar
#include "oscar/attention/detail/cpu_kernels.hpp"
#undef OSCAR_DETAIL_CPU_NS

#if OSCAR_ATTENTION_X86_KERNELS
OSCAR_DETAIL_BEGIN_AVX2
#define OSCAR_DETAIL_CPU_NS cpu_avx2
#include "oscar/attention/detail/cpu_kernels.hpp"
#undef OSCAR_DETAIL_CPU_NS
OSCAR_DETAIL_END_TARGET

OSCAR_DETAIL_BEGIN_AVX512
#define OSCAR_DETAIL_CPU_NS cpu_avx512
#include "oscar/attention/detail/cpu_kernels.hpp"
#undef OSCAR_DETAIL_CPU_NS
OSCAR_DETAIL_END_TARGET
#endif

namespace oscar::attention::detail {

/// The instruction set for a head_dim: the active one when head_dim fills its vectors.
inline cpu_isa kernel_isa(int head_dim) noexcept {
  const cpu_isa isa = active_cpu_isa();
  if (isa == cpu_isa::avx512 && head_dim % 16 == 0) return cpu_isa::avx512;
  if (isa != cpu_isa::scalar && head_dim % 8 == 0) return cpu_isa::avx2;
  return cpu_isa::scalar;
}

template <class Cache>
void run_task_on(cpu_isa isa, task_state& st, const entry_work<Cache>& e, int first, int last,
                 float* stats_scores, index_t stats_stride) noexcept {
#if OSCAR_ATTENTION_X86_KERNELS
  if (isa == cpu_isa::avx512) return cpu_avx512::run_task<Cache>(st, e, first, last, stats_scores, stats_stride);
  if (isa == cpu_isa::avx2) return cpu_avx2::run_task<Cache>(st, e, first, last, stats_scores, stats_stride);
#endif
  (void)isa;
  cpu_scalar::run_task<Cache>(st, e, first, last, stats_scores, stats_stride);
}

/// Rotates (or, with `inverse`, unrotates) `rows` head vectors of `d` floats in place.
inline void rotate_rows_on(cpu_isa isa, float* x, index_t rows, int d, bool inverse) noexcept {
  for (index_t r = 0; r < rows; ++r) {
#if OSCAR_ATTENTION_X86_KERNELS
    if (isa == cpu_isa::avx512) { cpu_avx512::rotate(x + r * d, d, inverse); continue; }
    if (isa == cpu_isa::avx2) { cpu_avx2::rotate(x + r * d, d, inverse); continue; }
#endif
    cpu_scalar::rotate(x + r * d, d, inverse);
  }
}

inline void key_bounds_on(cpu_isa isa, const float* q, int group, int d, const half* lo,
                          const half* hi, float* out) noexcept {
#if OSCAR_ATTENTION_X86_KERNELS
  if (isa == cpu_isa::avx512) return cpu_avx512::key_bounds(q, group, d, lo, hi, out);
  if (isa == cpu_isa::avx2) return cpu_avx2::key_bounds(q, group, d, lo, hi, out);
#endif
  (void)isa;
  cpu_scalar::key_bounds(q, group, d, lo, hi, out);
}

template <class Cache>
void reference_scores_on(cpu_isa isa, task_state& st, const entry_work<Cache>& e,
                         float* ref) noexcept {
#if OSCAR_ATTENTION_X86_KERNELS
  if (isa == cpu_isa::avx512) return cpu_avx512::reference_scores<Cache>(st, e, ref);
  if (isa == cpu_isa::avx2) return cpu_avx2::reference_scores<Cache>(st, e, ref);
#endif
  (void)isa;
  cpu_scalar::reference_scores<Cache>(st, e, ref);
}

/// Compile-time facts about a cache's formats for the kernels.
template <class Cache>
struct cache_kernels {
  template <int I>
  using codec = cpu_scalar::tier_codec<Cache, I>;
  static constexpr bool key_rotated =
      codec<0>::key_rotated || codec<1>::key_rotated || codec<2>::key_rotated;
  static constexpr bool value_rotated =
      codec<0>::value_rotated || codec<1>::value_rotated || codec<2>::value_rotated;
  template <int I>
  static constexpr bool tier_fallback =
      !(codec<I>::key_rows || codec<I>::key_tokens) || !codec<I>::value_rows;
  static constexpr bool fallback = tier_fallback<0> || tier_fallback<1> || tier_fallback<2>;
};

/// Fills an entry's view, tier parameters and segments (throws for an unknown sequence or a
/// KV head without tokens).
template <class Cache>
void build_entry(const Cache& cache, cache::seq_id seq, int layer, int h, entry_work<Cache>& e) {
  const int d = cache.config().head_dim;
  e.view = cache.view(seq, layer, h);
  e.params = {&cache.template params<0>(seq, layer, h), &cache.template params<1>(seq, layer, h),
              &cache.template params<2>(seq, layer, h)};
  const auto add_rows = [&](segment_kind kind, std::size_t elements) {
    const auto rows = static_cast<int>(elements / static_cast<std::size_t>(d));
    for (int r = 0; r < rows; r += max_segment_tokens) {
      segment s;
      s.kind = kind;
      s.first_row = r;
      s.count = std::min(max_segment_tokens, rows - r);
      s.position = e.tokens;
      s.live = s.count;
      e.tokens += s.live;
      e.segments.push_back(s);
    }
  };
  add_rows(segment_kind::sinks, e.view.sink_k.size());
  for (const cache::block_slot& slot : e.view.slots) {
    segment s;
    s.kind = segment_kind::block;
    s.tier = static_cast<int>(slot.level);
    s.data = cache.pool(slot.level).data(slot.id);
    s.valid = &slot.valid;
    s.key_min = cache.pool(slot.level).key_min(slot.id).data();
    s.key_max = cache.pool(slot.level).key_max(slot.id).data();
    s.count = cache.pool(slot.level).fill(slot.id);
    s.position = e.tokens;
    s.live = static_cast<index_t>(slot.valid.count());
    e.tokens += s.live;
    e.segments.push_back(s);
  }
  add_rows(segment_kind::window, e.view.window_k.size());
}

/// Splits segments [0, n) into `parts` contiguous runs of about equal live tokens; returns the
/// run boundaries (parts + 1 values, fewer when there are fewer segments).
inline std::vector<int> split_segments(const std::vector<segment>& segs, int parts) {
  index_t total = 0;
  for (const segment& s : segs) total += s.skipped ? 0 : s.live;
  std::vector<int> bounds{0};
  index_t done = 0;
  for (int i = 0; i < static_cast<int>(segs.size()); ++i) {
    done += segs[static_cast<std::size_t>(i)].skipped ? 0 : segs[static_cast<std::size_t>(i)].live;
    const auto next = static_cast<index_t>(bounds.size());
    if (next < parts && done * parts >= next * total && i + 1 < static_cast<int>(segs.size())) {
      bounds.push_back(i + 1);
    }
  }
  bounds.push_back(static_cast<int>(segs.size()));
  return bounds;
}

/// Decode attention over the blocks: see the file comment. Arguments are validated by the
/// caller, except what only the cache can check (sequences, empty heads), which throws here
/// before anything is written.
template <class Cache>
void cpu_decode(const Cache& cache, int layer, std::span<const cache::seq_id> seqs,
                kv_view<const float> q, kv_view<float> out, const options& opt, float scale,
                std::vector<kv_head_stats>* stats) {
  using kernels = cache_kernels<Cache>;
  const auto& cfg = cache.config();
  const int d = cfg.head_dim;
  const int heads = cfg.kv_heads;
  const int group = opt.q_heads / heads;
  const auto batch = static_cast<index_t>(seqs.size());
  const int threads = opt.threads > 0 ? opt.threads : default_threads();
  const cpu_isa isa = kernel_isa(d);
  const float log2e = 1.4426950408889634f;
  const float q_factor = scale * log2e;  // the kernels' scores are in base 2

  // 1. Entries and their segments (throws for an unknown sequence or an empty head).
  std::vector<entry_work<Cache>> entries(static_cast<std::size_t>(batch * heads));
  for (index_t b = 0; b < batch; ++b) {
    for (int h = 0; h < heads; ++h) {
      entry_work<Cache>& e = entries[static_cast<std::size_t>(b * heads + h)];
      e.b = b;
      e.h = h;
      build_entry(cache, seqs[static_cast<std::size_t>(b)], layer, h, e);
      OSCAR_CHECK(e.tokens > 0, errc::invalid_argument, "sequence ", seqs[b],
                  " has no tokens in layer ", layer, " KV head ", h,
                  " (allowed: decode over at least one cached token)");
      // Queries in base-2 score units; rotated when some tier's keys are.
      e.q_plain.resize(static_cast<std::size_t>(group) * d);
      for (int j = 0; j < group; ++j) {
        const float* row = q.row(b, h * group + j);
        for (int c = 0; c < d; ++c) e.q_plain[static_cast<std::size_t>(j * d + c)] = row[c] * q_factor;
      }
      if constexpr (kernels::key_rotated) {
        e.q_rot = e.q_plain;
        rotate_rows_on(isa, e.q_rot.data(), group, d, false);
      }
    }
  }
  if (stats) stats->assign(entries.size(), kv_head_stats{});
  const auto entry_count = static_cast<index_t>(entries.size());
  const auto make_state = [&](const entry_work<Cache>& e) {
    task_state st;
    st.prepare(d, group, kernels::fallback);
    st.q_plain = e.q_plain.data();
    st.q_rot = kernels::key_rotated ? e.q_rot.data() : nullptr;
    for (int t = 0; t < cache::tier_count; ++t) st.layouts[t] = cache.layout(static_cast<cache::tier>(t));
    return st;
  };

  // 2. Block skipping: the rule of attention/skip.hpp, in the kernels' base-2 units, with the
  // bounds summed in float; a relative margin of 1e-4 keeps every skip on the safe side of
  // float rounding (of the bound and of the kernels' own scores).
  if (opt.skip_threshold > 0.0f) {
    const float tau = opt.skip_threshold * log2e;
    parallel_for(entry_count, threads, [&](index_t i) noexcept {
      entry_work<Cache>& e = entries[static_cast<std::size_t>(i)];
      task_state st = make_state(e);
      std::vector<float> ref(static_cast<std::size_t>(group)), bound(ref.size());
      reference_scores_on<Cache>(isa, st, e, ref.data());
      const bool has_reference = ref[0] != -HUGE_VALF;  // else: no sinks, no window
      for (segment& seg : e.segments) {
        if (seg.kind != segment_kind::block) continue;
        ++e.report.blocks;
        if (!has_reference) continue;
        key_bounds_on(isa, e.q_plain.data(), group, d, seg.key_min, seg.key_max, bound.data());
        bool low = true;
        for (int j = 0; j < group && low; ++j) {
          const float margin = 1e-4f * (std::abs(bound[j]) + std::abs(ref[j]));
          low = bound[j] + margin < ref[j] - tau;
        }
        if (!low) continue;
        seg.skipped = true;
        ++e.report.blocks_skipped;
        e.report.tokens_skipped += seg.live;
      }
    });
  }

  // 3. Tasks: entries, split into runs of segments when there are too few for the threads.
  struct task {
    std::size_t entry;
    int first, last;
  };
  std::vector<task> tasks;
  std::vector<std::size_t> entry_first_task(entries.size() + 1);
  const index_t wanted = threads > 1 ? 4 * static_cast<index_t>(threads) : 1;
  const int parts = static_cast<int>(std::max<index_t>(1, (wanted + entry_count - 1) / entry_count));
  for (std::size_t i = 0; i < entries.size(); ++i) {
    entry_first_task[i] = tasks.size();
    const std::vector<int> bounds = split_segments(entries[i].segments, parts);
    for (std::size_t k = 0; k + 1 < bounds.size(); ++k) tasks.push_back({i, bounds[k], bounds[k + 1]});
  }
  entry_first_task[entries.size()] = tasks.size();
  const std::size_t per_task = static_cast<std::size_t>(group) * d;
  std::vector<float> m(tasks.size() * group, -HUGE_VALF);
  std::vector<double> l(tasks.size() * group, 0.0);
  std::vector<float> acc_plain(tasks.size() * per_task, 0.0f);
  std::vector<float> acc_rot(kernels::value_rotated ? tasks.size() * per_task : 0, 0.0f);
  std::vector<std::vector<float>> scores(stats ? entries.size() : 0);
  for (std::size_t i = 0; i < scores.size(); ++i) {
    scores[i].assign(static_cast<std::size_t>(group * entries[i].tokens), -HUGE_VALF);
  }
  parallel_for(static_cast<index_t>(tasks.size()), threads, [&](index_t i) noexcept {
    const task& t = tasks[static_cast<std::size_t>(i)];
    const entry_work<Cache>& e = entries[t.entry];
    task_state st = make_state(e);
    st.m = m.data() + i * group;
    st.l = l.data() + i * group;
    st.acc_plain = acc_plain.data() + i * per_task;
    st.acc_rot = kernels::value_rotated ? acc_rot.data() + i * per_task : nullptr;
    run_task_on<Cache>(isa, st, e, t.first, t.last, stats ? scores[t.entry].data() : nullptr,
                       e.tokens);
  });

  // 4. Combine the partials of each entry; statistics.
  parallel_for(entry_count, threads, [&](index_t i) noexcept {
    const entry_work<Cache>& e = entries[static_cast<std::size_t>(i)];
    const std::size_t t0 = entry_first_task[static_cast<std::size_t>(i)];
    const std::size_t t1 = entry_first_task[static_cast<std::size_t>(i) + 1];
    std::vector<float> plain(static_cast<std::size_t>(d)), rotated(static_cast<std::size_t>(d));
    for (int j = 0; j < group; ++j) {
      float top = -HUGE_VALF;
      for (std::size_t t = t0; t < t1; ++t) top = std::max(top, m[t * group + j]);
      double total = 0.0;
      std::fill(plain.begin(), plain.end(), 0.0f);
      std::fill(rotated.begin(), rotated.end(), 0.0f);
      for (std::size_t t = t0; t < t1; ++t) {
        if (l[t * group + j] == 0.0) continue;  // attended to nothing (all skipped)
        const float alpha = std::exp2(m[t * group + j] - top);
        total += alpha * l[t * group + j];
        const float* ap = acc_plain.data() + t * per_task + static_cast<std::size_t>(j) * d;
        for (int c = 0; c < d; ++c) plain[c] += alpha * ap[c];
        if constexpr (kernels::value_rotated) {
          const float* ar = acc_rot.data() + t * per_task + static_cast<std::size_t>(j) * d;
          for (int c = 0; c < d; ++c) rotated[c] += alpha * ar[c];
        }
      }
      if constexpr (kernels::value_rotated) rotate_rows_on(isa, rotated.data(), 1, d, true);
      float* o = out.row(e.b, e.h * group + j);
      const auto inv = static_cast<float>(1.0 / total);
      for (int c = 0; c < d; ++c) o[c] = (plain[c] + rotated[c]) * inv;
    }
    if (stats) {
      kv_head_stats& s = (*stats)[static_cast<std::size_t>(i)];
      s.token_mass.assign(static_cast<std::size_t>(e.tokens), 0.0);
      const double ln2 = 0.6931471805599453;
      for (int j = 0; j < group; ++j) {
        const float* sj = scores[static_cast<std::size_t>(i)].data() + static_cast<std::size_t>(j) * e.tokens;
        double top = -HUGE_VAL;
        for (index_t t = 0; t < e.tokens; ++t) top = std::max(top, double(sj[t]) * ln2);
        double sum = 0.0, weighted = 0.0;
        for (index_t t = 0; t < e.tokens; ++t) {
          if (sj[t] == -HUGE_VALF) continue;
          const double shifted = double(sj[t]) * ln2 - top;
          const double x = std::exp(shifted);
          sum += x;
          weighted += x * shifted;
        }
        s.lse += (top + std::log(sum)) / group;
        s.entropy += (std::log(sum) - weighted / sum) / group;
        for (index_t t = 0; t < e.tokens; ++t) {
          if (sj[t] == -HUGE_VALF) continue;
          s.token_mass[static_cast<std::size_t>(t)] += std::exp(double(sj[t]) * ln2 - top) / sum / group;
        }
      }
    }
  });
  if (opt.skipped) {
    skip_report r;
    for (const entry_work<Cache>& e : entries) {
      r.blocks += e.report.blocks;
      r.blocks_skipped += e.report.blocks_skipped;
      r.tokens_skipped += e.report.tokens_skipped;
    }
    *opt.skipped = r;
  }
}

}  // namespace oscar::attention::detail
