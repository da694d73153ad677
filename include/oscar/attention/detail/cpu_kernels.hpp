// SPDX-License-Identifier: Apache-2.0
/// \file
/// The CPU decode kernels, written once against `simd` (`cpu_simd.hpp`) and compiled once per
/// instruction set: `cpu_decode.hpp` includes this file inside `cpu_scalar`, `cpu_avx2` and
/// `cpu_avx512` (each in its target region), with `OSCAR_DETAIL_CPU_NS` naming the namespace.
/// Included on its own, it includes `cpu_decode.hpp`, which is what a reader wants.
///
/// ## What a task does
/// A task is one (sequence, KV head) or a contiguous run of its segments (split-K). Per
/// segment (the sinks, one block, or up to 256 window rows) it computes the scores of the
/// whole query group, updates the online softmax (running max `m`, sum `l`, in base 2), and
/// accumulates `p * v` into per-query accumulators. Codes and scales are read from the block
/// and unpacked in registers by a *decoder*:
///
/// - `row_decoder<F>`: one token's head vector, `W` channels at a time (formats grouped along
///   head_dim: fp16/bf16/fp32, q8_0, q4_0, FP2+/FP4+/KIVI values);
/// - `token_key_decoder<C>`: FP2+/KIVI keys grouped along tokens, scored `W` *tokens* at a time
///   by linearity: `q . k_t = sum_c (q_c s_c) level(code_tc) + sum_c q_c z_c`, then, for the
///   few fp16 outliers a group may keep, `q_c (outlier - decoded code)` added to their token;
/// - `float_rows` over a scratch block: any other format (fp8, user formats), decoded with the
///   format's own `decode_tile`.
///
/// Rotated formats are attended in the rotated space: the query is rotated once per entry,
/// values are accumulated rotated and the output is unrotated once (`cpu_decode.hpp`).
/// Each unpacked vector serves the whole query group (up to 8 query heads per pass), so a
/// block is read once per group.

#if !defined(OSCAR_DETAIL_CPU_NS)
#include "oscar/attention/detail/cpu_decode.hpp"
#else

