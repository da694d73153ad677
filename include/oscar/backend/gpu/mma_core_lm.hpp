// SPDX-License-Identifier: Apache-2.0
/// \file
/// The per-warp arithmetic of the tensor-core decode kernel over the 128-token records of the
/// default FP2+ (layout.hpp, namespace `mma_lm`), written against the same *warp policy* as
/// `mma_core.hpp` (the GPU's PTX, or a host emulation of a warp that the tests run against a
/// float64 reference).
///
/// One warp attends a tile of `QPT` query heads (4 or 8) to a run of records of one KV head with
/// an online softmax per query. The codebooks are symmetric 4-level Lloyd-Max tables, which are
/// *linear in the two code bits*: with `c = b0 + 2 b1`, `l0 = L(2)`, `l1 = L(3)`,
///
///     L(c) = -l1 + (l1 - l0) b0 + (l1 + l0) b1 = -(l1 - l0) / 2 + (l1 - l0) / 2 A0 - (l1 + l0) / 2 A1
///
/// where `A0 = 2 b0` and `A1 = 1 - 2 b1` are what one AND (`A0`: fp16 {0, 2}) and one AND-OR
/// (`A1`: fp16 {1, -1}) of a shifted code word give (layout.hpp). Both are exact tensor-core
/// operands, so each product is two MMAs on bit planes with no unpacking arithmetic:
///
/// - keys, k = z + s L(code) per channel (fp16 scale s and zero point z per channel and record):
///   logit = sum_c q_c z_c + k0 (sum_c (q s)_c (A0 - 1)) + k1 (sum_c (q s)_c A1) with
///   k0 = (l1 - l0) / 2, k1 = -(l1 + l0) / 2. B = q * s in fp16 with a hi + lo split of q (about
///   22 bits): with 4 queries per tile the lo parts ride in the MMA's 4 spare columns (columns
///   4-7 hold the lo products of queries 0-3; one shuffle adds them), with 8 they take their own
///   MMAs. The biases sum_c q z and sum_c (q s) come from MMAs with A = ones, once per record.
///   The key planes come from `planes_paired` (three shifts per code word instead of seven;
///   the MMA rows 0-7 get planes scaled by powers of two that the epilogue undoes).
/// - outliers (3 per channel and record, kept exactly in fp16): q_c (x - z - s L(code)) is added
///   to the token's logit through a per-warp correction table in shared memory, filled once per
///   record with integer atomics (32-bit fixed point scaled to the record) before the logits
///   are read.
/// - values, v = s L(code) with an e4m3 scale s per token and 64 channels:
///   sum_t P v = (l1 - l0) / 2 (sum P s A0 - sum P s) - (l1 + l0) / 2 sum P s A1; B = P s in
///   fp16 (shared by both planes), sum P s and the softmax sum sum P from one MMA per step, as in
///   `mma_core.hpp`.
///
/// The value accumulator stays in the value format's (rotated) space; the combine step
/// unrotates it once.
#pragma once

#include <cstdint>

#include "oscar/backend/gpu/layout.hpp"
#include "oscar/backend/gpu/mma_core.hpp"
#include "oscar/core/macros.hpp"

namespace oscar::gpu::mma_lm {

// ---- bit-plane operands ----------------------------------------------------------------------

/// fp16 2.0 in each half whose bit 14 of `shifted` is set, else 0.0 (plane 0: A0 = 2 b0).
OSCAR_HD_INLINE constexpr std::uint32_t plane0(std::uint32_t shifted) noexcept {
  return shifted & 0x40004000u;
}

/// fp16 -1.0 in each half whose bit 15 of `shifted` is set, else 1.0 (plane 1: A1 = 1 - 2 b1).
OSCAR_HD_INLINE std::uint32_t plane1(std::uint32_t shifted) noexcept {
#if defined(__CUDA_ARCH__)
  // One LOP3 with both constants in registers ((a & b) | c).
  std::uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(shifted), "r"(0x80008000u), "r"(0x3c003c00u));
  return d;
#else
  return (shifted & 0x80008000u) | 0x3c003c00u;
#endif
}

