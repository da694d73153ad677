// SPDX-License-Identifier: Apache-2.0
/// \file
/// The device cache's append path and the GPU decode's optional features against the host.
///
/// One source for CUDA (nvcc) and HIP (clang). On fresh random K/V each run:
///
///  1. **Append and key summaries.** The same appends (prefills of up to 2K tokens in one call,
///     so several chunks land in one block per call; forks whose shared last block is copied
///     on write; batched single-token steps) go to a host `kv_cache` and to `gpu::paged_kv`
///     caches (mma and native layouts where the format has an mma layout). Every entry read
///     back must equal the host's bytes, and every block's key summary (per-channel min/max of
///     the decoded keys, fp16 rounded outward) must equal the host pool's `key_min/key_max`
///     bit for bit; an upload of the host sequences must carry the same summaries.
///  2. **Statistics.** `decode` with `want_stats` on the device against the host backend's
///     float64 `kv_head_stats` (lse, entropy, per-token mass) and output; mass past an entry's
///     tokens must be 0. Outputs and statistics are poisoned (NaN) before each call.
///  3. **Block skipping.** On a cache whose middle tokens point away from the query, `decode`
///     with `skip_threshold` must skip exactly the blocks the host backend skips (the same
///     `skip_report`, and some blocks skipped), match the host's skipping output and
///     statistics, and stay within the documented error bound of the output over every token;
///     threshold 0 reports zeros and changes nothing.
///
/// `--quick` runs a reduced set (for compute-sanitizer); `--seed N` repeats a run.
/// Exit status: 0 passed, 1 a check failed, 2 a runtime call failed, 77 no GPU.

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include "device_test.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "oscar/attention/gpu.cuh"
#include "oscar/attention/host.hpp"
#include "oscar/backend/gpu/paged_kv.cuh"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/quant/formats.hpp"

namespace q = oscar::quant;
namespace gpu = oscar::gpu;
namespace cache = oscar::cache;
namespace att = oscar::attention;
using oscar::half;

namespace {

using oscar_device_test::backend_tag;
using oscar_device_test::report;
using oscar_device_test::rng;
using oscar_device_test::to_device;
using oscar_device_test::to_host;


struct shape {
  int head_dim;
  int kv_heads;
  int group;
  int block_tokens;
  int sinks;
  int window;
  std::vector<int> prefill;  ///< tokens of each sequence's first append (one call each)
  int steps;                 ///< batched steps of 1 to 3 tokens after the forks
};

std::string describe(const char* format, const shape& sh) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s hd%d kvh%d G%d bt%d sinks%d window%d", format, sh.head_dim,
                sh.kv_heads, sh.group, sh.block_tokens, sh.sinks, sh.window);
  return buf;
}

/// A direction per KV head that the keys of a "far" token range point away from.
struct far_keys {
  std::vector<float> direction;  ///< [kv_heads][d], unit length; empty: no far tokens
  int from = 0, to = 0;          ///< token range (of each sequence) that points away
};

/// Fresh K or V rows [tokens][heads][d] (fp16) for tokens [first, first + tokens) of a
/// sequence: keys with per-channel offsets and some wide channels, values plain; keys of the
/// far range are -12 * direction plus a little noise.
std::vector<half> random_rows(int first, int tokens, int heads, int d, bool keys,
                              const far_keys& far) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<half> x(static_cast<std::size_t>(tokens) * heads * d);
  std::vector<float> offset(static_cast<std::size_t>(heads) * d), spread(offset.size());
  for (std::size_t i = 0; i < offset.size(); ++i) {
    offset[i] = keys ? 0.5f * normal(rng) : 0.0f;
    spread[i] = keys && rng() % 11 == 0 ? 4.0f : 1.0f;
  }
  for (int t = 0; t < tokens; ++t) {
    const bool away = keys && !far.direction.empty() && first + t >= far.from && first + t < far.to;
    for (std::size_t i = 0; i < offset.size(); ++i) {
      const float v = away ? -12.0f * far.direction[i] + 0.05f * normal(rng)
                           : offset[i] + spread[i] * normal(rng);
      x[t * offset.size() + i] = half(v);
    }
  }
  return x;
}

template <class KV>
using host_cache = cache::kv_cache<KV, q::fp4plus, q::kv_fp16>;

