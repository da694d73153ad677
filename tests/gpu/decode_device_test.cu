// SPDX-License-Identifier: Apache-2.0
/// \file
/// The device paged cache and GPU decode attention against the host reference.
///
/// One source for CUDA (nvcc) and HIP (clang). For several shapes (head_dim 64 and 128, 1 to 8
/// query heads per KV head, blocks of 16 to 256 tokens, sinks and windows of several sizes) and
/// formats (FP2+ and FP2+ with per-channel keys, each in the mma and the native layout, FP4+,
/// FP2+ with per-token keys), on fresh random K/V (per-channel offsets and outlier channels in the keys):
///
///  1. the same append calls (one prefill per sequence, then single-token and batched steps,
///     forks that then diverge, so a shared last block is copied on write) go to a host
///     `kv_cache` and to a `gpu::paged_kv`; every entry read back from the device must equal
///     the host's bytes: codes, scales and zero points of every block token (an mma record
///     converted back), fills, fp16 sinks and window, per-head params;
///  2. the host sequences are uploaded into another device cache and read back the same way;
///  3. `attention::decode` on both device caches (the tensor-core kernel where the layout is
///     mma, the generic kernel otherwise) must match `attention::decode(backend::host{}, ...)`,
///     the float64 reference, within a tolerance per kernel; outputs are poisoned (NaN) before
///     every call, so an unwritten element fails.
///
/// On CUDA it first checks the PTX primitives of the tensor-core kernel against their host
/// emulation (mma fragments, movmatrix, fp16 unpacking, fp8 scale conversion) bit for bit.
///
/// `--quick` runs a reduced set (for compute-sanitizer); `--seed N` repeats a run.
/// Exit status: 0 passed, 1 a check failed, 2 a runtime call failed, 77 no GPU.

#include "oscar/backend/gpu/runtime.cuh"  // first: the vendor runtime defines __host__ etc.

#include "device_test.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "oscar/attention/gpu.cuh"
#include "oscar/attention/host.hpp"
#include "oscar/backend/gpu/paged_kv.cuh"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/quant/formats.hpp"

#if defined(OSCAR_GPU_RUNTIME_CUDA)
#include "oscar/backend/gpu/decode_mma.cuh"
#include "oscar/backend/gpu/mma_core.hpp"
#include "oscar/backend/gpu/mma_core_lm.hpp"
#include "warp_emulator.hpp"
#endif

namespace q = oscar::quant;
namespace gpu = oscar::gpu;
namespace cache = oscar::cache;
using oscar::half;