/// The plane operands of the four registers of k-step (or tile) parity `x` from a code word.
OSCAR_HD_INLINE void planes(std::uint32_t word, int x, std::uint32_t (&a0)[4],
                            std::uint32_t (&a1)[4]) noexcept {
  OSCAR_UNROLL
  for (int r = 0; r < 4; ++r) {
    const std::uint32_t s = word << (14 - 2 * (4 * x + r));
    a0[r] = plane0(s);
    a1[r] = plane1(s);
  }
}

/// fp16 bits to float (one conversion instruction on the device).
OSCAR_HD_INLINE float f16_to_f32(std::uint16_t h) noexcept {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  return half_bits_to_float(h);
#endif
}

/// `v` rounded to the nearest integer (|v| < 2^31).
OSCAR_HD_INLINE std::int32_t to_fixed(float v) noexcept {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(v);
#else
  return static_cast<std::int32_t>(__builtin_nearbyintf(v));
#endif
}

/// The little-endian 16-bit word at `p` (2-byte aligned).
OSCAR_HD_INLINE std::uint16_t load_u16(const std::uint8_t* p) noexcept {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const std::uint16_t*>(p);
#else
  return static_cast<std::uint16_t>(p[0] | p[1] << 8);
#endif
}

/// `s * level + z` of the host decoder (one rounded multiply, then one rounded add).
OSCAR_HD_INLINE float dequant_rn(float s, float level, float z) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(z, __fmul_rn(s, level));
#else
  const float scaled = s * level;
  return z + scaled;
#endif
}

