// SPDX-License-Identifier: Apache-2.0
/// \file
/// Moving one sequence of a `kv_cache` in and out as bytes: `serialize` writes every
/// (layer, KV head) entry of a sequence; `deserialize` checks bytes it does not trust and, only
/// when they are entirely valid for the receiving cache, creates a new sequence from them.
///
/// ## Byte layout, version 1
/// Integers are little-endian and unaligned; `u16` fp16 values are IEEE binary16 bit patterns.
///
/// Header, 108 bytes:
///
/// | offset | size   | field                                                                 |
/// |--------|--------|-----------------------------------------------------------------------|
/// | 0      | 8      | magic `"OSCARKV\0"` (4F 53 43 41 52 4B 56 00)                          |
/// | 8      | u32    | version = 1                                                           |
/// | 12     | u32    | header_bytes = 108                                                    |
/// | 16     | u64    | payload_bytes: the bytes after the header, exactly                    |
/// | 24     | u64    | checksum: FNV-1a 64 of the payload bytes                              |
/// | 32     | 3 x u64| format id of tier full, mid, low (below)                              |
/// | 56     | 7 x u32| layers, kv_heads, head_dim, block_tokens, sink_tokens, window_tokens, |
/// |        |        | chunk_tokens (`kv_cache::chunk_tokens()`)                             |
/// | 84     | 3 x u64| block bytes of tier full, mid, low (`pool(t).block_bytes()`)          |
///
/// FNV-1a 64: `h = 0xcbf29ce484222325`, then per byte `h = (h ^ byte) * 0x100000001b3` (mod
/// 2^64). The format id of a tier is the FNV-1a 64 of the bytes of
/// `format_traits<KV::key>::name`, a 0 byte, `format_traits<KV::value>::name`, a 0 byte, and the
/// tier's name (`"full"`, `"mid"` or `"low"`, `to_string(tier)`), where `KV` is the tier's KV
/// format.
///
/// Payload: one record per entry, layer-major (layer 0 head 0, layer 0 head 1, ...):
///
/// | size                          | field                                                  |
/// |-------------------------------|--------------------------------------------------------|
/// | u64                           | appended: tokens ever appended to the entry            |
/// | u32                           | n_sinks: sink rows                                     |
/// | u32                           | n_window: window rows                                  |
/// | n_sinks x head_dim x u16      | sink K rows, then                                      |
/// | n_sinks x head_dim x u16      | sink V rows                                            |
/// | n_window x head_dim x u16     | window K rows (oldest first), then                     |
/// | n_window x head_dim x u16     | window V rows                                          |
/// | per tier (full, mid, low):    | the key format's head params, the value format's head  |
/// |                               | params (`head_params_codec`: 0 bytes for formats       |
/// |                               | without; 1 byte for FP2+-style e4m3-scaled fpq, the    |
/// |                               | int8 `scale_exponent`; 4 bytes for fp8 `e4m3`, the     |
/// |                               | fp32 `scale` bits), then u8 calibrated (0 or 1)        |
/// | u32                           | n_blocks                                               |
/// | n_blocks x block record       | in block-table order                                   |
///
/// Block record: u8 tier (0 full, 1 mid, 2 low); u16 fill (tokens written into the block);
/// 32 bytes valid mask (bit `i` of the 256, LSB first: byte `i / 8`, bit `i % 8`, is token `i`);
/// then the block's bytes, `block_bytes` of its tier: the pool's bytes for the key tiles and the
/// value tiles of tokens `[0, fill)`, and zeros for every other byte (tiles past `fill` and
/// padding). Blocks are copied as the formats store them in memory (their own layouts, e.g.
/// `fpq.hpp`; fp16 elements in host order), so `serialize` and `deserialize` require a
/// little-endian host. A block that appears in several block tables (copy-on-write sharing) is
/// written once per table entry and imported as separate blocks.
///
/// ## What `deserialize` accepts
/// Bytes are untrusted. Before the cache is touched, `deserialize` checks, in this order: the
/// size (at least the header), magic, version, header_bytes, payload_bytes equal to the bytes
/// after the header, the checksum, each format id, each config field and each tier's block bytes
/// equal to the receiving cache's; then every entry: `appended <= 2^62`; `n_sinks <=
/// sink_tokens` and `<= appended`; `n_window <= window_tokens + chunk_tokens - 1`; sink and
/// window values finite; head params sane (`head_params_codec::problem`: fpq exponent in
/// [-100, 100], e4m3 scale finite, normal and > 0), the calibrated flag 0 or 1, an uncalibrated
/// tier's params at their defaults (`P{}`: exponent 0, scale 1.0); `n_blocks` no more than the
/// remaining bytes can hold; for each block: tier < 3, the tier calibrated, fill a positive
/// multiple of chunk_tokens and at most block_tokens, a non-empty valid mask with no bit at or
/// above fill, zero bytes outside the tiles of `[0, fill)`, and every key and value of `[0, fill)`
/// decoding (with the tier's head params) to a finite value; tokens held (sinks + fills + window)
/// at most `appended`, and none outside the sinks while `appended <= sink_tokens`; and no bytes
/// left after the last entry. Any failure throws `oscar::error` with `errc::corrupt_data`, naming
/// the field, what was expected and what was found. Then, if a pool has fewer free blocks than the
/// sequence's blocks of that tier, it throws `errc::out_of_memory`. In every failure the cache
/// is unchanged. Key summaries (`block_pool::key_min`/`key_max`) are recomputed from the
/// decoded keys of tokens `[0, fill)`, as `kv_cache` computes them.
///
/// Every accepted input is canonical: `serialize(cache, deserialize(cache, bytes)) == bytes`.
#pragma once

