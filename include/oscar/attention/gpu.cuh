// SPDX-License-Identifier: Apache-2.0
/// \file
/// GPU decode attention over a device cache (`gpu::paged_kv`): `oscar::attention::decode` with
/// the `backend::cuda` or `backend::hip` tag. One query token per sequence, a batch of
/// sequences of one layer, grouped-query attention, one softmax over sinks, blocks and window,
/// the same function as the host reference `attention::decode(backend::host{}, ...)`.
///
///     oscar::gpu::decode_workspace ws;
///     oscar::attention::decode(oscar::backend::cuda{}, cache, layer, slots, q, out,
///                              {.q_heads = 32}, ws, stream);
///
/// `q` and `out` are device arrays `[batch][q_heads][head_dim]` of float. Everything is queued
/// on `stream`; nothing waits, except that the workspace grows (a device allocation) the first
/// time a call needs more scratch than it holds.
///
/// Kernels: for the mma layout (head_dim 64/128) on sm_80+, a tensor-core kernel: FP2+ with
/// per-channel keys (`fp2plus_kc`) in decode_mma.cuh, the default FP2+ in decode_mma_lm.cuh
/// (groups of more than 8 query heads read each record once per 8 heads); otherwise the
/// generic kernel (decode_generic.cuh), which also serves HIP. All split each (sequence, KV
/// head) into enough work items to fill the device, then `combine_kernel` merges them.
///
/// Optional features run on the generic kernel for every format and layout (a call that asks
/// for them never takes the tensor-core kernel; the generic kernel also reads both kinds of mma
/// record):
/// - statistics (`options::want_stats`): pass a `gpu::decode_stats` of device arrays; it
///   receives the host backend's `kv_head_stats` quantities (`gpu::read_stats` copies them
///   into that struct, synchronizing). The logits of every token go through device scratch
///   (4 bytes per token and query head) and two small kernels after the combine.
/// - query-aware block skipping (`options::skip_threshold > 0`): the rule and error bound of
///   `attention/skip.hpp`, from the block key summaries `paged_kv` keeps, evaluated in float64
///   as the host evaluates it, so the same blocks are skipped. `options::skipped`, when set,
///   receives the counts; that waits for the stream (the counts are on the device).
#pragma once

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <map>
#include <mutex>
#include <span>
#include <tuple>
#include <type_traits>
#include <vector>

#include "oscar/attention/host.hpp"  // detail::check_common: the same argument checks
#include "oscar/attention/types.hpp"
#include "oscar/backend/gpu/decode_common.cuh"
#include "oscar/backend/gpu/decode_generic.cuh"
#include "oscar/backend/gpu/paged_kv.cuh"
#include "oscar/backend/tags.hpp"
#include "oscar/core/error.hpp"
#if defined(OSCAR_GPU_RUNTIME_CUDA)
#include "oscar/backend/gpu/decode_mma.cuh"
#include "oscar/backend/gpu/decode_mma_lm.cuh"
#endif

namespace oscar::gpu {

/// Which kernel a decode call runs.
enum class decode_kernel { automatic, generic, tensor_core };

/// Tuning knobs of a decode call (defaults are what production uses).
struct decode_config {
  decode_kernel kernel = decode_kernel::automatic;
  int splits = 0;  ///< work items per (sequence, KV head) for the blocks; 0 = fill the device
  /// Tensor-core kernel: compute the key products with q * scale in fp16 alone (logits to
  /// about 11 bits; fewer tensor-core operations) instead of the hi + lo split (about 22 bits).
  bool fp16_logits = false;
};

/// Device scratch of decode calls (partial results), reused across calls; grows on demand.
/// One workspace per stream: calls that share it must be ordered.
class decode_workspace {
 public:
  /// Makes room for `o_floats` + `ml_floats` floats (a device allocation when it grows).
  void reserve(std::size_t o_floats, std::size_t ml_floats) {
    if (o_.size() < o_floats) o_ = device_buffer<float>(o_floats);
    if (ml_.size() < ml_floats) ml_ = device_buffer<float>(ml_floats);
  }
  [[nodiscard]] float* o() const noexcept { return o_.data(); }
  [[nodiscard]] float* ml() const noexcept { return ml_.data(); }
  /// The current device, read once.
  const device_properties& device() {
    if (!have_device_) {
      device_ = current_device();
      have_device_ = true;
    }
    return device_;
  }
  /// Device scratch of at least `bytes` bytes for the optional features (statistics, block
  /// skipping); grows like the rest.
  std::byte* extra(std::size_t bytes) {
    if (extra_.size() < bytes) extra_ = device_buffer<std::byte>(bytes);
    return extra_.data();
  }
  /// What the last call ran (for tests and benchmarks).
  decode_kernel last_kernel = decode_kernel::automatic;
  int last_splits = 0;
  int last_partials = 0;

