// SPDX-License-Identifier: Apache-2.0
/// \file
/// The oneDNN backend of attention over a `kv_cache`, the production CPU path:
/// `decode(backend::onednn{}, ...)` and `prefill(backend::onednn{}, ...)`, with the signatures,
/// checks and errors of the host reference (`attention/host.hpp`).
///
/// - **decode** reads codes and scales straight from the blocks and unpacks them in registers
///   (no dequantized copy of the context), with AVX-512, AVX2 or portable kernels chosen at
///   run time (`detail/cpu_isa.hpp`), on a pool of threads over (sequence, KV head) entries
///   and, for few entries, over runs of blocks of one entry with an online-softmax combine
///   (`detail/cpu_decode.hpp`). Optional query-aware block skipping (`attention/skip.hpp`).
/// - **prefill** runs oneDNN matmul primitives (f32, or bf16 with `options::compute`) on tiles
///   of 512 tokens decoded block by block into a small scratch, with an online softmax across
///   tiles; the primitives are created once per shape and cached (`detail/onednn_prefill.hpp`).
///
/// Needs oneDNN (link `oscar::onednn`, which defines `OSCAR_WITH_ONEDNN=1`).
#pragma once

#include <span>
#include <vector>

#include "oscar/attention/detail/cpu_decode.hpp"
#include "oscar/attention/detail/onednn_prefill.hpp"
#include "oscar/attention/host.hpp"
#include "oscar/attention/types.hpp"
#include "oscar/backend/tags.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"

namespace oscar::attention {

/// Decode attention for a batch on the CPU: `q` is `[batch, q_heads, head_dim]` (one query
/// token of sequence `seqs[b]` per row), `out` the same shape. With `opt.want_stats`, `stats`
/// receives `batch * kv_heads` entries (batch-major). Throws `oscar::error` on shapes, head
/// counts, an unknown sequence, non-finite queries, or a KV head with no tokens; `out` is
/// written only after every check passed. `opt.threads` bounds the threads used.
template <class Cache>
void decode(backend::onednn, const Cache& cache, int layer, std::span<const cache::seq_id> seqs,
            kv_view<const float> q, kv_view<float> out, const options& opt,
            std::vector<kv_head_stats>* stats = nullptr) {
  const float scale = detail::check_decode(cache, layer, seqs, q, out, opt, stats);
  const auto batch = static_cast<index_t>(seqs.size());
  if (stats && !opt.want_stats) {
    stats->assign(static_cast<std::size_t>(batch * cache.config().kv_heads), {});
  }
  detail::cpu_decode(cache, layer, seqs, q, out, opt, scale, opt.want_stats ? stats : nullptr);
}

/// Prefill attention for one sequence on the CPU: `q` is `[chunk, q_heads, head_dim]`, `k`/`v`
/// the chunk's own keys and values `[chunk, kv_heads, head_dim]` (not yet in the cache), `out`
/// like `q`. Query `i` attends to every token the cache holds for the sequence and to chunk
/// tokens `0..i`. With `opt.want_stats`, `stats` receives `chunk * kv_heads` entries
/// (query-major); token_mass covers cached tokens, then the chunk. `opt.compute` picks f32 or
/// bf16 matrix products. Block skipping does not apply (prefill attends to every block).
template <class Cache, class T>
void prefill(backend::onednn, const Cache& cache, int layer, cache::seq_id seq,
             kv_view<const float> q, kv_view<const T> k, kv_view<const T> v, kv_view<float> out,
             const options& opt, std::vector<kv_head_stats>* stats = nullptr) {
  const float scale = detail::check_prefill(cache, layer, q, k, v, out, opt, stats);
  if (opt.skipped) *opt.skipped = skip_report{};
  if (stats && !opt.want_stats) {
    stats->assign(static_cast<std::size_t>(q.tokens * cache.config().kv_heads), {});
  }
  detail::onednn_prefill(cache, layer, seq, q, k, v, out, opt, scale,
                         opt.want_stats ? stats : nullptr);
}

}  // namespace oscar::attention