/// Host and device caches fed the same appends.
template <class KV>
struct twin {
  shape sh;
  cache::cache_config cfg;
  host_cache<KV> host;
  std::vector<std::unique_ptr<gpu::paged_kv<KV>>> devs;  ///< default layout, then native
  std::vector<cache::seq_id> seqs;
  std::vector<gpu::slot_id> slots;
  std::vector<int> lengths;  ///< tokens appended to each sequence
  far_keys far;
  static constexpr int layers = 2;

  twin(const shape& s, gpu::stream_t stream)
      : sh(s),
        cfg{.layers = layers, .kv_heads = s.kv_heads, .head_dim = s.head_dim,
            .block_tokens = s.block_tokens, .sink_tokens = s.sinks, .window_tokens = s.window},
        host(cfg, {.full = 0, .mid = 0, .low = std::size_t{512} << 20}) {
    const gpu::paged_kv_options opt{.max_sequences = 16, .max_tokens = 8192, .pool_blocks = 2048};
    devs.push_back(std::make_unique<gpu::paged_kv<KV>>(cfg, opt, stream));
    if (devs[0]->layout() == gpu::block_layout::mma) {
      gpu::paged_kv_options native = opt;
      native.native_layout = true;
      devs.push_back(std::make_unique<gpu::paged_kv<KV>>(cfg, native, stream));
    }
  }

  /// Appends `tokens` fresh rows to each sequence of `which`, every layer, host and devices.
  void append(std::span<const int> which, int tokens, gpu::stream_t s) {
    const int H = sh.kv_heads, d = sh.head_dim;
    for (int l = 0; l < layers; ++l) {
      std::vector<half> k, v;
      for (int i : which) {
        const auto kr = random_rows(lengths[static_cast<std::size_t>(i)], tokens, H, d, true, far);
        const auto vr = random_rows(lengths[static_cast<std::size_t>(i)], tokens, H, d, false, far);
        k.insert(k.end(), kr.begin(), kr.end());
        v.insert(v.end(), vr.begin(), vr.end());
      }
      for (std::size_t b = 0; b < which.size(); ++b) {
        const std::size_t at = b * static_cast<std::size_t>(tokens) * H * d;
        host.append(seqs[static_cast<std::size_t>(which[b])], l,
                    oscar::make_kv_view<const half>(k.data() + at, tokens, H, d),
                    oscar::make_kv_view<const half>(v.data() + at, tokens, H, d));
      }
      auto dk = to_device(k, s), dv = to_device(v, s);
      std::vector<gpu::slot_id> batch;
      for (int i : which) batch.push_back(slots[static_cast<std::size_t>(i)]);
      for (auto& c : devs) c->append(std::span<const gpu::slot_id>(batch), l, dk.data(), dv.data(), tokens, s);
      gpu::synchronize(s);  // the inputs are freed at the end of this scope
    }
    for (int i : which) lengths[static_cast<std::size_t>(i)] += tokens;
  }

  /// Prefills, forks of the first and last sequence, batched steps, one more divergence.
  void fill(gpu::stream_t s) {
    for (int len : sh.prefill) {
      seqs.push_back(host.create());
      gpu::slot_id slot = -1;
      for (auto& c : devs) slot = c->create(s);  // the same slot number in every device cache
      slots.push_back(slot);
      lengths.push_back(0);
      const int i = static_cast<int>(seqs.size()) - 1;
      append(std::span<const int>(&i, 1), len, s);
    }
    for (int parent : {0, static_cast<int>(sh.prefill.size()) - 1}) {
      seqs.push_back(host.fork(seqs[static_cast<std::size_t>(parent)]));
      gpu::slot_id slot = -1;
      for (auto& c : devs) slot = c->fork(slots[static_cast<std::size_t>(parent)], s);
      slots.push_back(slot);
      lengths.push_back(lengths[static_cast<std::size_t>(parent)]);
    }
    std::vector<int> all(seqs.size());
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
    for (int step = 0; step < sh.steps; ++step) append(std::span<const int>(all), 1 + step % 3, s);
    const int single = 0;
    append(std::span<const int>(&single, 1), 200, s);  // the parent diverges from its fork
  }
};

