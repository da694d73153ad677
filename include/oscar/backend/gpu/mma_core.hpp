// SPDX-License-Identifier: Apache-2.0
/// \file
/// The per-warp arithmetic of the tensor-core decode kernel over mma records (layout.hpp),
/// written against a *warp policy* so that the same code runs on the GPU (inline PTX:
/// `mma.sync.m16n8k16`, `movmatrix`, shuffles) and in a host emulation of a warp (the tests
/// run it lane by lane against a float64 reference, at no device time).
///
/// One warp attends a query group of up to 8 heads (the MMA's n = 8) to a run of 64-token
/// records of one KV head, keeping an online softmax per query. Per record:
///
/// - keys, k = min + scale * code per channel: the logits are `sum_c code * (q_c * scale_c)`
///   (tensor cores: A = codes as exact fp16 integers, unpacked with one mask and one fused
///   multiply-add per two codes; B = q * scale in fp16) plus `sum_c q_c * min_c` (the *bias*,
///   one per query and record, from a hi + lo fp16 split of q and min through the tensor cores
///   with A = ones, so it keeps about 22 bits);
/// - queries are scaled by softmax_scale * log2(e) and by a power of two per query that brings
///   them into [0.5, 1) (undone in fp32), so `q * scale` stays inside the fp16 range;
/// - values, v = s * L(code) with the Lloyd-Max levels L = {-a, -b, b, a}: since
///   L(c) = -a + (a - b) c + (3b - a) [c >= 2], the product P V is accumulated as two exact
///   planes, `sum P s c` and `sum P s [c >= 2]`, and `sum P s` (with the softmax row sum in the
///   same MMA), combined once at the end in fp32. P is the softmax numerator in fp16,
///   transposed into the B operand with `movmatrix`; the group scale s multiplies B.
///
/// The value accumulator stays in the value format's (rotated) space; the combine step
/// unrotates it once.
#pragma once

#include <cstdint>

#include "oscar/backend/gpu/layout.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"

/// Asks the GPU compiler to unroll the next loop (the fragment arrays must stay in registers).
#if defined(__CUDA_ARCH__)
#define OSCAR_UNROLL _Pragma("unroll")
#else
#define OSCAR_UNROLL
#endif