#include <array>
#include <bit>
#include <bitset>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "oscar/cache/block_pool.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/quant/float_formats.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/fpq.hpp"

namespace oscar::cache {

template <class Cache>
inline constexpr bool has_fp16_window_v = std::is_same_v<typename Cache::window_type, half>;

/// The version `serialize` writes and the only one `deserialize` reads.
inline constexpr std::uint32_t serial_version = 1;
/// Bytes of the version-1 header.
inline constexpr std::size_t serial_header_bytes = 108;

/// How a format's per-head metadata (`format_traits<F>::head_params`) is stored: `bytes` fixed
/// bytes (`store`/`load`), and `problem`, which returns an empty string for sane params and
/// otherwise says what is wrong. Specialize it for the head_params of your own formats.
template <class Params>
struct head_params_codec {
  static_assert(quant::dependent_false_v<Params>,
                "oscar::cache::head_params_codec<P>: serialize/deserialize do not know how to "
                "store this head_params type; specialize head_params_codec for it (bytes, "
                "store, load, problem), as serialize.hpp does for no_head_params, "
                "fpq_head_params and e4m3_head_params");
};

/// Formats without per-head metadata: nothing is stored.
template <>
struct head_params_codec<quant::no_head_params> {
  static constexpr std::size_t bytes = 0;
  static void store(const quant::no_head_params&, std::byte*) noexcept {}
  static quant::no_head_params load(const std::byte*) noexcept { return {}; }
  static std::string problem(const quant::no_head_params&) { return {}; }
};

/// fpq formats with e4m3 scales (FP2+): the int8 `scale_exponent`, two's complement.
template <>
struct head_params_codec<quant::fpq_head_params> {
  static constexpr std::size_t bytes = 1;
  static void store(const quant::fpq_head_params& p, std::byte* out) noexcept {
    out[0] = static_cast<std::byte>(static_cast<std::uint8_t>(p.scale_exponent));
  }
  static quant::fpq_head_params load(const std::byte* in) noexcept {
    return {static_cast<std::int8_t>(std::to_integer<std::uint8_t>(in[0]))};
  }
  static std::string problem(const quant::fpq_head_params& p) {
    if (p.scale_exponent >= -100 && p.scale_exponent <= 100) return {};
    return oscar::detail::concat("scale_exponent = ", static_cast<int>(p.scale_exponent),
                                 " is not allowed (allowed: -100 to 100)");
  }
};

/// fp8 `e4m3`: the fp32 `scale`, its IEEE bits as a u32.
template <>
struct head_params_codec<quant::e4m3_head_params> {
  static constexpr std::size_t bytes = 4;
  static void store(const quant::e4m3_head_params& p, std::byte* out) noexcept {
    const auto bits = std::bit_cast<std::uint32_t>(p.scale);
    for (int i = 0; i < 4; ++i) out[i] = static_cast<std::byte>((bits >> (8 * i)) & 0xffu);
  }
  static quant::e4m3_head_params load(const std::byte* in) noexcept {
    std::uint32_t bits = 0;
    for (int i = 0; i < 4; ++i)
      bits |= std::uint32_t{std::to_integer<std::uint8_t>(in[i])} << (8 * i);
    return {std::bit_cast<float>(bits)};
  }
  /// Normal, so that encoding with `1 / scale` stays finite when more tokens join the tier.
  static std::string problem(const quant::e4m3_head_params& p) {
    if (std::isnormal(p.scale) && p.scale > 0.0f) return {};
    return oscar::detail::concat("scale = ", p.scale,
                                 " is not allowed (allowed: a finite, normal value > 0)");
  }
};

namespace detail {

template <class T>
struct is_kv_cache : std::false_type {};
template <class Low, class Mid, class Full, class Allocator>
struct is_kv_cache<kv_cache<Low, Mid, Full, Allocator>> : std::true_type {};

inline constexpr std::uint64_t fnv1a64_basis = 0xcbf29ce484222325ull;
inline constexpr std::uint64_t fnv1a64_prime = 0x100000001b3ull;

/// FNV-1a 64 of `bytes`, continuing from `h`.
inline std::uint64_t fnv1a64(std::span<const std::byte> bytes,
                             std::uint64_t h = fnv1a64_basis) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  for (std::size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= fnv1a64_prime;
  }
  return h;
}
constexpr std::uint64_t fnv1a64(std::string_view text, std::uint64_t h = fnv1a64_basis) noexcept {
  for (const char c : text) {
    h ^= static_cast<unsigned char>(c);
    h *= fnv1a64_prime;
  }
  return h;
}

/// The format id of a tier (see the file comment).
template <class KV>
constexpr std::uint64_t tier_format_id(tier t) noexcept {
  std::uint64_t h = fnv1a64(quant::format_traits<typename KV::key>::name);
  h = fnv1a64(std::string_view("\0", 1), h);
  h = fnv1a64(quant::format_traits<typename KV::value>::name, h);
  h = fnv1a64(std::string_view("\0", 1), h);
  return fnv1a64(to_string(t), h);
}

/// Prints a u64 as 0x followed by 16 hex digits.
struct hex64 {
  std::uint64_t value;
  friend std::ostream& operator<<(std::ostream& out, hex64 h) {
    constexpr char digits[] = "0123456789abcdef";
    char text[19] = {'0', 'x'};
    for (int i = 0; i < 16; ++i) text[2 + i] = digits[(h.value >> (60 - 4 * i)) & 0xfu];
    text[18] = '\0';
    return out << text;
  }
};

/// Where in the payload a check failed, for messages.
struct serial_location {
  int layer = -1;
  int head = -1;
  std::int64_t block = -1;
  friend std::ostream& operator<<(std::ostream& out, const serial_location& l) {
    if (l.layer < 0) return out << "payload";
    out << "entry (layer " << l.layer << ", head " << l.head << ")";
    if (l.block >= 0) out << ", block " << l.block;
    return out;
  }
};

template <class U>
U load_le(const std::byte* p) noexcept {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) {
    v = static_cast<U>(
        v | static_cast<U>(static_cast<U>(std::to_integer<std::uint8_t>(p[i])) << (8 * i)));
  }
  return v;
}