/// Reads `N` consecutive 32-bit words (16-byte aligned for N = 4, 8 for N = 2) at `p`.
template <int N>
OSCAR_HD_INLINE void load_words(const std::uint8_t* p, std::uint32_t (&w)[N]) noexcept {
#if defined(__CUDA_ARCH__)
  if constexpr (N == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (N == 2) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else {
    for (int i = 0; i < N; ++i) w[i] = reinterpret_cast<const std::uint32_t*>(p)[i];
  }
#else
  for (int i = 0; i < N; ++i) w[i] = mma::load_le32(p + 4 * i);
#endif
}

/// `planes` with two shifts for four registers (keys): an odd register r (code j = 4 x + r, MMA
/// rows 8-15) gets the planes above from bits 14 and 15 of the word shifted for j; the even
/// register before it (code j - 1, rows 0-7) takes bits 12 and 13 of the same shifted word:
/// A0' = 2^-11 b0 (fp16 bit 12 alone) and A1' = 2^-7 b1 (bit 13 alone), both exact. Rows 0-7
/// thus give 2^-12 sum B A0 and 2^-7 sum B b1; `warp_record` starts their accumulators so that
/// both sums stay centred and scales them back by `paired_scale0` and `paired_scale1`.
OSCAR_HD_INLINE void planes_paired(std::uint32_t word, int x, std::uint32_t (&a0)[4],
                                   std::uint32_t (&a1)[4]) noexcept {
  OSCAR_UNROLL
  for (int r = 1; r < 4; r += 2) {
    const std::uint32_t s = word << (14 - 2 * (4 * x + r));
    a0[r] = plane0(s);
    a1[r] = plane1(s);
    a0[r - 1] = s & 0x10001000u;
    a1[r - 1] = s & 0x20002000u;
  }
}

/// 2^12 and 2^8: rows 0-7 of a key product on `planes_paired`, started at -2^-12 sum B and
/// -2^-8 sum B, hold 2^-12 sum B (A0 - 1) and -2^-8 sum B A1 (A1 = 1 - 2 b1).
inline constexpr float paired_scale0 = 4096.0f, paired_scale1 = 256.0f;

// ---- one warp's attention over records ---------------------------------------------------------

/// Row stride (in entries) of the outlier correction table `[QPT][corr_stride]`: one row per
/// query, one entry per token, padded by 8 so that the four rows a warp reads in one step and
/// the tokens an atomic scatters to spread over the 32 banks.
inline constexpr int corr_stride = record_tokens + 8;

/// Entries of the correction table of a `qpt`-query tile.
OSCAR_HD_INLINE constexpr int corr_entries(int qpt) noexcept { return qpt * corr_stride; }

/// What one lane keeps between records. `QPT`: query heads per tile, 4 (lo parts of q in the
/// spare MMA columns) or 8.
template <int D, int QPT>
struct warp_state {
  static constexpr int ks = D / 16;
  static constexpr bool split = QPT == 4;
  /// Per k-step and register: split: the hi part of q (columns 0-3) or its lo part (columns
  /// 4-7) of this lane's column; else the hi part.
  std::uint32_t x[ks][2];
  /// [ks][2][32 lanes] in shared memory: split: the hi part for lo columns, 0 for hi columns
  /// (the rounding error of hi * s then joins the lo product); else the lo part.
  std::uint32_t* y;
  const float* qf;  ///< [QPT][D]: the scaled queries in fp32 (outlier corrections)
  std::int32_t* corr;  ///< [QPT][corr_stride]: per-record logit corrections (outliers), fixed point
  float qscale[2];  ///< 2^e of the queries of columns 2t, 2t+1 (logit = S * qscale)
  float m[2];       ///< running max (log2 units) of columns 2t, 2t+1
  float o0[ks][4];  ///< sum P s A0, per 16-channel tile (O^T fragments)
  float o1[ks][4];  ///< sum P s A1
  float kacc[4];    ///< rows g < D / 64: sum P s of value group g; row 8: sum P (softmax sum)
};

/// Query head (inside the tile) of MMA column `col`.
template <int QPT>
OSCAR_HD_INLINE constexpr int column_query(int col) noexcept {
  return QPT == 4 ? col & 3 : col;
}

/// Loads the query of this lane's column (`q_row`, or nullptr for padding columns beyond the
/// group) and resets the state. `scale_log2` = softmax scale * log2(e). `y` receives the
/// lanes' second parts (`ks * 2 * 32` words); `qf_out`, when not null, the tile's scaled queries
/// in fp32 ([QPT][D], each element written by one lane); `corr` is the warp's correction table
/// (`corr_entries(QPT)` entries).
template <int D, int QPT, class Warp>
OSCAR_HOST_DEVICE void warp_begin(Warp& w, warp_state<D, QPT>& st, const float* q_row,
                                  float scale_log2, std::uint32_t* y, float* qf_out,
                                  std::int32_t* corr) {
  constexpr int ks = D / 16;
  const int lane = w.lane(), g = lane >> 2, t = lane & 3;
  float qf[ks][4];
  const int e = mma::load_query<D>(w, q_row, scale_log2, qf);
  const float down = mma::pow2(-e);
  const bool lo_column = warp_state<D, QPT>::split && g >= 4;
  const bool writes_q = qf_out != nullptr && (!warp_state<D, QPT>::split || g < 4);
  st.y = y;
  st.corr = corr;
  OSCAR_UNROLL
  for (int kk = 0; kk < ks; ++kk) {
    OSCAR_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float x0 = qf[kk][2 * r] * down, x1 = qf[kk][2 * r + 1] * down;
      const std::uint32_t hi = mma::pack_half2(x0, x1);
      const std::uint32_t lo = mma::pack_half2(x0 - mma::low_half(hi), x1 - mma::high_half(hi));
      if constexpr (warp_state<D, QPT>::split) {
        st.x[kk][r] = lo_column ? lo : hi;
        y[(kk * 2 + r) * 32 + lane] = lo_column ? hi : 0u;
      } else {
        st.x[kk][r] = hi;
        y[(kk * 2 + r) * 32 + lane] = lo;
      }
    }
    if (writes_q) {
      OSCAR_UNROLL
      for (int i = 0; i < 4; ++i) {
        qf_out[column_query<QPT>(g) * D + mma::key_param_channel(t, kk, i)] = qf[kk][i] * down;
      }
    }
  }
  st.qf = qf_out;
  const float up = mma::pow2(e);
  st.qscale[0] = w.shfl(up, 8 * t);
  st.qscale[1] = w.shfl(up, 8 * t + 4);
  st.m[0] = st.m[1] = -__builtin_huge_valf();
  OSCAR_UNROLL
  for (int i2 = 0; i2 < ks; ++i2) {
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) st.o0[i2][i] = st.o1[i2][i] = 0.0f;
  }
  OSCAR_UNROLL
  for (int i = 0; i < 4; ++i) st.kacc[i] = 0.0f;
}

