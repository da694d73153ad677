// SPDX-License-Identifier: Apache-2.0
/// \file
/// How the GPU block pool lays out the bytes of a block, for each KV format.
///
/// Two layouts, chosen per KV format by `block_layout_of<KV>`:
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

template <class F>
constexpr bool mma_key_format() {
  if constexpr (is_fpq<F>::value) {
    constexpr quant::fpq_config c = quant::format_traits<F>::config;
    return c.bits == 2 && c.levels == quant::codebook::uniform && c.zero_point &&
           c.scale == quant::scale_type::fp16 && c.axis == quant::group_axis::tokens &&
           c.group == 64 && !c.rotate && c.outliers == 0;
  } else {
    return false;
  }
}

template <class F>
constexpr bool mma_value_format() {
  if constexpr (is_fpq<F>::value) {
    constexpr quant::fpq_config c = quant::format_traits<F>::config;
    return c.bits == 2 && c.levels == quant::codebook::lloyd_max && !c.zero_point &&
           c.scale == quant::scale_type::e4m3 && c.axis == quant::group_axis::head_dim &&
           c.group == 16 && c.outliers == 0;
  } else {
    return false;
  }
}

}  // namespace detail

/// True when the KV format `KV` has an mma layout (and the tensor-core decode kernel): keys as
/// 2-bit uniform codes in per-channel groups of 64 tokens with fp16 scale and minimum, values
/// as 2-bit Lloyd-Max codes in groups of 16 channels with an e4m3 scale (rotated or not).
template <class KV>
inline constexpr bool has_mma_layout_v =
    detail::mma_key_format<typename KV::key>() && detail::mma_value_format<typename KV::value>();

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
}  // namespace oscar::gpu