/// Compares a device entry with the host's: block bytes, fills, key summaries, sinks, window,
/// per-head params.
template <class KV>
bool same_entry(const host_cache<KV>& host, cache::seq_id seq, const gpu::paged_kv<KV>& dev,
                gpu::slot_id slot, int layer, int head, gpu::stream_t s, std::string& why) {
  const auto snap = dev.read_entry(slot, layer, head, s);
  const auto ev = host.view(seq, layer, head);
  const auto& pool = host.pool(cache::tier::low);
  const auto& lay = host.layout(cache::tier::low);
  const auto same_rows = [](std::span<const half> a, const std::vector<half>& b) {
    return a.size() == b.size() &&
           std::equal(a.begin(), a.end(), b.begin(), [](half x, half y) { return x.bits == y.bits; });
  };
  if (!same_rows(ev.sink_k, snap.sink_k) || !same_rows(ev.sink_v, snap.sink_v)) {
    why = "sinks differ";
    return false;
  }
  if (!same_rows(ev.window_k, snap.window_k) || !same_rows(ev.window_v, snap.window_v)) {
    why = "window differs";
    return false;
  }
  if (ev.slots.size() != snap.blocks.size()) {
    why = "block count differs";
    return false;
  }
  const int d = host.config().head_dim;
  for (std::size_t i = 0; i < ev.slots.size(); ++i) {
    const cache::block_id id = ev.slots[i].id;
    const int fill = pool.fill(id);
    if (fill != snap.fills[i]) {
      why = "fill of block " + std::to_string(i) + " differs";
      return false;
    }
    const std::byte* h = pool.data(id);
    const std::byte* g = snap.blocks[i].data();
    const std::size_t keys = static_cast<std::size_t>(fill / lay.key_tile_tokens) * lay.key_tile_bytes;
    const std::size_t values = static_cast<std::size_t>(fill / lay.value_tile_tokens) * lay.value_tile_bytes;
    if (std::memcmp(h, g, keys) != 0 || std::memcmp(h + lay.key_bytes, g + lay.key_bytes, values) != 0) {
      why = "bytes of block " + std::to_string(i) + " differ";
      return false;
    }
    for (int c = 0; c < d; ++c) {
      if (pool.key_min(id)[c].bits != snap.key_bounds[i][c].bits ||
          pool.key_max(id)[c].bits != snap.key_bounds[i][d + c].bits) {
        why = "key summary of block " + std::to_string(i) + " channel " + std::to_string(c) +
              " differs";
        return false;
      }
    }
  }
  const auto& p = host.template params<2>(seq, layer, head);
  if (p.calibrated && !(p.key == snap.device_state.key && p.value == snap.device_state.value)) {
    why = "per-head params differ";
    return false;
  }
  return true;
}

const char* layout_name(gpu::block_layout l) { return l == gpu::block_layout::mma ? "mma" : "native"; }

/// 1. Appended and uploaded device entries equal the host's, summaries included.
template <class KV>
void check_append(report& r, const char* format, const shape& sh, gpu::stream_t s) {
  twin<KV> tw(sh, s);
  tw.fill(s);
  const auto count_bad = [&](const gpu::paged_kv<KV>& c, std::span<const gpu::slot_id> slots,
                             std::string& why) {
    int bad = 0;
    for (std::size_t i = 0; i < tw.seqs.size(); ++i)
      for (int l = 0; l < twin<KV>::layers; ++l)
        for (int h = 0; h < sh.kv_heads; ++h)
          if (!same_entry(tw.host, tw.seqs[i], c, slots[i], l, h, s, why)) ++bad;
    return bad;
  };
  for (auto& c : tw.devs) {
    std::string why;
    const int bad = count_bad(*c, tw.slots, why);
    r.check(bad == 0, describe(format, sh) + " " + layout_name(c->layout()) +
                          ": device append == host (bytes, key summaries)" +
                          (bad ? " (" + std::to_string(bad) + " entries differ, e.g. " + why + ")" : ""));
  }
  gpu::paged_kv<KV> up(tw.cfg, {.max_sequences = 16, .max_tokens = 8192, .pool_blocks = 2048}, s);
  const std::vector<gpu::slot_id> slots = up.upload(tw.host, std::span<const cache::seq_id>(tw.seqs), s);
  std::string why;
  const int bad = count_bad(up, slots, why);
  r.check(bad == 0, describe(format, sh) + " " + layout_name(up.layout()) +
                        ": upload == host (bytes, key summaries)" +
                        (bad ? " (" + std::to_string(bad) + " entries differ, e.g. " + why + ")" : ""));
}

