// SPDX-License-Identifier: Apache-2.0
/// \file
/// Prefill attention on oneDNN matmul primitives; the public entry point is
/// `prefill(backend::onednn, ...)` in `attention/onednn.hpp`.
///
/// Per KV head, the chunk's queries of the whole group are the rows of one matrix
/// (`row = chunk_token * group + j`, scaled by `softmax_scale * log2(e)`). The keys and values
/// the head attends to (blocks, sinks and window, then the chunk itself) are decoded block by
/// block into a *tile* of `kTileTokens` rows (`[tile, head_dim]`, f32 or bf16), and per tile
/// and block of `kRowBlock` query rows:
///
///     S = Q K_tile^T          (oneDNN matmul, f32 out)
///     online softmax on S     (running max and sum per row, accumulator rows rescaled, P out)
///     O += P V_tile           (oneDNN matmul with a sum post-op)
///
/// The softmax step runs on OpenMP's threads when the including code is compiled with OpenMP
/// (recommended, and what the benchmark does: oneDNN's threads are OpenMP on Debian), else on
/// the calling thread.
///
/// Causality is a prefix per row: a tile lists cached tokens, then chunk tokens in order, so
/// query token `i` sees the tile's columns before its chunk token `i + 1`. Rotated formats:
/// the tile is in the space of the low tier's keys (values), rows of other spaces are rotated
/// or unrotated as they enter it, queries are rotated once and the output unrotated once.
/// Each tile is packed once (a oneDNN reorder from the f32 tile to the blocked weight layout
/// the matmul kernel prefers, in f32 or bf16) and shared by all row blocks. Primitives are
/// created once per (shape, data type) and cached for the process.
///
/// With statistics, a second pass recomputes `S` per tile and accumulates, in float64, each
/// token's probability under the final log-sum-exp.
#pragma once

#include <dnnl.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <tuple>
#include <utility>
#include <vector>

#include "oscar/attention/detail/cpu_decode.hpp"
#include "oscar/attention/types.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/hadamard.hpp"

namespace oscar::attention::detail {

// ---- kernels by instruction set ----------------------------------------------------------------

template <class Cache>
std::pair<bool, bool> decode_block_on(cpu_isa isa, const task_state& st,
                                      const entry_work<Cache>& e, const segment& seg, float* k,
                                      float* v) noexcept {
#if OSCAR_ATTENTION_X86_KERNELS
  if (isa == cpu_isa::avx512) return cpu_avx512::decode_block<Cache>(st, e, seg, k, v);
  if (isa == cpu_isa::avx2) return cpu_avx2::decode_block<Cache>(st, e, seg, k, v);
#endif
  (void)isa;
  return cpu_scalar::decode_block<Cache>(st, e, seg, k, v);
}

template <class P>
void softmax_row_on(cpu_isa isa, float* s, int valid, int n, float& m, double& l, float* o,
                    int d, P* p) noexcept {
#if OSCAR_ATTENTION_X86_KERNELS
  if (isa == cpu_isa::avx512) return cpu_avx512::softmax_row(s, valid, n, m, l, o, d, p);
  if (isa == cpu_isa::avx2) return cpu_avx2::softmax_row(s, valid, n, m, l, o, d, p);
#endif
  (void)isa;
  cpu_scalar::softmax_row(s, valid, n, m, l, o, d, p);
}

inline void to_bf16_on(cpu_isa isa, const float* x, std::size_t n, std::uint16_t* out) noexcept {
#if OSCAR_ATTENTION_X86_KERNELS
  if (isa == cpu_isa::avx512) return cpu_avx512::to_bf16(x, n, out);
  if (isa == cpu_isa::avx2) return cpu_avx2::to_bf16(x, n, out);
#endif
  (void)isa;
  cpu_scalar::to_bf16(x, n, out);
}

// ---- oneDNN objects ----------------------------------------------------------------------------

/// The CPU engine and the primitives prefill uses, created on first use and kept for the
/// process (primitives are immutable and may run from several threads at once).
///
/// A matmul's weights (the key or value tile) come either in the plain row-major `[tile, d]`
/// layout, read in place, or *packed*: in the blocked layout oneDNN's kernel prefers
/// (`format_tag::any`), written once per tile by a reorder from the f32 tile, so the row
/// blocks of the tile share one packing instead of repeating it in every call.
class onednn_matmuls {
 public:
  enum class kind : std::uint8_t {
    scores,  ///< [M, d] x [d, N] (weights = a row-major [N, d] tile) -> [M, N] f32
    values,  ///< [M, N] x [N, d] -> [M, d] f32, added to dst (sum post-op)
  };