 private:
  device_buffer<float> o_, ml_;
  device_buffer<std::byte> extra_;
  device_properties device_;
  bool have_device_ = false;
};

namespace detail {

/// Blocks of `kernel` (with `threads` threads and `smem` bytes of dynamic shared memory) one
/// multiprocessor holds at once; asked once per kernel and size.
template <class Kernel>
int resident_blocks(Kernel kernel, int threads, std::size_t smem) {
  static std::mutex lock;
  static std::map<std::tuple<const void*, int, std::size_t>, int> known;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, smem);
  if (auto it = known.find(key); it != known.end()) return it->second;
  int blocks = 0;
#if defined(OSCAR_GPU_RUNTIME_HIP)
  check(hipOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem),
        "hipOccupancyMaxActiveBlocksPerMultiprocessor");
#else
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
#endif
  blocks = std::max(blocks, 1);
  known.emplace(key, blocks);
  return blocks;
}

/// Most work items per entry (bounds the combine kernel's shared memory).
inline constexpr int max_splits = 256;

/// Work items per entry for the blocks: enough to fill the device once (the short window items
/// run first and are not counted), at most one per `min_work` units of the longest entry.
inline int choose_splits(int resident, int entries, int longest, int min_work) {
  const int fill = std::max(1, resident / std::max(1, entries));
  const int useful = std::max(1, (longest + min_work - 1) / min_work);
  return std::min({fill, useful, max_splits});
}