namespace {

using oscar_device_test::backend_tag;
using oscar_device_test::report;
using oscar_device_test::rng;
using oscar_device_test::to_device;
using oscar_device_test::to_host;


// ---- PTX primitives vs their host emulation (CUDA) ---------------------------------------------

#if defined(OSCAR_GPU_RUNTIME_CUDA)
__global__ void primitives_kernel(const std::uint32_t* in, std::uint32_t* out, float* mma_out) {
  namespace m = oscar::gpu::mma;
  const int lane = threadIdx.x;
  const std::uint32_t w = in[lane], x = in[32 + lane], y = in[64 + lane];
  std::uint32_t* o = out + lane * 16;
  for (int p = 0; p < 4; ++p) {
    o[p] = m::unpack_code(w, 2 * p);
    o[4 + p] = m::unpack_high(w, 2 * p);
  }
  m::e4m3x4_to_half2(w, o[8], o[9]);
  o[10] = m::hmul2(x, y);
  o[11] = m::hfma2(x, y, w & 0x7bff7bffu);
  o[12] = m::pack_half2(__uint_as_float(x), __uint_as_float(y));
  oscar::gpu::detail::device_warp dw;
  o[13] = dw.movmatrix(w);
  o[14] = oscar::gpu::mma_lm::plane1(w << (lane & 15));
  o[15] = __float_as_uint(oscar::gpu::mma_lm::f16_to_f32(static_cast<std::uint16_t>(x & 0x7bffu)));
  float d[4] = {0.0f, 1.0f, 2.0f, 3.0f};
  const std::uint32_t* ab = in + 96;  // small integers: every sum is exact
  const std::uint32_t a[4] = {ab[lane * 4], ab[lane * 4 + 1], ab[lane * 4 + 2], ab[lane * 4 + 3]};
  dw.mma(d, a, ab[128 + lane * 2], ab[128 + lane * 2 + 1]);
  for (int i = 0; i < 4; ++i) mma_out[lane * 4 + i] = d[i];
}

void check_primitives(report& r, gpu::stream_t s) {
  const gpu::device_properties dev = gpu::current_device();
  if (dev.major < 8) {
    std::printf("     primitives: compute capability %d.%d < 8.0, tensor-core path not built for it\n",
                dev.major, dev.minor);
    return;
  }
  namespace m = oscar::gpu::mma;
  std::vector<std::uint32_t> in(96 + 192);
  for (auto& v : in) v = static_cast<std::uint32_t>(rng());
  for (int i = 0; i < 32; ++i) {  // no e4m3 NaN bytes (0x7f, 0xff): NaN payloads may differ
    for (int byte = 0; byte < 4; ++byte) {
      if (((in[i] >> (8 * byte)) & 0x7fu) == 0x7fu) in[i] ^= 1u << (8 * byte);
    }
  }
  for (int i = 32; i < 96; ++i) in[i] &= 0xbfffbfffu;  // finite floats and halves below 2
  for (int i = 96; i < 96 + 192; ++i) {
    const auto small = [](std::uint64_t bits) { return static_cast<float>(static_cast<int>(bits % 9) - 4); };
    in[i] = m::half2_bits(small(rng()), small(rng()));
  }
  auto d_in = to_device(in, s);
  gpu::device_buffer<std::uint32_t> d_out(32 * 16);
  gpu::device_buffer<float> d_mma(32 * 4);
  gpu::fill_async(d_out.data(), 0xff, d_out.bytes(), s);
  gpu::fill_async(d_mma.data(), 0xff, d_mma.bytes(), s);
  primitives_kernel<<<1, 32, 0, s>>>(d_in.data(), d_out.data(), d_mma.data());
  gpu::check_launch("primitives_kernel");
  const std::vector<std::uint32_t> out = to_host(d_out, s);
  const std::vector<float> mma_dev = to_host(d_mma, s);

  // Host side: the same functions (host paths) and the warp emulator.
  int bad_unpack = 0, bad_e4m3 = 0, bad_arith = 0, bad_pack = 0, bad_movm = 0, bad_mma = 0;
  std::vector<std::uint32_t> movm(32);
  std::vector<float> mma_host(32 * 4);
  emulation::run_warp([&](emulation::warp& w) {
    const int lane = w.lane();
    const std::uint32_t word = in[lane];
    movm[lane] = w.movmatrix(word);
    float d[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    const std::uint32_t* ab = in.data() + 96;
    const std::uint32_t a[4] = {ab[lane * 4], ab[lane * 4 + 1], ab[lane * 4 + 2], ab[lane * 4 + 3]};
    w.mma(d, a, ab[128 + lane * 2], ab[128 + lane * 2 + 1]);
    for (int i = 0; i < 4; ++i) mma_host[lane * 4 + i] = d[i];
  });
  for (int lane = 0; lane < 32; ++lane) {
    const std::uint32_t word = in[lane], x = in[32 + lane], y = in[64 + lane];
    const std::uint32_t* o = out.data() + lane * 16;
    for (int p = 0; p < 4; ++p) {
      bad_unpack += o[p] != m::unpack_code(word, 2 * p);
      bad_unpack += o[4 + p] != m::unpack_high(word, 2 * p);
    }
    std::uint32_t lo = 0, hi = 0;
    m::e4m3x4_to_half2(word, lo, hi);
    bad_e4m3 += (o[8] != lo) + (o[9] != hi);
    bad_arith += o[10] != m::hmul2(x, y);
    bad_arith += o[11] != m::hfma2(x, y, word & 0x7bff7bffu);
    float fx, fy;
    std::memcpy(&fx, &x, 4);
    std::memcpy(&fy, &y, 4);
    bad_pack += o[12] != m::pack_half2(fx, fy);
    bad_movm += o[13] != movm[lane];
    bad_unpack += o[14] != oscar::gpu::mma_lm::plane1(word << (lane & 15));
    const float f16 = oscar::gpu::mma_lm::f16_to_f32(static_cast<std::uint16_t>(x & 0x7bffu));
    std::uint32_t f16_bits;
    std::memcpy(&f16_bits, &f16, 4);
    bad_pack += o[15] != f16_bits;
    for (int i = 0; i < 4; ++i) bad_mma += mma_dev[lane * 4 + i] != mma_host[lane * 4 + i];
  }
  r.check(bad_unpack == 0, "primitive: code unpacking (fma.rn / fma.rn.sat f16x2, lop3 planes), mismatches " + std::to_string(bad_unpack));
  r.check(bad_e4m3 == 0, "primitive: e4m3 pairs to f16x2, mismatches " + std::to_string(bad_e4m3));
  r.check(bad_arith == 0, "primitive: mul.rn / fma.rn f16x2, mismatches " + std::to_string(bad_arith));
  r.check(bad_pack == 0, "primitive: cvt.rn.f16x2.f32 order, cvt.f32.f16, mismatches " + std::to_string(bad_pack));
  r.check(bad_movm == 0, "primitive: movmatrix.trans fragments, mismatches " + std::to_string(bad_movm));
  r.check(bad_mma == 0, "primitive: mma.m16n8k16 fragments, mismatches " + std::to_string(bad_mma));
}
#endif

// ---- the cache and decode scenario ----------------------------------------------------------------

struct shape {
  int head_dim;
  int kv_heads;
  int group;
  int block_tokens;
  int sinks;
  int window;
  std::vector<int> prefill;  ///< prefill tokens of each sequence (ragged)
  int steps;                 ///< batched single-token steps after the prefill and the forks
};

std::string describe(const char* format, const shape& sh, const char* layout) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s hd%d kvh%d G%d bt%d sinks%d window%d", format, layout,
                sh.head_dim, sh.kv_heads, sh.group, sh.block_tokens, sh.sinks, sh.window);
  return buf;
}

