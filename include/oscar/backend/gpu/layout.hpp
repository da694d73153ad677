// SPDX-License-Identifier: Apache-2.0
/// \file
/// How the GPU block pool lays out the bytes of a block, for each KV format.
///
/// Two layouts, chosen per KV format by `layout_for<KV>`:
///
/// - **native**: the host cache's block, byte for byte (`kv_cache`: key tiles of the whole
///   block, then value tiles, padded to 64 bytes). Any format; an upload is a copy, and the
///   generic decode kernel reads it through the formats' `decode_group`.
///
/// - **mma** (FP2+ with per-channel keys, `quant::fp2plus_kc`, head_dim 64 or 128): the block
///   is a row of 64-token *records*, each holding exactly the bytes of one 64-token chunk of the
///   native layout (the same codes, scales and zero points, bit for bit) rearranged so that each
///   lane of a warp reads the operands of its tensor-core fragments with one 16-byte load and
///   unpacks two codes with one bitwise operation. A record of head_dim `d` (`ks = d / 16`):
///
///   | section      | bytes     | content                                                     |
///   |--------------|-----------|-------------------------------------------------------------|
///   | key params   | 64 * ks   | per k-step kk, per t in 0..3: fp16 scales of channels       |
///   |              |           | 16kk + {2t, 2t+1, 2t+8, 2t+9}, then their fp16 minimums     |
///   | key codes    | 256 * ks  | per 16-token step s, per lane: ks/2 words (below)            |
///   | value scales | 64 * ks   | per step s, per t, per group G: e4m3 scales of the step's   |
///   |              |           | tokens {2t, 2t+1, 2t+8, 2t+9} in group G                    |
///   | value codes  | 256 * ks  | per step s, per lane: ks/2 words (below)                     |
///
///   Lane `(g, t) = (lane / 4, lane % 4)` of a warp holds the operands of `mma.m16n8k16` as the
///   PTX ISA defines them: register R of A holds rows `g + 8 (R & 1)` and columns
///   `2t + 8 (R >> 1) + {0, 1}`. For keys A is [16 tokens x 16 channels] (k-step kk covers
///   channels 16kk..16kk+15), for values A is [16 channels of group G x 16 tokens]. Word `w` of
///   a lane holds the codes of k-steps (or groups) `x = 2w, 2w + 1`: the two codes of register R
///   of `x` sit at bits `j` and `j + 16` with `j = 2 (2 (x & 1) + (R >> 1)) + 8 (R & 1)`, so one
///   mask gives both as the low bits of two fp16 mantissas, and one shift by 8 brings the other
///   half of the registers down.
///
/// - **mma, 128-token records** (the default FP2+, `quant::fp2plus`, head_dim 64 or 128):
///   the same idea for Lloyd-Max keys in per-channel groups of 128 tokens with 3 fp16 outliers
///   each and Lloyd-Max values in groups of 64 channels; see namespace `mma_lm` below.
///   `record_layout<KV>` gives the cache and its append kernel one interface over both.
///
/// Functions here are `OSCAR_HOST_DEVICE`: the host converts blocks when it uploads a cache and
/// the tests check the arrangement; the append kernel packs records with the same code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "oscar/core/bitpack.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/quant/config.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/fpq.hpp"

