// SPDX-License-Identifier: Apache-2.0
/// \file
/// Attention on the CPU: OSCAR's oneDNN backend on the compressed cache against dense fp32 and
/// bf16 attention done with oneDNN primitives over the same context, in one run.
///
/// **Decode**, batch 1, 32 query heads / 8 KV heads, head_dim 128, contexts 4K, 32K, 128K:
/// - `decode/<T>/dense-f32`: K^T `[8, 128, T]` and V `[8, T, 128]` in fp32; one batched oneDNN
///   matmul for the scores `[8, 4, T]`, oneDNN softmax, one matmul for the output (the layout
///   oneDNN's matmul reads fastest: keys transposed once when they are written);
/// - `decode/<T>/dense-bf16`: the same in bf16 (scores f32, probabilities reordered to bf16);
/// - `decode/<T>/<format>`: `attention::decode(backend::onednn{}, ...)` on a
///   `kv_cache<format>` holding T tokens (blocks of 128, 4 sinks, a 128-token fp16 window);
///   formats `fp2plus` (the default FP2+: per-channel Lloyd-Max keys in 128-token groups with
///   3 fp16 outliers each, rotated values), `fp2plus-kc` (the earlier per-channel candidate:
///   uniform keys in 64-token groups) and `fp4plus`.
/// - `memcpy`: one thread copying 512 MiB, the bandwidth that turns each row's bytes into its
///   *floor* (bytes the row must read / memcpy GB/s).
///
/// **Prefill**, a 2048-token chunk against 32K cached tokens, same heads (`prefill/...`): OSCAR's
/// oneDNN prefill with bf16 matmuls on the FP2+ caches, against a dense bf16 attention with
/// the same matmul shapes, tile sizes and online softmax over dense bf16 K/V, its tiles read
/// in place (`dense-bf16`, what an engine with a dense cache does) or packed once per tile
/// into oneDNN's blocked layout as OSCAR packs its decoded tiles (`dense-bf16-packed`).
///
/// Each decode and prefill row runs 5 times (prefill rows vary by ~10% from run to run on a
/// shared 2-core VM, so 3 were too few to tell parity from a loss), the repetitions of all rows in random
/// order (Google Benchmark's random interleaving, on by default here); the summary gives
/// medians: time, speed-up over dense fp32 and dense bf16, bytes read, and the floor.
/// K/V are synthetic (`oscar/testing/synthetic_kv.hpp`), 8192 tokens repeated; building the
/// three caches (164K tokens each through `kv_cache::append`, the host reference encoders)
/// takes 20 s to a minute, in parallel threads, before the first OSCAR row and outside every
/// timing.
/// Build with OpenMP (bench/CMakeLists.txt does): OSCAR's kernels then share oneDNN's threads.

#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#if defined(OSCAR_WITH_ONEDNN)

#include <dnnl.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "oscar/attention/onednn.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace {

using oscar::index_t;
namespace oc = oscar::cache;
namespace oa = oscar::attention;
namespace q = oscar::quant;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

constexpr int kHeads = 8;
constexpr int kQHeads = 32;
constexpr int kGroup = kQHeads / kHeads;
constexpr int kHeadDim = 128;
constexpr int kBlockTokens = 128;  ///< a multiple of FP2+'s 128-token key groups
constexpr int kSinks = 4;
constexpr int kWindow = 128;
constexpr index_t kPattern = 8192;  ///< synthetic tokens, repeated
constexpr index_t kContexts[] = {4096, 32768, 131072};
constexpr index_t kPrefillContext = 32768;
constexpr index_t kChunk = 2048;
constexpr const char* kFormats[] = {"fp2plus", "fp2plus-kc", "fp4plus"};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const oscar::testing::dense_kv& pattern_k() {
  static const auto k = oscar::testing::synthetic_keys(kPattern, kHeads, kHeadDim, 20261128);
  return k;
}
const oscar::testing::dense_kv& pattern_v() {
  static const auto v = oscar::testing::synthetic_values(kPattern, kHeads, kHeadDim, 20261129);
  return v;
}
/// Token t of the context, head h: the pattern's token t mod 8192.
const float* key_row(index_t t, int h) { return pattern_k().view().row(t % kPattern, h); }
const float* value_row(index_t t, int h) { return pattern_v().view().row(t % kPattern, h); }