namespace oscar::gpu::mma {

// ---- fp16x2 helpers: PTX on the device, exact emulation on the host --------------------------

/// Two fp16 values in one word, `lo` in the low half (what the MMA reads as the lower index).
OSCAR_HD_INLINE constexpr std::uint32_t half2_bits(float lo, float hi) noexcept {
  return static_cast<std::uint32_t>(float_to_half_bits(lo)) |
         static_cast<std::uint32_t>(float_to_half_bits(hi)) << 16;
}
OSCAR_HD_INLINE constexpr float low_half(std::uint32_t x) noexcept {
  return half_bits_to_float(static_cast<std::uint16_t>(x & 0xffffu));
}
OSCAR_HD_INLINE constexpr float high_half(std::uint32_t x) noexcept {
  return half_bits_to_float(static_cast<std::uint16_t>(x >> 16));
}

namespace detail {
/// fp16 rounding (to nearest, ties to even) of a double, as the hardware rounds the exact
/// result of an fp16 operation (the host side of the emulation). Finite, in fp16 range.
inline float round_half(double x) noexcept {
  const std::uint16_t h = float_to_half_bits(static_cast<float>(x));  // within one step of it
  float best = half_bits_to_float(h);
  for (int delta : {-1, 1}) {  // the float conversion may have rounded across a midpoint
    const auto n = static_cast<std::uint16_t>(h + delta);
    if ((n & 0x7c00u) == 0x7c00u || ((n ^ h) & 0x8000u) != 0) continue;
    const float v = half_bits_to_float(n);
    const double dn = v > x ? v - x : x - v, db = best > x ? best - x : x - best;
    if (dn < db || (dn == db && (n & 1u) == 0)) best = v;
  }
  return best;
}
}  // namespace detail

/// a * b + c per half, rounded once.
OSCAR_HD_INLINE std::uint32_t hfma2(std::uint32_t a, std::uint32_t b, std::uint32_t c) noexcept {
#if defined(__CUDA_ARCH__)
  std::uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  const float lo = detail::round_half(double(low_half(a)) * low_half(b) + low_half(c));
  const float hi = detail::round_half(double(high_half(a)) * high_half(b) + high_half(c));
  return half2_bits(lo, hi);
#endif
}

/// a * b + c per half, clamped to [0, 1].
OSCAR_HD_INLINE std::uint32_t hfma2_sat(std::uint32_t a, std::uint32_t b, std::uint32_t c) noexcept {
#if defined(__CUDA_ARCH__)
  std::uint32_t d;
  asm("fma.rn.sat.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  auto sat = [](float x) { return x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; };
  const float lo = detail::round_half(double(low_half(a)) * low_half(b) + low_half(c));
  const float hi = detail::round_half(double(high_half(a)) * high_half(b) + high_half(c));
  return half2_bits(sat(lo), sat(hi));
#endif
}

/// a * b per half.
OSCAR_HD_INLINE std::uint32_t hmul2(std::uint32_t a, std::uint32_t b) noexcept {
#if defined(__CUDA_ARCH__)
  std::uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
#else
  return half2_bits(detail::round_half(double(low_half(a)) * low_half(b)),
                    detail::round_half(double(high_half(a)) * high_half(b)));
#endif
}

/// Both halves negated.
OSCAR_HD_INLINE constexpr std::uint32_t hneg2(std::uint32_t a) noexcept { return a ^ 0x80008000u; }

/// Two floats rounded to fp16 and packed, `lo` in the low half.
OSCAR_HD_INLINE std::uint32_t pack_half2(float lo, float hi) noexcept {
#if defined(__CUDA_ARCH__)
  std::uint32_t d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));  // d.hi = %1, d.lo = %2
  return d;
#else
  return half2_bits(lo, hi);
#endif
}

/// The two e4m3 bytes of the low (`lo`) and high (`hi`) 16 bits of `w` as fp16 pairs (exact).
OSCAR_HD_INLINE void e4m3x4_to_half2(std::uint32_t w, std::uint32_t& lo, std::uint32_t& hi) noexcept {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n"
      " cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
#else
  auto one = [](std::uint32_t byte) -> std::uint32_t {
    return float_to_half_bits(e4m3_bits_to_float(static_cast<std::uint8_t>(byte)));
  };
  lo = one(w & 0xffu) | one((w >> 8) & 0xffu) << 16;
  hi = one((w >> 16) & 0xffu) | one(w >> 24) << 16;
#endif
}

/// 2^x (the hardware's approximation on the device).
OSCAR_HD_INLINE float fast_exp2(float x) noexcept {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return static_cast<float>(__builtin_exp2(static_cast<double>(x)));
#endif
}

/// 2^e as a float, for |e| <= 100.
OSCAR_HD_INLINE constexpr float pow2(int e) noexcept {
  return oscar::detail::bits_float(static_cast<std::uint32_t>(127 + e) << 23);
}

/// Unbiased exponent of a positive normal float (ilogb), -127 for zero and subnormals.
OSCAR_HD_INLINE constexpr int exponent_of(float x) noexcept {
  return static_cast<int>((oscar::detail::float_bits(x) >> 23) & 0xffu) - 127;
}

// ---- unpacking codes ---------------------------------------------------------------------------

/// 1024 + code * 2^p in both halves: the two codes at bits p and p + 16 of `word` placed in the
/// mantissas of fp16 1024.0.
OSCAR_HD_INLINE std::uint32_t code_bits(std::uint32_t word, int p) noexcept {
#if defined(__CUDA_ARCH__)
  // One LOP3 with both constants in registers ((a & b) | c); written as C++ the compiler
  // splits it into two instructions, each with its own immediate.
  std::uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(word), "r"(0x00030003u << p), "r"(0x64006400u));
  return d;