template <class KV>
void decode_impl(const paged_kv<KV>& cache, int layer, std::span<const slot_id> seqs,
                 const float* q, float* out, const attention::options& opt,
                 decode_workspace& ws, stream_t stream, const decode_config& cfg,
                 const decode_stats* stats) {
  const cache::cache_config& cc = cache.config();
  const float scale = attention::detail::check_common(cache, layer, opt);  // as the host's
  OSCAR_CHECK(!opt.want_stats || (stats != nullptr && stats->lse != nullptr &&
                                  stats->entropy != nullptr && stats->token_mass != nullptr),
              errc::invalid_argument,
              "stats = nullptr is not allowed (allowed: a decode_stats of device arrays when "
              "want_stats)");
  const decode_stats st = stats != nullptr ? *stats : decode_stats{};
  const auto batch = static_cast<int>(seqs.size());
  OSCAR_CHECK_ARG(batch >= 1 && batch <= max_decode_batch, batch,
                  oscar::detail::concat("1 to ", max_decode_batch, " sequences per call"));
  OSCAR_CHECK(q != nullptr && out != nullptr, errc::invalid_argument,
              "q and out must be device arrays [batch][q_heads][head_dim] (allowed: non-null)");
  const int H = cc.kv_heads, d = cc.head_dim, G = opt.q_heads / H;
  const int bt = cc.block_tokens;
  int longest = 0;  // tokens in blocks of the longest entry
  for (int b = 0; b < batch; ++b) {
    cache.check_slot(seqs[static_cast<std::size_t>(b)]);
    for (int h = 0; h < H; ++h) {
      OSCAR_CHECK(cache.tokens(seqs[static_cast<std::size_t>(b)], layer, h) > 0,
                  errc::invalid_argument, "slot ", seqs[static_cast<std::size_t>(b)],
                  " has no tokens in layer ", layer, " KV head ", h,
                  " (allowed: decode over at least one cached token)");
      longest = std::max<int>(longest, static_cast<int>(
                                           cache.block_tokens_held(seqs[static_cast<std::size_t>(b)], layer, h)));
      if (opt.want_stats) {
        OSCAR_CHECK_ARG(st.mass_stride >= static_cast<std::size_t>(cache.tokens(
                                                  seqs[static_cast<std::size_t>(b)], layer, h)),
                        st.mass_stride,
                        oscar::detail::concat(">= the tokens of every entry of the call (slot ",
                                              seqs[static_cast<std::size_t>(b)], " head ", h,
                                              " holds ",
                                              cache.tokens(seqs[static_cast<std::size_t>(b)], layer, h),
                                              ")"));
      }
    }
  }
  OSCAR_CHECK_ARG(!opt.want_stats || st.mass_stride < (std::size_t{1} << 38), st.mass_stride,
                  "below 2^38");
  const bool skipping = opt.skip_threshold > 0.0f;
  const bool features = opt.want_stats || skipping;  // served by the generic kernel

  decode_params<KV> prm;
  prm.cache = cache.view();
  prm.layer = layer;
  prm.q = q;
  prm.batch = batch;
  prm.q_heads = opt.q_heads;
  prm.group = G;
  prm.scale_log2 = scale * log2e;
  for (int b = 0; b < batch; ++b) prm.slots[b] = seqs[static_cast<std::size_t>(b)];

  const device_properties& dev = ws.device();
  bool tensor_cores = false;
#if defined(OSCAR_GPU_RUNTIME_CUDA)
  tensor_cores =
      has_mma_layout_v<KV> && cache.layout() == block_layout::mma && dev.major >= 8;
#endif
  if (cfg.kernel == decode_kernel::generic || features) tensor_cores = false;
  OSCAR_CHECK(cfg.kernel != decode_kernel::tensor_core || !features, errc::unsupported,
              "statistics and block skipping run on the generic decode kernel (allowed: "
              "decode_kernel::automatic or generic with want_stats or skip_threshold > 0)");
  OSCAR_CHECK(cfg.kernel != decode_kernel::tensor_core || tensor_cores, errc::unsupported,
              "the tensor-core decode kernel needs a CUDA device of compute capability 8.0 or "
              "newer and a cache in the mma layout (FP2+ or FP2+ with per-channel keys, head_dim "
              "64 or 128)");
  // The generic kernel reads the native layout and both kinds of mma record
  // (decode_generic.cuh: `decode_record`, `unpack_lm_record`), on CUDA and HIP alike.

  const int threads = 128;
  std::size_t smem = 0;
  OSCAR_CHECK_ARG(cfg.splits >= 0 && cfg.splits <= max_splits, cfg.splits,
                  oscar::detail::concat("0 (automatic) to ", max_splits));
  int splits = cfg.splits;
  if (tensor_cores) {
#if defined(OSCAR_GPU_RUNTIME_CUDA)
    if constexpr (has_mma_layout_v<KV>) {
      using kernel_t = void (*)(decode_params<KV>);
      kernel_t kernel = nullptr;
      int tile = 8;  // query heads per block
      if constexpr (is_mma_lm_v<KV>) {
        // 4-query tiles carry the lo parts of q in the MMAs' spare columns (always exact).
        tile = G <= 4 ? 4 : 8;
        auto pick = [&](auto exact) -> kernel_t {
          constexpr bool e = decltype(exact)::value;
          if (tile == 4) {
            return d == 64 ? decode_mma_lm_kernel<KV, 64, 4, e> : decode_mma_lm_kernel<KV, 128, 4, e>;
          }
          return d == 64 ? decode_mma_lm_kernel<KV, 64, 8, e> : decode_mma_lm_kernel<KV, 128, 8, e>;
        };
        kernel = cfg.fp16_logits ? pick(std::false_type{}) : pick(std::true_type{});
        smem = mma_lm_shared_bytes(d, tile, G);
      } else {
        auto pick = [&](auto exact) -> kernel_t {
          constexpr bool e = decltype(exact)::value;
          return d == 64 ? decode_mma_kernel<KV, 64, e> : decode_mma_kernel<KV, 128, e>;
        };
        kernel = cfg.fp16_logits ? pick(std::false_type{}) : pick(std::true_type{});
        smem = mma_shared_bytes(d, G);
      }
      allow_dynamic_shared(kernel, smem);
      prm.query_tiles = (G + tile - 1) / tile;
      if (splits <= 0) {
        splits = choose_splits(resident_blocks(kernel, threads, smem) * dev.multiprocessors,
                               batch * H * prm.query_tiles, longest / record_layout<KV>::tokens,
                               2 * mma_warps);
      }
      prm.splits = splits;
      prm.window_items = window_items(prm.cache);
      prm.partials = splits + prm.window_items;
      prm.window_partial = splits;
      ws.reserve(static_cast<std::size_t>(batch) * H * prm.partials * G * d,
                 static_cast<std::size_t>(batch) * H * prm.partials * G * 2);
      prm.part_o = ws.o();
      prm.part_ml = ws.ml();
      kernel<<<dim3(static_cast<unsigned>(batch * H * prm.query_tiles),
                    static_cast<unsigned>(prm.window_items + splits)),
               threads, smem, stream>>>(prm);
      check_launch("decode_mma_kernel");
    }
#endif
  } else {
    const int unit = generic_unit_tokens(cache.chunk_tokens(), bt);
    std::size_t record_native = 0;  // the generic kernel rebuilds default-FP2+ records
    if constexpr (has_mma_layout_v<KV>) {
      if (record_layout<KV>::lm && cache.layout() == block_layout::mma) {
        record_native = static_cast<std::size_t>(record_layout<KV>::bytes(d));
      }
    }
    smem = generic_shared_bytes(unit, G, d, record_native);
    auto kernel = decode_generic_kernel<KV>;
    allow_dynamic_shared(kernel, smem);
    if (splits <= 0) {
      splits = choose_splits(resident_blocks(kernel, threads, smem) * dev.multiprocessors,
                             batch * H, (longest + unit - 1) / unit, 2);
    }
    prm.splits = splits;
    prm.window_items = window_items(prm.cache);
    prm.partials = splits + prm.window_items;
    prm.window_partial = splits;
    ws.reserve(static_cast<std::size_t>(batch) * H * prm.partials * G * d,
               static_cast<std::size_t>(batch) * H * prm.partials * G * 2);
    prm.part_o = ws.o();
    prm.part_ml = ws.ml();
    native_offsets lay{};
    lay.key_tile_tokens = quant::tokens_per_tile<typename KV::key>();
    lay.value_tile_tokens = quant::tokens_per_tile<typename KV::value>();
    lay.key_tile_bytes = static_cast<std::size_t>(quant::blocks_per_tile<typename KV::key>(d)) *
                         sizeof(typename quant::format_traits<typename KV::key>::block);
    lay.value_tile_bytes =
        static_cast<std::size_t>(quant::blocks_per_tile<typename KV::value>(d)) *
        sizeof(typename quant::format_traits<typename KV::value>::block);
    lay.key_bytes = lay.key_tile_bytes * (bt / lay.key_tile_tokens);
    if (features) {  // the skip plan, and where the logits go (decode_common.cuh)
      prepare_features(prm, opt, scale, &st, ws.extra(feature_scratch_bytes(prm, opt, &st)),
                       stream);
    }
    kernel<<<dim3(static_cast<unsigned>(batch * H), static_cast<unsigned>(prm.window_items + splits)),
             threads, smem, stream>>>(prm, lay, unit);
    check_launch("decode_generic_kernel");
  }
  ws.last_kernel = tensor_cores ? decode_kernel::tensor_core : decode_kernel::generic;
  ws.last_splits = splits;
  ws.last_partials = prm.partials;

  // The tensor-core kernel leaves the blocks' values in the format's rotated space; the
  // generic kernel decodes whole tiles (rotation undone).
  const bool unrotate = tensor_cores && quant::format_traits<typename KV::value>::rotated;
  const std::size_t combine_smem = combine_shared_bytes(d, prm.partials);
  allow_dynamic_shared(combine_kernel<KV>, combine_smem);
  combine_kernel<KV><<<dim3(static_cast<unsigned>(G), static_cast<unsigned>(H),
                            static_cast<unsigned>(batch)),
                       std::min(threads, std::max(d, warp_size)), combine_smem, stream>>>(prm, unrotate, out);
  check_launch("combine_kernel");

  if (opt.want_stats) finish_stats(prm, st, stream);
  if (opt.skipped) {
    attention::skip_report report;
    if (skipping) {
      for (int b = 0; b < batch; ++b)
        for (int h = 0; h < H; ++h)
          report.blocks += (cache.block_tokens_held(seqs[static_cast<std::size_t>(b)], layer, h) +
                            bt - 1) / bt;
      read_skip_counts(ws.extra(0), report, stream);
    }
    *opt.skipped = report;
  }
}

}  // namespace detail