/// q * s in fp16 for one register from the lane's two parts (see `warp_state::x`, `y`):
/// `x * s + (y * s - round(y * s))`, so a lo column gets lo * s plus the rounding error of
/// hi * s, and a hi column (y = 0) gets round(hi * s).
OSCAR_HD_INLINE std::uint32_t split_product(std::uint32_t x, std::uint32_t y, std::uint32_t s) noexcept {
  return mma::hfma2(x, s, mma::hfma2(y, s, mma::hmul2(mma::hneg2(y), s)));
}

/// Attends to one 128-token record (in shared memory on the device); `levels`: l0 = L(2),
/// l1 = L(3) of the key codebook. `Exact` (8-query tiles only): also the MMAs of the lo parts.
/// The caller's `qf` must be readable by every lane (a barrier after `warp_begin`).
template <int D, int QPT, bool Exact, class Warp>
OSCAR_HOST_DEVICE void warp_record(Warp& w, warp_state<D, QPT>& st, const std::uint8_t* rec,
                                   float key_l0, float key_l1) {
  constexpr int ks = D / 16, wpl = ks / 2;
  constexpr bool split = warp_state<D, QPT>::split;
  constexpr bool lo_mmas = !split && Exact;
  constexpr geometry geo = geometry_for(D);
  constexpr int vgroups = D / value_group;
  const int lane = w.lane(), g = lane >> 2, t = lane & 3;
  const std::uint32_t ones[4] = {mma::half2_ones, mma::half2_ones, mma::half2_ones, mma::half2_ones};
  const float k0 = 0.5f * (key_l1 - key_l0), k1 = -0.5f * (key_l1 + key_l0);

  // Clear the correction table (the previous record's readers are past the caller's barrier).
#if defined(__CUDA_ARCH__)
  for (int i = lane; i < corr_entries(QPT) / 4; i += 32) {
    reinterpret_cast<int4*>(st.corr)[i] = make_int4(0, 0, 0, 0);
  }
#else
  for (int i = lane; i < corr_entries(QPT); i += 32) st.corr[i] = 0;
#endif
  w.sync();

  // B fragments (q * s) and the biases sum q z, sum q s (independent chains per k-step parity).
  std::uint32_t b[ks][2];
  std::uint32_t b_lo[lo_mmas ? ks : 1][2];
  (void)b_lo;
  float bz[2][4] = {}, bs[2][4] = {};
  OSCAR_UNROLL
  for (int kk = 0; kk < ks; ++kk) {
    std::uint32_t p[4];  // scales of channels {2t, 2t+1}, {2t+8, 2t+9}, then zero points
    load_words<4>(rec + geo.key_params + (kk * 4 + t) * 16, p);
    const std::uint32_t y0 = st.y[(kk * 2) * 32 + lane], y1 = st.y[(kk * 2 + 1) * 32 + lane];
    std::uint32_t z0, z1;
    if constexpr (split) {
      b[kk][0] = split_product(st.x[kk][0], y0, p[0]);
      b[kk][1] = split_product(st.x[kk][1], y1, p[1]);
      z0 = split_product(st.x[kk][0], y0, p[2]);
      z1 = split_product(st.x[kk][1], y1, p[3]);
    } else {
      b[kk][0] = mma::hmul2(st.x[kk][0], p[0]);
      b[kk][1] = mma::hmul2(st.x[kk][1], p[1]);
      if constexpr (lo_mmas) {
        b_lo[kk][0] = mma::hfma2(y0, p[0], mma::hfma2(st.x[kk][0], p[0], mma::hneg2(b[kk][0])));
        b_lo[kk][1] = mma::hfma2(y1, p[1], mma::hfma2(st.x[kk][1], p[1], mma::hneg2(b[kk][1])));
        w.mma(bs[kk & 1], ones, b_lo[kk][0], b_lo[kk][1]);
      }
      // The zero-point bias keeps both parts whatever Exact says (it moves every logit).
      const std::uint32_t h0 = mma::hmul2(st.x[kk][0], p[2]), h1 = mma::hmul2(st.x[kk][1], p[3]);
      w.mma(bz[kk & 1], ones, mma::hfma2(y0, p[2], mma::hfma2(st.x[kk][0], p[2], mma::hneg2(h0))),
            mma::hfma2(y1, p[3], mma::hfma2(st.x[kk][1], p[3], mma::hneg2(h1))));
      z0 = h0;
      z1 = h1;
    }
    w.mma(bz[kk & 1], ones, z0, z1);
    w.mma(bs[kk & 1], ones, b[kk][0], b[kk][1]);
  }
  float bias[4], minus_bs[4];
  OSCAR_UNROLL
  for (int i = 0; i < 4; ++i) {
    bias[i] = bz[0][i] + bz[1][i];
    minus_bs[i] = -(bs[0][i] + bs[1][i]);
  }

  // Outliers: lane L computes the corrections q (x - z - s L(code)) of the outliers of channels
  // L, L + 32, ...; a later slot with the same token replaces an earlier one (as the decoder
  // does), an index >= 128 is ignored. They are summed per token and query in 32-bit fixed
  // point, units of 2^-f with f chosen so that the sum of all |q delta| of the record (below
  // sum |delta|, as |q| < 1) stays under 2^30: integer atomics are native on shared memory and
  // exact, float ones a compare-and-swap loop.
  constexpr int per_lane = D / 32 * outliers;
  float delta[per_lane];
  int target[per_lane];  // token, or -1
  float bound = 0.0f;
  OSCAR_UNROLL
  for (int i = 0; i < D / 32; ++i) {
    const int c = lane + 32 * i;
    const int kk = c >> 4, cc = c & 15;
    const int prow = geo.key_params + (kk * 4 + ((cc & 7) >> 1)) * 16 + 2 * ((cc & 1) + 2 * (cc >> 3));
    const float s = f16_to_f32(load_u16(rec + prow));
    const float z = f16_to_f32(load_u16(rec + prow + 8));
    int index[outliers];
    OSCAR_UNROLL
    for (int k = 0; k < outliers; ++k) index[k] = rec[geo.outlier_index + (i * outliers + k) * 32 + lane];
    OSCAR_UNROLL
    for (int k = 0; k < outliers; ++k) {
      bool live = index[k] < record_tokens;
      OSCAR_UNROLL
      for (int k2 = k + 1; k2 < outliers; ++k2) live = live && index[k2] != index[k];
      const int n = (i * outliers + k) * 32 + lane;
      const float x = f16_to_f32(load_u16(rec + geo.outlier_values + 2 * n));
      // The code stored at (token, c): its lane, word and bit in the key code section.
      const int token = live ? index[k] : 0, row = token & 15;
      const int src_lane = 4 * (row & 7) + ((cc & 7) >> 1);
      const int reg = 2 * (cc >> 3) + (row >> 3);
      std::uint32_t word[1];
      load_words<1>(rec + geo.key_codes + (((token >> 4) * 32 + src_lane) * wpl + (kk >> 1)) * 4, word);
      const int code = static_cast<int>(word[0] >> code_bit(kk & 1, reg, cc & 1)) & 3;
      const float level = code == 0 ? -key_l1 : code == 1 ? -key_l0 : code == 2 ? key_l0 : key_l1;
      const float d = live ? x - dequant_rn(s, level, z) : 0.0f;
      delta[i * outliers + k] = d;
      target[i * outliers + k] = live ? token : -1;
      bound += d < 0.0f ? -d : d;
    }
  }
  OSCAR_UNROLL
  for (int mask = 1; mask <= 16; mask <<= 1) bound += w.shfl_xor(bound, mask);
  int f = bound > 0.0f ? 30 - (mma::exponent_of(bound) + 1) : 0;
  f = f < -100 ? -100 : f > 100 ? 100 : f;
  const float to_units = mma::pow2(f), from_units = mma::pow2(-f);
  OSCAR_UNROLL
  for (int i = 0; i < D / 32; ++i) {
    float qc[QPT];  // the tile's queries at channel c, in units
    OSCAR_UNROLL
    for (int j = 0; j < QPT; ++j) qc[j] = st.qf[j * D + lane + 32 * i] * to_units;
    OSCAR_UNROLL
    for (int k = 0; k < outliers; ++k) {
      const int e = i * outliers + k;
      if (target[e] < 0) continue;
      OSCAR_UNROLL
      for (int j = 0; j < QPT; ++j) w.atomic_add(st.corr + j * corr_stride + target[e], to_fixed(qc[j] * delta[e]));
    }
  }
  w.sync();

  // Two halves of 64 tokens: logits, online softmax, values.
  const int j0 = (2 * t) & (QPT - 1);  // query of columns 2t (and 2t + 1: j0 + 1)
  OSCAR_UNROLL
  for (int half = 0; half < 2; ++half) {
    float z[4][4];
    OSCAR_UNROLL
    for (int si = 0; si < 4; ++si) {
      const int s = 4 * half + si;
      std::uint32_t kw[wpl];
      load_words<wpl>(rec + geo.key_codes + (s * 32 + lane) * wpl * 4, kw);
      // Rows 0-7 (i < 2) run on the scaled planes of `planes_paired` (3 shifts per code word
      // instead of 7).
      float acc0[4] = {minus_bs[0] * (1.0f / paired_scale0), minus_bs[1] * (1.0f / paired_scale0),
                       minus_bs[2], minus_bs[3]};
      float acc1[4] = {minus_bs[0] * (1.0f / paired_scale1), minus_bs[1] * (1.0f / paired_scale1),
                       0.0f, 0.0f};
      OSCAR_UNROLL
      for (int wi = 0; wi < wpl; ++wi) {
        OSCAR_UNROLL
        for (int xi = 0; xi < 2; ++xi) {
          const int kk = 2 * wi + xi;
          std::uint32_t a0[4], a1[4];
          planes_paired(kw[wi], xi, a0, a1);
          w.mma(acc0, a0, b[kk][0], b[kk][1]);
          w.mma(acc1, a1, b[kk][0], b[kk][1]);
          if constexpr (lo_mmas) {
            w.mma(acc0, a0, b_lo[kk][0], b_lo[kk][1]);
            w.mma(acc1, a1, b_lo[kk][0], b_lo[kk][1]);
          }
        }
      }
      float pre[4];
      OSCAR_UNROLL
      for (int i = 0; i < 4; ++i) {
        pre[i] = bias[i] + (i < 2 ? k0 * paired_scale0 : k0) * acc0[i] +
                 (i < 2 ? -k1 * paired_scale1 : k1) * acc1[i];
      }
      if constexpr (split) {
        OSCAR_UNROLL
        for (int i = 0; i < 4; ++i) pre[i] += w.shfl_xor(pre[i], 2);
      }
      OSCAR_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int token = 16 * s + g + 8 * (i >> 1);
        const auto units = static_cast<float>(st.corr[(j0 + (i & 1)) * corr_stride + token]);
        z[si][i] = (pre[i] + units * from_units) * st.qscale[i & 1];
      }
    }

    // Online softmax: the half's max per query, then rescale what came before.
    float mx[2];
    mma::softmax_update(w, z, st.m, mx, st.o0, st.o1, st.kacc);

    // Values.
    OSCAR_UNROLL
    for (int si = 0; si < 4; ++si) {
      const int s = 4 * half + si;
      const std::uint32_t pb0 = w.movmatrix(
          mma::pack_half2(mma::fast_exp2(z[si][0] - mx[0]), mma::fast_exp2(z[si][1] - mx[1])));
      const std::uint32_t pb1 = w.movmatrix(
          mma::pack_half2(mma::fast_exp2(z[si][2] - mx[0]), mma::fast_exp2(z[si][3] - mx[1])));
      const std::uint8_t* vs = rec + geo.value_scales + (s * 4 + t) * vgroups * 4;
      std::uint32_t bg[vgroups][2];
      OSCAR_UNROLL
      for (int grp = 0; grp < vgroups; ++grp) {
        std::uint32_t sw[1];
        load_words<1>(vs + 4 * grp, sw);
        std::uint32_t slo, shi;
        mma::e4m3x4_to_half2(sw[0], slo, shi);
        bg[grp][0] = mma::hmul2(pb0, slo);
        bg[grp][1] = mma::hmul2(pb1, shi);
      }
      std::uint32_t vw[wpl];
      load_words<wpl>(rec + geo.value_codes + (s * 32 + lane) * wpl * 4, vw);
      OSCAR_UNROLL
      for (int wi = 0; wi < wpl; ++wi) {
        OSCAR_UNROLL
        for (int xi = 0; xi < 2; ++xi) {
          const int tile = 2 * wi + xi, grp = tile / (value_group / 16);
          std::uint32_t a0[4], a1[4];
          planes(vw[wi], xi, a0, a1);
          w.mma(st.o0[tile], a0, bg[grp][0], bg[grp][1]);
          w.mma(st.o1[tile], a1, bg[grp][0], bg[grp][1]);
        }
      }
      std::uint32_t klo = 0, khi = 0;
      if (g < vgroups) {
        std::uint32_t sw[1];
        load_words<1>(vs + 4 * g, sw);
        mma::e4m3x4_to_half2(sw[0], klo, khi);
      }
      const std::uint32_t one = g == 0 ? mma::half2_ones : 0u;
      const std::uint32_t ak[4] = {klo, one, khi, one};
      w.mma(st.kacc, ak, pb0, pb1);
    }
  }
}