/// Queries [batch][q_heads][d]: per KV head, the group's heads share a direction (the far keys'
/// direction when there is one) plus noise.
std::vector<float> make_queries(int batch, int H, int G, int d, const far_keys& far) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> qv(static_cast<std::size_t>(batch) * H * G * d);
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < H; ++h) {
      std::vector<float> base(static_cast<std::size_t>(d));
      for (int c = 0; c < d; ++c) {
        base[c] = far.direction.empty() ? normal(rng) : 2.0f * far.direction[h * d + c] * std::sqrt(float(d));
      }
      for (int j = 0; j < G; ++j)
        for (int c = 0; c < d; ++c)
          qv[((static_cast<std::size_t>(b) * H + h) * G + j) * d + c] = base[c] + 0.3f * normal(rng);
    }
  }
  return qv;
}

double rel_error(std::span<const float> got, std::span<const float> want, bool& finite) {
  double err = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    finite = finite && std::isfinite(got[i]);
    err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
  }
  return std::sqrt(err / std::max(norm, 1e-30));
}

/// Largest difference of device statistics from the host's, as a multiple of the allowed one
/// (<= 1 passes): lse and entropy to 1e-4 (relative above 1), each token's mass to 1e-4 of
/// itself + 1e-7; device mass past an entry's tokens must be exactly 0.
double stats_error(const std::vector<att::kv_head_stats>& got, const std::vector<att::kv_head_stats>& want,
                   const std::vector<float>& raw_mass, std::size_t stride, std::string& why) {
  double worst = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const auto rel = [](double g, double w) { return std::abs(g - w) / (1e-4 * std::max(1.0, std::abs(w))); };
    const double e1 = rel(got[i].lse, want[i].lse), e2 = rel(got[i].entropy, want[i].entropy);
    if (!(e1 <= worst) || !(e2 <= worst)) why = "lse/entropy of entry " + std::to_string(i);
    worst = std::max({worst, std::isfinite(e1) ? e1 : 1e30, std::isfinite(e2) ? e2 : 1e30});
    if (got[i].token_mass.size() != want[i].token_mass.size()) {
      why = "token_mass length of entry " + std::to_string(i);
      return 1e30;
    }
    for (std::size_t t = 0; t < want[i].token_mass.size(); ++t) {
      const double w = want[i].token_mass[t];
      const double e = std::abs(got[i].token_mass[t] - w) / (1e-4 * w + 1e-7);
      if (!(e <= worst)) why = "token_mass of entry " + std::to_string(i) + " token " + std::to_string(t);
      worst = std::max(worst, std::isfinite(e) ? e : 1e30);
    }
    for (std::size_t t = want[i].token_mass.size(); t < stride; ++t) {
      if (raw_mass[i * stride + t] != 0.0f) {
        why = "token_mass past the tokens of entry " + std::to_string(i);
        return 1e30;
      }
    }
  }
  return worst;
}

/// Device decode (with optional statistics) on one cache; returns the output.
template <class KV>
std::vector<float> device_decode(gpu::paged_kv<KV>& c, std::span<const gpu::slot_id> slots,
                                 const gpu::device_buffer<float>& dq, const att::options& opt,
                                 gpu::decode_workspace& ws, gpu::stream_t s,
                                 std::vector<att::kv_head_stats>* stats, std::vector<float>* raw_mass,
                                 std::size_t stride) {
  const int H = c.config().kv_heads;
  const std::size_t entries = slots.size() * H;
  gpu::device_buffer<float> out(dq.size()), lse(entries), entropy(entries), mass(entries * stride);
  gpu::fill_async(out.data(), 0xff, out.bytes(), s);  // NaN
  gpu::fill_async(lse.data(), 0xff, lse.bytes(), s);
  gpu::fill_async(entropy.data(), 0xff, entropy.bytes(), s);
  gpu::fill_async(mass.data(), 0xff, mass.bytes(), s);
  const gpu::decode_stats ds{lse.data(), entropy.data(), mass.data(), stride};
  att::decode(backend_tag{}, c, 1, slots, dq.data(), out.data(), opt, ws, s, {},
              opt.want_stats ? &ds : nullptr);
  if (stats) *stats = gpu::read_stats(c, 1, slots, ds, s);
  if (raw_mass) *raw_mass = to_host(mass, s);
  return to_host(out, s);
}