/// Fresh random K or V rows [tokens][heads][d] in fp16: keys with per-channel offsets and a few
/// large channels, values plain.
std::vector<half> random_rows(int tokens, int heads, int d, bool keys) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<half> x(static_cast<std::size_t>(tokens) * heads * d);
  std::vector<float> offset(static_cast<std::size_t>(heads) * d), spread(offset.size());
  for (std::size_t i = 0; i < offset.size(); ++i) {
    offset[i] = keys ? 0.7f * normal(rng) : 0.0f;
    spread[i] = keys && (rng() % 13 == 0) ? 5.0f : 1.0f;
  }
  for (int t = 0; t < tokens; ++t)
    for (std::size_t i = 0; i < offset.size(); ++i)
      x[t * offset.size() + i] = half(offset[i] + spread[i] * normal(rng));
  return x;
}

/// Compares a device entry with the host's, byte for byte over what the entry holds.
template <class KV, class Host>
bool same_entry(const Host& host, cache::seq_id seq, const gpu::paged_kv<KV>& dev,
                gpu::slot_id slot, int layer, int head, gpu::stream_t s, std::string& why) {
  const auto snap = dev.read_entry(slot, layer, head, s);
  const auto ev = host.view(seq, layer, head);
  const auto& lay = host.layout(cache::tier::low);
  auto rows_equal = [](std::span<const half> a, const std::vector<half>& b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i)
      if (a[i].bits != b[i].bits) return false;
    return true;
  };
  if (!rows_equal(ev.sink_k, snap.sink_k) || !rows_equal(ev.sink_v, snap.sink_v)) {
    why = "sinks differ";
    return false;
  }
  if (!rows_equal(ev.window_k, snap.window_k) || !rows_equal(ev.window_v, snap.window_v)) {
    why = "window differs (host rows " + std::to_string(ev.window_k.size()) + ", device " +
          std::to_string(snap.window_k.size()) + ")";
    return false;
  }
  if (ev.slots.size() != snap.blocks.size()) {
    why = "block count differs: host " + std::to_string(ev.slots.size()) + ", device " +
          std::to_string(snap.blocks.size());
    return false;
  }
  for (std::size_t i = 0; i < ev.slots.size(); ++i) {
    const int fill = host.pool(cache::tier::low).fill(ev.slots[i].id);
    if (fill != snap.fills[i]) {
      why = "fill of block " + std::to_string(i) + " differs";
      return false;
    }
    const std::byte* h = host.pool(cache::tier::low).data(ev.slots[i].id);
    const std::byte* d = snap.blocks[i].data();
    const std::size_t keys = static_cast<std::size_t>(fill / lay.key_tile_tokens) * lay.key_tile_bytes;
    const std::size_t values = static_cast<std::size_t>(fill / lay.value_tile_tokens) * lay.value_tile_bytes;
    if (std::memcmp(h, d, keys) != 0 || std::memcmp(h + lay.key_bytes, d + lay.key_bytes, values) != 0) {
      why = "bytes of block " + std::to_string(i) + " differ";
      return false;
    }
  }
  const auto& p = host.template params<2>(seq, layer, head);
  if (p.calibrated && !(p.key == snap.device_state.key && p.value == snap.device_state.value)) {
    why = "per-head params differ";
    return false;
  }
  return true;
}