template <class U>
void store_le(std::byte* p, U v) noexcept {
  for (std::size_t i = 0; i < sizeof(U); ++i) {
    p[i] = static_cast<std::byte>(static_cast<std::uint8_t>(v >> (8 * i)));
  }
}

/// Reads fields from untrusted bytes; every read checks that the bytes are there.
class byte_reader {
 public:
  byte_reader(std::span<const std::byte> bytes, std::size_t base) noexcept
      : bytes_(bytes), base_(base) {}

  serial_location where;

  [[nodiscard]] std::size_t left() const noexcept { return bytes_.size() - pos_; }
  /// Offset of the next byte in the whole input.
  [[nodiscard]] std::size_t offset() const noexcept { return base_ + pos_; }

  const std::byte* take(std::size_t n, std::string_view what) {
    OSCAR_CHECK(n <= left(), errc::corrupt_data, "deserialize: ", where, ": ", what, " needs ", n,
                " bytes at offset ", offset(), " but only ", left(),
                " remain (allowed: a payload that holds every field it announces)");
    const std::byte* p = bytes_.data() + pos_;
    pos_ += n;
    return p;
  }
  template <class U>
  U get(std::string_view what) {
    return load_le<U>(take(sizeof(U), what));
  }
  /// `count` items of `item_bytes` each, checked without overflow.
  const std::byte* take_items(std::uint64_t count, std::size_t item_bytes, std::string_view what) {
    OSCAR_CHECK(item_bytes == 0 || count <= left() / item_bytes, errc::corrupt_data,
                "deserialize: ", where, ": ", what, " = ", count, " items of ", item_bytes,
                " bytes at offset ", offset(), " do not fit in the ", left(),
                " bytes that remain (allowed: a payload that holds every field it announces)");
    return take(static_cast<std::size_t>(count) * item_bytes, what);
  }

 private:
  std::span<const std::byte> bytes_;
  std::size_t base_;
  std::size_t pos_ = 0;
};

template <class F, std::size_t... I>
constexpr void for_each_tier_impl(F&& f, std::index_sequence<I...>) {
  (f.template operator()<static_cast<int>(I)>(), ...);
}
/// Calls `f.template operator()<I>()` for tiers 0, 1, 2.
template <class F>
constexpr void for_each_tier_index(F&& f) {
  for_each_tier_impl(f, std::make_index_sequence<tier_count>{});
}

/// Reads and rebuilds sequences of a `kv_cache` (a friend of it).
struct serializer {
  // ---- header fields shared by both directions ------------------------------------------------

  struct header_fields {
    std::array<std::uint64_t, tier_count> format_ids{};
    std::array<std::uint32_t, 7> config{};
    std::array<std::uint64_t, tier_count> block_bytes{};
  };
  static constexpr std::array<std::string_view, 7> config_names = {
      "layers",      "kv_heads",      "head_dim",    "block_tokens",
      "sink_tokens", "window_tokens", "chunk_tokens"};

  template <class Cache>
  static header_fields expected_header(const Cache& cache) {
    header_fields h;
    for_each_tier_index([&]<int I>() {
      h.format_ids[I] =
          tier_format_id<typename Cache::template tier_format<I>>(static_cast<tier>(I));
      h.block_bytes[I] = cache.pool(static_cast<tier>(I)).block_bytes();
    });
    const cache_config& c = cache.config();
    const int values[7] = {c.layers,      c.kv_heads,      c.head_dim,          c.block_tokens,
                           c.sink_tokens, c.window_tokens, cache.chunk_tokens()};
    for (int i = 0; i < 7; ++i) h.config[i] = static_cast<std::uint32_t>(values[i]);
    return h;
  }

  template <class Cache>
  static void check_host() {
    static_assert(std::endian::native == std::endian::little,
                  "oscar::cache::serialize/deserialize copy format blocks as they are in "
                  "memory, which the byte layout defines as little-endian: they need a "
                  "little-endian host");
  }

  // ---- serialize ------------------------------------------------------------------------------