namespace oscar::gpu {

/// The two block layouts of the GPU pool.
enum class block_layout : std::uint8_t { native, mma };

namespace detail {

template <class F>
struct is_fpq : std::false_type {};
template <quant::fpq_config C>
struct is_fpq<quant::fpq<C>> : std::true_type {};

/// `pred(config)` for an FP2+/FP4+ format `F` (`quant::fpq<config>`), false for any other.
template <class F, class Pred>
constexpr bool fpq_config_is(Pred pred) {
  if constexpr (is_fpq<F>::value) {
    return pred(quant::format_traits<F>::config);
  } else {
    (void)pred;
    return false;
  }
}

/// `fp2plus_kc` keys: 2-bit uniform codes in per-channel groups of 64 tokens, fp16 scale and
/// minimum, no outliers.
template <class F>
constexpr bool mma_key_format() {
  return fpq_config_is<F>([](const quant::fpq_config& c) {
    return c.bits == 2 && c.levels == quant::codebook::uniform && c.zero_point &&
           c.scale == quant::scale_type::fp16 && c.axis == quant::group_axis::tokens &&
           c.group == 64 && !c.rotate && c.outliers == 0;
  });
}

/// `fp2plus_kc` values: 2-bit Lloyd-Max codes in groups of 16 channels with an e4m3 scale.
template <class F>
constexpr bool mma_value_format() {
  return fpq_config_is<F>([](const quant::fpq_config& c) {
    return c.bits == 2 && c.levels == quant::codebook::lloyd_max && !c.zero_point &&
           c.scale == quant::scale_type::e4m3 && c.axis == quant::group_axis::head_dim &&
           c.group == 16 && c.outliers == 0;
  });
}

/// The default FP2+ keys: 2-bit Lloyd-Max codes in per-channel groups of 128 tokens with fp16
/// scale and zero point and 3 fp16 outliers per group.
template <class F>
constexpr bool mma_lm_key_format() {
  return fpq_config_is<F>([](const quant::fpq_config& c) {
    return c.bits == 2 && c.levels == quant::codebook::lloyd_max && c.zero_point &&
           c.scale == quant::scale_type::fp16 && c.axis == quant::group_axis::tokens &&
           c.group == 128 && !c.rotate && c.outliers == 3;
  });
}

/// The default FP2+ values: 2-bit Lloyd-Max codes in groups of 64 channels with an e4m3 scale.
template <class F>
constexpr bool mma_lm_value_format() {
  return fpq_config_is<F>([](const quant::fpq_config& c) {
    return c.bits == 2 && c.levels == quant::codebook::lloyd_max && !c.zero_point &&
           c.scale == quant::scale_type::e4m3 && c.axis == quant::group_axis::head_dim &&
           c.group == 64 && c.outliers == 0;
  });
}

}  // namespace detail

/// True when `KV` uses the 128-token records of `mma_lm` (the default FP2+: Lloyd-Max keys in
/// per-channel groups of 128 tokens with 3 outliers, Lloyd-Max values in groups of 64).
template <class KV>
inline constexpr bool is_mma_lm_v = detail::mma_lm_key_format<typename KV::key>() &&
                                    detail::mma_lm_value_format<typename KV::value>();

/// True when the KV format `KV` has an mma layout (and a tensor-core decode kernel): either keys
/// as 2-bit uniform codes in per-channel groups of 64 tokens with fp16 scale and minimum and
/// values as 2-bit Lloyd-Max codes in groups of 16 channels with an e4m3 scale (`fp2plus_kc`,
/// 64-token records of namespace `mma`), or the default FP2+ (`is_mma_lm_v`, 128-token records
/// of namespace `mma_lm`). Values may be rotated or not.
template <class KV>
inline constexpr bool has_mma_layout_v =
    (detail::mma_key_format<typename KV::key>() && detail::mma_value_format<typename KV::value>()) ||
    is_mma_lm_v<KV>;

/// The layout the GPU pool uses for `KV` (mma where available; head_dim decides at run time
/// between mma for 64/128 and native otherwise, see `layout_for`).
template <class KV>
constexpr block_layout layout_for(int head_dim) noexcept {
  if constexpr (has_mma_layout_v<KV>) {
    return head_dim == 64 || head_dim == 128 ? block_layout::mma : block_layout::native;
  } else {
    (void)head_dim;
    return block_layout::native;
  }
}

namespace mma {

/// Tokens per record.
inline constexpr int record_tokens = 64;
/// Tokens per tensor-core step.
inline constexpr int step_tokens = 16;
/// Steps per record.
inline constexpr int record_steps = record_tokens / step_tokens;

/// Byte offsets of a record's sections for head_dim `d` (64 or 128).
struct geometry {
  int d = 0;
  int ksteps = 0;         ///< d / 16: k-steps of the key product, value groups
  int key_params = 0;     ///< offset of the key scales and minimums
  int key_codes = 0;      ///< offset of the key code words
  int value_scales = 0;   ///< offset of the value scales
  int value_codes = 0;    ///< offset of the value code words
  int bytes = 0;          ///< record size
  int words_per_lane = 0; ///< code words of one lane per step (keys and values alike)
};

OSCAR_HD_INLINE constexpr geometry geometry_for(int d) noexcept {
  geometry g;
  g.d = d;
  g.ksteps = d / 16;
  g.words_per_lane = g.ksteps / 2;
  g.key_params = 0;
  g.key_codes = g.key_params + 64 * g.ksteps;
  g.value_scales = g.key_codes + 256 * g.ksteps;
  g.value_codes = g.value_scales + 64 * g.ksteps;
  g.bytes = g.value_codes + 256 * g.ksteps;
  return g;
}

static_assert(geometry_for(128).bytes == 5120 && geometry_for(64).bytes == 2560,
              "an mma record holds exactly the bytes of a native 64-token chunk");

/// Bit of register `reg` (0..3), element `e` (0, 1) of k-step or group `x` inside its word.
OSCAR_HD_INLINE constexpr int code_bit(int x, int reg, int e) noexcept {
  return 2 * (2 * (x & 1) + (reg >> 1)) + 8 * (reg & 1) + 16 * e;
}

/// Token (inside the record) and channel of a key code: step `s`, lane, k-step `kk`, register
/// `reg`, element `e`. Keys: A = [tokens x channels].
struct token_channel {
  int token;
  int channel;
};
OSCAR_HD_INLINE constexpr token_channel key_position(int s, int lane, int kk, int reg,
                                                     int e) noexcept {
  const int g = lane >> 2, t = lane & 3;
  return {step_tokens * s + g + 8 * (reg & 1), 16 * kk + 2 * t + 8 * (reg >> 1) + e};
}

/// Token and channel of a value code: step `s`, lane, group `G`, register, element. Values:
/// A = [channels of the group x tokens].
OSCAR_HD_INLINE constexpr token_channel value_position(int s, int lane, int group, int reg,
                                                       int e) noexcept {
  const int g = lane >> 2, t = lane & 3;
  return {step_tokens * s + 2 * t + 8 * (reg >> 1) + e, 16 * group + g + 8 * (reg & 1)};
}

/// Channel of key parameter `i` (0..3) of k-step `kk` in the t-th parameter row (16 bytes at
/// `key_params + (4 kk + t) * 16`, so the four rows a warp reads fall in different banks).
OSCAR_HD_INLINE constexpr int key_param_channel(int t, int kk, int i) noexcept {
  return 16 * kk + 2 * t + (i & 1) + 8 * (i >> 1);
}

/// Token (inside the step) of value scale `i` (0..3) in a t-row.
OSCAR_HD_INLINE constexpr int value_scale_token(int t, int i) noexcept {
  return 2 * t + (i & 1) + 8 * (i >> 1);
}

// ---- native chunk <-> record ------------------------------------------------------------------

/// The native bytes of one 64-token chunk, for the mma formats: the key tile (d blocks of 20
/// bytes: fp16 scale, fp16 minimum, 16 bytes of codes for the 64 tokens of one channel) and 64
/// value tiles (d / 16 blocks of 5 bytes each: e4m3 scale, 4 bytes of codes for 16 channels).
inline constexpr int key_block_bytes = 20;
inline constexpr int value_block_bytes = 5;

OSCAR_HD_INLINE constexpr int native_key_code(const std::uint8_t* key_tile, int token,
                                              int channel) noexcept {
  return get_code<2>(key_tile + channel * key_block_bytes + 4, token);
}
OSCAR_HD_INLINE constexpr int native_value_code(const std::uint8_t* value_tiles, int d, int token,
                                                int channel) noexcept {
  const std::uint8_t* block =
      value_tiles + (token * (d / 16) + channel / 16) * value_block_bytes;
  return get_code<2>(block + 1, channel % 16);
}

/// Word `w` of `lane` for step `s` of the key codes, gathered from the native key tile.
OSCAR_HD_INLINE constexpr std::uint32_t key_code_word(const std::uint8_t* key_tile, int s,
                                                      int lane, int w) noexcept {
  std::uint32_t word = 0;
  for (int xi = 0; xi < 2; ++xi) {
    const int kk = 2 * w + xi;
    for (int reg = 0; reg < 4; ++reg) {
      for (int e = 0; e < 2; ++e) {
        const token_channel p = key_position(s, lane, kk, reg, e);
        word |= static_cast<std::uint32_t>(native_key_code(key_tile, p.token, p.channel))
                << code_bit(kk, reg, e);
      }
    }
  }
  return word;
}

/// Word `w` of `lane` for step `s` of the value codes, gathered from the native value tiles.
OSCAR_HD_INLINE constexpr std::uint32_t value_code_word(const std::uint8_t* value_tiles, int d,
                                                        int s, int lane, int w) noexcept {
  std::uint32_t word = 0;
  for (int xi = 0; xi < 2; ++xi) {
    const int group = 2 * w + xi;
    for (int reg = 0; reg < 4; ++reg) {
      for (int e = 0; e < 2; ++e) {
        const token_channel p = value_position(s, lane, group, reg, e);
        word |= static_cast<std::uint32_t>(native_value_code(value_tiles, d, p.token, p.channel))
                << code_bit(group, reg, e);
      }
    }
  }
  return word;
}

/// Writes 32-bit `v` little-endian at `p`.
OSCAR_HD_INLINE constexpr void store_le32(std::uint8_t* p, std::uint32_t v) noexcept {
  p[0] = static_cast<std::uint8_t>(v);
  p[1] = static_cast<std::uint8_t>(v >> 8);
  p[2] = static_cast<std::uint8_t>(v >> 16);
  p[3] = static_cast<std::uint8_t>(v >> 24);
}
OSCAR_HD_INLINE constexpr std::uint32_t load_le32(const std::uint8_t* p) noexcept {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

/// Number of independent work items of `pack_item` for head_dim `d`; items may run in
/// parallel (one per thread of the append kernel) and together write every byte of a record.
OSCAR_HD_INLINE constexpr int pack_items(int d) noexcept {
  const geometry g = geometry_for(d);
  // key params: 4 t-rows x ks k-steps; code words: 2 x 4 steps x 32 lanes x ks/2 words;
  // value scales: 4 steps x 4 t-rows x ks groups.
  return 4 * g.ksteps + 2 * record_steps * 32 * g.words_per_lane + record_steps * 4 * g.ksteps;
}

/// Writes work item `item` (< pack_items(d)) of the record built from a native chunk.
OSCAR_HD_INLINE constexpr void pack_item(const std::uint8_t* key_tile,
                                         const std::uint8_t* value_tiles, int d, int item,
                                         std::uint8_t* record) noexcept {
  const geometry g = geometry_for(d);
  const int params = 4 * g.ksteps;
  const int words = record_steps * 32 * g.words_per_lane;
  if (item < params) {  // 4 fp16 scales, then 4 fp16 minimums
    const int kk = item / 4, t = item % 4;
    std::uint8_t* out = record + g.key_params + item * 16;
    for (int i = 0; i < 4; ++i) {
      const std::uint8_t* block = key_tile + key_param_channel(t, kk, i) * key_block_bytes;
      out[2 * i] = block[0];
      out[2 * i + 1] = block[1];
      out[8 + 2 * i] = block[2];
      out[8 + 2 * i + 1] = block[3];
    }
    return;
  }
  item -= params;
  if (item < words) {  // key code word: (step, lane, w) in that order
    const int w = item % g.words_per_lane, lane = (item / g.words_per_lane) % 32,
              s = item / (g.words_per_lane * 32);
    store_le32(record + g.key_codes + 4 * item, key_code_word(key_tile, s, lane, w));
    return;
  }
  item -= words;
  if (item < words) {
    const int w = item % g.words_per_lane, lane = (item / g.words_per_lane) % 32,
              s = item / (g.words_per_lane * 32);
    store_le32(record + g.value_codes + 4 * item, value_code_word(value_tiles, d, s, lane, w));
    return;
  }
  item -= words;  // value scales: (step, t, group)
  const int group = item % g.ksteps, t = (item / g.ksteps) % 4, s = item / (4 * g.ksteps);
  std::uint8_t* out = record + g.value_scales + 4 * item;
  for (int i = 0; i < 4; ++i) {
    const int token = step_tokens * s + value_scale_token(t, i);
    out[i] = value_tiles[(token * (d / 16) + group) * value_block_bytes];
  }
}

/// Builds a whole record from a native chunk (sequentially; see `pack_item`).
OSCAR_HD_INLINE constexpr void pack_record(const std::uint8_t* key_tile,
                                           const std::uint8_t* value_tiles, int d,
                                           std::uint8_t* record) noexcept {
  for (int i = 0; i < pack_items(d); ++i) pack_item(key_tile, value_tiles, d, i, record);
}

/// Rebuilds the native chunk (key tile, value tiles) from a record: the inverse of
/// `pack_record`, for tests and for exporting a device cache to the host.
OSCAR_HD_INLINE constexpr void unpack_record(const std::uint8_t* record, int d,
                                             std::uint8_t* key_tile,
                                             std::uint8_t* value_tiles) noexcept {
  const geometry g = geometry_for(d);
  for (int t = 0; t < 4; ++t) {
    for (int kk = 0; kk < g.ksteps; ++kk) {
      const std::uint8_t* in = record + g.key_params + (kk * 4 + t) * 16;
      for (int i = 0; i < 4; ++i) {
        std::uint8_t* block = key_tile + key_param_channel(t, kk, i) * key_block_bytes;
        block[0] = in[2 * i];
        block[1] = in[2 * i + 1];
        block[2] = in[8 + 2 * i];
        block[3] = in[8 + 2 * i + 1];
      }
    }
  }
  for (int s = 0; s < record_steps; ++s) {
    for (int t = 0; t < 4; ++t) {
      for (int group = 0; group < g.ksteps; ++group) {
        const std::uint8_t* in = record + g.value_scales + ((s * 4 + t) * g.ksteps + group) * 4;
        for (int i = 0; i < 4; ++i) {
          const int token = step_tokens * s + value_scale_token(t, i);
          value_tiles[(token * (d / 16) + group) * value_block_bytes] = in[i];
        }
      }
    }
  }
  // Codes: clear, then OR every code back into place.
  for (int c = 0; c < d; ++c) {
    for (int b = 0; b < 16; ++b) key_tile[c * key_block_bytes + 4 + b] = 0;
  }
  for (int i = 0; i < record_tokens * (d / 16); ++i) {
    for (int b = 0; b < 4; ++b) value_tiles[i * value_block_bytes + 1 + b] = 0;
  }
  for (int s = 0; s < record_steps; ++s) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int w = 0; w < g.words_per_lane; ++w) {
        const int index = (s * 32 + lane) * g.words_per_lane + w;
        const std::uint32_t kw = load_le32(record + g.key_codes + 4 * index);
        const std::uint32_t vw = load_le32(record + g.value_codes + 4 * index);
        for (int xi = 0; xi < 2; ++xi) {
          for (int reg = 0; reg < 4; ++reg) {
            for (int e = 0; e < 2; ++e) {
              const int x = 2 * w + xi;
              const int bit = code_bit(x, reg, e);
              const token_channel k = key_position(s, lane, x, reg, e);
              key_tile[k.channel * key_block_bytes + 4 + k.token / 4] |=
                  static_cast<std::uint8_t>(((kw >> bit) & 3u) << (2 * (k.token % 4)));
              const token_channel v = value_position(s, lane, x, reg, e);
              value_tiles[(v.token * (d / 16) + v.channel / 16) * value_block_bytes + 1 +
                          (v.channel % 16) / 4] |=
                  static_cast<std::uint8_t>(((vw >> bit) & 3u) << (2 * (v.channel % 4)));
            }
          }
        }
      }
    }
  }
}

}  // namespace mma