  /// A matmul primitive and the layout of its weights.
  struct matmul_entry {
    dnnl::matmul primitive;
    dnnl::memory::desc weights;
    dnnl::reorder pack;  ///< f32 row-major tile -> `weights` (packed entries only)
  };

  static onednn_matmuls& instance() {
    static onednn_matmuls m;
    return m;
  }

  const dnnl::engine& engine() const noexcept { return engine_; }

  /// A stream per thread (streams are not thread-safe).
  dnnl::stream& stream() {
    thread_local dnnl::stream s(engine_);
    return s;
  }

  /// The primitive for `kind` with `rows` x `tile` x `head_dim` in data type `dt`, with plain
  /// or packed weights.
  const matmul_entry& get(kind k, dnnl::memory::data_type dt, index_t rows, index_t tile,
                          index_t head_dim, bool packed) {
    const key id{k, dt, rows, tile, head_dim, packed};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cache_.find(id);
    if (it == cache_.end()) it = cache_.emplace(id, create(k, dt, rows, tile, head_dim, packed)).first;
    return it->second;
  }

  static dnnl::memory::desc scores_src(dnnl::memory::data_type dt, index_t rows, index_t d) {
    return {{rows, d}, dt, dnnl::memory::format_tag::ab};
  }
  static dnnl::memory::desc scores_weights(dnnl::memory::data_type dt, index_t tile, index_t d) {
    return {{d, tile}, dt, dnnl::memory::format_tag::ba};  // the tile is row-major [tile, d]
  }
  static dnnl::memory::desc scores_dst(index_t rows, index_t tile) {
    return {{rows, tile}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab};
  }
  static dnnl::memory::desc values_src(dnnl::memory::data_type dt, index_t rows, index_t tile) {
    return {{rows, tile}, dt, dnnl::memory::format_tag::ab};
  }
  static dnnl::memory::desc values_weights(dnnl::memory::data_type dt, index_t tile, index_t d) {
    return {{tile, d}, dt, dnnl::memory::format_tag::ab};
  }
  static dnnl::memory::desc values_dst(index_t rows, index_t d) {
    return {{rows, d}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::ab};
  }

 private:
  using key = std::tuple<kind, dnnl::memory::data_type, index_t, index_t, index_t, bool>;

  onednn_matmuls() : engine_(dnnl::engine::kind::cpu, 0) {}

  matmul_entry create(kind k, dnnl::memory::data_type dt, index_t rows, index_t tile,
                      index_t d, bool packed) const {
    using dnnl::memory;
    const memory::desc plain = k == kind::scores ? scores_weights(dt, tile, d) : values_weights(dt, tile, d);
    const memory::desc weights =
        packed ? memory::desc(plain.dims(), dt, memory::format_tag::any) : plain;
    dnnl::primitive_attr attr;
    if (k == kind::values) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    const dnnl::matmul::desc desc =
        k == kind::scores ? dnnl::matmul::desc(scores_src(dt, rows, d), weights, scores_dst(rows, tile))
                          : dnnl::matmul::desc(values_src(dt, rows, tile), weights, values_dst(rows, d));
    const dnnl::matmul::primitive_desc pd(desc, attr, engine_);
    matmul_entry e{dnnl::matmul(pd), pd.weights_desc(), {}};
    if (packed) {
      const memory::desc f32_tile = k == kind::scores ? scores_weights(memory::data_type::f32, tile, d)
                                                      : values_weights(memory::data_type::f32, tile, d);
      e.pack = dnnl::reorder(dnnl::reorder::primitive_desc(engine_, f32_tile, engine_, e.weights));
    }
    return e;
  }

