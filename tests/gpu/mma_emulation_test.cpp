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
/// The same for the default FP2+ (`quant::fp2plus`, 128-token records of `mma_lm`, with key
/// outliers, also with duplicate and out-of-range outlier indices), the record layout's
/// pack/unpack round trip on random bytes, and the paired key bit planes against their
/// definition.
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
#include "oscar/backend/gpu/mma_core_lm.hpp"
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

/// softmax(scale_log2 q.k) v per query in float64 (log2 units, as the kernels): the output, the
/// softmax sum relative to the max, and the max. `kref`, `vref`: [tokens][d] decoded keys and
/// values; `query`: [group][d].
struct reference {
  std::vector<double> o, l, m;
};
reference attend_reference(const std::vector<float>& query, int group, const std::vector<float>& kref,
                           const std::vector<float>& vref, int tokens, int d, float scale_log2) {
  reference ref{std::vector<double>(static_cast<std::size_t>(group) * d), std::vector<double>(group),
                std::vector<double>(group)};
  for (int j = 0; j < group; ++j) {
    std::vector<double> z(tokens);
    double mx = -1e300;
    for (int t = 0; t < tokens; ++t) {
      double s = 0.0;
      for (int c = 0; c < d; ++c) s += double(query[j * d + c]) * kref[t * d + c];
      z[t] = double(scale_log2) * s;
      mx = std::max(mx, z[t]);
    }
    double l = 0.0;
    for (int t = 0; t < tokens; ++t) {
      const double p = std::exp2(z[t] - mx);
      l += p;
      for (int c = 0; c < d; ++c) ref.o[j * d + c] += p * vref[t * d + c];
    }
    for (int c = 0; c < d; ++c) ref.o[j * d + c] /= l;
    ref.l[j] = l;
    ref.m[j] = mx;
  }
  return ref;
}

/// The emulated warp's result (`out` [8][d] unnormalized, `out_m`, `out_l` per MMA column)
/// against the reference, for queries 0 .. group - 1.
result compare(const std::vector<float>& out, const std::vector<float>& out_m,
               const std::vector<float>& out_l, const reference& ref, int group, int d) {
  result res;
  for (int j = 0; j < group; ++j) {
    double err = 0.0, norm = 0.0;
    for (int c = 0; c < d; ++c) {
      const double x = double(out[j * d + c]) / out_l[j];
      if (!std::isfinite(x)) res.finite = false;
      err += (x - ref.o[j * d + c]) * (x - ref.o[j * d + c]);
      norm += ref.o[j * d + c] * ref.o[j * d + c];
    }
    res.max_rel = std::max(res.max_rel, std::sqrt(err / norm));
    // The kernel's l is relative to its own max m; rescale to the reference's max.
    const double l_kernel = double(out_l[j]) * std::exp2(double(out_m[j]) - ref.m[j]);
    res.max_l_rel = std::max(res.max_l_rel, std::abs(l_kernel - ref.l[j]) / ref.l[j]);
  }
  return res;
}

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

  const reference ref = attend_reference(query, group, kref, vref, tokens, D, scale_log2);

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

  return compare(out, out_m, out_l, ref, group, D);
}

// ---- the default FP2+ (128-token records, mma_core_lm.hpp) ----------------------------------------

namespace lm = oscar::gpu::mma_lm;
using KVL = q::fp2plus;
using KL = q::format_traits<KVL::key>;
using VL = q::format_traits<KVL::value>;
static_assert(oscar::gpu::is_mma_lm_v<KVL>, "the default FP2+ uses 128-token mma records");

/// pack_record then unpack_record gives back every byte of a native chunk, for random bytes
/// (codes, scales, outliers and indices of any value, also ones no encoder writes).
bool lm_round_trip(int d, std::uint32_t seed) {
  std::mt19937 rng(seed);
  const int key_bytes = d * lm::key_block_bytes, value_bytes = lm::record_tokens * (d / 64) * lm::value_block_bytes;
  std::vector<std::uint8_t> native(static_cast<std::size_t>(key_bytes + value_bytes)), back(native.size());
  for (auto& b : native) b = static_cast<std::uint8_t>(rng());
  std::vector<std::uint8_t> rec(static_cast<std::size_t>(lm::geometry_for(d).bytes), 0xa5);
  lm::pack_record(native.data(), native.data() + key_bytes, d, rec.data());
  // Every item writes its own bytes: the items in reverse order give the same record.
  std::vector<std::uint8_t> rec2(rec.size(), 0x5a);
  for (int i = lm::pack_items(d); i-- > 0;) lm::pack_item(native.data(), native.data() + key_bytes, d, i, rec2.data());
  lm::unpack_record(rec.data(), d, back.data(), back.data() + key_bytes);
  return back == native && rec2 == rec;
}