#else
  return (word & (0x00030003u << p)) | 0x64006400u;
#endif
}

/// Constants of `unpack_code` / `unpack_high` for bit position p (0, 2, 4 or 6).
struct unpack_constants {
  std::uint32_t scale;  ///< 2^-p
  std::uint32_t code;   ///< -1024 * 2^-p
  std::uint32_t high;   ///< -(1024 * 2^-p + 1)
};
OSCAR_HD_INLINE constexpr unpack_constants unpack_for(int p) noexcept {
  const float s = 1.0f / static_cast<float>(1 << p);
  return {half2_bits(s, s), half2_bits(-1024.0f * s, -1024.0f * s),
          half2_bits(-(1024.0f * s + 1.0f), -(1024.0f * s + 1.0f))};
}

/// The codes (0..3) as exact fp16 values, from `code_bits(word, p)`.
OSCAR_HD_INLINE std::uint32_t code_value(std::uint32_t bits, int p) noexcept {
  const unpack_constants k = unpack_for(p);
  return hfma2(bits, k.scale, k.code);
}

/// 1.0 where the code is 2 or 3, else 0.0 (the high bit), exact, from `code_bits(word, p)`.
OSCAR_HD_INLINE std::uint32_t code_high(std::uint32_t bits, int p) noexcept {
  const unpack_constants k = unpack_for(p);
  return hfma2_sat(bits, k.scale, k.high);
}

/// The codes at bit p of `word` as exact fp16 values.
OSCAR_HD_INLINE std::uint32_t unpack_code(std::uint32_t word, int p) noexcept {
  return code_value(code_bits(word, p), p);
}

/// 1.0 where the code at bit p of `word` is 2 or 3, else 0.0.
OSCAR_HD_INLINE std::uint32_t unpack_high(std::uint32_t word, int p) noexcept {
  return code_high(code_bits(word, p), p);
}

inline constexpr std::uint32_t half2_ones = 0x3c003c00u;

/// The larger of two floats that are not NaN (one FMNMX on the device).
OSCAR_HD_INLINE float fmax2(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return fmaxf(a, b);
#else
  return a > b ? a : b;
#endif
}

/// The online-softmax update of a warp after `Steps` 16-token steps of logits `z` (fragments:
/// tokens g, g + 8 x queries 2t, 2t + 1): `mx` receives the new running max of the lane's two
/// query columns (over the warp's rows), and when it moved, the accumulators `a`, `b` (per
/// tile) and `k` are rescaled to it. `m` is the running max before, then `mx`.
template <int Steps, int Tiles, class Warp>
OSCAR_HOST_DEVICE void softmax_update(Warp& w, const float (&z)[Steps][4], float (&m)[2],
                                      float (&mx)[2], float (&a)[Tiles][4], float (&b)[Tiles][4],
                                      float (&k)[4]) {
  mx[0] = m[0];
  mx[1] = m[1];
  OSCAR_UNROLL
  for (int s = 0; s < Steps; ++s) {
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) mx[i & 1] = fmax2(mx[i & 1], z[s][i]);
  }
  OSCAR_UNROLL
  for (int c = 0; c < 2; ++c) {
    OSCAR_UNROLL
    for (int mask = 4; mask <= 16; mask <<= 1) mx[c] = fmax2(mx[c], w.shfl_xor(mx[c], mask));
  }
  const float alpha[2] = {fast_exp2(m[0] - mx[0]), fast_exp2(m[1] - mx[1])};
  if (w.any(alpha[0] != 1.0f || alpha[1] != 1.0f)) {
    OSCAR_UNROLL
    for (int g = 0; g < Tiles; ++g) {
      OSCAR_UNROLL
      for (int i = 0; i < 4; ++i) {
        a[g][i] *= alpha[i & 1];
        b[g][i] *= alpha[i & 1];
      }
    }
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) k[i] *= alpha[i & 1];
  }
  m[0] = mx[0];
  m[1] = mx[1];
}

// ---- one warp's attention over records ---------------------------------------------------------