/// The decode query: [1, 32, 128].
const oscar::testing::dense_kv& query() {
  static const auto qs = oscar::testing::gaussian_kv(1, kQHeads, kHeadDim, 7, 0.5f);
  return qs;
}

// ---- OSCAR caches ------------------------------------------------------------------------------

/// One cache per format with a sequence per context (and the prefill's) appended through
/// `kv_cache::append`; `decode` and `prefill` run OSCAR's oneDNN backend on it.
struct oscar_cache {
  virtual ~oscar_cache() = default;
  virtual void decode(index_t context, float* out) const = 0;
  virtual void prefill(const float* qs, const float* k, const float* v, float* out) const = 0;
  virtual double bytes(index_t context) const = 0;  ///< bytes a decode reads
};

template <class KV>
struct oscar_cache_of final : oscar_cache {
  using cache_type = oc::kv_cache<KV>;
  std::unique_ptr<cache_type> cache;
  std::map<index_t, oc::seq_id> seqs;

  oscar_cache_of() {
    const oc::cache_config cfg{.layers = 1, .kv_heads = kHeads, .head_dim = kHeadDim,
                               .block_tokens = kBlockTokens, .sink_tokens = kSinks,
                               .window_tokens = kWindow};
    index_t total = 0;
    for (index_t t : kContexts) total += t;
    const double bytes = double(total) * kHeads * kHeadDim * 2 * KV::bits_per_element / 8;
    cache = std::make_unique<cache_type>(
        cfg, oc::tier_budget{.full = 0, .mid = 0, .low = static_cast<std::size_t>(bytes * 1.2) + (64 << 20)});
    for (index_t context : kContexts) {
      const oc::seq_id id = cache->create();
      for (index_t t = 0; t < context; t += kPattern) {
        const index_t n = std::min(kPattern, context - t);
        cache->append(id, 0, pattern_k().view().slice_tokens(0, n), pattern_v().view().slice_tokens(0, n));
      }
      seqs[context] = id;
    }
  }

  void decode(index_t context, float* out) const override {
    const oc::seq_id id = seqs.at(context);
    oa::decode(oscar::backend::onednn{}, *cache, 0, std::span(&id, 1), query().view(),
               oscar::make_kv_view(out, 1, kQHeads, kHeadDim), oa::options{.q_heads = kQHeads});
  }

  void prefill(const float* qs, const float* k, const float* v, float* out) const override {
    oa::prefill(oscar::backend::onednn{}, *cache, 0, seqs.at(kPrefillContext),
                oscar::make_kv_view(qs, kChunk, kQHeads, kHeadDim),
                oscar::make_kv_view(k, kChunk, kHeads, kHeadDim),
                oscar::make_kv_view(v, kChunk, kHeads, kHeadDim),
                oscar::make_kv_view(out, kChunk, kQHeads, kHeadDim),
                oa::options{.q_heads = kQHeads, .compute = oa::compute_type::bf16});
  }

  double bytes(index_t context) const override {
    double total = 0;
    for (int h = 0; h < kHeads; ++h) {
      const auto ev = cache->view(seqs.at(context), 0, h);
      for (const oc::block_slot& s : ev.slots) total += double(cache->layout(s.level).block_bytes);
      total += double(ev.sink_k.size() + ev.sink_v.size() + ev.window_k.size() + ev.window_v.size()) *
               sizeof(typename cache_type::window_type);
    }
    return total;
  }
};

/// The three caches, built in parallel threads on first use.
const std::map<std::string, std::unique_ptr<oscar_cache>>& caches() {
  static const auto all = [] {
    const double t0 = now();
    std::unique_ptr<oscar_cache> a, b, c;
    std::thread ta([&] { a = std::make_unique<oscar_cache_of<q::fp2plus>>(); });
    std::thread tb([&] { b = std::make_unique<oscar_cache_of<q::fp2plus_kc>>(); });
    c = std::make_unique<oscar_cache_of<q::fp4plus>>();
    ta.join();
    tb.join();
    std::map<std::string, std::unique_ptr<oscar_cache>> m;
    m["fp2plus"] = std::move(a);
    m["fp2plus-kc"] = std::move(b);
    m["fp4plus"] = std::move(c);
    std::fprintf(stderr, "built the OSCAR caches in %.1f s\n", now() - t0);
    return m;
  }();
  return all;
}

