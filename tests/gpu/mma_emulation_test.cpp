// SPDX-License-Identifier: Apache-2.0
/// \file
/// Host check of the tensor-core decode arithmetic (`oscar/backend/gpu/mma_core.hpp`) on an
/// emulated warp (warp_emulator.hpp), at no device time.
///
/// For head_dim 64 and 128, query groups of 1 to 8 heads and several numbers of 64-token
/// records, fresh random keys and values (with per-channel offsets and a few large channels)
/// are encoded by the host encoders of FP2+ with per-channel keys (`quant::fp2plus_kc`), packed
/// into mma records (`layout.hpp`), and attended by the emulated warp. The reference decodes the
/// same chunks with the formats' own decoders and computes softmax(scale q.k) v in float64 (in
/// the values' rotated space, where the kernel leaves its accumulator). Every output element
/// is compared (||o - ref|| / ||ref|| per query); the output buffer is poisoned (NaN) first, so
/// an element the lanes do not write fails. The softmax sum is printed too: it also moves with
/// a common shift of all logits (from q * scale rounded to fp16), which the output ignores.
///
/// Exit status: 0 all checks passed, 1 a check failed.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/mma_core.hpp"
#include "oscar/quant/formats.hpp"

#include "warp_emulator.hpp"

namespace q = oscar::quant;
namespace mma = oscar::gpu::mma;

namespace {

using KV = q::fp2plus_kc;
using K = q::format_traits<KV::key>;
using V = q::format_traits<KV::value>;

struct result {
  double max_rel = 0.0;  ///< worst ||o - ref|| / ||ref|| over queries
  double max_l_rel = 0.0;
  bool finite = true;
};

template <int D, bool Exact>
result run_case(int group, int records, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int tokens = records * mma::record_tokens;
  // Keys with per-channel offsets and a few outlier channels; values plain Gaussian.
  std::vector<float> keys(static_cast<std::size_t>(tokens) * D), values(keys.size());
  std::vector<float> offset(D), spread(D);
  for (int c = 0; c < D; ++c) {
    offset[c] = 0.5f * normal(rng);
    spread[c] = (c % 17 == 3) ? 6.0f : 1.0f;
  }
  for (int t = 0; t < tokens; ++t) {
    for (int c = 0; c < D; ++c) {
      keys[t * D + c] = offset[c] + spread[c] * normal(rng);
      values[t * D + c] = normal(rng);
    }
  }
  const auto vparams = V::calibrate(values.data(), tokens, D);
  const K::head_params kparams{};

  // Encode per chunk (as the cache does), pack records, and decode the reference.
  const mma::geometry geo = mma::geometry_for(D);
  std::vector<std::uint8_t> recs(static_cast<std::size_t>(records) * geo.bytes);
  std::vector<float> kref(keys.size()), vref(values.size());
  std::vector<K::block> kt(static_cast<std::size_t>(q::blocks_per_tile<KV::key>(D)));
  std::vector<V::block> vt(static_cast<std::size_t>(mma::record_tokens) * (D / 16));
  for (int r = 0; r < records; ++r) {
    const float* kx = keys.data() + static_cast<std::size_t>(r) * mma::record_tokens * D;
    K::encode_tile(kx, D, kparams, kt.data());
    for (int t = 0; t < mma::record_tokens; ++t) {
      V::encode_tile(values.data() + (static_cast<std::size_t>(r) * mma::record_tokens + t) * D, D,
                     vparams, vt.data() + t * (D / 16));
    }
    mma::pack_record(reinterpret_cast<const std::uint8_t*>(kt.data()),
                     reinterpret_cast<const std::uint8_t*>(vt.data()), D,
                     recs.data() + static_cast<std::size_t>(r) * geo.bytes);
    K::decode_tile(kt.data(), D, kparams, kref.data() + static_cast<std::size_t>(r) * mma::record_tokens * D);
    for (int t = 0; t < mma::record_tokens; ++t) {
      for (int grp = 0; grp < D / 16; ++grp) {  // decode_group: stays in the rotated space
        V::decode_group(vt[static_cast<std::size_t>(t * (D / 16) + grp)], vparams,
                        vref.data() + (static_cast<std::size_t>(r) * mma::record_tokens + t) * D + grp * 16);
      }
    }
  }

  std::vector<float> query(static_cast<std::size_t>(group) * D);
  for (float& x : query) x = normal(rng);
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(D));