// ---- the default FP2+: 128-token records -------------------------------------------------------

/// Records of the default FP2+ (`quant::fp2plus`, head_dim 64 or 128): 128 tokens, one key
/// group of every channel. Fragments follow the same `mma.m16n8k16` operand positions as
/// namespace `mma` (`mma::key_position`, `mma::value_position`); what differs is the bytes a
/// record holds and where a code sits in its lane's word. A record of head_dim `d`
/// (`ks = d / 16` k-steps of the key product and 16-channel tiles of the value product, `d / 64`
/// value groups), exactly the bytes of one 128-token chunk of the native layout:
///
///   | section        | bytes | content                                                   |
///   |----------------|-------|-----------------------------------------------------------|
///   | key params     | 4 d   | as `mma`: per k-step kk, per t: fp16 scales of channels    |
///   |                |       | 16kk + {2t, 2t+1, 2t+8, 2t+9}, then their fp16 zero points |
///   | outlier values | 6 d   | entry n: fp16 outlier k of channel c (`outlier_entry(n)`)  |
///   | outlier index  | 3 d   | entry n: its token index byte                              |
///   | key codes      | 32 d  | per 16-token step s, per lane: ks/2 words (below)          |
///   | value scales   | 2 d   | per step s, per t, per group G: e4m3 scales of the step's  |
///   |                |       | tokens {2t, 2t+1, 2t+8, 2t+9} in group G                   |
///   | value codes    | 32 d  | per step s, per lane: ks/2 words (below)                   |
///
/// Outlier entry n belongs to channel `n % 32 + 32 (n / 96)`, slot `(n / 32) % 3`: lane L of a
/// warp finds the outliers of its channels L, L + 32, ... at entries L, L + 32, L + 64, L + 96...
///
/// Word w of a lane holds the codes of k-steps (or value tiles) `x = 2w, 2w + 1`: the 2-bit
/// code of register R, element e of x sits at bits `2 j + 16 e` with `j = 4 (x & 1) + R`, its
/// low bit first, as in the native packing. Shifted left by `14 - 2 j`, the word holds the two
/// codes of a register at bits 14-15 and 30-31 of its halves, so one AND gives the low bits as
/// fp16 {0, 2} and one AND-OR the high bits as fp16 {1, -1}: exact operands of a tensor-core
/// product with no arithmetic (`mma_core_lm.hpp`).
namespace mma_lm {

inline constexpr int record_tokens = 128;
inline constexpr int step_tokens = mma::step_tokens;
inline constexpr int record_steps = record_tokens / step_tokens;
inline constexpr int outliers = 3;

/// Native block layouts (fpq.hpp): key block of one channel: fp16 scale, fp16 zero point,
/// 3 fp16 outliers, 3 index bytes, 32 bytes of codes for 128 tokens; value block of 64
/// channels of one token: e4m3 scale, 16 bytes of codes.
inline constexpr int key_block_bytes = 45;
inline constexpr int key_outlier_value_offset = 4;
inline constexpr int key_outlier_index_offset = 10;
inline constexpr int key_code_offset = 13;
inline constexpr int value_block_bytes = 17;
inline constexpr int value_group = 64;

/// Byte offsets of a record's sections for head_dim `d` (64 or 128).
struct geometry {
  int d = 0;
  int ksteps = 0;          ///< d / 16
  int vgroups = 0;         ///< d / 64: value scale groups
  int words_per_lane = 0;  ///< code words of one lane per step (keys and values alike)
  int key_params = 0;
  int outlier_values = 0;
  int outlier_index = 0;
  int key_codes = 0;
  int value_scales = 0;
  int value_codes = 0;
  int bytes = 0;
};

OSCAR_HD_INLINE constexpr geometry geometry_for(int d) noexcept {
  geometry g;
  g.d = d;
  g.ksteps = d / 16;
  g.vgroups = d / value_group;
  g.words_per_lane = g.ksteps / 2;
  g.key_params = 0;
  g.outlier_values = g.key_params + 4 * d;
  g.outlier_index = g.outlier_values + 2 * outliers * d;
  g.key_codes = g.outlier_index + outliers * d;
  g.value_scales = g.key_codes + record_steps * 32 * g.words_per_lane * 4;
  g.value_codes = g.value_scales + record_tokens * g.vgroups;
  g.bytes = g.value_codes + record_steps * 32 * g.words_per_lane * 4;
  return g;
}

static_assert(geometry_for(128).bytes == 128 * key_block_bytes + 128 * 2 * value_block_bytes &&
                  geometry_for(64).bytes == 64 * key_block_bytes + 128 * value_block_bytes,
              "an mma_lm record holds exactly the bytes of a native 128-token chunk");
static_assert(geometry_for(64).key_codes % 16 == 0 && geometry_for(128).key_codes % 16 == 0 &&
                  geometry_for(64).value_codes % 16 == 0 && geometry_for(128).value_codes % 16 == 0 &&
                  geometry_for(64).bytes % 16 == 0,
              "code sections start on 16 bytes (one wide load per lane and step)");

/// Bit of the code of register `reg`, element `e` of k-step (or tile) `x` inside its word.
OSCAR_HD_INLINE constexpr int code_bit(int x, int reg, int e) noexcept {
  return 2 * (4 * (x & 1) + reg) + 16 * e;
}

/// Channel and slot of outlier entry `n`.
struct outlier_slot {
  int channel;
  int slot;
};
OSCAR_HD_INLINE constexpr outlier_slot outlier_entry(int n) noexcept {
  return {n % 32 + 32 * (n / (32 * outliers)), (n / 32) % outliers};
}

OSCAR_HD_INLINE constexpr int native_key_code(const std::uint8_t* key_tile, int token,
                                              int channel) noexcept {
  return get_code<2>(key_tile + channel * key_block_bytes + key_code_offset, token);
}
OSCAR_HD_INLINE constexpr int native_value_code(const std::uint8_t* value_tiles, int d, int token,
                                                int channel) noexcept {
  const std::uint8_t* block =
      value_tiles + (token * (d / value_group) + channel / value_group) * value_block_bytes;
  return get_code<2>(block + 1, channel % value_group);
}

/// Word `w` of `lane` for step `s` of the key codes, gathered from the native key tile.
OSCAR_HD_INLINE constexpr std::uint32_t key_code_word(const std::uint8_t* key_tile, int s,
                                                      int lane, int w) noexcept {
  std::uint32_t word = 0;
  for (int xi = 0; xi < 2; ++xi) {
    for (int reg = 0; reg < 4; ++reg) {
      for (int e = 0; e < 2; ++e) {
        const mma::token_channel p = mma::key_position(s, lane, 2 * w + xi, reg, e);
        word |= static_cast<std::uint32_t>(native_key_code(key_tile, p.token, p.channel))
                << code_bit(xi, reg, e);
      }
    }
  }
  return word;
}

/// Word `w` of `lane` for step `s` of the value codes, gathered from the native value tiles.
OSCAR_HD_INLINE constexpr std::uint32_t value_code_word(const std::uint8_t* value_tiles, int d,
                                                        int s, int lane, int w) noexcept {
  std::uint32_t word = 0;
  for (int xi = 0; xi < 2; ++xi) {
    for (int reg = 0; reg < 4; ++reg) {
      for (int e = 0; e < 2; ++e) {
        const mma::token_channel p = mma::value_position(s, lane, 2 * w + xi, reg, e);
        word |= static_cast<std::uint32_t>(native_value_code(value_tiles, d, p.token, p.channel))
                << code_bit(xi, reg, e);
      }
    }
  }
  return word;
}

/// Number of independent work items of `pack_item` for head_dim `d` (see `mma::pack_items`).
OSCAR_HD_INLINE constexpr int pack_items(int d) noexcept {
  const geometry g = geometry_for(d);
  // key params: 4 t-rows x ks k-steps; outlier entries; code words: 2 x 8 steps x 32 lanes x
  // ks/2 words; value scales: 8 steps x 4 t-rows x groups.
  return 4 * g.ksteps + outliers * d + 2 * record_steps * 32 * g.words_per_lane +
         record_steps * 4 * g.vgroups;
}

/// Writes work item `item` (< pack_items(d)) of the record built from a native chunk.
OSCAR_HD_INLINE constexpr void pack_item(const std::uint8_t* key_tile,
                                         const std::uint8_t* value_tiles, int d, int item,
                                         std::uint8_t* record) noexcept {
  const geometry g = geometry_for(d);
  const int params = 4 * g.ksteps;
  const int entries = outliers * d;
  const int words = record_steps * 32 * g.words_per_lane;
  if (item < params) {  // 4 fp16 scales, then 4 fp16 zero points
    const int kk = item / 4, t = item % 4;
    std::uint8_t* out = record + g.key_params + item * 16;
    for (int i = 0; i < 4; ++i) {
      const std::uint8_t* block = key_tile + mma::key_param_channel(t, kk, i) * key_block_bytes;
      out[2 * i] = block[0];
      out[2 * i + 1] = block[1];
      out[8 + 2 * i] = block[2];
      out[8 + 2 * i + 1] = block[3];
    }
    return;
  }
  item -= params;
  if (item < entries) {  // outlier entry: fp16 value and index byte
    const outlier_slot o = outlier_entry(item);
    const std::uint8_t* block = key_tile + o.channel * key_block_bytes;
    record[g.outlier_values + 2 * item] = block[key_outlier_value_offset + 2 * o.slot];
    record[g.outlier_values + 2 * item + 1] = block[key_outlier_value_offset + 2 * o.slot + 1];
    record[g.outlier_index + item] = block[key_outlier_index_offset + o.slot];
    return;
  }
  item -= entries;
  if (item < words) {  // key code word: (step, lane, w) in that order
    const int w = item % g.words_per_lane, lane = (item / g.words_per_lane) % 32,
              s = item / (g.words_per_lane * 32);
    mma::store_le32(record + g.key_codes + 4 * item, key_code_word(key_tile, s, lane, w));
    return;
  }
  item -= words;
  if (item < words) {
    const int w = item % g.words_per_lane, lane = (item / g.words_per_lane) % 32,
              s = item / (g.words_per_lane * 32);
    mma::store_le32(record + g.value_codes + 4 * item,
                    value_code_word(value_tiles, d, s, lane, w));
    return;
  }
  item -= words;  // value scales: (step, t, group)
  const int group = item % g.vgroups, t = (item / g.vgroups) % 4, s = item / (4 * g.vgroups);
  std::uint8_t* out = record + g.value_scales + 4 * item;
  for (int i = 0; i < 4; ++i) {
    const int token = step_tokens * s + mma::value_scale_token(t, i);
    out[i] = value_tiles[(token * g.vgroups + group) * value_block_bytes];
  }
}

/// Builds a whole record from a native chunk (sequentially; see `pack_item`).
OSCAR_HD_INLINE constexpr void pack_record(const std::uint8_t* key_tile,
                                           const std::uint8_t* value_tiles, int d,
                                           std::uint8_t* record) noexcept {
  for (int i = 0; i < pack_items(d); ++i) pack_item(key_tile, value_tiles, d, i, record);
}

/// Rebuilds the native chunk (key tile, value tiles) from a record: the inverse of
/// `pack_record`.
OSCAR_HD_INLINE constexpr void unpack_record(const std::uint8_t* record, int d,
                                             std::uint8_t* key_tile,
                                             std::uint8_t* value_tiles) noexcept {
  const geometry g = geometry_for(d);
  for (int t = 0; t < 4; ++t) {
    for (int kk = 0; kk < g.ksteps; ++kk) {
      const std::uint8_t* in = record + g.key_params + (kk * 4 + t) * 16;
      for (int i = 0; i < 4; ++i) {
        std::uint8_t* block = key_tile + mma::key_param_channel(t, kk, i) * key_block_bytes;
        block[0] = in[2 * i];
        block[1] = in[2 * i + 1];
        block[2] = in[8 + 2 * i];
        block[3] = in[8 + 2 * i + 1];
      }
    }
  }
  for (int n = 0; n < outliers * d; ++n) {
    const outlier_slot o = outlier_entry(n);
    std::uint8_t* block = key_tile + o.channel * key_block_bytes;
    block[key_outlier_value_offset + 2 * o.slot] = record[g.outlier_values + 2 * n];
    block[key_outlier_value_offset + 2 * o.slot + 1] = record[g.outlier_values + 2 * n + 1];
    block[key_outlier_index_offset + o.slot] = record[g.outlier_index + n];
  }
  for (int s = 0; s < record_steps; ++s) {
    for (int t = 0; t < 4; ++t) {
      for (int group = 0; group < g.vgroups; ++group) {
        const std::uint8_t* in = record + g.value_scales + ((s * 4 + t) * g.vgroups + group) * 4;
        for (int i = 0; i < 4; ++i) {
          const int token = step_tokens * s + mma::value_scale_token(t, i);
          value_tiles[(token * g.vgroups + group) * value_block_bytes] = in[i];
        }
      }
    }
  }
  // Codes: clear, then OR every code back into place.
  for (int c = 0; c < d; ++c) {
    for (int b = 0; b < record_tokens / 4; ++b) key_tile[c * key_block_bytes + key_code_offset + b] = 0;
  }
  for (int i = 0; i < record_tokens * g.vgroups; ++i) {
    for (int b = 0; b < value_group / 4; ++b) value_tiles[i * value_block_bytes + 1 + b] = 0;
  }
  for (int s = 0; s < record_steps; ++s) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int w = 0; w < g.words_per_lane; ++w) {
        const int index = (s * 32 + lane) * g.words_per_lane + w;
        const std::uint32_t kw = mma::load_le32(record + g.key_codes + 4 * index);
        const std::uint32_t vw = mma::load_le32(record + g.value_codes + 4 * index);
        for (int xi = 0; xi < 2; ++xi) {
          for (int reg = 0; reg < 4; ++reg) {
            for (int e = 0; e < 2; ++e) {
              const int bit = code_bit(xi, reg, e);
              const mma::token_channel k = mma::key_position(s, lane, 2 * w + xi, reg, e);
              key_tile[k.channel * key_block_bytes + key_code_offset + k.token / 4] |=
                  static_cast<std::uint8_t>(((kw >> bit) & 3u) << (2 * (k.token % 4)));
              const mma::token_channel v = mma::value_position(s, lane, 2 * w + xi, reg, e);
              value_tiles[(v.token * g.vgroups + v.channel / value_group) * value_block_bytes + 1 +
                          (v.channel % value_group) / 4] |=
                  static_cast<std::uint8_t>(((vw >> bit) & 3u) << (2 * (v.channel % 4)));
            }
          }
        }
      }
    }
  }
}

}  // namespace mma_lm