  template <class Cache>
  static std::vector<std::byte> save(const Cache& cache, seq_id id) {
    check_host<Cache>();
    const auto& seq = cache.find(id);
    const cache_config& c = cache.config();
    const std::size_t d = static_cast<std::size_t>(c.head_dim);
    for (const auto& e : seq.entries) {
      OSCAR_CHECK(!e.pruned, errc::unsupported, "serialize of sequence ", id,
                  " with a pruned head is not allowed (allowed: sequences without pruned heads; "
                  "the page format has no field for a head's running mean)");
    }

    // Exact size first; the zero-initialized buffer already holds every unused block byte.
    std::size_t total = serial_header_bytes;
    for (const auto& e : seq.entries) {
      total += 8 + 4 + 4 + tier_params_bytes<Cache>() + 4 +
               2 * (e.sink_k.size() + e.sink_v.size() + e.window_k.size() + e.window_v.size());
      for (const block_slot& s : e.slots) {
        total += block_record_bytes + cache.pool(s.level).block_bytes();
      }
    }
    std::vector<std::byte> out(total);
    std::byte* w = out.data() + serial_header_bytes;
    const auto put_rows = [&](const std::vector<half>& x) {
      if (x.empty()) return;  // data() may be null
      std::memcpy(w, x.data(), x.size() * sizeof(half));  // binary16 bits, little-endian host
      w += x.size() * sizeof(half);
    };

    for (int layer = 0; layer < c.layers; ++layer) {
      for (int head = 0; head < c.kv_heads; ++head) {
        const auto& e = seq.entries[cache.entry_index(layer, head)];
        w = put(w, static_cast<std::uint64_t>(e.appended));
        w = put(w, static_cast<std::uint32_t>(e.sink_k.size() / d));
        w = put(w, static_cast<std::uint32_t>(e.window_k.size() / d));
        put_rows(e.sink_k);
        put_rows(e.sink_v);
        put_rows(e.window_k);
        put_rows(e.window_v);
        for_each_tier_index([&]<int I>() {
          const auto& p = std::get<I>(e.params);
          w = put_params(w, p.key);
          w = put_params(w, p.value);
          w = put(w, static_cast<std::uint8_t>(p.calibrated ? 1 : 0));
        });
        w = put(w, static_cast<std::uint32_t>(e.slots.size()));
        for (const block_slot& s : e.slots) {
          const auto& pool = cache.pool(s.level);
          const int fill = pool.fill(s.id);
          w = put(w, static_cast<std::uint8_t>(s.level));
          w = put(w, static_cast<std::uint16_t>(fill));
          for (int byte = 0; byte < max_block_tokens / 8; ++byte) {
            std::uint8_t bits = 0;
            for (int bit = 0; bit < 8; ++bit) {
              if (s.valid.test(static_cast<std::size_t>(byte * 8 + bit))) bits |= 1u << bit;
            }
            w = put(w, bits);
          }
          const tier_layout& lay = cache.layouts_[static_cast<int>(s.level)];
          const std::byte* block = pool.data(s.id);
          std::memcpy(w, block, used_key_bytes(lay, fill));
          std::memcpy(w + lay.key_bytes, block + lay.key_bytes, used_value_bytes(lay, fill));
          w += lay.block_bytes;  // the rest stays zero
        }
      }
    }

    const header_fields h = expected_header(cache);
    std::byte* p = out.data();
    constexpr char magic[8] = {'O', 'S', 'C', 'A', 'R', 'K', 'V', '\0'};
    std::memcpy(p, magic, 8);
    store_le<std::uint32_t>(p + 8, serial_version);
    store_le<std::uint32_t>(p + 12, static_cast<std::uint32_t>(serial_header_bytes));
    store_le<std::uint64_t>(p + 16, total - serial_header_bytes);
    store_le<std::uint64_t>(p + 24,
                            fnv1a64(std::span<const std::byte>(out).subspan(serial_header_bytes)));
    for (int t = 0; t < tier_count; ++t) store_le<std::uint64_t>(p + 32 + 8 * t, h.format_ids[t]);
    for (int i = 0; i < 7; ++i) store_le<std::uint32_t>(p + 56 + 4 * i, h.config[i]);
    for (int t = 0; t < tier_count; ++t) store_le<std::uint64_t>(p + 84 + 8 * t, h.block_bytes[t]);
    return out;
  }

  /// Bytes of a block record before the block bytes: tier, fill, valid mask.
  static constexpr std::size_t block_record_bytes = 1 + 2 + max_block_tokens / 8;

  /// Bytes of the head params and calibrated flags of all tiers in an entry.
  template <class Cache>
  static constexpr std::size_t tier_params_bytes() {
    std::size_t n = 0;
    for_each_tier_index([&]<int I>() {
      using KV = typename Cache::template tier_format<I>;
      n +=
          head_params_codec<typename quant::format_traits<typename KV::key>::head_params>::bytes +
          head_params_codec<typename quant::format_traits<typename KV::value>::head_params>::bytes +
          1;
    });
    return n;
  }

  template <class U>
  static std::byte* put(std::byte* w, U v) noexcept {
    store_le(w, v);
    return w + sizeof(U);
  }

  template <class P>
  static std::byte* put_params(std::byte* w, const P& params) {
    head_params_codec<P>::store(params, w);
    return w + head_params_codec<P>::bytes;
  }

  static std::size_t used_key_bytes(const tier_layout& lay, int fill) noexcept {
    return static_cast<std::size_t>(fill / lay.key_tile_tokens) * lay.key_tile_bytes;
  }
  static std::size_t used_value_bytes(const tier_layout& lay, int fill) noexcept {
    return static_cast<std::size_t>(fill / lay.value_tile_tokens) * lay.value_tile_bytes;
  }