/// 2. and 3.: statistics, and block skipping when the shape's cache has far keys.
template <class KV>
void check_decode(report& r, const char* format, const shape& sh, bool far_range, gpu::stream_t s) {
  twin<KV> tw(sh, s);
  const int H = sh.kv_heads, G = sh.group, d = sh.head_dim;
  if (far_range) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    tw.far.direction.resize(static_cast<std::size_t>(H) * d);
    for (int h = 0; h < H; ++h) {
      double norm = 0.0;
      for (int c = 0; c < d; ++c) {
        tw.far.direction[h * d + c] = normal(rng);
        norm += double(tw.far.direction[h * d + c]) * tw.far.direction[h * d + c];
      }
      for (int c = 0; c < d; ++c) tw.far.direction[h * d + c] /= float(std::sqrt(norm));
    }
    tw.far.from = sh.sinks + sh.block_tokens;  // the second and third block of each sequence
    tw.far.to = sh.sinks + 3 * sh.block_tokens;
  }
  tw.fill(s);
  const int batch = static_cast<int>(tw.seqs.size()), qh = H * G;
  const std::vector<float> qv = make_queries(batch, H, G, d, tw.far);
  const auto dq = to_device(qv, s);
  std::size_t longest = 0;
  for (std::size_t i = 0; i < tw.seqs.size(); ++i)
    for (int h = 0; h < H; ++h)
      longest = std::max<std::size_t>(longest, tw.devs[0]->tokens(tw.slots[i], 1, h));
  const std::size_t stride = longest + 37;  // padding the device must zero
  const auto qview = oscar::make_kv_view<const float>(qv.data(), batch, qh, d);
  const std::span<const cache::seq_id> seqs(tw.seqs);
  const std::span<const gpu::slot_id> slots(tw.slots);
  gpu::decode_workspace ws;

  std::vector<float> full(qv.size());  // the host over every token
  std::vector<att::kv_head_stats> full_stats;
  att::decode(oscar::backend::host{}, tw.host, 1, seqs, qview, oscar::make_kv_view(full.data(), batch, qh, d),
              {.q_heads = qh, .want_stats = true}, &full_stats);

  for (auto& c : tw.devs) {
    const std::string what = describe(format, sh) + " " + layout_name(c->layout());
    // Statistics without skipping.
    std::vector<att::kv_head_stats> st;
    std::vector<float> raw;
    const std::vector<float> out = device_decode(*c, slots, dq, {.q_heads = qh, .want_stats = true},
                                                 ws, s, &st, &raw, stride);
    bool finite = true;
    const double err = rel_error(out, full, finite);
    std::string why;
    const double serr = stats_error(st, full_stats, raw, stride, why);
    char buf[200];
    std::snprintf(buf, sizeof buf, ": decode with stats, output rel err %.1e (tol 1e-4), stats %.2f of tol%s%s",
                  err, serr, finite ? "" : ", NON-FINITE output", serr > 1 ? (" at " + why).c_str() : "");
    r.check(finite && err <= 1e-4 && serr <= 1.0 &&
                ws.last_kernel == gpu::decode_kernel::generic, what + buf);

    // Threshold 0: no skipping, zero report, the same output as without skipping.
    att::skip_report zero{1, 1, 1};
    const std::vector<float> out0 = device_decode(*c, slots, dq, {.q_heads = qh, .skip_threshold = 0.0f, .skipped = &zero},
                                                  ws, s, nullptr, nullptr, stride);
    finite = true;
    const double err0 = rel_error(out0, full, finite);
    // Without features the mma layout takes the tensor-core kernel (fp16 operands).
    const double tol0 = ws.last_kernel == gpu::decode_kernel::tensor_core ? 2e-3 : 1e-4;
    std::snprintf(buf, sizeof buf, ": skip_threshold 0 skips nothing and reports zeros (rel err %.1e, tol %.0e)",
                  err0, tol0);
    r.check(finite && err0 <= tol0 && zero.blocks == 0 && zero.blocks_skipped == 0 && zero.tokens_skipped == 0,
            what + buf);
    if (!far_range) continue;

    // Skipping: the host's choices, output and statistics, and the error bound.
    for (const float tau : {4.0f, 12.0f}) {
      const att::options opt{.q_heads = qh, .want_stats = true, .skip_threshold = tau};
      att::skip_report host_report, dev_report;
      att::options host_opt = opt;
      host_opt.skipped = &host_report;
      std::vector<float> host_out(qv.size());
      std::vector<att::kv_head_stats> host_stats;
      att::decode(oscar::backend::host{}, tw.host, 1, seqs, qview,
                  oscar::make_kv_view(host_out.data(), batch, qh, d), host_opt, &host_stats);
      att::options dev_opt = opt;
      dev_opt.skipped = &dev_report;
      std::vector<att::kv_head_stats> dst;
      std::vector<float> draw;
      const std::vector<float> dout = device_decode(*c, slots, dq, dev_opt, ws, s, &dst, &draw, stride);
      std::snprintf(buf, sizeof buf,
                    ": tau %.0f skips the host's blocks (host %lld/%lld blocks, %lld tokens; device %lld/%lld, %lld)",
                    double(tau), (long long)host_report.blocks_skipped, (long long)host_report.blocks,
                    (long long)host_report.tokens_skipped, (long long)dev_report.blocks_skipped,
                    (long long)dev_report.blocks, (long long)dev_report.tokens_skipped);
      r.check(host_report.blocks_skipped > 0 && host_report.blocks == dev_report.blocks &&
                  host_report.blocks_skipped == dev_report.blocks_skipped &&
                  host_report.tokens_skipped == dev_report.tokens_skipped,
              what + buf);
      finite = true;
      const double e_host = rel_error(dout, host_out, finite);
      std::string swhy;
      const double se = stats_error(dst, host_stats, draw, stride, swhy);
      std::snprintf(buf, sizeof buf, ": tau %.0f output vs host rel err %.1e (tol 1e-4), stats %.2f of tol%s",
                    double(tau), e_host, se, se > 1 ? (" at " + swhy).c_str() : "");
      r.check(finite && e_host <= 1e-4 && se <= 1.0, what + buf);
      // Error bound per query head: n_skipped e^-tau (|o_kept| + max |v|), v over every token
      // (a looser bound than over the skipped ones), plus the kernel's own rounding.
      double worst = 0.0;
      for (int b = 0; b < batch; ++b) {
        const auto g = tw.host.gather(tw.seqs[static_cast<std::size_t>(b)], 1);
        for (int h = 0; h < H; ++h) {
          double vmax = 0.0;
          for (oscar::index_t t = 0; t < g[h].tokens; ++t) {
            double n2 = 0.0;
            for (int c2 = 0; c2 < d; ++c2) n2 += double(g[h].v[t * d + c2]) * g[h].v[t * d + c2];
            vmax = std::max(vmax, std::sqrt(n2));
          }
          for (int j = 0; j < G; ++j) {
            const std::size_t at = (static_cast<std::size_t>(b) * qh + h * G + j) * d;
            double diff = 0.0, kept = 0.0, ref = 0.0;
            for (int c2 = 0; c2 < d; ++c2) {
              diff += (double(dout[at + c2]) - full[at + c2]) * (double(dout[at + c2]) - full[at + c2]);
              kept += double(dout[at + c2]) * dout[at + c2];
              ref += double(full[at + c2]) * full[at + c2];
            }
            const double bound = double(dev_report.tokens_skipped) * std::exp(-double(tau)) *
                                     (std::sqrt(kept) + vmax) + 1e-4 * std::sqrt(ref);
            worst = std::max(worst, std::sqrt(diff) / bound);
          }
        }
      }
      std::snprintf(buf, sizeof buf, ": tau %.0f output within the skipping error bound (worst %.2f of it)",
                    double(tau), worst);
      r.check(worst <= 1.0, what + buf);
    }
  }
}

