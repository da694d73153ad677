// SPDX-License-Identifier: Apache-2.0
/// \file
/// The few vector operations the CPU attention kernels use, once per instruction set:
/// `cpu_scalar::simd` (portable, 1 lane), `cpu_avx2::simd` (8 lanes) and `cpu_avx512::simd`
/// (16 lanes). The kernels (`cpu_kernels.hpp`) are written once against this interface and
/// compiled inside each set's namespace and target region.
///
/// Target regions: the AVX2 and AVX-512 code is compiled with `#pragma GCC target` (Clang:
/// `#pragma clang attribute`) instead of the including file's `-march`, so a library built for
/// x86-64-v2 still carries the wide kernels and picks one at run time (`cpu_isa.hpp`).
/// `OSCAR_DETAIL_BEGIN_AVX2` / `OSCAR_DETAIL_BEGIN_AVX512` ... `OSCAR_DETAIL_END_TARGET` open
/// and close such a region; nothing may be `#include`d inside one.
///
/// Code unpacking (`levels2`, `levels4`) maps W consecutive 2- or 4-bit codes (OSCAR's LSB-first
/// packing, `core/bitpack.hpp`) to floats through a table of the codebook's levels: one
/// broadcast, one variable shift and one table permute per vector on AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "oscar/attention/detail/cpu_isa.hpp"
#include "oscar/core/numeric.hpp"

#if OSCAR_ATTENTION_X86_KERNELS
#include <immintrin.h>
#endif

// ---- target regions ----------------------------------------------------------------------------
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized inside inlined intrinsics (GCC bug 105593);
// the regions silence it for the kernels only.
#if defined(__clang__)
#define OSCAR_DETAIL_BEGIN_AVX2                                                                  \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c,bmi2\"))), apply_to = function)")
#define OSCAR_DETAIL_BEGIN_AVX512                                                                \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2\"))), apply_to = function)")
#define OSCAR_DETAIL_END_TARGET _Pragma("clang attribute pop")
#elif defined(__GNUC__)
#define OSCAR_DETAIL_BEGIN_AVX2                                                                  \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi2\")")                     \
      _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")     \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define OSCAR_DETAIL_BEGIN_AVX512                                                                \
  _Pragma("GCC push_options")                                                                    \
      _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2\")")          \
          _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")     \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define OSCAR_DETAIL_END_TARGET _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

namespace oscar::attention::detail {

/// 2^f for f in [-0.5, 0.5]: Taylor polynomial of e^(f ln 2) to degree 7 (error < 6e-9).
inline constexpr float exp2_poly[8] = {1.0f,
                                       0.6931471805599453f,
                                       0.2402265069591007f,
                                       0.05550410866482158f,
                                       0.009618129107628477f,
                                       0.0013333558146428443f,
                                       0.00015403530393381606f,
                                       1.525273380405984e-05f};

/// Loads `N` bytes as an unsigned integer (little-endian, unaligned).
template <class U>
inline U load_bits(const std::uint8_t* p) noexcept {
  U u;
  std::memcpy(&u, p, sizeof(U));
  return u;
}

namespace cpu_scalar {

struct simd {
  static constexpr int W = 1;
  static constexpr int accumulators = 16;  ///< vectors the kernels may keep live
  using vf = float;

  static vf zero() noexcept { return 0.0f; }
  static vf set1(float x) noexcept { return x; }
  static vf load(const float* p) noexcept { return *p; }
  static void store(float* p, vf v) noexcept { *p = v; }
  static vf add(vf a, vf b) noexcept { return a + b; }
  static vf sub(vf a, vf b) noexcept { return a - b; }
  static vf mul(vf a, vf b) noexcept { return a * b; }
  static vf fma(vf a, vf b, vf c) noexcept { return a * b + c; }
  static vf max(vf a, vf b) noexcept { return a > b ? a : b; }
  static float reduce_add(vf a) noexcept { return a; }
  static float reduce_max(vf a) noexcept { return a; }
  static void reduce4(vf a, vf b, vf c, vf d, float* out) noexcept {
    out[0] = a, out[1] = b, out[2] = c, out[3] = d;
  }
  static vf exp2(vf x) noexcept { return std::exp2(x < -126.0f ? -126.0f : x); }
  /// Lane k <- lane k ^ len, and +1/-1 by bit `len` of k (unused with one lane).
  static vf swap_lanes(vf v, int) noexcept { return v; }
  static vf lane_signs(int) noexcept { return 1.0f; }
  static float half_to_float(std::uint16_t h) noexcept { return half_bits_to_float(h); }
  static vf load_half(const std::uint16_t* p) noexcept { return half_bits_to_float(*p); }
  static vf load_bf16(const std::uint16_t* p) noexcept { return bf16_bits_to_float(*p); }
  static vf load_i8(const std::int8_t* p) noexcept { return static_cast<float>(*p); }
  static void store_bf16(std::uint16_t* p, vf x) noexcept { *p = float_to_bf16_bits(x); }