  // ---- deserialize ----------------------------------------------------------------------------

  /// A block record that passed validation, waiting for the commit.
  struct pending_block {
    tier level;
    int fill;
    std::bitset<max_block_tokens> valid;
    std::size_t offset;   ///< of the block bytes in the input
    std::size_t summary;  ///< of its key min (then max) in the summaries
  };

  template <class Cache>
  static seq_id load(Cache& cache, std::span<const std::byte> bytes) {
    check_host<Cache>();
    const cache_config& c = cache.config();
    const int d = c.head_dim;
    const int chunk = cache.chunk_tokens();
    check_header(cache, bytes);

    using entry_type = typename Cache::entry;
    using sequence_type = typename Cache::sequence;
    const std::size_t entries = static_cast<std::size_t>(c.layers) * c.kv_heads;
    const std::span<const std::byte> payload = bytes.subspan(serial_header_bytes);

    // Every entry takes at least its fixed fields: reject a short payload before allocating.
    const std::size_t min_entry_bytes = 8 + 4 + 4 + tier_params_bytes<Cache>() + 4;
    OSCAR_CHECK(entries <= payload.size() / min_entry_bytes, errc::corrupt_data,
                "deserialize: payload_bytes = ", payload.size(),
                " is not allowed (allowed: at least ", entries * min_entry_bytes, " for the ",
                entries, " (layer, head) entries of this cache)");

    std::size_t min_block_record = std::numeric_limits<std::size_t>::max();
    std::size_t max_block_bytes = 0;
    for (int t = 0; t < tier_count; ++t) {
      const std::size_t bb = cache.pool(static_cast<tier>(t)).block_bytes();
      min_block_record = std::min(min_block_record, block_record_bytes + bb);
      max_block_bytes = std::max(max_block_bytes, bb);
    }

    sequence_type seq;
    seq.entries.resize(entries);
    std::vector<std::vector<pending_block>> blocks(entries);
    std::array<std::size_t, tier_count> needed{};
    std::vector<std::byte> block_copy(max_block_bytes);  // aligned for every block type
    std::vector<float> scratch;
    std::vector<float> summaries;  // per block: key min [head_dim], key max [head_dim]
    byte_reader in(payload, serial_header_bytes);

    constexpr std::uint64_t max_appended = std::uint64_t{1} << 62;
    const std::uint64_t max_window = static_cast<std::uint64_t>(c.window_tokens) + chunk - 1;
    const std::size_t row_bytes = static_cast<std::size_t>(d) * 2;

    for (int layer = 0; layer < c.layers; ++layer) {
      for (int head = 0; head < c.kv_heads; ++head) {
        const std::size_t index = cache.entry_index(layer, head);
        entry_type& e = seq.entries[index];
        in.where = serial_location{layer, head, -1};

        const auto appended = in.get<std::uint64_t>("appended");
        OSCAR_CHECK(appended <= max_appended, errc::corrupt_data, "deserialize: ", in.where,
                    ": appended = ", appended, " is not allowed (allowed: at most 2^62)");
        const auto n_sinks = in.get<std::uint32_t>("n_sinks");
        const auto n_window = in.get<std::uint32_t>("n_window");
        OSCAR_CHECK(n_sinks <= static_cast<std::uint32_t>(c.sink_tokens) && n_sinks <= appended,
                    errc::corrupt_data, "deserialize: ", in.where, ": n_sinks = ", n_sinks,
                    " is not allowed (allowed: at most sink_tokens = ", c.sink_tokens,
                    " and at most appended = ", appended, ")");
        OSCAR_CHECK(n_window <= max_window, errc::corrupt_data, "deserialize: ", in.where,
                    ": n_window = ", n_window, " is not allowed (allowed: at most "
                    "window_tokens + chunk_tokens - 1 = ", max_window, ")");
        e.appended = static_cast<index_t>(appended);
        read_rows(in, n_sinks, row_bytes, e.sink_k, "sink K rows");
        read_rows(in, n_sinks, row_bytes, e.sink_v, "sink V rows");
        read_rows(in, n_window, row_bytes, e.window_k, "window K rows");
        read_rows(in, n_window, row_bytes, e.window_v, "window V rows");

        for_each_tier_index([&]<int I>() {
          auto& p = std::get<I>(e.params);
          p.key = get_params<decltype(p.key)>(in);
          p.value = get_params<decltype(p.value)>(in);
          const auto flag = in.get<std::uint8_t>("calibrated flag");
          OSCAR_CHECK(flag <= 1, errc::corrupt_data, "deserialize: ", in.where,
                      ": calibrated flag of tier ", to_string(static_cast<tier>(I)), " = ",
                      static_cast<int>(flag), " is not allowed (allowed: 0 or 1)");
          p.calibrated = flag == 1;
          if (p.calibrated) {
            check_params(in, p.key, I, "key");
            check_params(in, p.value, I, "value");
          } else {
            check_default_params(in, p.key, I, "key");
            check_default_params(in, p.value, I, "value");
          }
        });

        const auto n_blocks = in.get<std::uint32_t>("n_blocks");
        OSCAR_CHECK(n_blocks <= in.left() / min_block_record, errc::corrupt_data,
                    "deserialize: ", in.where, ": n_blocks = ", n_blocks,
                    " is not allowed (allowed: at most ", in.left() / min_block_record,
                    ", as many block records as the ", in.left(), " remaining bytes can hold)");
        std::uint64_t held = std::uint64_t{n_sinks} + n_window;
        std::vector<pending_block>& table = blocks[index];
        table.reserve(n_blocks);
        for (std::uint32_t b = 0; b < n_blocks; ++b) {
          in.where.block = b;
          const auto level = in.get<std::uint8_t>("tier");
          OSCAR_CHECK(level < tier_count, errc::corrupt_data, "deserialize: ", in.where,
                      ": tier = ", static_cast<int>(level),
                      " is not allowed (allowed: 0 full, 1 mid or 2 low)");
          const auto fill = in.get<std::uint16_t>("fill");
          OSCAR_CHECK(fill > 0 && fill % chunk == 0 && fill <= c.block_tokens, errc::corrupt_data,
                      "deserialize: ", in.where, ": fill = ", fill,
                      " is not allowed (allowed: a positive multiple of chunk_tokens = ", chunk,
                      " up to block_tokens = ", c.block_tokens, ")");
          const std::byte* mask = in.take(max_block_tokens / 8, "valid mask");
          std::bitset<max_block_tokens> valid;
          for (int i = 0; i < max_block_tokens; ++i) {
            if ((std::to_integer<unsigned>(mask[i / 8]) >> (i % 8)) & 1u)
              valid.set(static_cast<std::size_t>(i));
          }
          OSCAR_CHECK(valid.any(), errc::corrupt_data, "deserialize: ", in.where,
                      ": the valid mask is empty (allowed: at least one valid token; blocks "
                      "without any are freed, never stored)");
          for (int i = fill; i < max_block_tokens; ++i) {
            OSCAR_CHECK(!valid.test(static_cast<std::size_t>(i)), errc::corrupt_data,
                        "deserialize: ", in.where, ": valid mask bit ", i,
                        " is set (allowed: bits below fill = ", fill, " only)");
          }
          const std::size_t offset = in.offset();
          const std::byte* data =
              in.take(cache.pool(static_cast<tier>(level)).block_bytes(), "block bytes");
          const std::size_t summary = summaries.size();
          summaries.resize(summary + 2 * static_cast<std::size_t>(d));
          const std::span<float> key_min(summaries.data() + summary, static_cast<std::size_t>(d));
          const std::span<float> key_max(summaries.data() + summary + d,
                                         static_cast<std::size_t>(d));
          switch (static_cast<tier>(level)) {
            case tier::full:
              check_block<0>(cache, e, in.where, data, fill, offset, block_copy, scratch, key_min,
                             key_max);
              break;
            case tier::mid:
              check_block<1>(cache, e, in.where, data, fill, offset, block_copy, scratch, key_min,
                             key_max);
              break;
            case tier::low:
              check_block<2>(cache, e, in.where, data, fill, offset, block_copy, scratch, key_min,
                             key_max);
              break;
          }
          table.push_back(pending_block{static_cast<tier>(level), fill, valid, offset, summary});
          ++needed[level];
          held += fill;
        }
        in.where.block = -1;
        OSCAR_CHECK(held <= appended, errc::corrupt_data, "deserialize: ", in.where, ": ", held,
                    " tokens held (sinks, block fills, window) are not allowed with appended = ",
                    appended, " (allowed: at most as many as were appended)");
        OSCAR_CHECK(appended > static_cast<std::uint64_t>(c.sink_tokens) ||
                        (n_window == 0 && n_blocks == 0),
                    errc::corrupt_data, "deserialize: ", in.where, ": appended = ", appended,
                    " with ", n_window, " window rows and ", n_blocks,
                    " blocks is not allowed (allowed: while appended <= sink_tokens = ",
                    c.sink_tokens, ", every token is a sink)");
      }
    }
    in.where = {};
    OSCAR_CHECK(in.left() == 0, errc::corrupt_data, "deserialize: ", in.left(),
                " bytes follow the last entry at offset ", in.offset(),
                " (allowed: none; payload_bytes must end with the last entry)");

    cache.check_free(needed, "deserialize");
    return commit(cache, std::move(seq), blocks, summaries, bytes);
  }