// ---- one interface over both record kinds ------------------------------------------------------

/// The records of a KV format with an mma layout (`has_mma_layout_v<KV>`): what the device
/// cache, its append kernel and the host conversions need, whichever record kind `KV` uses.
/// A record holds the bytes of one native chunk of `tokens` tokens: the key tile(s) of those
/// tokens (`key_tile`, as the host block stores them) and their value tiles (`value_tiles`).
template <class KV>
struct record_layout {
  static_assert(has_mma_layout_v<KV>,
                "oscar::gpu::record_layout<KV>: KV has no mma layout (allowed: quant::fp2plus, "
                "quant::fp2plus_kc and formats with the same key and value configs)");
  static constexpr bool lm = is_mma_lm_v<KV>;
  /// Tokens per record (the format's chunk).
  static constexpr int tokens = lm ? mma_lm::record_tokens : mma::record_tokens;
  static_assert(tokens == quant::tokens_per_tile<typename KV::key>(),
                "a record holds one key tile: the cache's chunk");

  OSCAR_HD_INLINE static constexpr int bytes(int d) noexcept {
    return lm ? mma_lm::geometry_for(d).bytes : mma::geometry_for(d).bytes;
  }
  OSCAR_HD_INLINE static constexpr int pack_items(int d) noexcept {
    return lm ? mma_lm::pack_items(d) : mma::pack_items(d);
  }
  OSCAR_HD_INLINE static constexpr void pack_item(const std::uint8_t* key_tile,
                                                  const std::uint8_t* value_tiles, int d,
                                                  int item, std::uint8_t* record) noexcept {
    if constexpr (lm) mma_lm::pack_item(key_tile, value_tiles, d, item, record);
    else mma::pack_item(key_tile, value_tiles, d, item, record);
  }
  OSCAR_HD_INLINE static constexpr void pack_record(const std::uint8_t* key_tile,
                                                    const std::uint8_t* value_tiles, int d,
                                                    std::uint8_t* record) noexcept {
    if constexpr (lm) mma_lm::pack_record(key_tile, value_tiles, d, record);
    else mma::pack_record(key_tile, value_tiles, d, record);
  }
  OSCAR_HD_INLINE static constexpr void unpack_record(const std::uint8_t* record, int d,
                                                      std::uint8_t* key_tile,
                                                      std::uint8_t* value_tiles) noexcept {
    if constexpr (lm) mma_lm::unpack_record(record, d, key_tile, value_tiles);
    else mma::unpack_record(record, d, key_tile, value_tiles);
  }
};

}  // namespace oscar::gpu