  struct lut2 { float t[4]; };
  struct lut4 { float t[16]; };
  static lut2 make_lut2(const float* levels) noexcept {
    return {{levels[0], levels[1], levels[2], levels[3]}};
  }
  static lut4 make_lut4(const float* levels) noexcept {
    lut4 l;
    for (int i = 0; i < 16; ++i) l.t[i] = levels[i];
    return l;
  }
  /// Level of code `first` of 2-bit codes packed at `codes`.
  static vf levels2(const std::uint8_t* codes, int first, const lut2& l) noexcept {
    return l.t[(codes[first / 4] >> (2 * (first % 4))) & 3];
  }
  static vf levels4(const std::uint8_t* codes, int first, const lut4& l) noexcept {
    return l.t[(codes[first / 2] >> (4 * (first % 2))) & 15];
  }
};

}  // namespace cpu_scalar

#if OSCAR_ATTENTION_X86_KERNELS

OSCAR_DETAIL_BEGIN_AVX2
namespace cpu_avx2 {

struct simd {
  static constexpr int W = 8;
  static constexpr int accumulators = 8;
  using vf = __m256;

  static vf zero() noexcept { return _mm256_setzero_ps(); }
  static vf set1(float x) noexcept { return _mm256_set1_ps(x); }
  static vf load(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static void store(float* p, vf v) noexcept { _mm256_storeu_ps(p, v); }
  static vf add(vf a, vf b) noexcept { return _mm256_add_ps(a, b); }
  static vf sub(vf a, vf b) noexcept { return _mm256_sub_ps(a, b); }
  static vf mul(vf a, vf b) noexcept { return _mm256_mul_ps(a, b); }
  static vf fma(vf a, vf b, vf c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static vf max(vf a, vf b) noexcept { return _mm256_max_ps(a, b); }
  static float reduce_add(vf a) noexcept {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static float reduce_max(vf a) noexcept {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  /// The sums of four vectors.
  static void reduce4(vf a, vf b, vf c, vf d, float* out) noexcept {
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: a, b, c, d
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  static vf exp2(vf x) noexcept {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(exp2_poly[7]);
    for (int k = 6; k >= 0; --k) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(exp2_poly[k]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static vf swap_lanes(vf v, int len) noexcept {
    const __m256i idx = _mm256_xor_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(len));
    return _mm256_permutevar8x32_ps(v, idx);
  }
  static vf lane_signs(int len) noexcept {
    const __m256i bit = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(len));
    return _mm256_blendv_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(-1.0f),
                            _mm256_castsi256_ps(_mm256_cmpeq_epi32(bit, _mm256_set1_epi32(len))));
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
  static vf load_half(const std::uint16_t* p) noexcept {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static vf load_bf16(const std::uint16_t* p) noexcept {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static vf load_i8(const std::int8_t* p) noexcept {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
  /// Rounds to bf16 (nearest even; finite input) and stores 8 values.
  static void store_bf16(std::uint16_t* p, vf x) noexcept {
    __m256i b = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
  }

  struct lut2 { __m256 t; };
  struct lut4 { __m256 lo, hi; };
  static lut2 make_lut2(const float* l) noexcept {
    return {_mm256_setr_ps(l[0], l[1], l[2], l[3], l[0], l[1], l[2], l[3])};
  }
  static lut4 make_lut4(const float* l) noexcept {
    return {_mm256_loadu_ps(l), _mm256_loadu_ps(l + 8)};
  }
  /// Codes first..first+7 (first a multiple of 8). The permute reads index bits 0-2: code
  /// plus 4x the next code's low bit, which a table repeating with period 4 ignores.
  static vf levels2(const std::uint8_t* codes, int first, const lut2& l) noexcept {
    const __m256i w = _mm256_set1_epi32(load_bits<std::uint16_t>(codes + first / 4));
    const __m256i idx = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
    return _mm256_permutevar8x32_ps(l.t, idx);
  }
  /// Codes first..first+7: bits 0-2 pick within each half of the table, bit 3 the half.
  static vf levels4(const std::uint8_t* codes, int first, const lut4& l) noexcept {
    const __m256i w = _mm256_set1_epi32(static_cast<int>(load_bits<std::uint32_t>(codes + first / 2)));
    const __m256i idx = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    const __m256 lo = _mm256_permutevar8x32_ps(l.lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(l.hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
};

}  // namespace cpu_avx2
OSCAR_DETAIL_END_TARGET

OSCAR_DETAIL_BEGIN_AVX512
namespace cpu_avx512 {

struct simd {
  static constexpr int W = 16;
  static constexpr int accumulators = 16;
  using vf = __m512;

  static vf zero() noexcept { return _mm512_setzero_ps(); }
  static vf set1(float x) noexcept { return _mm512_set1_ps(x); }
  static vf load(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static void store(float* p, vf v) noexcept { _mm512_storeu_ps(p, v); }
  static vf add(vf a, vf b) noexcept { return _mm512_add_ps(a, b); }
  static vf sub(vf a, vf b) noexcept { return _mm512_sub_ps(a, b); }
  static vf mul(vf a, vf b) noexcept { return _mm512_mul_ps(a, b); }
  static vf fma(vf a, vf b, vf c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static vf max(vf a, vf b) noexcept { return _mm512_max_ps(a, b); }
  /// Adds the upper 256 bits onto the lower ones.
  static __m256 fold(vf a) noexcept {
    return _mm256_add_ps(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  static float reduce_add(vf a) noexcept {
    const __m256 h = fold(a);
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static float reduce_max(vf a) noexcept {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  /// The sums of four vectors: 128-bit lanes are summed across vectors, then within lanes.
  static void reduce4(vf a, vf b, vf c, vf d, float* out) noexcept {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
    // 128-bit lanes: a0+a2, a1+a3, b0+b2, b1+b3 | same for c, d -> one lane per vector.
    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
    x = _mm512_add_ps(x, _mm512_permute_ps(x, 0x4e));
    x = _mm512_add_ps(x, _mm512_permute_ps(x, 0xb1));
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, x)));
  }
  static vf exp2(vf x) noexcept {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(exp2_poly[7]);
    for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(exp2_poly[k]));
    return _mm512_scalef_ps(p, n);
  }
  static vf swap_lanes(vf v, int len) noexcept {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_permutexvar_ps(_mm512_xor_si512(iota, _mm512_set1_epi32(len)), v);
  }
  static vf lane_signs(int len) noexcept {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __mmask16 set = _mm512_test_epi32_mask(iota, _mm512_set1_epi32(len));
    return _mm512_mask_blend_ps(set, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
  }
  static float half_to_float(std::uint16_t h) noexcept { return _cvtsh_ss(h); }
  static vf load_half(const std::uint16_t* p) noexcept {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static vf load_bf16(const std::uint16_t* p) noexcept {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static vf load_i8(const std::int8_t* p) noexcept {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  /// Rounds to bf16 (nearest even; finite input) and stores 16 values.
  static void store_bf16(std::uint16_t* p, vf x) noexcept {
    __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
  }

  struct lut2 { __m512 t; };
  struct lut4 { __m512 t; };
  static lut2 make_lut2(const float* l) noexcept {
    return {_mm512_setr_ps(l[0], l[1], l[2], l[3], l[0], l[1], l[2], l[3], l[0], l[1], l[2], l[3],
                           l[0], l[1], l[2], l[3])};
  }
  static lut4 make_lut4(const float* l) noexcept { return {_mm512_loadu_ps(l)}; }
  /// Codes first..first+15 (first a multiple of 16). The permute reads index bits 0-3: the
  /// code plus higher codes' bits, which a table repeating with period 4 ignores.
  static vf levels2(const std::uint8_t* codes, int first, const lut2& l) noexcept {
    const __m512i w = _mm512_set1_epi32(static_cast<int>(load_bits<std::uint32_t>(codes + first / 4)));
    const __m512i idx = _mm512_srlv_epi32(
        w, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30));
    return _mm512_permutexvar_ps(idx, l.t);
  }
  /// Codes first..first+15: lanes 0-7 shift the low 32 bits, lanes 8-15 the high 32 bits.
  static vf levels4(const std::uint8_t* codes, int first, const lut4& l) noexcept {
    const __m512i w = _mm512_set1_epi64(static_cast<long long>(load_bits<std::uint64_t>(codes + first / 2)));
    const __m512i halves = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), w);
    const __m512i idx = _mm512_srlv_epi32(
        halves, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28));
    return _mm512_permutexvar_ps(idx, l.t);
  }
};

}  // namespace cpu_avx512
OSCAR_DETAIL_END_TARGET

#endif  // OSCAR_ATTENTION_X86_KERNELS

}  // namespace oscar::attention::detail