  template <class Cache>
  static void check_header(const Cache& cache, std::span<const std::byte> bytes) {
    OSCAR_CHECK(bytes.size() >= serial_header_bytes, errc::corrupt_data,
                "deserialize: ", bytes.size(), " bytes are not allowed (allowed: at least the ",
                serial_header_bytes, "-byte header)");
    const std::byte* p = bytes.data();
    constexpr char magic[8] = {'O', 'S', 'C', 'A', 'R', 'K', 'V', '\0'};
    OSCAR_CHECK(std::memcmp(p, magic, 8) == 0, errc::corrupt_data,
                "deserialize: magic is not \"OSCARKV\\0\" (allowed: bytes written by "
                "oscar::cache::serialize)");
    const auto version = load_le<std::uint32_t>(p + 8);
    OSCAR_CHECK(version == serial_version, errc::corrupt_data, "deserialize: version = ", version,
                " is not allowed (expected ", serial_version, ", the version this build reads)");
    const auto header_bytes = load_le<std::uint32_t>(p + 12);
    OSCAR_CHECK(header_bytes == serial_header_bytes, errc::corrupt_data,
                "deserialize: header_bytes = ", header_bytes, " is not allowed (expected ",
                serial_header_bytes, " in version ", serial_version, ")");
    const auto payload_bytes = load_le<std::uint64_t>(p + 16);
    const std::size_t actual = bytes.size() - serial_header_bytes;
    OSCAR_CHECK(payload_bytes == actual, errc::corrupt_data,
                "deserialize: payload_bytes = ", payload_bytes, " is not allowed (expected ",
                actual, ", the bytes after the header: truncated or extended input)");
    const auto checksum = load_le<std::uint64_t>(p + 24);
    const std::uint64_t computed = fnv1a64(bytes.subspan(serial_header_bytes));
    OSCAR_CHECK(checksum == computed, errc::corrupt_data,
                "deserialize: checksum = ", hex64{checksum}, " is not allowed (expected ",
                hex64{computed}, ", the FNV-1a 64 of the payload: the bytes were damaged)");

    const header_fields want = expected_header(cache);
    for_each_tier_index([&]<int I>() {
      using KV = typename Cache::template tier_format<I>;
      const auto got = load_le<std::uint64_t>(p + 32 + 8 * I);
      OSCAR_CHECK(got == want.format_ids[I], errc::corrupt_data, "deserialize: format id of tier ",
                  to_string(static_cast<tier>(I)), " = ", hex64{got}, " is not allowed (expected ",
                  hex64{want.format_ids[I]}, ": this cache stores tier ",
                  to_string(static_cast<tier>(I)), " as key format '",
                  quant::format_traits<typename KV::key>::name, "', value format '",
                  quant::format_traits<typename KV::value>::name, "')");
    });
    for (int i = 0; i < 7; ++i) {
      const auto got = load_le<std::uint32_t>(p + 56 + 4 * i);
      OSCAR_CHECK(got == want.config[i], errc::corrupt_data, "deserialize: ", config_names[i],
                  " = ", got, " is not allowed (expected ", want.config[i], ", this cache's ",
                  config_names[i], ")");
    }
    for (int t = 0; t < tier_count; ++t) {
      const auto got = load_le<std::uint64_t>(p + 84 + 8 * t);
      OSCAR_CHECK(got == want.block_bytes[t], errc::corrupt_data,
                  "deserialize: block_bytes of tier ", to_string(static_cast<tier>(t)), " = ", got,
                  " is not allowed (expected ", want.block_bytes[t], ", this cache's)");
    }
  }