namespace oscar::attention::detail::OSCAR_DETAIL_CPU_NS {

using vf = simd::vf;
constexpr int W = simd::W;

// ---- decoders --------------------------------------------------------------------------------

/// Rows of fp32, fp16 or bf16 elements (`E`: float, half, bfloat16): sinks, window, decoded
/// scratch blocks, and the blocks of the plain formats (a token's tile is head_dim elements).
template <class E>
struct plain_rows {
  static constexpr bool rotated = false;
  static constexpr bool tokens_axis = false;
  const E* p;
  int stride;  ///< elements between rows
  float factor() const noexcept { return 1.0f; }
  vf load(int t, int v) const noexcept {
    const E* x = p + t * stride + v * W;
    if constexpr (std::is_same_v<E, float>) return simd::load(x);
    else if constexpr (std::is_same_v<E, half>) return simd::load_half(&x->bits);
    else return simd::load_bf16(&x->bits);
  }
};
using float_rows = plain_rows<float>;

/// Decoder of a format grouped along head_dim; the primary template is the generic fallback.
template <class F, class = void>
struct row_decoder {
  static constexpr bool fast = false;
};

template <class F> struct plain_element {};
template <> struct plain_element<quant::fp32> { using type = float; };
template <> struct plain_element<quant::fp16> { using type = half; };
template <> struct plain_element<quant::bf16> { using type = bfloat16; };

template <class F>
struct row_decoder<F, std::void_t<typename plain_element<F>::type>> {
  using element = typename plain_element<F>::type;
  static constexpr bool fast = true;
  using type = plain_rows<element>;
  template <class P>
  static type make(const std::byte* tiles, std::size_t tile_bytes, const P&) noexcept {
    return {reinterpret_cast<const element*>(tiles), static_cast<int>(tile_bytes / sizeof(element))};
  }
};

/// llama.cpp-style blocks of 32: fp16 scale, then int8 codes (q8_0) or 4-bit codes minus 8.
template <class Block, int Bits>
struct q_rows {
  static constexpr bool rotated = false;
  static constexpr bool tokens_axis = false;
  const std::uint8_t* p;
  std::size_t stride;  ///< bytes between rows
  typename simd::lut4 lut;
  float factor() const noexcept { return 1.0f; }
  vf load(int t, int v) const noexcept {
    const int c = v * W;
    const std::uint8_t* blk = p + t * stride + (c / 32) * sizeof(Block);
    const vf scale = simd::set1(simd::half_to_float(load_bits<std::uint16_t>(blk)));
    if constexpr (Bits == 8) {
      return simd::mul(simd::load_i8(reinterpret_cast<const std::int8_t*>(blk + 2 + c % 32)), scale);
    } else {
      return simd::mul(simd::levels4(blk + 2, c % 32, lut), scale);
    }
  }
};

/// The levels of q4_0's codes (code - 8); q8_0 carries the table unused.
inline typename simd::lut4 q4_0_lut() noexcept {
  float levels[16];
  for (int i = 0; i < 16; ++i) levels[i] = static_cast<float>(i - 8);
  return simd::make_lut4(levels);
}

template <>
struct row_decoder<quant::q8_0> {
  static constexpr bool fast = true;
  using type = q_rows<quant::block_q8_0, 8>;
  template <class P>
  static type make(const std::byte* tiles, std::size_t tile_bytes, const P&) noexcept {
    return {reinterpret_cast<const std::uint8_t*>(tiles), tile_bytes, q4_0_lut()};
  }
};

template <>
struct row_decoder<quant::q4_0> {
  static constexpr bool fast = true;
  using type = q_rows<quant::block_q4_0, 4>;
  template <class P>
  static type make(const std::byte* tiles, std::size_t tile_bytes, const P&) noexcept {
    return {reinterpret_cast<const std::uint8_t*>(tiles), tile_bytes, q4_0_lut()};
  }
};

/// Level table of an fpq format (4 or 16 levels).
template <quant::fpq_config C>
auto fpq_lut() noexcept {
  using T = quant::format_traits<quant::fpq<C>>;
  float levels[16];
  for (int q = 0; q < T::levels; ++q) levels[q] = T::level(q);
  if constexpr (C.bits == 2) return simd::make_lut2(levels);
  else return simd::make_lut4(levels);
}

/// Scale (or zero point) of an fpq block as stored; e4m3 scales leave out the head exponent,
/// which `factor()` carries.
template <quant::fpq_config C>
float fpq_stored(const std::uint8_t* p) noexcept {
  if constexpr (C.scale == quant::scale_type::e4m3) return e4m3_table()[p[0]];
  else if constexpr (C.scale == quant::scale_type::fp16) return simd::half_to_float(load_bits<std::uint16_t>(p));
  else return bf16_bits_to_float(load_bits<std::uint16_t>(p));
}

template <quant::fpq_config C>
vf fpq_levels(const std::uint8_t* codes, int first, const decltype(fpq_lut<C>())& lut) noexcept {
  if constexpr (C.bits == 2) return simd::levels2(codes, first, lut);
  else return simd::levels4(codes, first, lut);
}

/// FP2+/FP4+/KIVI grouped along head_dim: `W` channels of a token are `zero + scale * level`.
template <quant::fpq_config C>
struct fpq_rows {
  using T = quant::format_traits<quant::fpq<C>>;
  static constexpr bool rotated = C.rotate;
  static constexpr bool tokens_axis = false;
  const std::uint8_t* p;
  std::size_t stride;  ///< bytes between rows
  decltype(fpq_lut<C>()) lut;
  float head_factor;
  float factor() const noexcept { return head_factor; }
  vf load(int t, int v) const noexcept {
    const int c = v * W;
    const std::uint8_t* blk = p + t * stride + (c / C.group) * T::block_bytes;
    const vf levels = fpq_levels<C>(blk + T::code_offset, c % C.group, lut);
    const vf scale = simd::set1(fpq_stored<C>(blk));
    if constexpr (C.zero_point) {
      return simd::fma(levels, scale, simd::set1(fpq_stored<C>(blk + T::zero_offset)));
    } else {
      return simd::mul(levels, scale);
    }
  }
};

template <quant::fpq_config C>
struct row_decoder<quant::fpq<C>,
                   std::enable_if_t<C.axis == quant::group_axis::head_dim && C.outliers == 0>> {
  static constexpr bool fast = true;
  using type = fpq_rows<C>;
  template <class P>
  static type make(const std::byte* tiles, std::size_t tile_bytes, const P& params) noexcept {
    return {reinterpret_cast<const std::uint8_t*>(tiles), tile_bytes, fpq_lut<C>(),
            quant::format_traits<quant::fpq<C>>::exponent_factor(params, false)};
  }
};

/// FP2+/KIVI keys grouped along tokens: per channel `c`, a block of `group` tokens holds
/// scale, zero point and codes. Scores `W` tokens at a time.
template <quant::fpq_config C>
struct token_keys {
  using T = quant::format_traits<quant::fpq<C>>;
  static constexpr bool rotated = C.rotate;
  static constexpr bool tokens_axis = true;
  const std::uint8_t* p;  ///< the block's key tiles
  std::size_t tile_bytes;
  decltype(fpq_lut<C>()) lut;
  float head_factor;
  float factor() const noexcept { return head_factor; }
  /// The codebook's levels (for the outliers' codes), a table built at compile time.
  static constexpr std::array<float, T::levels> levels = [] {
    std::array<float, T::levels> l{};
    for (int i = 0; i < T::levels; ++i) l[static_cast<std::size_t>(i)] = T::level(i);
    return l;
  }();
  static float level(int q) noexcept { return levels[static_cast<std::size_t>(q)]; }
};

template <class F>
struct token_key_decoder {
  static constexpr bool fast = false;
};

template <quant::fpq_config C>
  requires(C.axis == quant::group_axis::tokens && C.group % W == 0)
struct token_key_decoder<quant::fpq<C>> {
  static constexpr bool fast = true;
  using type = token_keys<C>;
  template <class P>
  static type make(const std::byte* tiles, std::size_t tile_bytes, const P& params) noexcept {
    return {reinterpret_cast<const std::uint8_t*>(tiles), tile_bytes, fpq_lut<C>(),
            quant::format_traits<quant::fpq<C>>::exponent_factor(params, false)};
  }
};

// ---- rotation ----------------------------------------------------------------------------------

/// In-place unnormalized Walsh-Hadamard transform of `n` floats (a power of two, a multiple
/// of W): butterflies within vectors (`lane k +- lane k ^ len`) while `len < W`, then between
/// vectors; the same additions in the same order as `oscar::fwht`, so the same floats.
inline void fwht(float* x, int n) noexcept {
  for (int len = 1; len < W && len < n; len <<= 1) {
    const vf sign = simd::lane_signs(len);
    for (int i = 0; i < n; i += W) {
      const vf v = simd::load(x + i);
      simd::store(x + i, simd::fma(v, sign, simd::swap_lanes(v, len)));
    }
  }
  for (int len = W; len < n; len <<= 1) {
    for (int i = 0; i < n; i += 2 * len) {
      for (int j = i; j < i + len; j += W) {
        const vf a = simd::load(x + j), b = simd::load(x + j + len);
        simd::store(x + j, simd::add(a, b));
        simd::store(x + j + len, simd::sub(a, b));
      }
    }
  }
}

/// `oscar::rotate_unchecked` / `unrotate_unchecked` (bit for bit), vectorized.
inline void rotate(float* x, int n, bool inverse) noexcept {
  const float* sign = rotation_signs();
  const vf scale = simd::set1(rotation_scale(n));
  if (!inverse) {
    for (int i = 0; i < n; i += W) simd::store(x + i, simd::mul(simd::load(x + i), simd::load(sign + i)));
  }
  fwht(x, n);
  for (int i = 0; i < n; i += W) {
    const vf y = simd::mul(simd::load(x + i), scale);
    simd::store(x + i, inverse ? simd::mul(y, simd::load(sign + i)) : y);
  }
}

// ---- scores ----------------------------------------------------------------------------------

/// s[j * ss + t] = q_j . k_t for `n` rows of a row decoder, JB query heads (q: [JB][d]).
template <int JB, class D>
void row_scores(const D& dec, int n, const float* q, int d, float* s, int ss) noexcept {
  const int nv = d / W;
  for (int t = 0; t < n; ++t) {
    vf acc[JB];
    for (int j = 0; j < JB; ++j) acc[j] = simd::zero();
    for (int v = 0; v < nv; ++v) {
      const vf k = dec.load(t, v);
      for (int j = 0; j < JB; ++j) acc[j] = simd::fma(simd::load(q + j * d + v * W), k, acc[j]);
    }
    if constexpr (JB % 4 == 0) {
      float sums[4];
      for (int j = 0; j < JB; j += 4) {
        simd::reduce4(acc[j], acc[j + 1], acc[j + 2], acc[j + 3], sums);
        for (int i = 0; i < 4; ++i) s[(j + i) * ss + t] = sums[i];
      }
    } else {
      for (int j = 0; j < JB; ++j) s[j * ss + t] = simd::reduce_add(acc[j]);
    }
  }
}

/// Scores of the `n` tokens (whole tiles) of a tokens-axis key block, JB query heads.
/// `w` is scratch for [JB][d] floats.
template <int JB, quant::fpq_config C>
void token_scores(const token_keys<C>& dec, int n, const float* q, int d, float* s, int ss,
                  float* w) noexcept {
  using T = quant::format_traits<quant::fpq<C>>;
  constexpr int TV = simd::accumulators / JB > 0 ? simd::accumulators / JB : 1;  // token vectors
  constexpr int vectors_per_tile = C.group / W;
  // Outliers: per token of the tile and query head, sum_c q_c (outlier - decoded code).
  float corr[C.outliers > 0 ? C.group * JB : 1];
  const float inv_factor = 1.0f / dec.head_factor;
  for (int tile = 0; tile < n / C.group; ++tile) {
    const std::uint8_t* base = dec.p + tile * dec.tile_bytes;
    float zsum[JB] = {};
    if constexpr (C.outliers > 0) std::fill(corr, corr + C.group * JB, 0.0f);
    for (int c = 0; c < d; ++c) {  // q_c * scale_c per head, the zero points' share, outliers
      const std::uint8_t* blk = base + c * T::block_bytes;
      const float scale = fpq_stored<C>(blk);
      const float zero = C.zero_point ? fpq_stored<C>(blk + T::zero_offset) : 0.0f;
      float qc[JB];
      for (int j = 0; j < JB; ++j) {
        qc[j] = q[j * d + c];
        w[j * d + c] = qc[j] * scale;
        zsum[j] += qc[j] * zero;
      }
      for (int k = 0; k < C.outliers; ++k) {
        const int t = blk[T::outlier_index_offset + k];
        if (t >= C.group) continue;  // as decode_group: bytes may be untrusted
        const float value = simd::half_to_float(load_bits<std::uint16_t>(blk + T::outlier_value_offset + 2 * k));
        const float delta = value * inv_factor -
                            (zero + scale * dec.level(get_code<C.bits>(blk + T::code_offset, t)));
        for (int j = 0; j < JB; ++j) corr[t * JB + j] += qc[j] * delta;
      }
    }
    for (int tv0 = 0; tv0 < vectors_per_tile; tv0 += TV) {
      constexpr int count = TV < vectors_per_tile ? TV : vectors_per_tile;
      vf acc[JB][count];
      for (int j = 0; j < JB; ++j)
        for (int i = 0; i < count; ++i) acc[j][i] = simd::zero();
      for (int c = 0; c < d; ++c) {
        const std::uint8_t* codes = base + c * T::block_bytes + T::code_offset;
        vf levels[count];
        for (int i = 0; i < count; ++i) levels[i] = fpq_levels<C>(codes, (tv0 + i) * W, dec.lut);
        for (int j = 0; j < JB; ++j) {
          const vf wj = simd::set1(w[j * d + c]);
          for (int i = 0; i < count; ++i) acc[j][i] = simd::fma(levels[i], wj, acc[j][i]);
        }
      }
      for (int j = 0; j < JB; ++j) {
        const vf z = simd::set1(zsum[j]);
        for (int i = 0; i < count; ++i) {
          simd::store(s + j * ss + tile * C.group + (tv0 + i) * W, simd::add(acc[j][i], z));
        }
      }
    }
    if constexpr (C.outliers > 0) {
      for (int t = 0; t < C.group; ++t)
        for (int j = 0; j < JB; ++j) s[j * ss + tile * C.group + t] += corr[t * JB + j];
    }
  }
}

template <int JB, class D>
void scores(const D& dec, int n, const float* q, int d, float* s, int ss, float* w) noexcept {
  if constexpr (D::tokens_axis) token_scores<JB>(dec, n, q, d, s, ss, w);
  else row_scores<JB>(dec, n, q, d, s, ss);
}

// ---- values ----------------------------------------------------------------------------------

/// acc[j][:] += sum_t p[j * ps + t] v_t for `n` rows, JB query heads, CV vectors of channels
/// at a time (JB * CV accumulators stay in registers).
template <int JB, int CV, class D>
void row_values(const D& dec, int n, const float* p, int ps, float* acc, int d) noexcept {
  const int nv = d / W;
  for (int v0 = 0; v0 < nv; v0 += CV) {
    vf a[JB][CV];
    for (int j = 0; j < JB; ++j)
      for (int i = 0; i < CV; ++i) a[j][i] = simd::load(acc + j * d + (v0 + i) * W);
    for (int t = 0; t < n; ++t) {
      vf v[CV];
      for (int i = 0; i < CV; ++i) v[i] = dec.load(t, v0 + i);
      for (int j = 0; j < JB; ++j) {
        const vf pj = simd::set1(p[j * ps + t]);
        for (int i = 0; i < CV; ++i) a[j][i] = simd::fma(v[i], pj, a[j][i]);
      }
    }
    for (int j = 0; j < JB; ++j)
      for (int i = 0; i < CV; ++i) simd::store(acc + j * d + (v0 + i) * W, a[j][i]);
  }
}

template <int JB, class D>
void values(const D& dec, int n, const float* p, int ps, float* acc, int d) noexcept {
  constexpr int CV = simd::accumulators / JB > 0 ? simd::accumulators / JB : 1;
  if ((d / W) % CV == 0) row_values<JB, CV>(dec, n, p, ps, acc, d);
  else row_values<JB, 1>(dec, n, p, ps, acc, d);
}

/// Calls `f.template operator()<JB>(j0)` for query blocks covering `group` heads: blocks of 8
/// (AVX-512 only), 4, 2 and 1.
template <class F>
void for_query_blocks(int group, F&& f) noexcept {
  int j0 = 0;
  if constexpr (simd::accumulators >= 16) {
    for (; j0 + 8 <= group; j0 += 8) f.template operator()<8>(j0);
  }
  for (; j0 + 4 <= group; j0 += 4) f.template operator()<4>(j0);
  for (; j0 + 2 <= group; j0 += 2) f.template operator()<2>(j0);
  for (; j0 < group; ++j0) f.template operator()<1>(j0);
}

// ---- one segment -----------------------------------------------------------------------------

/// Exponentials of `s - m` (base 2) into `p`, returning their sum; `n` values.
inline float exp2_shifted(const float* s, float m, int n, float* p) noexcept {
  const vf vm = simd::set1(m);
  vf sum = simd::zero();
  int t = 0;
  for (; t + W <= n; t += W) {
    const vf e = simd::exp2(simd::sub(simd::load(s + t), vm));
    simd::store(p + t, e);
    sum = simd::add(sum, e);
  }
  float total = simd::reduce_add(sum);
  for (; t < n; ++t) {
    p[t] = cpu_scalar::simd::exp2(s[t] - m);
    total += p[t];
  }
  return total;
}

inline float max_of(const float* s, int n) noexcept {
  float m = -HUGE_VALF;
  int t = 0;
  if (n >= W) {
    vf vm = simd::load(s);
    for (t = W; t + W <= n; t += W) vm = simd::max(vm, simd::load(s + t));
    m = simd::reduce_max(vm);
  }
  for (; t < n; ++t) m = s[t] > m ? s[t] : m;
  return m;
}

inline void scale_in_place(float* x, int n, float a) noexcept {
  const vf va = simd::set1(a);
  int i = 0;
  for (; i + W <= n; i += W) simd::store(x + i, simd::mul(simd::load(x + i), va));
  for (; i < n; ++i) x[i] *= a;
}

/// Scores, softmax update and value accumulation of one segment of `n` tokens.
template <class Cache, class KD, class VD>
void attend_segment(task_state& st, const KD& kd, const VD& vd, int n,
                    const std::bitset<cache::max_block_tokens>* valid, index_t position,
                    float* stats_scores, index_t stats_stride) noexcept {
  const int d = st.d;
  const int group = st.group;
  float* s = st.s.data();
  float* p = st.p.data();
  constexpr int ss = max_segment_tokens;
  const float* q = KD::rotated ? st.q_rot : st.q_plain;
  for_query_blocks(group, [&]<int JB>(int j0) noexcept {
    scores<JB>(kd, n, q + j0 * d, d, s + j0 * ss, ss, st.w.data());
  });
  const float kf = kd.factor();
  const bool partial = valid && static_cast<int>(valid->count()) != n;
  for (int j = 0; j < group; ++j) {
    float* sj = s + j * ss;
    if (kf != 1.0f) scale_in_place(sj, n, kf);
    if (partial) {
      for (int t = 0; t < n; ++t)
        if (!valid->test(static_cast<std::size_t>(t))) sj[t] = -HUGE_VALF;
    }
    if (stats_scores) {  // raw scores at their entry positions
      float* out = stats_scores + j * stats_stride + position;
      for (int t = 0, i = 0; t < n; ++t)
        if (!partial || valid->test(static_cast<std::size_t>(t))) out[i++] = sj[t];
    }
    const float seg_max = max_of(sj, n);
    float& m = st.m[j];
    if (seg_max > m) {
      const float alpha = cpu_scalar::simd::exp2(m - seg_max);  // 0 while m is -inf
      st.l[j] *= alpha;
      scale_in_place(st.acc_plain + j * d, d, alpha);
      if (st.acc_rot) scale_in_place(st.acc_rot + j * d, d, alpha);
      m = seg_max;
    }
    st.l[j] += exp2_shifted(sj, m, n, p + j * ss);
    if (partial) {
      float* pj = p + j * ss;
      for (int t = 0; t < n; ++t) {
        if (!valid->test(static_cast<std::size_t>(t))) {
          st.l[j] -= pj[t];
          pj[t] = 0.0f;
        }
      }
    }
  }
  float* acc = VD::rotated ? st.acc_rot : st.acc_plain;
  const float vfac = vd.factor();  // the values' head exponent, folded into p
  if (vfac != 1.0f) {
    for (int j = 0; j < group; ++j) scale_in_place(p + j * ss, n, vfac);
  }
  for_query_blocks(group, [&]<int JB>(int j0) noexcept {
    values<JB>(vd, n, p + j0 * ss, ss, acc + j0 * d, d);
  });
}

// ---- blocks of one tier ----------------------------------------------------------------------

/// The key and value decoders of tier I's formats for one block.
template <class Cache, int I>
struct tier_codec {
  using KV = typename Cache::template tier_format<I>;
  using KF = typename KV::key;
  using VF = typename KV::value;
  static constexpr bool key_rows = row_decoder<KF>::fast;
  static constexpr bool key_tokens = token_key_decoder<KF>::fast;
  static constexpr bool value_rows = row_decoder<VF>::fast;
  /// Whether values accumulate in the rotated space.
  static constexpr bool value_rotated = value_rows && quant::format_traits<VF>::rotated;
  static constexpr bool key_rotated =
      (key_rows || key_tokens) && quant::format_traits<KF>::rotated;
};

/// Decodes tiles `[0, fill)` of one tensor of a block with the format's own `decode_tile`.
template <class F, class P>
void decode_block_tiles(const std::byte* tiles, std::size_t tile_bytes, int fill, int d,
                        const P& params, float* out) noexcept {
  using T = quant::format_traits<F>;
  constexpr int tt = quant::tokens_per_tile<F>();
  for (int t = 0; t < fill; t += tt) {
    T::decode_tile(reinterpret_cast<const typename T::block*>(tiles + (t / tt) * tile_bytes), d,
                   params, out + static_cast<std::size_t>(t) * d);
  }
}

template <class Cache, int I>
void attend_block(task_state& st, const entry_work<Cache>& e, const segment& seg,
                  float* stats_scores, index_t stats_stride) noexcept {
  using codec = tier_codec<Cache, I>;
  const cache::detail::tier_layout& lay = st.layouts[I];
  const auto& params = *std::get<I>(e.params);
  const std::byte* keys = seg.data;
  const std::byte* vals = seg.data + lay.key_bytes;
  const int n = seg.count;
  const int d = st.d;
  const auto with_values = [&](const auto& kd) noexcept {
    if constexpr (codec::value_rows) {
      const auto vd = row_decoder<typename codec::VF>::make(vals, lay.value_tile_bytes, params.value);
      attend_segment<Cache>(st, kd, vd, n, seg.valid, seg.position, stats_scores, stats_stride);
    } else {
      decode_block_tiles<typename codec::VF>(vals, lay.value_tile_bytes, n, d, params.value,
                                             st.scratch_v.data());
      attend_segment<Cache>(st, kd, float_rows{st.scratch_v.data(), d}, n, seg.valid,
                            seg.position, stats_scores, stats_stride);
    }
  };
  if constexpr (codec::key_rows) {
    with_values(row_decoder<typename codec::KF>::make(keys, lay.key_tile_bytes, params.key));
  } else if constexpr (codec::key_tokens) {
    with_values(token_key_decoder<typename codec::KF>::make(keys, lay.key_tile_bytes, params.key));
  } else {
    decode_block_tiles<typename codec::KF>(keys, lay.key_tile_bytes, n, d, params.key,
                                           st.scratch_k.data());
    with_values(float_rows{st.scratch_k.data(), d});
  }
}

template <class Cache>
plain_rows<typename Cache::window_type> window_rows(const typename Cache::window_type* p,
                                                    int d) noexcept {
  return {p, d};
}

/// Runs one task: the segments `[first, last)` of entry `e`, into the partial state `st`.
template <class Cache>
void run_task(task_state& st, const entry_work<Cache>& e, int first, int last,
              float* stats_scores, index_t stats_stride) noexcept {
  const int d = st.d;
  for (int i = first; i < last; ++i) {
    const segment& seg = e.segments[static_cast<std::size_t>(i)];
    if (seg.skipped) continue;
    switch (seg.kind) {
      case segment_kind::sinks:
      case segment_kind::window: {
        const auto& k = seg.kind == segment_kind::sinks ? e.view.sink_k : e.view.window_k;
        const auto& v = seg.kind == segment_kind::sinks ? e.view.sink_v : e.view.window_v;
        const std::size_t offset = static_cast<std::size_t>(seg.first_row) * d;
        attend_segment<Cache>(st, window_rows<Cache>(k.data() + offset, d),
                              window_rows<Cache>(v.data() + offset, d), seg.count, nullptr,
                              seg.position, stats_scores, stats_stride);
        break;
      }
      case segment_kind::block:
        switch (seg.tier) {
          case 0: attend_block<Cache, 0>(st, e, seg, stats_scores, stats_stride); break;
          case 1: attend_block<Cache, 1>(st, e, seg, stats_scores, stats_stride); break;
          default: attend_block<Cache, 2>(st, e, seg, stats_scores, stats_stride); break;
        }
        break;
    }
  }
}

/// Block skipping's bound on `q_j . k` over a block's keys for the `group` query heads `q`
/// (`[group][d]`, plain space): `sum_c max(q_jc lo_c, q_jc hi_c)` from the fp16 key bounds.
inline void key_bounds(const float* q, int group, int d, const half* lo, const half* hi,
                       float* out) noexcept {
  for (int j = 0; j < group; ++j) {
    vf acc = simd::zero();
    for (int c = 0; c < d; c += W) {
      const vf qj = simd::load(q + j * d + c);
      acc = simd::add(acc, simd::max(simd::mul(qj, simd::load_half(&lo[c].bits)),
                                     simd::mul(qj, simd::load_half(&hi[c].bits))));
    }
    out[j] = simd::reduce_add(acc);
  }
}

/// The reference scores of block skipping: per query head, the largest score (base-2 units,
/// as the kernels compute them) over the entry's sinks and window; -inf without any.
template <class Cache>
void reference_scores(task_state& st, const entry_work<Cache>& e, float* ref) noexcept {
  const int d = st.d;
  for (int j = 0; j < st.group; ++j) ref[j] = -HUGE_VALF;
  for (const segment& seg : e.segments) {
    if (seg.kind == segment_kind::block) continue;
    const auto& k = seg.kind == segment_kind::sinks ? e.view.sink_k : e.view.window_k;
    const auto rows = window_rows<Cache>(k.data() + static_cast<std::size_t>(seg.first_row) * d, d);
    float* s = st.s.data();
    for_query_blocks(st.group, [&]<int JB>(int j0) noexcept {
      scores<JB>(rows, seg.count, st.q_plain + j0 * d, d, s + j0 * max_segment_tokens,
                 max_segment_tokens, st.w.data());
    });
    for (int j = 0; j < st.group; ++j) {
      const float m = max_of(s + j * max_segment_tokens, seg.count);
      ref[j] = m > ref[j] ? m : ref[j];
    }
  }
}

// ---- decoded rows, for prefill's matrix products ----------------------------------------------

/// Writes `n` rows of a decoder, `[n][d]`, in the decoder's space, head factor applied.
template <class D>
void decode_rows(const D& dec, int n, int d, float* out) noexcept {
  const vf factor = simd::set1(dec.factor());
  if constexpr (D::tokens_axis) {
    constexpr auto cfg = D::T::config;
    for (int tile = 0; tile < n / cfg.group; ++tile) {
      const std::uint8_t* base = dec.p + tile * dec.tile_bytes;
      for (int c = 0; c < d; ++c) {
        const std::uint8_t* blk = base + c * D::T::block_bytes;
        const vf scale = simd::mul(simd::set1(fpq_stored<cfg>(blk)), factor);
        const vf zero = simd::set1(cfg.zero_point ? fpq_stored<cfg>(blk + D::T::zero_offset) : 0.0f);
        for (int t0 = 0; t0 < cfg.group; t0 += W) {
          float lanes[W];
          simd::store(lanes, simd::fma(fpq_levels<cfg>(blk + D::T::code_offset, t0, dec.lut), scale, zero));
          float* column = out + static_cast<std::size_t>(tile * cfg.group + t0) * d + c;
          for (int i = 0; i < W; ++i) column[static_cast<std::size_t>(i) * d] = lanes[i];
        }
        for (int k = 0; k < cfg.outliers; ++k) {  // fp16 outliers replace their token's value
          const int t = blk[D::T::outlier_index_offset + k];
          if (t < cfg.group) {
            out[static_cast<std::size_t>(tile * cfg.group + t) * d + c] =
                half_bits_to_float(load_bits<std::uint16_t>(blk + D::T::outlier_value_offset + 2 * k));
          }
        }
      }
    }
  } else {
    for (int t = 0; t < n; ++t)
      for (int v = 0; v < d / W; ++v)
        simd::store(out + static_cast<std::size_t>(t) * d + v * W, simd::mul(dec.load(t, v), factor));
  }
}

/// Decodes all `seg.count` rows of a block of tier I into `k` and `v` (`[count][d]` each);
/// returns whether each came out in the rotated space.
template <class Cache, int I>
std::pair<bool, bool> decode_block_in(const task_state& st, const entry_work<Cache>& e,
                                      const segment& seg, float* k, float* v) noexcept {
  using codec = tier_codec<Cache, I>;
  const cache::detail::tier_layout& lay = st.layouts[I];
  const auto& params = *std::get<I>(e.params);
  const std::byte* keys = seg.data;
  const std::byte* vals = seg.data + lay.key_bytes;
  const int n = seg.count;
  const int d = st.d;
  if constexpr (codec::key_rows) {
    decode_rows(row_decoder<typename codec::KF>::make(keys, lay.key_tile_bytes, params.key), n, d, k);
  } else if constexpr (codec::key_tokens) {
    decode_rows(token_key_decoder<typename codec::KF>::make(keys, lay.key_tile_bytes, params.key), n, d, k);
  } else {
    decode_block_tiles<typename codec::KF>(keys, lay.key_tile_bytes, n, d, params.key, k);
  }
  if constexpr (codec::value_rows) {
    decode_rows(row_decoder<typename codec::VF>::make(vals, lay.value_tile_bytes, params.value), n, d, v);
  } else {
    decode_block_tiles<typename codec::VF>(vals, lay.value_tile_bytes, n, d, params.value, v);
  }
  return {codec::key_rotated, codec::value_rotated};
}

template <class Cache>
std::pair<bool, bool> decode_block(const task_state& st, const entry_work<Cache>& e,
                                   const segment& seg, float* k, float* v) noexcept {
  switch (seg.tier) {
    case 0: return decode_block_in<Cache, 0>(st, e, seg, k, v);
    case 1: return decode_block_in<Cache, 1>(st, e, seg, k, v);
    default: return decode_block_in<Cache, 2>(st, e, seg, k, v);
  }
}

/// float -> bf16 (round to nearest even) for `n` values.
inline void to_bf16(const float* x, std::size_t n, std::uint16_t* out) noexcept {
  std::size_t i = 0;
  for (; i + W <= n; i += W) simd::store_bf16(out + i, simd::load(x + i));
  for (; i < n; ++i) out[i] = float_to_bf16_bits(x[i]);
}

/// One query row of prefill's online softmax over a tile: scores `s[0, n)` (base 2; only
/// `[0, valid)` attended), running max `m` and sum `l`, accumulator row `o` (`d` floats,
/// rescaled when the max grows). Writes `p[0, n)` (zeros past `valid`) as float or bf16.
template <class P>
void softmax_row(float* s, int valid, int n, float& m, double& l, float* o, int d,
                 P* p) noexcept {
  if (valid == 0) {
    for (int t = 0; t < n; ++t) p[t] = P{};
    return;
  }
  const float top = max_of(s, valid);
  if (top > m) {
    const float alpha = cpu_scalar::simd::exp2(m - top);  // 0 while m is -inf
    l *= alpha;
    scale_in_place(o, d, alpha);
    m = top;
  }
  if constexpr (std::is_same_v<P, float>) {
    l += exp2_shifted(s, m, valid, p);
  } else {
    l += exp2_shifted(s, m, valid, s);
    to_bf16(s, static_cast<std::size_t>(valid), p);
  }
  for (int t = valid; t < n; ++t) p[t] = P{};
}

}  // namespace oscar::attention::detail::OSCAR_DETAIL_CPU_NS

#endif  // OSCAR_DETAIL_CPU_NS