/// Upload refuses a host cache with a pruned head (it holds a running mean, not tokens) and
/// leaves the device cache without new slots.
void check_upload_refuses_pruned(report& r, gpu::stream_t s) {
  using KV = q::fp2plus_kc;
  const cache::cache_config cfg{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 64,
                                .sink_tokens = 4, .window_tokens = 64};
  cache::kv_cache<KV, q::fp4plus, q::kv_fp16> host(cfg, {.full = 0, .mid = 0, .low = 1 << 20});
  const cache::seq_id seq = host.create();
  std::vector<float> k(300 * 2 * 64), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::sin(0.37f * float(i));
    v[i] = std::cos(0.11f * float(i));
  }
  host.append(seq, 0, oscar::make_kv_view<const float>(k.data(), 300, 2, 64),
              oscar::make_kv_view<const float>(v.data(), 300, 2, 64));
  host.prune(seq, 0, 1);
  gpu::paged_kv<KV> dev(cfg, {.max_sequences = 2, .max_tokens = 1024, .pool_blocks = 64}, s);
  bool refused = false;
  try {
    (void)dev.upload(host, std::span<const cache::seq_id>(&seq, 1), s);
  } catch (const oscar::error& e) {
    refused = e.code() == oscar::errc::unsupported && std::string(e.what()).find("pruned") != std::string::npos;
  }
  const std::vector<gpu::slot_id> after = dev.upload(host, std::span<const cache::seq_id>(), s);
  r.check(refused && after.empty(), "upload refuses a pruned head with errc::unsupported");
}