  static void read_rows(byte_reader& in, std::uint32_t rows, std::size_t row_bytes,
                        std::vector<half>& out, std::string_view what) {
    const std::byte* p = in.take_items(rows, row_bytes, what);
    const std::size_t count = static_cast<std::size_t>(rows) * (row_bytes / 2);
    out.resize(count);
    for (std::size_t i = 0; i < count; ++i) {
      const auto bits = load_le<std::uint16_t>(p + 2 * i);
      OSCAR_CHECK((bits & 0x7c00u) != 0x7c00u, errc::corrupt_data, "deserialize: ", in.where, ": ",
                  what, ": element ", i, " (row ", i / (row_bytes / 2), ", channel ",
                  i % (row_bytes / 2), ") is ", half_bits_to_float(bits),
                  " (allowed: finite fp16 values)");
      out[i] = half::from_bits(bits);
    }
  }

  template <class P>
  static P get_params(byte_reader& in) {
    if constexpr (head_params_codec<P>::bytes == 0) {
      return head_params_codec<P>::load(nullptr);
    } else {
      return head_params_codec<P>::load(in.take(head_params_codec<P>::bytes, "head params"));
    }
  }

  template <class P>
  static void check_params(const byte_reader& in, const P& params, int t, std::string_view which) {
    const std::string problem = head_params_codec<P>::problem(params);
    OSCAR_CHECK(problem.empty(), errc::corrupt_data, "deserialize: ", in.where, ": ", which,
                " head params of tier ", to_string(static_cast<tier>(t)), ": ", problem);
  }

  template <class P>
  static void check_default_params(const byte_reader& in, const P& params, int t,
                                   std::string_view which) {
    constexpr std::size_t n = head_params_codec<P>::bytes;
    std::byte got[n + 1] = {}, want[n + 1] = {};
    head_params_codec<P>::store(params, got);
    head_params_codec<P>::store(P{}, want);
    OSCAR_CHECK(std::memcmp(got, want, n) == 0, errc::corrupt_data, "deserialize: ", in.where, ": ",
                which, " head params of tier ", to_string(static_cast<tier>(t)),
                " are set but the tier is not calibrated (allowed: default params until the "
                "tier is calibrated)");
  }