// ---- dense decode with oneDNN --------------------------------------------------------------------

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

/// Dense decode attention over T tokens in f32 or bf16.
struct dense_decode {
  index_t context;
  bool bf16;
  dnnl::memory q, kt, v, scores, probs, out;
  dnnl::matmul qk, pv;
  dnnl::softmax_forward softmax;
  dnnl::reorder to_bf16;

  dense_decode(index_t t, bool use_bf16) : context(t), bf16(use_bf16) {
    const dt type = bf16 ? dt::bf16 : dt::f32;
    const dnnl::memory::desc qd({kHeads, kGroup, kHeadDim}, type, tag::abc);
    const dnnl::memory::desc kd({kHeads, kHeadDim, t}, type, tag::abc);
    const dnnl::memory::desc sd({kHeads, kGroup, t}, dt::f32, tag::abc);
    const dnnl::memory::desc pd({kHeads, kGroup, t}, type, tag::abc);
    const dnnl::memory::desc vd({kHeads, t, kHeadDim}, type, tag::abc);
    const dnnl::memory::desc od({kHeads, kGroup, kHeadDim}, dt::f32, tag::abc);
    qk = dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(qd, kd, sd), engine()));
    pv = dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(pd, vd, od), engine()));
    softmax = dnnl::softmax_forward(dnnl::softmax_forward::primitive_desc(
        dnnl::softmax_forward::desc(dnnl::prop_kind::forward_inference, sd, 2), engine()));
    q = dnnl::memory(qd, engine());
    kt = dnnl::memory(kd, engine());
    v = dnnl::memory(vd, engine());
    scores = dnnl::memory(sd, engine());
    probs = bf16 ? dnnl::memory(pd, engine()) : scores;
    out = dnnl::memory(od, engine());
    if (bf16) to_bf16 = dnnl::reorder(scores, probs);
    // Scaled query, keys transposed, values: the same tokens as the OSCAR caches.
    const float scale = 1.0f / std::sqrt(float(kHeadDim));
    const auto put = [&](dnnl::memory& m, std::size_t i, float x) {
      if (bf16) static_cast<std::uint16_t*>(m.get_data_handle())[i] = oscar::float_to_bf16_bits(x);
      else static_cast<float*>(m.get_data_handle())[i] = x;
    };
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < kGroup; ++j)
        for (int c = 0; c < kHeadDim; ++c)
          put(q, static_cast<std::size_t>((h * kGroup + j) * kHeadDim + c),
              query().view()(0, h * kGroup + j, c) * scale);
    for (int h = 0; h < kHeads; ++h) {
      for (index_t tok = 0; tok < t; ++tok) {
        const float* kr = key_row(tok, h);
        const float* vr = value_row(tok, h);
        for (int c = 0; c < kHeadDim; ++c) {
          put(kt, static_cast<std::size_t>((h * kHeadDim + c) * t + tok), kr[c]);
          put(v, static_cast<std::size_t>((h * t + tok) * kHeadDim + c), vr[c]);
        }
      }
    }
  }

  void run(dnnl::stream& s) {
    qk.execute(s, {{DNNL_ARG_SRC, q}, {DNNL_ARG_WEIGHTS, kt}, {DNNL_ARG_DST, scores}});
    softmax.execute(s, {{DNNL_ARG_SRC, scores}, {DNNL_ARG_DST, scores}});
    if (bf16) to_bf16.execute(s, scores, probs);
    pv.execute(s, {{DNNL_ARG_SRC, probs}, {DNNL_ARG_WEIGHTS, v}, {DNNL_ARG_DST, out}});
    s.wait();
  }

  [[nodiscard]] double bytes() const {
    return 2.0 * kHeads * double(context) * kHeadDim * (bf16 ? 2 : 4);
  }
  [[nodiscard]] const float* output() const { return static_cast<const float*>(out.get_data_handle()); }
};