template <class KV>
void run_case(report& r, const char* format, const shape& sh, gpu::stream_t s) {
  constexpr bool has_mma = gpu::has_mma_layout_v<KV>;
  const int d = sh.head_dim, H = sh.kv_heads, layers = 2, layer = 1;
  const cache::cache_config cfg{.layers = layers, .kv_heads = H, .head_dim = d,
                                .block_tokens = sh.block_tokens, .sink_tokens = sh.sinks,
                                .window_tokens = sh.window};
  using host_cache = cache::kv_cache<KV, q::fp4plus, q::kv_fp16>;
  host_cache host(cfg, {.full = 0, .mid = 0, .low = std::size_t{256} << 20});
  const gpu::paged_kv_options opt{.max_sequences = 16, .max_tokens = 16384, .pool_blocks = 4096};
  gpu::paged_kv<KV> dev(cfg, opt, s);  // mma layout where the format has one
  gpu::paged_kv_options native_opt = opt;
  native_opt.native_layout = true;
  std::vector<gpu::paged_kv<KV>*> devs{&dev};
  std::unique_ptr<gpu::paged_kv<KV>> dev_native;
  if (has_mma && dev.layout() == gpu::block_layout::mma) {
    dev_native = std::make_unique<gpu::paged_kv<KV>>(cfg, native_opt, s);
    devs.push_back(dev_native.get());
  }

  std::vector<cache::seq_id> seqs;
  std::vector<gpu::slot_id> slots;
  // Appends the same fresh rows to host sequence i and its device slot(s), every layer.
  auto append = [&](std::span<const int> which, int tokens) {
    for (int l = 0; l < layers; ++l) {
      std::vector<half> k = random_rows(tokens * static_cast<int>(which.size()), H, d, true);
      std::vector<half> v = random_rows(tokens * static_cast<int>(which.size()), H, d, false);
      for (std::size_t b = 0; b < which.size(); ++b) {
        const std::size_t at = b * static_cast<std::size_t>(tokens) * H * d;
        host.append(seqs[static_cast<std::size_t>(which[b])], l,
                    oscar::make_kv_view<const half>(k.data() + at, tokens, H, d),
                    oscar::make_kv_view<const half>(v.data() + at, tokens, H, d));
      }
      auto dk = to_device(k, s), dv = to_device(v, s);
      std::vector<gpu::slot_id> batch;
      for (int i : which) batch.push_back(slots[static_cast<std::size_t>(i)]);
      for (auto* c : devs) c->append(std::span<const gpu::slot_id>(batch), l, dk.data(), dv.data(), tokens, s);
      gpu::synchronize(s);  // the inputs are freed at the end of this scope
    }
  };
  for (int len : sh.prefill) {
    seqs.push_back(host.create());
    slots.push_back(dev.create(s));
    if (dev_native) dev_native->create(s);  // same slot numbers in both device caches
    const int i = static_cast<int>(seqs.size()) - 1;
    append(std::span<const int>(&i, 1), len);
  }
  // Forks of the two longest sequences, then every sequence (forks too) takes batched steps.
  for (int parent : {0, static_cast<int>(sh.prefill.size()) - 1}) {
    seqs.push_back(host.fork(seqs[static_cast<std::size_t>(parent)]));
    slots.push_back(dev.fork(slots[static_cast<std::size_t>(parent)], s));
    if (dev_native) dev_native->fork(slots[static_cast<std::size_t>(parent)], s);
  }
  std::vector<int> all(seqs.size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
  for (int step = 0; step < sh.steps; ++step) append(std::span<const int>(all), 1 + step % 3);
  const int single = 0;
  append(std::span<const int>(&single, 1), 70);  // the parent diverges once more

  // 1. Appended device entries equal the host's.
  for (auto* c : devs) {
    const char* layout = c->layout() == gpu::block_layout::mma ? "mma" : "native";
    int bad = 0;
    std::string why;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      for (int l = 0; l < layers; ++l)
        for (int h = 0; h < H; ++h)
          if (!same_entry(host, seqs[i], *c, slots[i], l, h, s, why)) ++bad;
    r.check(bad == 0, describe(format, sh, layout) + ": device append == host append" +
                          (bad ? " (" + std::to_string(bad) + " entries differ, e.g. " + why + ")" : ""));
  }

  // 2. Upload of the host sequences into fresh device caches.
  std::vector<std::unique_ptr<gpu::paged_kv<KV>>> uploaded;
  uploaded.push_back(std::make_unique<gpu::paged_kv<KV>>(cfg, opt, s));
  if (dev_native) uploaded.push_back(std::make_unique<gpu::paged_kv<KV>>(cfg, native_opt, s));
  std::vector<std::vector<gpu::slot_id>> up_slots;
  for (auto& c : uploaded) {
    up_slots.push_back(c->upload(host, std::span<const cache::seq_id>(seqs), s));
    int bad = 0;
    std::string why;
    for (std::size_t i = 0; i < seqs.size(); ++i)
      for (int l = 0; l < layers; ++l)
        for (int h = 0; h < H; ++h)
          if (!same_entry(host, seqs[i], *c, up_slots.back()[i], l, h, s, why)) ++bad;
    const char* layout = c->layout() == gpu::block_layout::mma ? "mma" : "native";
    r.check(bad == 0, describe(format, sh, layout) + ": upload == host" +
                          (bad ? " (" + std::to_string(bad) + " entries differ, e.g. " + why + ")" : ""));
  }

  // 3. Decode vs the host reference.
  const int qh = H * sh.group, batch = static_cast<int>(seqs.size());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> qv(static_cast<std::size_t>(batch) * qh * d);
  for (std::size_t i = 0; i < qv.size(); ++i) qv[i] = normal(rng) * ((i / d) % 3 == 0 ? 3.0f : 1.0f);
  std::vector<float> ref(qv.size());
  const oscar::attention::options aopt{.q_heads = qh};
  oscar::attention::decode(oscar::backend::host{}, host, layer, std::span<const cache::seq_id>(seqs),
                           oscar::make_kv_view<const float>(qv.data(), batch, qh, d),
                           oscar::make_kv_view(ref.data(), batch, qh, d), aopt);
  auto dq = to_device(qv, s);
  gpu::device_buffer<float> dout(qv.size());
  gpu::decode_workspace ws;
  auto compare = [&](gpu::paged_kv<KV>& c, std::span<const gpu::slot_id> sl, const char* what,
                     const gpu::decode_config& dc) {
    gpu::fill_async(dout.data(), 0xff, dout.bytes(), s);  // NaN
    oscar::attention::decode(backend_tag{}, c, layer, sl, dq.data(), dout.data(), aopt, ws, s, dc);
    const std::vector<float> out = to_host(dout, s);
    double worst = 0.0;
    bool finite = true;
    for (int b = 0; b < batch; ++b) {
      for (int h = 0; h < qh; ++h) {
        double err = 0.0, norm = 0.0;
        for (int c2 = 0; c2 < d; ++c2) {
          const std::size_t i = (static_cast<std::size_t>(b) * qh + h) * d + c2;
          finite = finite && std::isfinite(out[i]);
          err += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
          norm += double(ref[i]) * ref[i];
        }
        worst = std::max(worst, std::sqrt(err / std::max(norm, 1e-30)));
      }
    }
    const bool tensor = ws.last_kernel == gpu::decode_kernel::tensor_core;
    // Generic: fp32 arithmetic on exactly decoded values. Tensor cores: fp16 P and value
    // operands, logits to ~22 bits (or ~11 with fp16_logits).
    const double tol = !tensor ? 1e-4 : dc.fp16_logits ? 2e-2 : 2e-3;
    char buf[200];
    std::snprintf(buf, sizeof buf, ": decode (%s cache, %s kernel%s, %d splits) max rel err %.2e (tol %.0e)%s",
                  what, tensor ? "tensor-core" : "generic", tensor && dc.fp16_logits ? ", fp16 logits" : "",
                  ws.last_splits, worst, tol, finite ? "" : ", NON-FINITE output");
    const char* layout = c.layout() == gpu::block_layout::mma ? "mma" : "native";
    r.check(finite && worst <= tol, describe(format, sh, layout) + buf);
  };
  for (auto* c : devs) {
    compare(*c, std::span<const gpu::slot_id>(slots), "appended", {});
    if (c->layout() == gpu::block_layout::mma) {
      compare(*c, std::span<const gpu::slot_id>(slots), "appended", {.fp16_logits = true});
    }
  }
  for (std::size_t i = 0; i < uploaded.size(); ++i)
    compare(*uploaded[i], std::span<const gpu::slot_id>(up_slots[i]), "uploaded", {});
}

}  // namespace