/// Bad calls are refused before anything is queued.
void check_refusals(report& r, gpu::stream_t s) {
  using KV = q::fp2plus;
  const shape sh{64, 2, 2, 128, 2, 16, {300}, 0};
  twin<KV> tw(sh, s);
  tw.fill(s);
  const std::vector<float> qv = make_queries(static_cast<int>(tw.seqs.size()), 2, 2, 64, tw.far);
  const auto dq = to_device(qv, s);
  gpu::device_buffer<float> out(qv.size());
  gpu::decode_workspace ws;
  const std::span<const gpu::slot_id> slots(tw.slots);
  const auto refused = [&](const att::options& opt, const gpu::decode_stats* st, const gpu::decode_config& dc,
                           const char* needle) {
    try {
      att::decode(backend_tag{}, *tw.devs[0], 1, slots, dq.data(), out.data(), opt, ws, s, dc, st);
    } catch (const oscar::error& e) {
      return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
  };
  gpu::device_buffer<float> a(64), b2(64), m(64);
  const gpu::decode_stats small{a.data(), b2.data(), m.data(), 8};
  r.check(refused({.q_heads = 4, .want_stats = true}, nullptr, {}, "stats = nullptr"),
          "want_stats without a decode_stats is refused");
  r.check(refused({.q_heads = 4, .want_stats = true}, &small, {}, "mass_stride"),
          "a mass_stride shorter than an entry is refused");
  r.check(refused({.q_heads = 4, .skip_threshold = -1.0f}, nullptr, {}, "skip_threshold"),
          "a negative skip_threshold is refused");
  r.check(refused({.q_heads = 4, .skip_threshold = 3.0f}, nullptr, {.kernel = gpu::decode_kernel::tensor_core},
                  "generic"),
          "block skipping on the tensor-core kernel is refused");
}

}  // namespace