/// Relative RMS difference of two [32, 128] outputs.
double rel_diff(const float* a, const float* b) {
  double num = 0, den = 0;
  for (int i = 0; i < kQHeads * kHeadDim; ++i) {
    num += double(a[i] - b[i]) * double(a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

void record(benchmark::State& state, double seconds_total, double bytes) {
  state.counters["ms"] = 1e3 * seconds_total / double(state.iterations());
  state.counters["MB"] = bytes / 1e6;
}

void bm_memcpy(benchmark::State& state) {
  const std::size_t n = std::size_t{512} << 20;
  std::vector<char> src(n, 1), dst(n, 2);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<std::int64_t>(n));
}

/// The dense attention of a context, built on first use and kept (its output is the
/// reference of the OSCAR rows).
dense_decode& dense(index_t context, bool bf16) {
  static std::map<std::pair<index_t, bool>, std::unique_ptr<dense_decode>> made;
  auto& d = made[{context, bf16}];
  if (!d) {
    d = std::make_unique<dense_decode>(context, bf16);
    dnnl::stream s(engine());
    d->run(s);
  }
  return *d;
}

void bm_dense_decode(benchmark::State& state, index_t context, bool bf16) {
  dense_decode& d = dense(context, bf16);
  dnnl::stream s(engine());
  double total = 0;
  for (auto _ : state) {
    const double t0 = now();
    d.run(s);
    total += now() - t0;
  }
  record(state, total, d.bytes());
}

void bm_oscar_decode(benchmark::State& state, index_t context, const std::string& format) {
  const oscar_cache& c = *caches().at(format);
  std::vector<float> out(kQHeads * kHeadDim);
  c.decode(context, out.data());  // warm-up
  double total = 0;
  for (auto _ : state) {
    const double t0 = now();
    c.decode(context, out.data());
    total += now() - t0;
  }
  record(state, total, c.bytes(context));
  state.counters["err"] = rel_diff(out.data(), dense(context, false).output());
}

// ---- prefill -------------------------------------------------------------------------------------

struct prefill_input {
  std::vector<float> q, k, v;  ///< chunk tokens: q [2048, 32, 128], k/v [2048, 8, 128]
};
const prefill_input& chunk_input() {
  static const prefill_input in{oscar::testing::gaussian_kv(kChunk, kQHeads, kHeadDim, 8, 0.5f).data,
                                oscar::testing::synthetic_keys(kChunk, kHeads, kHeadDim, 9).data,
                                oscar::testing::synthetic_values(kChunk, kHeads, kHeadDim, 10).data};
  return in;
}

/// Dense bf16 prefill: the OSCAR prefill's algorithm on dense bf16 K/V `[8, 32K + 2K, 128]`:
/// the same matmul shapes (`onednn_matmuls`), 512-token tiles, the same online softmax rows.
/// `packed = false` reads the tiles in place, in the row-major layout a dense cache holds
/// (oneDNN packs the weights inside every call); `packed = true` first reorders each tile
/// into oneDNN's blocked weight layout once, as OSCAR's prefill does with its decoded tiles.
struct dense_prefill {
  static constexpr index_t kTotal = kPrefillContext + kChunk;
  std::vector<std::uint16_t> k, v, qs;  // bf16
  std::vector<float> o, s, m;
  std::vector<double> l;
  std::vector<std::uint16_t> p;

  dense_prefill() {
    const prefill_input& in = chunk_input();
    k.resize(static_cast<std::size_t>(kHeads * kTotal * kHeadDim));
    v.resize(k.size());
    for (int h = 0; h < kHeads; ++h) {
      for (index_t t = 0; t < kTotal; ++t) {
        const bool cached = t < kPrefillContext;
        const index_t c = t - kPrefillContext;
        const float* kr = cached ? key_row(t, h) : in.k.data() + (c * kHeads + h) * kHeadDim;
        const float* vr = cached ? value_row(t, h) : in.v.data() + (c * kHeads + h) * kHeadDim;
        for (int d = 0; d < kHeadDim; ++d) {
          k[static_cast<std::size_t>((h * kTotal + t) * kHeadDim + d)] = oscar::float_to_bf16_bits(kr[d]);
          v[static_cast<std::size_t>((h * kTotal + t) * kHeadDim + d)] = oscar::float_to_bf16_bits(vr[d]);
        }
      }
    }
  }

  void run(float* out, bool packed) {
    namespace od = oscar::attention::detail;
    using mm = od::onednn_matmuls;
    constexpr index_t rows = kChunk * kGroup;
    constexpr index_t rb = od::kRowBlock;
    constexpr int tile = od::kTileTokens;
    auto& dnn = mm::instance();
    const auto& mm_s = dnn.get(mm::kind::scores, dt::bf16, rb, tile, kHeadDim, packed);
    const auto& mm_v = dnn.get(mm::kind::values, dt::bf16, rb, tile, kHeadDim, packed);
    dnnl::stream& stream = dnn.stream();
    // Packing in place bf16 tiles (the cached reorders of `onednn_matmuls` start from f32).
    static const dnnl::reorder pack_k(dnnl::reorder::primitive_desc(
        dnn.engine(), mm::scores_weights(dt::bf16, tile, kHeadDim), dnn.engine(),
        dnn.get(mm::kind::scores, dt::bf16, rb, tile, kHeadDim, true).weights));
    static const dnnl::reorder pack_v(dnnl::reorder::primitive_desc(
        dnn.engine(), mm::values_weights(dt::bf16, tile, kHeadDim), dnn.engine(),
        dnn.get(mm::kind::values, dt::bf16, rb, tile, kHeadDim, true).weights));
    dnnl::memory k_packed(mm_s.weights, dnn.engine()), v_packed(mm_v.weights, dnn.engine());
    const oa::cpu_isa isa = od::kernel_isa(kHeadDim);
    const int threads = od::default_threads();
    const prefill_input& in = chunk_input();
    const float scale = 1.0f / std::sqrt(float(kHeadDim)) * 1.4426950408889634f;
    qs.resize(static_cast<std::size_t>(rows * kHeadDim));
    o.resize(qs.size());
    m.resize(rows);
    l.resize(rows);
    s.resize(static_cast<std::size_t>(rb * tile));
    p.resize(s.size());
    for (int h = 0; h < kHeads; ++h) {
      for (index_t r = 0; r < rows; ++r)
        for (int d = 0; d < kHeadDim; ++d)
          qs[static_cast<std::size_t>(r * kHeadDim + d)] = oscar::float_to_bf16_bits(
              in.q[static_cast<std::size_t>(((r / kGroup) * kQHeads + h * kGroup + r % kGroup) * kHeadDim + d)] * scale);
      std::fill(o.begin(), o.end(), 0.0f);
      std::fill(m.begin(), m.end(), -HUGE_VALF);
      std::fill(l.begin(), l.end(), 0.0);
      const dnnl::memory s_mem(od::onednn_matmuls::scores_dst(rb, tile), dnn.engine(), s.data());
      const dnnl::memory p_mem(od::onednn_matmuls::values_src(dt::bf16, rb, tile), dnn.engine(), p.data());
      for (index_t t0 = 0; t0 < kTotal; t0 += tile) {
        dnnl::memory k_rows(mm::scores_weights(dt::bf16, tile, kHeadDim), dnn.engine(),
                            k.data() + (h * kTotal + t0) * kHeadDim);
        dnnl::memory v_rows(mm::values_weights(dt::bf16, tile, kHeadDim), dnn.engine(),
                            v.data() + (h * kTotal + t0) * kHeadDim);
        if (packed) {
          pack_k.execute(stream, k_rows, k_packed);
          pack_v.execute(stream, v_rows, v_packed);
          stream.wait();
        }
        const dnnl::memory& k_mem = packed ? k_packed : k_rows;
        const dnnl::memory& v_mem = packed ? v_packed : v_rows;
        for (index_t r0 = 0; r0 < rows; r0 += rb) {
          // Query token i sees tokens [0, 32K + i]; the tile covers [t0, t0 + tile).
          const auto visible = [&](index_t r) {
            return static_cast<int>(std::clamp<index_t>(kPrefillContext + r / kGroup + 1 - t0, 0, tile));
          };
          if (visible(r0 + rb - 1) == 0) continue;
          const dnnl::memory q_mem(od::onednn_matmuls::scores_src(dt::bf16, rb, kHeadDim), dnn.engine(),
                                   qs.data() + r0 * kHeadDim);
          mm_s.primitive.execute(stream, {{DNNL_ARG_SRC, q_mem}, {DNNL_ARG_WEIGHTS, k_mem}, {DNNL_ARG_DST, s_mem}});
          stream.wait();
          od::parallel_for(rb / 16, threads, [&](index_t task) noexcept {
            for (index_t r = r0 + task * 16; r < r0 + task * 16 + 16; ++r) {
              od::softmax_row_on(isa, s.data() + (r - r0) * tile, visible(r), tile, m[r], l[r],
                                 o.data() + r * kHeadDim, kHeadDim, p.data() + (r - r0) * tile);
            }
          });
          const dnnl::memory o_mem(od::onednn_matmuls::values_dst(rb, kHeadDim), dnn.engine(),
                                   o.data() + r0 * kHeadDim);
          mm_v.primitive.execute(stream, {{DNNL_ARG_SRC, p_mem}, {DNNL_ARG_WEIGHTS, v_mem}, {DNNL_ARG_DST, o_mem}});
          stream.wait();
        }
      }
      for (index_t r = 0; r < rows; ++r) {
        float* dst = out + ((r / kGroup) * kQHeads + h * kGroup + r % kGroup) * kHeadDim;
        for (int d = 0; d < kHeadDim; ++d) dst[d] = static_cast<float>(o[r * kHeadDim + d] / l[r]);
      }
    }
  }
};

dense_prefill& dense_prefill_instance() {
  static dense_prefill d;
  return d;
}

/// The dense prefill's output (one untimed run), the reference of the OSCAR rows.
const std::vector<float>& prefill_reference() {
  static const std::vector<float> out = [] {
    std::vector<float> o(static_cast<std::size_t>(kChunk * kQHeads * kHeadDim));
    dense_prefill_instance().run(o.data(), false);
    return o;
  }();
  return out;
}

void bm_dense_prefill(benchmark::State& state, bool packed) {
  dense_prefill& d = dense_prefill_instance();
  std::vector<float> out(static_cast<std::size_t>(kChunk * kQHeads * kHeadDim));
  double total = 0;
  for (auto _ : state) {
    const double t0 = now();
    d.run(out.data(), packed);
    total += now() - t0;
  }
  record(state, total, 2.0 * kHeads * double(dense_prefill::kTotal) * kHeadDim * 2);
}

void bm_oscar_prefill(benchmark::State& state, const std::string& format) {
  const oscar_cache& c = *caches().at(format);
  const prefill_input& in = chunk_input();
  std::vector<float> out(static_cast<std::size_t>(kChunk * kQHeads * kHeadDim));
  double total = 0;
  for (auto _ : state) {
    const double t0 = now();
    c.prefill(in.q.data(), in.k.data(), in.v.data(), out.data());
    total += now() - t0;
  }
  record(state, total, c.bytes(kPrefillContext) + 2.0 * kHeads * kChunk * kHeadDim * 4);
  double num = 0, den = 0;
  const std::vector<float>& ref = prefill_reference();
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += double(out[i] - ref[i]) * double(out[i] - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  state.counters["err"] = den > 0 ? std::sqrt(num / den) : 0.0;
}

std::string context_name(index_t t) { return std::to_string(t / 1024) + "K"; }

void register_all() {
  benchmark::RegisterBenchmark("memcpy", bm_memcpy)->Repetitions(5)->UseRealTime()->ReportAggregatesOnly(true);
  for (index_t t : kContexts) {
    const std::string ctx = context_name(t);
    for (const bool bf16 : {false, true}) {
      benchmark::RegisterBenchmark(("decode/" + ctx + (bf16 ? "/dense-bf16" : "/dense-f32")).c_str(),
                                   [t, bf16](benchmark::State& s) { bm_dense_decode(s, t, bf16); })
          ->Repetitions(5)->UseRealTime()->ReportAggregatesOnly(true);
    }
    for (const char* f : kFormats) {
      const std::string format = f;
      benchmark::RegisterBenchmark(("decode/" + ctx + "/" + format).c_str(),
                                   [t, format](benchmark::State& s) { bm_oscar_decode(s, t, format); })
          ->Repetitions(5)->UseRealTime()->ReportAggregatesOnly(true);
    }
  }
  for (const bool packed : {false, true}) {
    benchmark::RegisterBenchmark(packed ? "prefill/32K+2K/dense-bf16-packed" : "prefill/32K+2K/dense-bf16",
                                 [packed](benchmark::State& s) { bm_dense_prefill(s, packed); })
        ->Iterations(1)->Repetitions(5)->UseRealTime()->ReportAggregatesOnly(true);
  }
  for (const char* f : {"fp2plus", "fp2plus-kc"}) {
    const std::string format = f;
    benchmark::RegisterBenchmark(("prefill/32K+2K/" + format).c_str(),
                                 [format](benchmark::State& s) { bm_oscar_prefill(s, format); })
        ->Iterations(1)->Repetitions(5)->UseRealTime()->ReportAggregatesOnly(true);
  }
}

class attention_reporter : public oscar_bench::summary_reporter {
 public:
  using summary_reporter::summary_reporter;

 protected:
  void print_context(std::ostream& out) override {
    out << "oscar attention_cpu on " << oscar_bench::host_name() << ": " << oscar_bench::cpu_model()
        << ", " << std::thread::hardware_concurrency() << " threads, kernels "
        << oa::to_string(oa::active_cpu_isa())
#if defined(_OPENMP)
        << " on OpenMP"
#else
        << " on OSCAR's thread pool"
#endif
        << "; decode batch 1, " << kQHeads << " q heads / " << kHeads << " KV heads, head_dim "
        << kHeadDim << "; caches: blocks of " << kBlockTokens << ", " << kSinks << " sinks, "
        << kWindow << "-token fp16 window\n";
  }

  void print_summary(std::ostream& out) override {
    const double bw = get("memcpy", "bytes_per_second");
    char line[256];
    out << "\nDecode attention (median of 5 runs; x f32 / x bf16 = speed-up over the dense rows;"
           " floor = MB / memcpy " << bw / 1e9 << " GB/s; err = rel. RMS vs dense f32 output)\n";
    std::snprintf(line, sizeof(line), "%-8s %-12s %10s %8s %8s %10s %10s %8s %9s\n", "context",
                  "method", "ms", "x f32", "x bf16", "MB read", "floor ms", "x floor", "err");
    out << line;
    for (index_t t : kContexts) {
      const std::string ctx = context_name(t);
      const double f32 = get("decode/" + ctx + "/dense-f32", "ms");
      const double bf16 = get("decode/" + ctx + "/dense-bf16", "ms");
      for (const char* method : {"dense-f32", "dense-bf16", "fp2plus", "fp2plus-kc", "fp4plus"}) {
        const std::string name = "decode/" + ctx + "/" + method + "";
        if (!has(name)) continue;
        const double ms = get(name, "ms"), mb = get(name, "MB");
        const double floor = bw > 0 ? mb * 1e6 / bw * 1e3 : 0.0;
        std::snprintf(line, sizeof(line), "%-8s %-12s %10.3f %8.2f %8.2f %10.1f %10.3f %8.2f %9.4f\n",
                      ctx.c_str(), method, ms, ms > 0 ? f32 / ms : 0.0, ms > 0 ? bf16 / ms : 0.0,
                      mb, floor, floor > 0 ? ms / floor : 0.0, get(name, "err"));
        out << line;
      }
    }
    out << "\nPrefill: a " << kChunk << "-token chunk against " << kPrefillContext
        << " cached tokens, bf16 matmuls (median of 5; err = rel. RMS vs dense bf16)\n";
    const double dense = get("prefill/32K+2K/dense-bf16", "ms");
    std::snprintf(line, sizeof(line), "%-18s %10s %10s %9s\n", "method", "ms", "x bf16", "err");
    out << line;
    for (const char* method : {"dense-bf16", "dense-bf16-packed", "fp2plus", "fp2plus-kc"}) {
      const std::string name = std::string("prefill/32K+2K/") + method + "";
      if (!has(name)) continue;
      const double ms = get(name, "ms");
      std::snprintf(line, sizeof(line), "%-18s %10.1f %10.3f %9.4f\n", method, ms,
                    ms > 0 ? dense / ms : 0.0, get(name, "err"));
      out << line;
    }
  }

  bool records(const Run& run) const override {
    return run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
  }
};

}  // namespace

int main(int argc, char** argv) {
  // Repetitions of the rows run in random order, so a burst of load on a shared machine
  // spreads over rows instead of hitting one; an explicit flag wins.
  std::vector<char*> args(argv, argv + argc);
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  if (oscar_bench::flag_value(argc, argv, "benchmark_enable_random_interleaving").empty()) {
    args.push_back(interleave.data());
  }
  return oscar_bench::run_benchmarks<attention_reporter>(static_cast<int>(args.size()), args.data(),
                                                         "0.3", register_all);
}

#else  // !OSCAR_WITH_ONEDNN

#include <cstdio>

int main() {
  std::puts("oscar-bench-attention_cpu needs oneDNN (oscar::onednn); nothing to run");
  return 0;
}

#endif