/// Fresh keys and values encoded with the default FP2+ (`records` chunks of 128 tokens), packed
/// into mma_lm records and attended by the emulated warp with `QPT`-query tiles, against the
/// formats' own decoders and a float64 softmax. `corrupt`: some channels' outlier slots get a
/// duplicate token index or an index >= 128 (bytes no encoder writes; the decoder's rule: a
/// later slot wins, an index >= 128 is ignored).
template <int D, int QPT, bool Exact>
result run_lm_case(int group, int records, std::uint32_t seed, bool corrupt) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int tokens = records * lm::record_tokens;
  std::vector<float> keys(static_cast<std::size_t>(tokens) * D), values(keys.size());
  std::vector<float> offset(D), spread(D);
  for (int c = 0; c < D; ++c) {
    offset[c] = 0.5f * normal(rng);
    spread[c] = (c % 17 == 3) ? 6.0f : 1.0f;
  }
  for (int t = 0; t < tokens; ++t) {
    for (int c = 0; c < D; ++c) {
      // Heavy tails: a few tokens far out, so the outliers matter.
      const float tail = (rng() % 97 == 0) ? 8.0f : 1.0f;
      keys[t * D + c] = offset[c] + spread[c] * tail * normal(rng);
      values[t * D + c] = normal(rng);
    }
  }
  const auto vparams = VL::calibrate(values.data(), tokens, D);
  const KL::head_params kparams{};

  const lm::geometry geo = lm::geometry_for(D);
  std::vector<std::uint8_t> recs(static_cast<std::size_t>(records) * geo.bytes);
  std::vector<float> kref(keys.size()), vref(values.size());
  std::vector<KL::block> kt(static_cast<std::size_t>(q::blocks_per_tile<KVL::key>(D)));
  std::vector<VL::block> vt(static_cast<std::size_t>(lm::record_tokens) * (D / 64));
  for (int r = 0; r < records; ++r) {
    const float* kx = keys.data() + static_cast<std::size_t>(r) * lm::record_tokens * D;
    KL::encode_tile(kx, D, kparams, kt.data());
    if (corrupt) {
      for (int c = 0; c < D; c += 5) {
        std::uint8_t* b = kt[static_cast<std::size_t>(c)].bytes + KL::outlier_index_offset;
        if (c % 10 == 0) b[2] = b[0];       // slot 2 repeats slot 0: slot 2's value wins
        else b[1] = static_cast<std::uint8_t>(128 + c);  // out of range: ignored
      }
    }
    for (int t = 0; t < lm::record_tokens; ++t) {
      VL::encode_tile(values.data() + (static_cast<std::size_t>(r) * lm::record_tokens + t) * D, D,
                      vparams, vt.data() + t * (D / 64));
    }
    lm::pack_record(reinterpret_cast<const std::uint8_t*>(kt.data()),
                    reinterpret_cast<const std::uint8_t*>(vt.data()), D,
                    recs.data() + static_cast<std::size_t>(r) * geo.bytes);
    KL::decode_tile(kt.data(), D, kparams, kref.data() + static_cast<std::size_t>(r) * lm::record_tokens * D);
    for (int t = 0; t < lm::record_tokens; ++t) {
      for (int grp = 0; grp < D / 64; ++grp) {  // decode_group: stays in the rotated space
        VL::decode_group(vt[static_cast<std::size_t>(t * (D / 64) + grp)], vparams,
                         vref.data() + (static_cast<std::size_t>(r) * lm::record_tokens + t) * D + grp * 64);
      }
    }
  }

  std::vector<float> query(static_cast<std::size_t>(group) * D);
  for (float& x : query) x = 2.0f * normal(rng);
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(D));

  const reference ref = attend_reference(query, group, kref, vref, tokens, D, scale_log2);

  std::vector<float> out(static_cast<std::size_t>(8) * D, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> out_m(8, std::numeric_limits<float>::quiet_NaN()), out_l(out_m);
  std::vector<std::uint32_t> y(static_cast<std::size_t>(D / 16) * 2 * 32);
  std::vector<float> qf(static_cast<std::size_t>(QPT) * D);
  std::vector<std::int32_t> corr(static_cast<std::size_t>(lm::corr_entries(QPT)));
  emulation::run_warp([&](emulation::warp& w) {
    const int g = w.lane() >> 2, t = w.lane() & 3;
    const int jq = lm::column_query<QPT>(g);
    lm::warp_state<D, QPT> st;
    lm::warp_begin<D, QPT>(w, st, jq < group ? query.data() + jq * D : nullptr, scale_log2, y.data(),
                           qf.data(), corr.data());
    w.sync();
    for (int r = 0; r < records; ++r) {
      lm::warp_record<D, QPT, Exact>(w, st, recs.data() + static_cast<std::size_t>(r) * geo.bytes,
                                     KL::level(2), KL::level(3));
      w.sync();
    }
    float o[D / 16][4], m[2], l[2];
    lm::warp_end<D, QPT>(w, st, mma::pow2(vparams.scale_exponent), VL::level(2), VL::level(3), o, m, l);
    for (int tile = 0; tile < D / 16; ++tile) {
      for (int i = 0; i < 4; ++i) {
        out[static_cast<std::size_t>(2 * t + (i & 1)) * D + 16 * tile + g + 8 * (i >> 1)] = o[tile][i];
      }
    }
    if (g == 0) {
      for (int c = 0; c < 2; ++c) {
        out_m[2 * t + c] = m[c];
        out_l[2 * t + c] = l[c];
      }
    }
  });

  result res = compare(out, out_m, out_l, ref, group, D);
  if (QPT == 4) {  // columns 4-7 repeat queries 0-3
    for (int j = 0; j < group; ++j) {
      for (int c = 0; c < D; ++c) {
        if (out[(j + 4) * D + c] != out[j * D + c]) res.finite = false;
      }
    }
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
  // The default FP2+: layout round trip, then the emulated kernel (4-query tiles with the lo
  // parts of q in the spare columns; 8-query tiles with separate lo MMAs, or fp16 logits).
  for (int d : {64, 128}) {
    const bool ok = lm_round_trip(d, seed++);
    std::printf("%s mma_lm record of head_dim %d: pack/unpack round trip of random bytes\n",
                ok ? "ok  " : "FAIL", d);
    ++(ok ? passed : failed);
  }
  {
    // planes_paired against its definition, on random code words: register r of parity x
    // reads code j = 4 x + r (bits 2 j, 2 j + 1 of each half); odd r: A0 = 2 b0, A1 = 1 - 2 b1;
    // even r: A0' = 2^-11 b0, A1' = 2^-7 b1 (fp16 values).
    std::mt19937 gen(seed++);
    int bad = 0;
    for (int n = 0; n < 4096; ++n) {
      const std::uint32_t word = static_cast<std::uint32_t>(gen());
      for (int x = 0; x < 2; ++x) {
        std::uint32_t a0[4], a1[4];
        oscar::gpu::mma_lm::planes_paired(word, x, a0, a1);
        for (int r = 0; r < 4; ++r) {
          for (int e = 0; e < 2; ++e) {
            const int code = static_cast<int>(word >> (2 * (4 * x + r) + 16 * e)) & 3;
            const int b0 = code & 1, b1 = code >> 1;
            const float v0 =
                oscar::half_bits_to_float(static_cast<std::uint16_t>(a0[r] >> (16 * e)));
            const float v1 =
                oscar::half_bits_to_float(static_cast<std::uint16_t>(a1[r] >> (16 * e)));
            const bool odd = (r & 1) != 0;
            bad += v0 != (odd ? 2.0f * b0 : std::ldexp(static_cast<float>(b0), -11));
            bad += v1 != (odd ? 1.0f - 2.0f * b1 : std::ldexp(static_cast<float>(b1), -7));
          }
        }
      }
    }
    std::printf("%s mma_lm paired bit planes: %d mismatches\n", bad == 0 ? "ok  " : "FAIL", bad);
    ++(bad == 0 ? passed : failed);
  }
  struct lm_case {
    int d, qpt, group, records;
    bool exact, corrupt;
  };
  const lm_case lm_cases[] = {{64, 4, 1, 1, true, false},  {64, 4, 4, 3, true, true},
                              {64, 8, 8, 2, true, false},  {128, 4, 2, 2, true, false},
                              {128, 4, 4, 1, true, true},  {128, 8, 5, 2, true, true},
                              {128, 8, 8, 1, false, false}};
  for (const lm_case& c : lm_cases) {
    ++seed;
    result r;
    if (c.d == 64) {
      r = c.qpt == 4 ? run_lm_case<64, 4, true>(c.group, c.records, seed, c.corrupt)
                     : run_lm_case<64, 8, true>(c.group, c.records, seed, c.corrupt);
    } else if (c.qpt == 4) {
      r = run_lm_case<128, 4, true>(c.group, c.records, seed, c.corrupt);
    } else {
      r = c.exact ? run_lm_case<128, 8, true>(c.group, c.records, seed, c.corrupt)
                  : run_lm_case<128, 8, false>(c.group, c.records, seed, c.corrupt);
    }
    // Exact logits (~22 bits) leave the fp16 P and value operands: ~1e-3. fp16 logits: ~1e-2.
    const double tol = c.exact ? 2e-3 : 2e-2;
    const bool ok = r.finite && r.max_rel < tol && r.max_l_rel < 4 * tol;
    std::printf("%s fp2plus %s logits, head_dim %3d tile %d group %d records %d%s: max rel err %.2e, "
                "softmax sum rel err %.2e%s\n",
                ok ? "ok  " : "FAIL", c.exact ? "exact" : "fp16 ", c.d, c.qpt, c.group, c.records,
                c.corrupt ? " (odd outlier indices)" : "", r.max_rel, r.max_l_rel,
                r.finite ? "" : " (non-finite output or columns 4-7 differ)");
    ++(ok ? passed : failed);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