int main(int argc, char** argv) {
  return oscar_device_test::device_test_main(argc, argv, [](report& r, gpu::stream& s,
                                                              bool quick) {
    check_refusals(r, s);
    if (quick) {  // small shapes for compute-sanitizer: every kernel and path, few blocks
      check_append<q::fp2plus>(r, "fp2plus", {128, 2, 4, 128, 4, 64, {1, 400}, 2}, s);
      check_append<q::fp2plus_kc>(r, "fp2plus-kc", {64, 2, 4, 128, 2, 64, {70, 300}, 2}, s);
      check_append<q::fp4plus>(r, "fp4plus", {64, 2, 2, 32, 2, 16, {3, 100}, 2}, s);
      check_decode<q::fp2plus>(r, "fp2plus", {128, 2, 4, 128, 4, 64, {500}, 1}, true, s);
      check_decode<q::fp2plus_kc>(r, "fp2plus-kc", {64, 2, 4, 64, 4, 64, {300}, 1}, true, s);
    } else {
      // Append (bytes and summaries), prefill-sized calls included.
      check_append<q::fp2plus>(r, "fp2plus", {128, 2, 4, 128, 4, 64, {1, 130, 2048}, 3}, s);
      check_append<q::fp2plus>(r, "fp2plus", {64, 4, 2, 256, 0, 16, {900, 2100}, 2}, s);
      check_append<q::fp2plus_kc>(r, "fp2plus-kc", {128, 2, 4, 256, 4, 64, {70, 1100}, 3}, s);
      check_append<q::fp2plus_kc>(r, "fp2plus-kc", {64, 2, 4, 64, 2, 128, {5, 2048}, 4}, s);
      check_append<q::fp4plus>(r, "fp4plus", {128, 2, 4, 64, 4, 32, {3, 700}, 2}, s);
      check_append<q::kivi2>(r, "kivi2", {128, 2, 1, 64, 0, 32, {40, 1000}, 3}, s);
      check_append<q::fp2plus_kh>(r, "fp2plus-kh", {64, 2, 2, 16, 4, 32, {1, 333}, 2}, s);
      // Statistics and skipping.
      check_decode<q::fp2plus>(r, "fp2plus", {128, 2, 4, 128, 4, 64, {700, 1500}, 2}, true, s);
      check_decode<q::fp2plus>(r, "fp2plus", {64, 2, 8, 256, 0, 16, {129, 900}, 2}, false, s);
      check_decode<q::fp2plus>(r, "fp2plus", {128, 1, 1, 128, 2, 32, {1, 2000}, 1}, true, s);
      check_decode<q::fp2plus_kc>(r, "fp2plus-kc", {128, 2, 4, 64, 4, 64, {300, 1300}, 2}, true, s);
      check_decode<q::fp2plus_kc>(r, "fp2plus-kc", {64, 2, 16, 128, 2, 128, {64, 900}, 2}, false, s);
      check_decode<q::fp4plus>(r, "fp4plus", {64, 4, 2, 32, 2, 16, {9, 999}, 3}, true, s);
    }
  });
}