/// Copies the statistics a decode call wrote into `stats` back to the host, in the host
/// backend's form: `seqs.size() * kv_heads` entries (batch-major), each `token_mass` as long as
/// its entry (sinks, blocks, window). Synchronizes `stream`.
template <class KV>
std::vector<attention::kv_head_stats> read_stats(const paged_kv<KV>& cache, int layer,
                                                 std::span<const slot_id> seqs,
                                                 const decode_stats& stats, stream_t stream) {
  const int H = cache.config().kv_heads;
  const std::size_t entries = seqs.size() * static_cast<std::size_t>(H);
  std::vector<float> lse(entries), entropy(entries), mass(entries * stats.mass_stride);
  copy_async(lse.data(), stats.lse, entries * sizeof(float), stream);
  copy_async(entropy.data(), stats.entropy, entries * sizeof(float), stream);
  copy_async(mass.data(), stats.token_mass, mass.size() * sizeof(float), stream);
  synchronize(stream);
  std::vector<attention::kv_head_stats> out(entries);
  for (std::size_t i = 0; i < entries; ++i) {
    const auto tokens = static_cast<std::size_t>(
        cache.tokens(seqs[i / static_cast<std::size_t>(H)], layer, static_cast<int>(i % H)));
    out[i].lse = lse[i];
    out[i].entropy = entropy[i];
    out[i].token_mass.assign(mass.begin() + static_cast<std::ptrdiff_t>(i * stats.mass_stride),
                             mass.begin() + static_cast<std::ptrdiff_t>(i * stats.mass_stride + tokens));
  }
  return out;
}

}  // namespace oscar::gpu