/// What one lane keeps between records.
template <int D>
struct warp_state {
  static constexpr int ks = D / 16;
  std::uint32_t qh[ks][2];  ///< hi part of the scaled query (B fragments), per k-step
  std::uint32_t* ql;        ///< lo part, [ks][2][32 lanes] (in shared memory on the device:
                            ///< read once per record, it need not hold registers)
  float qscale[2];          ///< 2^e of the queries of columns 2t, 2t+1 (logit = S * qscale)
  float m[2];               ///< running max (log2 units) of columns 2t, 2t+1
  float oc[ks][4];          ///< sum P s c, per value group (O^T fragments)
  float oh[ks][4];          ///< sum P s [c >= 2]
  float kacc[4];            ///< rows g < ks: sum P s of group g; row 8: sum P (softmax sum)
};

/// Loads the elements of the lane's query row (`q_row`, or nullptr for a padding column: zeros)
/// that its B fragments take, `qf[kk][i]` = channel `16 kk + 2t + (i & 1) + 8 (i >> 1)` times
/// `scale_log2`, and returns the exponent e (within +-100) that brings the row's largest
/// magnitude into [0.5, 1) as `qf * 2^-e` (the four lanes of a column agree on it).
template <int D, class Warp>
OSCAR_HOST_DEVICE int load_query(Warp& w, const float* q_row, float scale_log2,
                                 float (&qf)[D / 16][4]) {
  const int t = w.lane() & 3;
  float amax = 0.0f;
  OSCAR_UNROLL
  for (int kk = 0; kk < D / 16; ++kk) {
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int c = 16 * kk + 2 * t + (i & 1) + 8 * (i >> 1);
      qf[kk][i] = q_row != nullptr ? q_row[c] * scale_log2 : 0.0f;
      const float m = qf[kk][i] < 0.0f ? -qf[kk][i] : qf[kk][i];
      amax = m > amax ? m : amax;
    }
  }
  OSCAR_UNROLL
  for (int mask = 1; mask <= 2; mask <<= 1) {
    const float o = w.shfl_xor(amax, mask);
    amax = o > amax ? o : amax;
  }
  const int e = amax > 0.0f ? exponent_of(amax) + 1 : 0;
  return e < -100 ? -100 : e > 100 ? 100 : e;
}

/// Loads the query of this lane's row (`q_row`, or nullptr for padding rows beyond the group)
/// and resets the state. `scale_log2` = softmax scale * log2(e). `ql` receives the lo parts:
/// `ks * 2 * 32` words shared by the warp's lanes.
template <int D, class Warp>
OSCAR_HOST_DEVICE void warp_begin(Warp& w, warp_state<D>& st, const float* q_row, float scale_log2,
                                  std::uint32_t* ql) {
  constexpr int ks = D / 16;
  const int t = w.lane() & 3;
  float qf[ks][4];
  const int e = load_query<D>(w, q_row, scale_log2, qf);
  const float down = pow2(-e);
  st.ql = ql;
  OSCAR_UNROLL
  for (int kk = 0; kk < ks; ++kk) {
    OSCAR_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float x0 = qf[kk][2 * r] * down, x1 = qf[kk][2 * r + 1] * down;
      st.qh[kk][r] = pack_half2(x0, x1);
      ql[(kk * 2 + r) * 32 + w.lane()] =
          pack_half2(x0 - low_half(st.qh[kk][r]), x1 - high_half(st.qh[kk][r]));
    }
  }
  const float up = pow2(e);
  st.qscale[0] = w.shfl(up, 8 * t);
  st.qscale[1] = w.shfl(up, 8 * t + 4);
  st.m[0] = st.m[1] = -__builtin_huge_valf();
  OSCAR_UNROLL
  for (int g = 0; g < ks; ++g)
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) st.oc[g][i] = st.oh[g][i] = 0.0f;
  OSCAR_UNROLL
  for (int i = 0; i < 4; ++i) st.kacc[i] = 0.0f;
}