/// The lane's share of the warp's result: `o[tile][i]` for channel 16 tile + g + 8 (i >> 1) and
/// column 2t + (i & 1) (unnormalized, in the value format's space, times `value_factor`), and
/// per column c: `m[c]`, `l[c]`. `l0`, `l1`: the value levels L(2), L(3). With 4-query tiles,
/// columns 4-7 repeat queries 0-3.
template <int D, int QPT, class Warp>
OSCAR_HOST_DEVICE void warp_end(Warp& w, const warp_state<D, QPT>& st, float value_factor,
                                float l0, float l1, float (&o)[D / 16][4], float (&m)[2],
                                float (&l)[2]) {
  constexpr int ks = D / 16;
  const int t = w.lane() & 3;
  const float k0 = 0.5f * (l1 - l0), k1 = -0.5f * (l1 + l0);
  OSCAR_UNROLL
  for (int tile = 0; tile < ks; ++tile) {
    const int grp = tile / (value_group / 16);
    const float s0 = w.shfl(st.kacc[0], 4 * grp + t), s1 = w.shfl(st.kacc[1], 4 * grp + t);
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float ps = (i & 1) ? s1 : s0;
      o[tile][i] = value_factor * (k0 * (st.o0[tile][i] - ps) + k1 * st.o1[tile][i]);
    }
  }
  l[0] = w.shfl(st.kacc[2], t);
  l[1] = w.shfl(st.kacc[3], t);
  m[0] = st.m[0];
  m[1] = st.m[1];
}

}  // namespace oscar::gpu::mma_lm