namespace oscar::attention {

#if defined(OSCAR_GPU_RUNTIME_CUDA)
/// Decode attention on an NVIDIA GPU; see the file comment. With `opt.want_stats`, `stats`
/// says where the statistics go (device arrays). Throws `oscar::error` on bad arguments before
/// queuing anything.
template <class KV>
void decode(backend::cuda, const gpu::paged_kv<KV>& cache, int layer,
            std::span<const gpu::slot_id> seqs, const float* q, float* out, const options& opt,
            gpu::decode_workspace& ws, gpu::stream_t stream, const gpu::decode_config& cfg = {},
            const gpu::decode_stats* stats = nullptr) {
  gpu::detail::decode_impl(cache, layer, seqs, q, out, opt, ws, stream, cfg, stats);
}
#endif

#if defined(OSCAR_GPU_RUNTIME_HIP)
/// Decode attention on an AMD GPU (the generic kernel); see the file comment.
template <class KV>
void decode(backend::hip, const gpu::paged_kv<KV>& cache, int layer,
            std::span<const gpu::slot_id> seqs, const float* q, float* out, const options& opt,
            gpu::decode_workspace& ws, gpu::stream_t stream, const gpu::decode_config& cfg = {},
            const gpu::decode_stats* stats = nullptr) {
  gpu::detail::decode_impl(cache, layer, seqs, q, out, opt, ws, stream, cfg, stats);
}
#endif

}  // namespace oscar::attention