  dnnl::engine engine_;
  std::mutex mutex_;
  std::map<key, matmul_entry> cache_;
};

// ---- prefill -----------------------------------------------------------------------------------

inline constexpr int kTileTokens = 512;  ///< keys/values per tile
inline constexpr int kRowBlock = 512;    ///< query rows per matmul
inline constexpr int kRows = 16;         ///< rows per task of the element-wise steps

/// Converts a row between the plain and the rotated space.
inline void to_space(cpu_isa isa, float* row, int d, bool from_rotated, bool to_rotated) noexcept {
  if (from_rotated != to_rotated) rotate_rows_on(isa, row, 1, d, !to_rotated);
}

template <class Cache, class T>
void onednn_prefill(const Cache& cache, int layer, cache::seq_id seq, kv_view<const float> q,
                    kv_view<const T> k, kv_view<const T> v, kv_view<float> out,
                    const options& opt, float scale, std::vector<kv_head_stats>* stats) {
  using codec = cpu_scalar::tier_codec<Cache, 2>;  // the low tier sets the spaces
  constexpr bool key_rot = codec::key_rotated;
  constexpr bool value_rot = codec::value_rotated;
  const auto& cfg = cache.config();
  const int d = cfg.head_dim;
  const int heads = cfg.kv_heads;
  const int group = opt.q_heads / heads;
  const index_t chunk = q.tokens;
  // The softmax between two matmuls runs on OpenMP's threads when the including code has
  // OpenMP; otherwise on the calling thread alone, because oneDNN's OpenMP threads spin for a
  // while after each matmul and a second set of threads would fight them for the cores.
#if defined(_OPENMP)
  const int threads = opt.threads > 0 ? opt.threads : default_threads();
#else
  const int threads = 1;
#endif
  const cpu_isa isa = kernel_isa(d);
  const bool bf16 = opt.compute == compute_type::bf16;
  const auto dt = bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  const float q_factor = scale * 1.4426950408889634f;  // scores in base 2
  const double ln2 = 0.6931471805599453;

  std::vector<entry_work<Cache>> entries(static_cast<std::size_t>(heads));
  for (int h = 0; h < heads; ++h) build_entry(cache, seq, layer, h, entries[h]);  // may throw
  if (stats) {
    stats->assign(static_cast<std::size_t>(chunk * heads), kv_head_stats{});
    for (index_t i = 0; i < chunk; ++i)
      for (int h = 0; h < heads; ++h)
        (*stats)[static_cast<std::size_t>(i * heads + h)].token_mass.assign(
            static_cast<std::size_t>(entries[h].tokens + i + 1), 0.0);
  }
  if (chunk == 0) return;

  const index_t rows = chunk * group;
  const index_t row_block = std::min<index_t>(kRowBlock, (rows + 15) / 16 * 16);
  const index_t padded = (rows + row_block - 1) / row_block * row_block;
  const std::size_t tile_elems = static_cast<std::size_t>(kTileTokens) * d;

  onednn_matmuls& dnn = onednn_matmuls::instance();
  const auto& mm_scores = dnn.get(onednn_matmuls::kind::scores, dt, row_block, kTileTokens, d, true);
  const auto& mm_values = dnn.get(onednn_matmuls::kind::values, dt, row_block, kTileTokens, d, true);
  dnnl::stream& stream = dnn.stream();
  dnnl::memory k_packed(mm_scores.weights, dnn.engine());
  dnnl::memory v_packed(mm_values.weights, dnn.engine());

  std::vector<float> q_f32(static_cast<std::size_t>(padded) * d);
  std::vector<std::uint16_t> q_bf16(bf16 ? q_f32.size() : 0);
  std::vector<float> o(static_cast<std::size_t>(padded) * d);
  std::vector<float> m(static_cast<std::size_t>(padded));
  std::vector<double> l(static_cast<std::size_t>(padded));
  std::vector<float> s(static_cast<std::size_t>(row_block) * kTileTokens);
  std::vector<float> p_f32(bf16 ? 0 : s.size());
  std::vector<std::uint16_t> p_bf16(bf16 ? s.size() : 0);
  std::vector<float> k_tile(tile_elems), v_tile(tile_elems);
  std::vector<index_t> position(kTileTokens);
  std::vector<float> k_block, v_block;
  task_state st;
  st.prepare(d, group, false);
  for (int t = 0; t < cache::tier_count; ++t) st.layouts[t] = cache.layout(static_cast<cache::tier>(t));

  for (int h = 0; h < heads; ++h) {
    const entry_work<Cache>& e = entries[static_cast<std::size_t>(h)];
    const index_t cached = e.tokens;
    // Queries of the group as rows, in base-2 score units and the keys' space.
    parallel_for((rows + kRows - 1) / kRows, threads, [&](index_t task) noexcept {
      const index_t r1 = std::min(rows, task * kRows + kRows);
      for (index_t r = task * kRows; r < r1; ++r) {
        const float* src = q.row(r / group, h * group + static_cast<int>(r % group));
        float* dst = q_f32.data() + r * d;
        for (int c = 0; c < d; ++c) dst[c] = src[c] * q_factor;
      }
      if constexpr (key_rot) rotate_rows_on(isa, q_f32.data() + task * kRows * d, r1 - task * kRows, d, false);
      if (bf16) {
        to_bf16_on(isa, q_f32.data() + task * kRows * d, static_cast<std::size_t>(r1 - task * kRows) * d,
                   q_bf16.data() + task * kRows * d);
      }
    });
    std::fill(o.begin(), o.end(), 0.0f);
    std::fill(m.begin(), m.end(), -HUGE_VALF);
    std::fill(l.begin(), l.end(), 0.0);

    // One pass over the tiles: pass 0 attends, pass 1 (statistics) revisits the scores.
    for (int pass = 0; pass < (stats ? 2 : 1); ++pass) {
      int filled = 0;
      int chunk_column = kTileTokens;  // first column holding a chunk token
      index_t chunk_first = 0;         // that token's chunk index

      // Rows enter the f32 tile (`k_tile`/`v_tile`) in its space; a reorder per tile packs it
      // (in f32 or bf16) for the matmuls.
      const auto land = [&](float* kr, float* vr, int rows_in, bool k_rotated,
                            bool v_rotated) noexcept {
        for (int t = 0; t < rows_in; ++t) {
          to_space(isa, kr + static_cast<std::size_t>(t) * d, d, k_rotated, key_rot);
          to_space(isa, vr + static_cast<std::size_t>(t) * d, d, v_rotated, value_rot);
        }
      };

      // Whole blocks waiting to be decoded into the tile, with their first row; decoded
      // together, one block per task.
      std::vector<std::pair<const segment*, int>> pending;
      const auto decode_pending = [&] {
        parallel_for(static_cast<index_t>(pending.size()), threads, [&](index_t i) noexcept {
          const auto [seg, first] = pending[static_cast<std::size_t>(i)];
          float* kd = k_tile.data() + static_cast<std::size_t>(first) * d;
          float* vd = v_tile.data() + static_cast<std::size_t>(first) * d;
          const auto [kr, vr] = decode_block_on<Cache>(isa, st, e, *seg, kd, vd);
          land(kd, vd, seg->count, kr, vr);
        });
        pending.clear();
      };

      const auto flush = [&] {
        decode_pending();
        if (filled == 0) return;
        const auto pad = static_cast<std::ptrdiff_t>(filled) * d;
        std::fill(k_tile.begin() + pad, k_tile.end(), 0.0f);
        std::fill(v_tile.begin() + pad, v_tile.end(), 0.0f);
        dnnl::memory k_f32(onednn_matmuls::scores_weights(dnnl::memory::data_type::f32, kTileTokens, d),
                           dnn.engine(), k_tile.data());
        dnnl::memory v_f32(onednn_matmuls::values_weights(dnnl::memory::data_type::f32, kTileTokens, d),
                           dnn.engine(), v_tile.data());
        mm_scores.pack.execute(stream, k_f32, k_packed);
        mm_values.pack.execute(stream, v_f32, v_packed);
        stream.wait();
        const dnnl::memory& k_mem = k_packed;
        const dnnl::memory& v_mem = v_packed;
        const dnnl::memory s_mem(onednn_matmuls::scores_dst(row_block, kTileTokens), dnn.engine(), s.data());
        for (index_t r0 = 0; r0 < rows; r0 += row_block) {
          // Query token i sees columns [0, visible(i)).
          const auto visible = [&](index_t r) {
            const index_t i = r / group;
            if (chunk_column >= filled) return filled;
            return static_cast<int>(std::clamp<index_t>(chunk_column + i - chunk_first + 1,
                                                        chunk_column, filled));
          };
          if (visible(std::min(rows, r0 + row_block) - 1) == 0) continue;  // all causal-masked
          void* qp = bf16 ? static_cast<void*>(q_bf16.data() + r0 * d)
                          : static_cast<void*>(q_f32.data() + r0 * d);
          const dnnl::memory q_mem(onednn_matmuls::scores_src(dt, row_block, d), dnn.engine(), qp);
          mm_scores.primitive.execute(stream, {{DNNL_ARG_SRC, q_mem}, {DNNL_ARG_WEIGHTS, k_mem},
                                     {DNNL_ARG_DST, s_mem}});
          stream.wait();
          const index_t block_rows = std::min(row_block, rows - r0);
          if (pass == 1) {  // statistics: probabilities under the final log-sum-exp
            for (index_t r = r0; r < r0 + block_rows; ++r) {
              const index_t i = r / group;
              kv_head_stats& sr = (*stats)[static_cast<std::size_t>(i * heads + h)];
              const double lse = (double(m[r]) + std::log2(l[r])) * ln2;
              const float* sr_row = s.data() + (r - r0) * kTileTokens;
              for (int t = 0; t < visible(r); ++t) {
                const double shifted = double(sr_row[t]) * ln2 - lse;
                const double pt = std::exp(shifted);
                sr.token_mass[static_cast<std::size_t>(position[t])] += pt / group;
                sr.entropy -= pt * shifted / group;
              }
            }
            continue;
          }
          parallel_for((block_rows + kRows - 1) / kRows, threads, [&](index_t task) noexcept {
            for (index_t r = r0 + task * kRows; r < std::min(r0 + block_rows, r0 + (task + 1) * kRows); ++r) {
              const index_t rr = r - r0;
              float* sr = s.data() + rr * kTileTokens;
              float* orow = o.data() + r * d;
              if (bf16) {
                softmax_row_on(isa, sr, visible(r), kTileTokens, m[r], l[r], orow, d,
                               p_bf16.data() + rr * kTileTokens);
              } else {
                softmax_row_on(isa, sr, visible(r), kTileTokens, m[r], l[r], orow, d,
                               p_f32.data() + rr * kTileTokens);
              }
            }
          });
          void* pp = bf16 ? static_cast<void*>(p_bf16.data()) : static_cast<void*>(p_f32.data());
          const dnnl::memory p_mem(onednn_matmuls::values_src(dt, row_block, kTileTokens), dnn.engine(), pp);
          const dnnl::memory o_mem(onednn_matmuls::values_dst(row_block, d), dnn.engine(), o.data() + r0 * d);
          mm_values.primitive.execute(stream, {{DNNL_ARG_SRC, p_mem}, {DNNL_ARG_WEIGHTS, v_mem},
                                     {DNNL_ARG_DST, o_mem}});
          stream.wait();
        }
        filled = 0;
        chunk_column = kTileTokens;
      };

      const auto push = [&](const float* kr, const float* vr, bool k_rotated, bool v_rotated,
                            index_t pos, index_t chunk_index) {
        float* kd = k_tile.data() + static_cast<std::size_t>(filled) * d;
        float* vd = v_tile.data() + static_cast<std::size_t>(filled) * d;
        std::copy(kr, kr + d, kd);
        std::copy(vr, vr + d, vd);
        land(kd, vd, 1, k_rotated, v_rotated);
        position[filled] = pos;
        if (chunk_index >= 0 && chunk_column == kTileTokens) {
          chunk_column = filled;
          chunk_first = chunk_index;
        }
        if (++filled == kTileTokens) flush();
      };

      // Blocks first (a tile takes whole blocks, decoded in place), then sinks and window,
      // then the chunk in order (its causal mask is a prefix). Attention does not depend on
      // the order of the keys; `position` keeps each one's entry position for statistics.
      std::vector<float> kw(static_cast<std::size_t>(d)), vw(static_cast<std::size_t>(d));
      for (const segment& seg : e.segments) {
        if (seg.kind != segment_kind::block) continue;
        const bool whole = seg.live == seg.count;
        if (whole && filled + seg.count <= kTileTokens) {  // decoded in place, with the others
          pending.emplace_back(&seg, filled);
          for (int t = 0; t < seg.count; ++t) position[filled + t] = seg.position + t;
          filled += seg.count;
          if (filled == kTileTokens) flush();
          continue;
        }
        k_block.resize(static_cast<std::size_t>(seg.count) * d);
        v_block.resize(k_block.size());
        const auto [kr, vr] = decode_block_on<Cache>(isa, st, e, seg, k_block.data(), v_block.data());
        index_t pos = seg.position;
        for (int t = 0; t < seg.count; ++t) {
          if (!seg.valid->test(static_cast<std::size_t>(t))) continue;
          push(k_block.data() + static_cast<std::size_t>(t) * d,
               v_block.data() + static_cast<std::size_t>(t) * d, kr, vr, pos++, -1);
        }
      }
      for (const segment& seg : e.segments) {
        if (seg.kind == segment_kind::block) continue;
        const auto& ks = seg.kind == segment_kind::sinks ? e.view.sink_k : e.view.window_k;
        const auto& vs = seg.kind == segment_kind::sinks ? e.view.sink_v : e.view.window_v;
        for (int t = 0; t < seg.count; ++t) {
          const std::size_t at = static_cast<std::size_t>(seg.first_row + t) * d;
          for (int c = 0; c < d; ++c) {
            kw[c] = static_cast<float>(ks[at + c]);
            vw[c] = static_cast<float>(vs[at + c]);
          }
          push(kw.data(), vw.data(), false, false, seg.position + t, -1);
        }
      }
      for (index_t i = 0; i < chunk; ++i) {
        for (int c = 0; c < d; ++c) {
          kw[c] = static_cast<float>(k.row(i, h)[c]);
          vw[c] = static_cast<float>(v.row(i, h)[c]);
        }
        push(kw.data(), vw.data(), false, false, cached + i, i);
      }
      flush();
    }

    // Normalize, back to the plain space, out.
    parallel_for((rows + kRows - 1) / kRows, threads, [&](index_t task) noexcept {
      for (index_t r = task * kRows; r < std::min(rows, task * kRows + kRows); ++r) {
        float* orow = o.data() + r * d;
        const auto inv = static_cast<float>(1.0 / l[r]);
        for (int c = 0; c < d; ++c) orow[c] *= inv;
        if constexpr (value_rot) rotate_rows_on(isa, orow, 1, d, true);
        std::copy(orow, orow + d, out.row(r / group, h * group + static_cast<int>(r % group)));
      }
    });
    if (stats) {
      for (index_t r = 0; r < rows; ++r) {
        (*stats)[static_cast<std::size_t>(r / group * heads + h)].lse +=
            (double(m[r]) + std::log2(l[r])) * ln2 / group;
      }
    }
  }
}

}  // namespace oscar::attention::detail