  /// Unused bytes zero; keys and values of [0, fill) decode to finite values. Writes the key
  /// summary of the block: per channel, the min and max decoded key of tokens [0, fill), taken
  /// in token order as `kv_cache::update_summary` takes them.
  template <int I, class Cache>
  static void check_block(const Cache& cache, const typename Cache::entry& e,
                          const serial_location& where, const std::byte* data, int fill,
                          std::size_t offset, std::vector<std::byte>& block_copy,
                          std::vector<float>& scratch, std::span<float> key_min,
                          std::span<float> key_max) {
    using KV = typename Cache::template tier_format<I>;
    using V = quant::format_traits<typename KV::value>;
    const auto& params = std::get<I>(e.params);
    OSCAR_CHECK(params.calibrated, errc::corrupt_data, "deserialize: ", where, ": tier ",
                to_string(static_cast<tier>(I)),
                " is not calibrated (allowed: blocks only in tiers whose head params are "
                "calibrated)");
    const tier_layout& lay = cache.layouts_[I];
    const std::size_t key_used = used_key_bytes(lay, fill);
    const std::size_t value_end = lay.key_bytes + used_value_bytes(lay, fill);
    const auto check_zero = [&](std::size_t from, std::size_t to) {
      for (std::size_t i = from; i < to; ++i) {
        OSCAR_CHECK(data[i] == std::byte{0}, errc::corrupt_data, "deserialize: ", where,
                    ": block byte ", i, " (offset ", offset + i,
                    ") = ", std::to_integer<int>(data[i]),
                    " is not allowed (allowed: 0 outside the "
                    "tiles of the ",
                    fill, " filled tokens)");
      }
    };
    check_zero(key_used, lay.key_bytes);
    check_zero(value_end, lay.block_bytes);

    // Decode from an aligned copy: format blocks may hold 2-byte fields.
    std::memcpy(block_copy.data(), data, lay.block_bytes);
    const std::size_t d = static_cast<std::size_t>(cache.config().head_dim);
    cache.template decode_keys<I>(block_copy.data(), params.key, 0, fill, scratch);
    check_finite(scratch, d, where, "key");
    for (std::size_t t = 0; t < static_cast<std::size_t>(fill); ++t) {
      for (std::size_t ch = 0; ch < d; ++ch) {
        const float x = scratch[t * d + ch];
        key_min[ch] = t == 0 ? x : std::min(key_min[ch], x);
        key_max[ch] = t == 0 ? x : std::max(key_max[ch], x);
      }
    }
    scratch.resize(static_cast<std::size_t>(fill) * d);
    for (int t = 0; t < fill; t += lay.value_tile_tokens) {
      const auto* tile = reinterpret_cast<const typename V::block*>(
          block_copy.data() + lay.key_bytes + (t / lay.value_tile_tokens) * lay.value_tile_bytes);
      V::decode_tile(tile, static_cast<int>(d), params.value,
                     scratch.data() + static_cast<std::size_t>(t) * d);
    }
    check_finite(scratch, d, where, "value");
  }

  static void check_finite(const std::vector<float>& x, std::size_t d, const serial_location& where,
                           std::string_view what) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      OSCAR_CHECK(std::isfinite(x[i]), errc::corrupt_data, "deserialize: ", where, ": ", what,
                  " of token ", i / d, ", channel ", i % d, " decodes to ", x[i],
                  " (allowed: finite values; the block's bytes or the tier's head params are "
                  "corrupt)");
    }
  }

  /// Nothing below fails except by std::bad_alloc, after which every taken block is returned.
  template <class Cache>
  static seq_id commit(Cache& cache, typename Cache::sequence&& seq,
                       const std::vector<std::vector<pending_block>>& blocks,
                       const std::vector<float>& summaries, std::span<const std::byte> bytes) {
    const std::size_t d = static_cast<std::size_t>(cache.config().head_dim);
    std::size_t total = 0;
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      seq.entries[i].slots.reserve(blocks[i].size());
      total += blocks[i].size();
    }
    std::vector<std::pair<tier, block_id>> taken;
    taken.reserve(total);
    try {
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        auto& e = seq.entries[i];
        for (const pending_block& b : blocks[i]) {
          auto& pool = cache.pool_mut(b.level);
          const block_id id = pool.allocate();
          taken.emplace_back(b.level, id);
          std::memcpy(pool.data(id), bytes.data() + b.offset, pool.block_bytes());
          pool.set_fill(id, b.fill);
          pool.set_key_bounds(id, std::span(summaries.data() + b.summary, d),
                              std::span(summaries.data() + b.summary + d, d));
          e.slots.push_back(block_slot{b.level, id, b.valid});
        }
      }
      const seq_id id = cache.next_id_;
      cache.sequences_.emplace(id, std::move(seq));
      ++cache.next_id_;
      return id;
    } catch (...) {
      for (const auto& [level, id] : taken) cache.pool_mut(level).release(id);
      throw;
    }
  }
};

}  // namespace detail

/// Writes every (layer, KV head) entry of sequence `seq` of `cache` in the byte layout of the
/// file comment. Throws `oscar::error` (invalid_argument) for an unknown sequence.
template <class Cache>
requires detail::is_kv_cache<Cache>::value [[nodiscard]] std::vector<std::byte> serialize(
    const Cache& cache, seq_id seq) {
  static_assert(has_fp16_window_v<Cache>,
                "oscar::cache::serialize: version 1 of the page layout stores sinks and windows "
                "in fp16; caches whose full tier is kv_fp32 (fp32 windows, for reference runs) "
                "cannot be serialized");
  return detail::serializer::save(cache, seq);
}

/// Creates a new sequence in `cache` from `bytes` (untrusted, as `serialize` writes them, for a
/// cache of the same formats and config) and returns its id. Throws `oscar::error`:
/// `corrupt_data` for any invalid or mismatched input, `out_of_memory` when a pool lacks room;
/// the cache is then unchanged.
template <class Cache>
requires detail::is_kv_cache<Cache>::value seq_id deserialize(Cache& cache,
                                                              std::span<const std::byte> bytes) {
  static_assert(has_fp16_window_v<Cache>,
                "oscar::cache::deserialize: version 1 of the page layout stores sinks and windows "
                "in fp16; caches whose full tier is kv_fp32 (fp32 windows) cannot import pages");
  return detail::serializer::load(cache, bytes);
}

}  // namespace oscar::cache