int main(int argc, char** argv) {
  return oscar_device_test::device_test_main(argc, argv, [](report& r, gpu::stream& s,
                                                              bool quick) {
#if defined(OSCAR_GPU_RUNTIME_CUDA)
    check_primitives(r, s);
#endif
    check_upload_refuses_pruned(r, s);
    const shape main_shape{128, 2, 4, 64, 4, 64, {1, 5, 70, 300, 1200}, 3};
    run_case<q::fp2plus_kc>(r, "fp2plus-kc", main_shape, s);
    run_case<q::fp4plus>(r, "fp4plus", {128, 2, 4, 64, 4, 32, {3, 200, 700}, 2}, s);
    // The default FP2+ (keys in 128-token tiles with outliers): its tensor-core kernel (4-query
    // tiles up to 4 heads per KV head, else 8-query tiles) on the mma layout, the generic kernel
    // on the native layout.
    run_case<q::fp2plus>(r, "fp2plus", {128, 2, 4, 128, 4, 64, {1, 70, 300, 1200}, 2}, s);
    run_case<q::fp2plus>(r, "fp2plus", {64, 1, 6, 128, 2, 32, {130, 400}, 1}, s);
    if (!quick) {
      run_case<q::fp2plus>(r, "fp2plus", {64, 2, 8, 256, 0, 16, {129, 900}, 2}, s);
      run_case<q::fp2plus>(r, "fp2plus", {128, 2, 1, 256, 4, 64, {5, 257, 1500}, 2}, s);
      run_case<q::fp2plus>(r, "fp2plus", {128, 1, 16, 128, 2, 128, {300, 1000}, 1}, s);
      run_case<q::fp2plus>(r, "fp2plus", {64, 4, 4, 128, 4, 32, {128, 700, 2100}, 3}, s);
      run_case<q::fp2plus>(r, "fp2plus", {128, 2, 2, 256, 0, 0, {600, 3000}, 2}, s);
      run_case<q::fp2plus_kc>(r, "fp2plus-kc", {64, 4, 8, 128, 2, 128, {2, 64, 129, 900, 2500}, 4}, s);
      run_case<q::fp2plus_kc>(r, "fp2plus-kc", {128, 1, 1, 256, 0, 16, {17, 640, 3000}, 2}, s);
      run_case<q::fp2plus_kc>(r, "fp2plus-kc", {128, 2, 8, 64, 4, 128, {100, 4000}, 2}, s);
      run_case<q::fp2plus_kc>(r, "fp2plus-kc", {128, 2, 16, 64, 4, 64, {500, 1000}, 1}, s);
      run_case<q::fp2plus_kh>(r, "fp2plus-kh", {64, 2, 2, 16, 4, 32, {1, 40, 333}, 2}, s);
      run_case<q::fp4plus>(r, "fp4plus", {64, 4, 1, 32, 2, 16, {9, 99, 999}, 3}, s);
    }
  });
}