/// Attends to one 64-token record (in shared memory on the device). `Exact`: the key product
/// also uses the lo parts (q_lo * scale and the rounding error of q_hi * scale, both exact
/// through an fma), so the logits keep about 22 bits instead of 11 (8 more MMAs per 16 tokens).
template <int D, bool Exact, class Warp>
OSCAR_HOST_DEVICE void warp_record(Warp& w, warp_state<D>& st, const std::uint8_t* rec) {
  constexpr int ks = D / 16, wpl = ks / 2;
  constexpr geometry geo = geometry_for(D);
  const int lane = w.lane(), g = lane >> 2, t = lane & 3;
  const std::uint32_t ones[4] = {half2_ones, half2_ones, half2_ones, half2_ones};

  // B fragments of the key product and the bias of this record (four independent chains).
  std::uint32_t b[ks][2];
  std::uint32_t b_lo[Exact ? ks : 1][2];
  float bias_part[4][4] = {};
  OSCAR_UNROLL
  for (int kk = 0; kk < ks; ++kk) {
    const auto* pr = reinterpret_cast<const std::uint32_t*>(rec + geo.key_params + (kk * 4 + t) * 16);
    const std::uint32_t p0 = pr[0], p1 = pr[1], m0 = pr[2], m1 = pr[3];
    const std::uint32_t ql0 = st.ql[(kk * 2) * 32 + lane], ql1 = st.ql[(kk * 2 + 1) * 32 + lane];
    b[kk][0] = hmul2(st.qh[kk][0], p0);
    b[kk][1] = hmul2(st.qh[kk][1], p1);
    if constexpr (Exact) {
      b_lo[kk][0] = hfma2(ql0, p0, hfma2(st.qh[kk][0], p0, hneg2(b[kk][0])));
      b_lo[kk][1] = hfma2(ql1, p1, hfma2(st.qh[kk][1], p1, hneg2(b[kk][1])));
    }
    const std::uint32_t h0 = hmul2(st.qh[kk][0], m0), h1 = hmul2(st.qh[kk][1], m1);
    const std::uint32_t l0 = hfma2(ql0, m0, hfma2(st.qh[kk][0], m0, hneg2(h0)));
    const std::uint32_t l1 = hfma2(ql1, m1, hfma2(st.qh[kk][1], m1, hneg2(h1)));
    w.mma(bias_part[kk & 1], ones, h0, h1);
    w.mma(bias_part[2 + (kk & 1)], ones, l0, l1);
  }
  float bias[4];
  OSCAR_UNROLL
  for (int i = 0; i < 4; ++i) {
    bias[i] = (bias_part[0][i] + bias_part[1][i]) + (bias_part[2][i] + bias_part[3][i]);
  }

  // Logits of the record's 64 tokens: z[s] holds (token g, g + 8) x (query 2t, 2t + 1). The hi
  // and lo products go to separate accumulators (independent chains for the tensor cores).
  float z[record_steps][4];
  OSCAR_UNROLL
  for (int s = 0; s < record_steps; ++s) {
    const auto* kw = reinterpret_cast<const std::uint32_t*>(rec + geo.key_codes + (s * 32 + lane) * wpl * 4);
    float acc[2][4] = {{bias[0], bias[1], bias[2], bias[3]}, {0.0f, 0.0f, 0.0f, 0.0f}};
    OSCAR_UNROLL
    for (int wi = 0; wi < wpl; ++wi) {
      const std::uint32_t lo = kw[wi], hi = kw[wi] >> 8;
      OSCAR_UNROLL
      for (int xi = 0; xi < 2; ++xi) {
        const std::uint32_t a[4] = {unpack_code(lo, 4 * xi), unpack_code(hi, 4 * xi),
                                    unpack_code(lo, 4 * xi + 2), unpack_code(hi, 4 * xi + 2)};
        if constexpr (Exact) {
          w.mma(acc[0], a, b[2 * wi + xi][0], b[2 * wi + xi][1]);
          w.mma(acc[1], a, b_lo[2 * wi + xi][0], b_lo[2 * wi + xi][1]);
        } else {
          w.mma(acc[xi], a, b[2 * wi + xi][0], b[2 * wi + xi][1]);
        }
      }
    }
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) z[s][i] = (acc[0][i] + acc[1][i]) * st.qscale[i & 1];
  }

  // Online softmax: the record's max per query, then rescale what came before.
  float mx[2];
  softmax_update(w, z, st.m, mx, st.oc, st.oh, st.kacc);

  // Values.
  OSCAR_UNROLL
  for (int s = 0; s < record_steps; ++s) {
    const std::uint32_t pb0 = w.movmatrix(pack_half2(fast_exp2(z[s][0] - mx[0]), fast_exp2(z[s][1] - mx[1])));
    const std::uint32_t pb1 = w.movmatrix(pack_half2(fast_exp2(z[s][2] - mx[0]), fast_exp2(z[s][3] - mx[1])));
    const auto* vs = reinterpret_cast<const std::uint32_t*>(rec + geo.value_scales + (s * 4 + t) * ks * 4);
    const auto* vc = reinterpret_cast<const std::uint32_t*>(rec + geo.value_codes + (s * 32 + lane) * wpl * 4);
    OSCAR_UNROLL
    for (int grp = 0; grp < ks; ++grp) {
      std::uint32_t slo, shi;
      e4m3x4_to_half2(vs[grp], slo, shi);
      const std::uint32_t b0 = hmul2(pb0, slo), b1 = hmul2(pb1, shi);
      const std::uint32_t lo = vc[grp / 2], hi = vc[grp / 2] >> 8;
      const int p0 = 4 * (grp & 1), p1 = p0 + 2;
      const std::uint32_t x[4] = {code_bits(lo, p0), code_bits(hi, p0), code_bits(lo, p1),
                                  code_bits(hi, p1)};
      const std::uint32_t ac[4] = {code_value(x[0], p0), code_value(x[1], p0), code_value(x[2], p1),
                                   code_value(x[3], p1)};
      const std::uint32_t ah[4] = {code_high(x[0], p0), code_high(x[1], p0), code_high(x[2], p1),
                                   code_high(x[3], p1)};
      w.mma(st.oc[grp], ac, b0, b1);
      w.mma(st.oh[grp], ah, b0, b1);
    }
    std::uint32_t klo = 0, khi = 0;
    if (g < ks) e4m3x4_to_half2(vs[g], klo, khi);
    const std::uint32_t one = g == 0 ? half2_ones : 0u;
    const std::uint32_t ak[4] = {klo, one, khi, one};
    w.mma(st.kacc, ak, pb0, pb1);
  }
}