  // Reference in float64.
  std::vector<double> ref(static_cast<std::size_t>(group) * D), ref_l(group);
  for (int j = 0; j < group; ++j) {
    std::vector<double> z(tokens);
    double mx = -1e300;
    for (int t = 0; t < tokens; ++t) {
      double s = 0.0;
      for (int c = 0; c < D; ++c) s += double(query[j * D + c]) * kref[t * D + c];
      z[t] = double(scale_log2) * s;
      mx = std::max(mx, z[t]);
    }
    double l = 0.0;
    for (int t = 0; t < tokens; ++t) {
      const double p = std::exp2(z[t] - mx);
      l += p;
      for (int c = 0; c < D; ++c) ref[j * D + c] += p * vref[t * D + c];
    }
    for (int c = 0; c < D; ++c) ref[j * D + c] /= l;
    ref_l[j] = l;  // relative to the max, like the kernel's l with its m
  }

  // Emulated warp.
  std::vector<float> out(static_cast<std::size_t>(8) * D, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> out_m(8, std::numeric_limits<float>::quiet_NaN()), out_l(out_m);
  std::vector<std::uint32_t> ql(static_cast<std::size_t>(D / 16) * 2 * 32);  // the warp's lo parts
  emulation::run_warp([&](emulation::warp& w) {
    const int g = w.lane() >> 2, t = w.lane() & 3;
    mma::warp_state<D> st;
    mma::warp_begin<D>(w, st, g < group ? query.data() + g * D : nullptr, scale_log2, ql.data());
    for (int r = 0; r < records; ++r) mma::warp_record<D, Exact>(w, st, recs.data() + static_cast<std::size_t>(r) * geo.bytes);
    float o[D / 16][4], m[2], l[2];
    mma::warp_end<D>(w, st, mma::pow2(vparams.scale_exponent), V::level(3), V::level(2), o, m, l);
    for (int grp = 0; grp < D / 16; ++grp) {
      for (int i = 0; i < 4; ++i) {
        out[static_cast<std::size_t>(2 * t + (i & 1)) * D + 16 * grp + g + 8 * (i >> 1)] = o[grp][i];
      }
    }
    if (g == 0) {
      for (int c = 0; c < 2; ++c) {
        out_m[2 * t + c] = m[c];
        out_l[2 * t + c] = l[c];
      }
    }
  });

  result res;
  for (int j = 0; j < group; ++j) {
    double err = 0.0, norm = 0.0;
    for (int c = 0; c < D; ++c) {
      const double x = double(out[j * D + c]) / out_l[j];
      if (!std::isfinite(x)) res.finite = false;
      err += (x - ref[j * D + c]) * (x - ref[j * D + c]);
      norm += ref[j * D + c] * ref[j * D + c];
    }
    res.max_rel = std::max(res.max_rel, std::sqrt(err / norm));
    // The kernel's l is relative to its own max m; rescale to the reference's max.
    double mx = -1e300;
    for (int t = 0; t < tokens; ++t) {
      double s = 0.0;
      for (int c = 0; c < D; ++c) s += double(query[j * D + c]) * kref[t * D + c];
      mx = std::max(mx, double(scale_log2) * s);
    }
    const double l_kernel = double(out_l[j]) * std::exp2(double(out_m[j]) - mx);
    res.max_l_rel = std::max(res.max_l_rel, std::abs(l_kernel - ref_l[j]) / ref_l[j]);
  }
  return res;
}

}  // namespace

int main() {
  int failed = 0, passed = 0;
  // fp16 operands (P, q * scale, the value scales' products) bound the agreement at ~1e-3;
  // a wrong fragment, code or scale gives errors of order 1.
  constexpr double tolerance = 5e-3;
  std::uint32_t seed = 0x05ca7u;
  for (bool exact : {false, true}) {
    for (int d : {64, 128}) {
      for (int group : {1, 2, 4, 8}) {
        for (int records : {1, 3, 8}) {
          ++seed;
          const result r = d == 64 ? (exact ? run_case<64, true>(group, records, seed)
                                            : run_case<64, false>(group, records, seed))
                                   : (exact ? run_case<128, true>(group, records, seed)
                                            : run_case<128, false>(group, records, seed));
          const bool ok = r.finite && r.max_rel < tolerance && r.max_l_rel < 4 * tolerance;
          std::printf("%s %s logits, head_dim %3d group %d records %d: max rel err %.2e, softmax "
                      "sum rel err %.2e%s\n",
                      ok ? "ok  " : "FAIL", exact ? "exact" : "fp16 ", d, group, records,
                      r.max_rel, r.max_l_rel, r.finite ? "" : " (non-finite output)");
          ++(ok ? passed : failed);
        }
      }
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