/// The lane's share of the warp's result: `o[grp][i]` for channel 16 grp + g + 8 (i >> 1) and
/// query 2t + (i & 1) (unnormalized, in the value format's space, times `value_factor`), and
/// per query column c: `m[c]`, `l[c]`. `a`, `b`: the levels L(3), L(2).
template <int D, class Warp>
OSCAR_HOST_DEVICE void warp_end(Warp& w, const warp_state<D>& st, float value_factor, float a, float b,
                       float (&o)[D / 16][4], float (&m)[2], float (&l)[2]) {
  constexpr int ks = D / 16;
  const int t = w.lane() & 3;
  OSCAR_UNROLL
  for (int grp = 0; grp < ks; ++grp) {
    const float k0 = w.shfl(st.kacc[0], 4 * grp + t), k1 = w.shfl(st.kacc[1], 4 * grp + t);
    OSCAR_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float k = (i & 1) ? k1 : k0;
      o[grp][i] = value_factor * ((a - b) * st.oc[grp][i] + (3.0f * b - a) * st.oh[grp][i] - a * k);
    }
  }
  l[0] = w.shfl(st.kacc[2], t);
  l[1] = w.shfl(st.kacc[3], t);
  m[0] = st.m[0];
  m[1] = st.m[1];
}

}  // namespace oscar::gpu::mma
