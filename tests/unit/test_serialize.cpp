// SPDX-License-Identifier: Apache-2.0
// Serialization of kv_cache sequences (oscar/cache/serialize.hpp): exact round trips, and
// untrusted bytes (truncated, bit-flipped, semantically corrupt behind a valid checksum,
// mismatched config) rejected with the cache unchanged.
//
// The byte layout is parsed here independently of the library (`walk`), from the documentation
// in serialize.hpp, so the tests also check that the documentation is right.

#include <algorithm>
#include <array>
#include <bit>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "oscar/cache/kv_cache.hpp"
#include "oscar/cache/serialize.hpp"
#include "oscar/core/error.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace {

using namespace oscar;
using namespace oscar::cache;
using bytes_t = std::vector<std::byte>;

// Chunk 1 (16-token blocks hold many partial chunks): low FP2+ with per-token keys
// (fpq_head_params for keys and values), mid fp4plus, full fp16.
using per_token_cache = kv_cache<quant::fp2plus_kh, quant::fp4plus, quant::kv_fp16>;
using default_cache = kv_cache<>;  // FP2+ keys in 64-token tiles: chunk 64
using kivi_cache = kv_cache<quant::kivi2, quant::kivi4, quant::kv_fp16>;    // chunk 32
using fp8_cache = kv_cache<quant::fp2plus_kh, quant::kv_fp8, quant::kv_fp16>;  // e4m3_head_params

constexpr std::size_t header_bytes = 108;

// ---- errors ---------------------------------------------------------------------------------

template <class F>
std::optional<oscar::error> thrown_by(F&& f) {
  try {
    f();
  } catch (const oscar::error& e) {
    return e;
  }
  return std::nullopt;
}

// ---- caches and data ------------------------------------------------------------------------

/// Puts blocks in every tier: the tier cycles with the block index, head and layer.
tier mixed_policy(const block_request& r) {
  return static_cast<tier>((r.block_index + r.head + r.layer) % tier_count);
}

constexpr tier_budget roomy{std::size_t{4} << 20, std::size_t{4} << 20, std::size_t{4} << 20};

template <class Cache>
struct setup;
template <>
struct setup<per_token_cache> {
  static cache_config config() { return {2, 2, 64, 16, 4, 8}; }
  static constexpr int tokens = 90;  // enough for several blocks per head in every tier
  static constexpr std::array<int, 6> params{0, 0, 0, 0, 1, 1};  // key/value bytes per tier
};
template <>
struct setup<default_cache> {
  static cache_config config() { return {2, 2, 64, 128, 4, 70}; }
  static constexpr int tokens = 600;
  static constexpr std::array<int, 6> params{0, 0, 0, 0, 0, 1};
};
template <>
struct setup<kivi_cache> {
  static cache_config config() { return {2, 2, 64, 64, 4, 16}; }
  static constexpr int tokens = 400;
  static constexpr std::array<int, 6> params{0, 0, 0, 0, 0, 0};
};
template <>
struct setup<fp8_cache> {
  static cache_config config() { return {2, 2, 64, 16, 4, 8}; }
  static constexpr int tokens = 90;
  static constexpr std::array<int, 6> params{0, 0, 4, 4, 1, 1};
};

/// Appends `tokens` tokens to every layer of `seq`, in uneven pieces.
template <class Cache>
void feed(Cache& cache, seq_id seq, int tokens, std::uint64_t seed) {
  const cache_config& c = cache.config();
  for (int layer = 0; layer < c.layers; ++layer) {
    const auto k = testing::synthetic_keys(tokens, c.kv_heads, c.head_dim, seed + 2 * layer);
    const auto v = testing::synthetic_values(tokens, c.kv_heads, c.head_dim, seed + 2 * layer + 1);
    const int pieces[] = {1, 3, 7, 2, 31};
    int done = 0;
    for (int i = 0; done < tokens; ++i) {
      const int n = std::min(i < 5 ? pieces[i] : tokens, tokens - done);
      cache.append(seq, layer, k.view().slice_tokens(done, n), v.view().slice_tokens(done, n));
      done += n;
    }
  }
}

std::vector<std::uint32_t> bits_of(const std::vector<float>& x) {
  std::vector<std::uint32_t> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = std::bit_cast<std::uint32_t>(x[i]);
  return out;
}
std::vector<std::uint32_t> bits_of(std::span<const oscar::half> x) {
  std::vector<std::uint32_t> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i].bits;
  return out;
}

/// Everything observable about some sequences of a cache, bit-exact: gathered K/V, block
/// tables with fills and key summaries, and usage().
struct cache_state {
  std::vector<std::vector<std::uint32_t>> data;
  std::vector<std::uint64_t> counters;
  bool operator==(const cache_state&) const = default;
};

template <class Cache>
cache_state state_of(const Cache& cache, std::span<const seq_id> seqs) {
  cache_state s;
  const cache_config& c = cache.config();
  for (const seq_id id : seqs) {
    for (int layer = 0; layer < c.layers; ++layer) {
      for (const gathered_head& g : cache.gather(id, layer)) {
        s.data.push_back(bits_of(g.k));
        s.data.push_back(bits_of(g.v));
      }
      for (int head = 0; head < c.kv_heads; ++head) {
        for (const block_slot& b : cache.blocks(id, layer, head)) {
          const auto& pool = cache.pool(b.level);
          s.counters.push_back(static_cast<std::uint64_t>(b.level));
          s.counters.push_back(b.id);
          s.counters.push_back(static_cast<std::uint64_t>(pool.fill(b.id)));
          s.counters.push_back(pool.refcount(b.id));
          for (int w = 0; w < max_block_tokens; w += 64) {
            s.counters.push_back(
                ((b.valid >> w) & std::bitset<max_block_tokens>(~0ull)).to_ullong());
          }
          s.data.push_back(bits_of(pool.key_min(b.id)));
          s.data.push_back(bits_of(pool.key_max(b.id)));
        }
      }
    }
  }
  const cache_usage u = cache.usage();
  for (const tier_usage& t : u.tiers) {
    for (const std::size_t x : {t.block_bytes, t.capacity, t.used, t.free}) s.counters.push_back(x);
  }
  s.counters.push_back(u.window_bytes);
  s.counters.push_back(static_cast<std::uint64_t>(u.sequences));
  s.counters.push_back(static_cast<std::uint64_t>(u.token_heads));
  return s;
}

/// The imported sequence `b` of `cb` equals `a` of `ca` bit for bit: gathers, block tables
/// (tiers, fills, masks), key summaries.
template <class Cache>
void require_same_sequence(const Cache& ca, seq_id a, const Cache& cb, seq_id b) {
  const cache_config& c = ca.config();
  for (int layer = 0; layer < c.layers; ++layer) {
    const auto ga = ca.gather(a, layer);
    const auto gb = cb.gather(b, layer);
    REQUIRE(ga.size() == gb.size());
    for (std::size_t h = 0; h < ga.size(); ++h) {
      REQUIRE(ga[h].tokens == gb[h].tokens);
      REQUIRE(bits_of(ga[h].k) == bits_of(gb[h].k));
      REQUIRE(bits_of(ga[h].v) == bits_of(gb[h].v));
    }
    for (int head = 0; head < c.kv_heads; ++head) {
      const auto ta = ca.blocks(a, layer, head);
      const auto tb = cb.blocks(b, layer, head);
      REQUIRE(ta.size() == tb.size());
      for (std::size_t i = 0; i < ta.size(); ++i) {
        REQUIRE(ta[i].level == tb[i].level);
        REQUIRE(ta[i].valid == tb[i].valid);
        const auto& pa = ca.pool(ta[i].level);
        const auto& pb = cb.pool(tb[i].level);
        REQUIRE(pa.fill(ta[i].id) == pb.fill(tb[i].id));
        REQUIRE(bits_of(pa.key_min(ta[i].id)) == bits_of(pb.key_min(tb[i].id)));
        REQUIRE(bits_of(pa.key_max(ta[i].id)) == bits_of(pb.key_max(tb[i].id)));
      }
    }
  }
}

template <class Cache>
std::array<std::size_t, tier_count> blocks_per_tier(const Cache& cache, seq_id seq) {
  std::array<std::size_t, tier_count> n{};
  const cache_config& c = cache.config();
  for (int layer = 0; layer < c.layers; ++layer)
    for (int head = 0; head < c.kv_heads; ++head)
      for (const block_slot& b : cache.blocks(seq, layer, head)) ++n[static_cast<int>(b.level)];
  return n;
}

// ---- the byte layout, parsed independently ---------------------------------------------------

std::uint64_t fnv1a64(std::span<const std::byte> bytes) {
  std::uint64_t h = 14695981039346656037ull;
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

template <class U>
U get(const bytes_t& b, std::size_t at) {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i)
    v |= static_cast<U>(static_cast<U>(static_cast<std::uint8_t>(b[at + i])) << (8 * i));
  return v;
}
template <class U>
void set(bytes_t& b, std::size_t at, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i)
    b[at + i] = static_cast<std::byte>(static_cast<std::uint8_t>(v >> (8 * i)));
}

/// Rewrites payload_bytes and the checksum so that only the payload's meaning is wrong.
void reseal(bytes_t& b) {
  set<std::uint64_t>(b, 16, b.size() - header_bytes);
  set<std::uint64_t>(b, 24, fnv1a64(std::span<const std::byte>(b).subspan(header_bytes)));
}

struct block_at {
  std::size_t tier, fill, mask, bytes;  // offsets
  int level, fill_value;
  std::size_t block_bytes;
};
struct entry_at {
  std::size_t appended, n_sinks, n_window, sink_k, sink_v, window_k, window_v, n_blocks;
  std::array<std::size_t, 3> key_params, value_params, calibrated;
  std::uint32_t sinks, window;
  std::vector<block_at> blocks;
};

/// Offsets of every field, per the layout documented in serialize.hpp.
std::vector<entry_at> walk(const bytes_t& b, const std::array<int, 6>& params) {
  const std::size_t entries = std::size_t{get<std::uint32_t>(b, 56)} * get<std::uint32_t>(b, 60);
  const std::size_t d = get<std::uint32_t>(b, 64);
  std::size_t at = header_bytes;
  std::vector<entry_at> out;
  for (std::size_t i = 0; i < entries; ++i) {
    entry_at e{};
    e.appended = at;
    e.n_sinks = at + 8;
    e.n_window = at + 12;
    e.sinks = get<std::uint32_t>(b, e.n_sinks);
    e.window = get<std::uint32_t>(b, e.n_window);
    at += 16;
    e.sink_k = at;
    e.sink_v = at + e.sinks * d * 2;
    at += 2 * e.sinks * d * 2;
    e.window_k = at;
    e.window_v = at + e.window * d * 2;
    at += 2 * e.window * d * 2;
    for (int t = 0; t < 3; ++t) {
      e.key_params[t] = at;
      at += static_cast<std::size_t>(params[2 * t]);
      e.value_params[t] = at;
      at += static_cast<std::size_t>(params[2 * t + 1]);
      e.calibrated[t] = at;
      at += 1;
    }
    e.n_blocks = at;
    const auto n = get<std::uint32_t>(b, at);
    at += 4;
    for (std::uint32_t k = 0; k < n; ++k) {
      block_at blk{};
      blk.tier = at;
      blk.level = static_cast<int>(b[at]);
      blk.fill = at + 1;
      blk.fill_value = get<std::uint16_t>(b, at + 1);
      blk.mask = at + 3;
      blk.bytes = at + 35;
      blk.block_bytes = get<std::uint64_t>(b, 84 + 8 * static_cast<std::size_t>(blk.level));
      at = blk.bytes + blk.block_bytes;
      e.blocks.push_back(blk);
    }
    out.push_back(e);
  }
  REQUIRE(at == b.size());  // the documented layout accounts for every byte
  return out;
}

/// Imports `bytes` into `cache` expecting `code` with a message containing `needle`, and the
/// cache (its sequences `seqs`) unchanged.
template <class Cache>
void expect_refused(Cache& cache, const bytes_t& bytes, std::span<const seq_id> seqs,
                    std::string_view needle, errc code = errc::corrupt_data) {
  const cache_state before = state_of(cache, seqs);
  const auto count = cache.sequence_count();
  const auto e = thrown_by([&] { (void)deserialize(cache, bytes); });
  REQUIRE(e.has_value());
  INFO(e->what());
  CHECK(e->code() == code);
  CHECK(std::string_view(e->what()).find(needle) != std::string_view::npos);
  CHECK(cache.sequence_count() == count);
  CHECK(state_of(cache, seqs) == before);
}

}  // namespace

// ---- round trips ----------------------------------------------------------------------------

TEMPLATE_TEST_CASE("serialize: a round trip restores the sequence exactly", "[cache][serialize]",
                   per_token_cache, default_cache, kivi_cache, fp8_cache) {
  using S = setup<TestType>;
  TestType cache(S::config(), roomy, mixed_policy);
  const seq_id a = cache.create();
  feed(cache, a, S::tokens, 11);
  const auto tiers = blocks_per_tier(cache, a);
  for (int t = 0; t < tier_count; ++t) REQUIRE(tiers[t] > 0);  // every tier is exercised

  const bytes_t bytes = serialize(cache, a);
  const seq_id b = deserialize(cache, bytes);
  REQUIRE(b != a);
  REQUIRE(cache.sequence_count() == 2);
  require_same_sequence(cache, a, cache, b);
  CHECK(serialize(cache, b) == bytes);  // canonical

  // Into another cache with the same config and formats.
  TestType other(S::config(), roomy, mixed_policy);
  const seq_id c = deserialize(other, bytes);
  require_same_sequence(cache, a, other, c);

  // Further appends behave identically (same sinks, windows, params, fills and summaries).
  feed(cache, a, 75, 99);
  feed(cache, b, 75, 99);
  feed(other, c, 75, 99);
  require_same_sequence(cache, a, cache, b);
  require_same_sequence(cache, a, other, c);
  CHECK(serialize(cache, a) == serialize(cache, b));
  CHECK(serialize(cache, a) == serialize(other, c));

  // The import owns its blocks: freeing the original leaves it intact.
  const bytes_t after = serialize(cache, b);
  cache.free(a);
  CHECK(serialize(cache, b) == after);
  cache.free(b);
  const cache_usage u = cache.usage();
  for (const tier_usage& t : u.tiers) CHECK(t.used == 0);
}

TEMPLATE_TEST_CASE("serialize: round trips after evict, compact and fork", "[cache][serialize]",
                   per_token_cache, default_cache, kivi_cache, fp8_cache) {
  using S = setup<TestType>;
  TestType cache(S::config(), roomy, mixed_policy);
  const seq_id a = cache.create();
  feed(cache, a, S::tokens, 5);
  const seq_id f = cache.fork(a);  // shares a's blocks

  const cache_config& c = cache.config();
  for (int layer = 0; layer < c.layers; ++layer) {
    for (int head = 0; head < c.kv_heads; ++head) {
      const index_t n = cache.tokens(a, layer, head);
      // A sink, block tokens spread over the table, and the newest window token.
      std::vector<index_t> positions{1, n - 1};
      for (index_t p = c.sink_tokens + head; p < n - c.window_tokens; p += 5 + layer) {
        positions.push_back(p);
      }
      cache.evict(a, layer, head, positions);
      const index_t left = cache.tokens(a, layer, head);
      std::vector<float> importance(static_cast<std::size_t>(left));
      for (index_t i = 0; i < left; ++i) importance[i] = std::sin(0.37f * static_cast<float>(i));
      if (head == 0) cache.compact(a, layer, head, importance);
    }
  }

  for (const seq_id s : {a, f}) {
    const bytes_t bytes = serialize(cache, s);
    const seq_id copy = deserialize(cache, bytes);
    require_same_sequence(cache, s, cache, copy);
    CHECK(serialize(cache, copy) == bytes);
    feed(cache, s, 40, 21);
    feed(cache, copy, 40, 21);
    require_same_sequence(cache, s, cache, copy);
    CHECK(serialize(cache, s) == serialize(cache, copy));
  }
}

TEST_CASE("serialize: empty and sinks-only sequences", "[cache][serialize]") {
  per_token_cache cache(setup<per_token_cache>::config(), roomy, mixed_policy);
  const seq_id empty = cache.create();
  const bytes_t bytes = serialize(cache, empty);
  // 4 entries of appended, n_sinks, n_window, 3 x (no params + flag), fp2plus 2 x 1 byte,
  // n_blocks.
  CHECK(bytes.size() == header_bytes + 4 * (8 + 4 + 4 + 3 + 2 + 4));
  const seq_id e2 = deserialize(cache, bytes);
  CHECK(cache.tokens(e2, 1, 1) == 0);
  CHECK(serialize(cache, e2) == bytes);

  const seq_id few = cache.create();
  feed(cache, few, 3, 1);  // fewer than sink_tokens: every token is a sink
  const bytes_t few_bytes = serialize(cache, few);
  const seq_id f2 = deserialize(cache, few_bytes);
  require_same_sequence(cache, few, cache, f2);
  feed(cache, few, 20, 2);
  feed(cache, f2, 20, 2);
  require_same_sequence(cache, few, cache, f2);
}

TEST_CASE("serialize: the header is as documented", "[cache][serialize]") {
  per_token_cache cache(setup<per_token_cache>::config(), roomy, mixed_policy);
  const seq_id a = cache.create();
  feed(cache, a, 40, 3);
  const bytes_t b = serialize(cache, a);
  REQUIRE(b.size() > header_bytes);
  CHECK(std::memcmp(b.data(), "OSCARKV\0", 8) == 0);
  CHECK(get<std::uint32_t>(b, 8) == 1);
  CHECK(get<std::uint32_t>(b, 12) == header_bytes);
  CHECK(get<std::uint64_t>(b, 16) == b.size() - header_bytes);
  CHECK(get<std::uint64_t>(b, 24) == fnv1a64(std::span<const std::byte>(b).subspan(header_bytes)));

  // Format ids: FNV-1a 64 of key name, 0, value name, 0, tier name.
  const auto id = [](std::string_view key, std::string_view value, std::string_view tier_name) {
    std::string text(key);
    text.push_back('\0');
    text += value;
    text.push_back('\0');
    text += tier_name;
    return fnv1a64(std::as_bytes(std::span(text.data(), text.size())));
  };
  CHECK(get<std::uint64_t>(b, 32) == id("fp16", "fp16", "full"));
  CHECK(get<std::uint64_t>(b, 40) == id(quant::format_traits<quant::fp4plus_key>::name,
                                        quant::format_traits<quant::fp4plus_value>::name, "mid"));
  CHECK(get<std::uint64_t>(b, 48) == id("fp2-lm-g16h-e4m3-rot", "fp2-lm-g16h-e4m3-rot", "low"));

  const cache_config c = cache.config();
  const std::uint32_t config[7] = {2, 2, 64, 16, 4, 8, 1};
  REQUIRE(c.layers == 2);
  for (int i = 0; i < 7; ++i)
    CHECK(get<std::uint32_t>(b, 56 + 4 * static_cast<std::size_t>(i)) == config[i]);
  for (int t = 0; t < tier_count; ++t) {
    CHECK(get<std::uint64_t>(b, 84 + 8 * static_cast<std::size_t>(t)) ==
          std::as_const(cache).pool(static_cast<tier>(t)).block_bytes());
  }

  // Payload: the walker accounts for every byte; entry fields match the cache.
  const auto entries = walk(b, setup<per_token_cache>::params);
  REQUIRE(entries.size() == 4);
  for (int layer = 0; layer < 2; ++layer) {
    for (int head = 0; head < 2; ++head) {
      const entry_at& e = entries[static_cast<std::size_t>(layer * 2 + head)];
      CHECK(get<std::uint64_t>(b, e.appended) == 40);
      CHECK(e.sinks == 4);
      const auto table = cache.blocks(a, layer, head);
      REQUIRE(e.blocks.size() == table.size());
      CHECK(cache.tokens(a, layer, head) == e.sinks + e.window + [&] {
        index_t n = 0;
        for (const block_slot& s : table) n += static_cast<index_t>(s.valid.count());
        return n;
      }());
      const auto g = cache.gather(a, layer)[static_cast<std::size_t>(head)];
      // The first sink K value is the first gathered K value, as fp16 bits.
      CHECK(half_bits_to_float(get<std::uint16_t>(b, e.sink_k)) == g.k[0]);
      for (std::size_t i = 0; i < table.size(); ++i) {
        CHECK(e.blocks[i].level == static_cast<int>(table[i].level));
        CHECK(e.blocks[i].fill_value ==
              std::as_const(cache).pool(table[i].level).fill(table[i].id));
        for (int bit = 0; bit < max_block_tokens; ++bit) {
          const bool set_in_bytes =
              (static_cast<unsigned>(b[e.blocks[i].mask + static_cast<std::size_t>(bit / 8)]) >>
               (bit % 8)) &
              1u;
          CHECK(set_in_bytes == table[i].valid.test(static_cast<std::size_t>(bit)));
        }
      }
    }
  }
}

TEST_CASE("serialize: an unknown sequence is an invalid argument", "[cache][serialize]") {
  per_token_cache cache(setup<per_token_cache>::config(), roomy, mixed_policy);
  const auto e = thrown_by([&] { (void)serialize(cache, seq_id{42}); });
  REQUIRE(e.has_value());
  CHECK(e->code() == errc::invalid_argument);
}

// ---- untrusted bytes --------------------------------------------------------------------------

namespace {

/// A small cache holding two sequences, and the bytes of a small one with blocks in every tier.
struct small_fixture {
  static cache_config config() { return {1, 2, 64, 16, 2, 4}; }
  per_token_cache cache{config(), roomy, mixed_policy};
  seq_id a = cache.create();
  seq_id other = cache.create();
  bytes_t bytes;
  std::vector<seq_id> seqs{a, other};
  small_fixture() {
    feed(cache, a, 40, 7);
    feed(cache, other, 9, 8);
    // A partly evicted head, so masks have holes.
    const index_t n = cache.tokens(a, 0, 1);
    const index_t positions[] = {0, 5, 6, n - 1};
    cache.evict(a, 0, 1, positions);
    bytes = serialize(cache, a);
  }
};

/// Bits to flip, as (byte offset, bit): all 8 bits of every byte of the header and of the
/// count, param, flag and block record fields; one bit (cycling) of every `stride`-th byte of
/// the bulk (fp16 rows and block bytes).
std::vector<std::pair<std::size_t, int>> flip_bits(const bytes_t& b, std::size_t stride) {
  std::vector<bool> bulk(b.size(), false);
  for (const entry_at& e : walk(b, setup<per_token_cache>::params)) {
    for (std::size_t i = e.sink_k; i < e.key_params[0]; ++i) bulk[i] = true;
    for (const block_at& x : e.blocks)
      for (std::size_t i = x.bytes; i < x.bytes + x.block_bytes; ++i) bulk[i] = true;
  }
  std::vector<std::pair<std::size_t, int>> out;
  std::size_t k = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    if (!bulk[i]) {
      for (int bit = 0; bit < 8; ++bit) out.emplace_back(i, bit);
    } else if (k++ % stride == 0) {
      out.emplace_back(i, static_cast<int>(k / stride % 8));
    }
  }
  return out;
}

}  // namespace

TEST_CASE("deserialize: every truncation is refused and changes nothing", "[cache][serialize]") {
  small_fixture fx;
  const auto tiers = blocks_per_tier(fx.cache, fx.a);
  for (int t = 0; t < tier_count; ++t) REQUIRE(tiers[t] > 0);
  const cache_state before = state_of(fx.cache, fx.seqs);
  const auto usage = fx.cache.usage();
  std::size_t refused = 0;
  for (std::size_t n = 0; n < fx.bytes.size(); ++n) {
    const auto e = thrown_by(
        [&] { (void)deserialize(fx.cache, std::span<const std::byte>(fx.bytes).first(n)); });
    if (!e || e->code() != errc::corrupt_data || fx.cache.usage() != usage) {
      FAIL("truncation to " << n << " bytes: " << (e ? e->what() : "accepted"));
    }
    ++refused;
    if (n % 257 == 0) REQUIRE(state_of(fx.cache, fx.seqs) == before);
  }
  CHECK(refused == fx.bytes.size());
  // One byte too many, too.
  bytes_t longer = fx.bytes;
  longer.push_back(std::byte{0});
  expect_refused(fx.cache, longer, fx.seqs, "payload_bytes");
  CHECK(state_of(fx.cache, fx.seqs) == before);
}

TEST_CASE("deserialize: every single-bit flip is refused", "[cache][serialize]") {
  small_fixture fx;
  const cache_state before = state_of(fx.cache, fx.seqs);
  const auto usage = fx.cache.usage();
  bytes_t b = fx.bytes;
  const auto flips = flip_bits(b, 2);
  for (std::size_t i = 0; i < flips.size(); ++i) {
    const auto [at, bit] = flips[i];
    b[at] ^= static_cast<std::byte>(1u << bit);
    const auto e = thrown_by([&] { (void)deserialize(fx.cache, b); });
    if (!e || e->code() != errc::corrupt_data || fx.cache.usage() != usage) {
      FAIL("byte " << at << " bit " << bit << ": " << (e ? e->what() : "accepted"));
    }
    b[at] ^= static_cast<std::byte>(1u << bit);
    if (i % 1009 == 0) REQUIRE(state_of(fx.cache, fx.seqs) == before);
  }
  CHECK(flips.size() > 5000);
  CHECK(state_of(fx.cache, fx.seqs) == before);
}

TEST_CASE("deserialize: resealed bit flips are refused or imported canonically",
          "[cache][serialize]") {
  small_fixture fx;
  const cache_state before = state_of(fx.cache, fx.seqs);
  const auto usage = fx.cache.usage();
  std::size_t refused = 0, accepted = 0;
  bytes_t b = fx.bytes;
  // The payload's bytes (the header's fields are compared exactly, tested above).
  auto flips = flip_bits(b, 3);
  std::erase_if(flips, [](const auto& f) { return f.first < header_bytes; });
  for (std::size_t flip = 0; flip < flips.size(); ++flip) {
    const auto [at, bit_in_byte] = flips[flip];
    const std::size_t bit = 8 * at + static_cast<std::size_t>(bit_in_byte);
    b[at] ^= static_cast<std::byte>(1u << bit_in_byte);
    reseal(b);
    std::optional<seq_id> id;
    const auto e = thrown_by([&] { id = deserialize(fx.cache, b); });
    if (e) {
      if (e->code() != errc::corrupt_data || fx.cache.usage() != usage) {
        FAIL("bit " << bit << ": " << e->what());
      }
      ++refused;
    } else {
      ++accepted;
      // An accepted input is canonical and decodes to finite values.
      if (serialize(fx.cache, *id) != b) FAIL("bit " << bit << ": not canonical");
      for (int layer = 0; layer < fx.cache.config().layers; ++layer) {
        for (const gathered_head& g : fx.cache.gather(*id, layer)) {
          for (std::size_t i = 0; i < g.k.size(); ++i) {
            if (!std::isfinite(g.k[i]) || !std::isfinite(g.v[i])) FAIL("bit " << bit << ": NaN");
          }
        }
      }
      fx.cache.free(*id);
      if (fx.cache.usage() != usage) FAIL("bit " << bit << ": free did not restore usage");
    }
    b[at] ^= static_cast<std::byte>(1u << bit_in_byte);
    if (flip % 1009 == 0) REQUIRE(state_of(fx.cache, fx.seqs) == before);
  }
  reseal(b);
  CHECK(b == fx.bytes);
  CHECK(state_of(fx.cache, fx.seqs) == before);
  INFO("refused " << refused << ", accepted " << accepted);
  CHECK(refused > 1000);   // counts, tiers, fills, masks, flags, exponents, NaN ...
  CHECK(accepted > 1000);  // codes and fp16 values that stay finite
}

TEST_CASE("deserialize: semantic corruption behind a valid checksum is refused",
          "[cache][serialize]") {
  small_fixture fx;
  const auto cfg = small_fixture::config();
  const auto layout = walk(fx.bytes, setup<per_token_cache>::params);
  const entry_at& e0 = layout[0];
  const entry_at& e1 = layout[1];
  REQUIRE(e0.blocks.size() >= 2);
  REQUIRE(e0.sinks > 0);
  REQUIRE(e0.window > 0);
  const block_at& blk = e0.blocks[0];

  // Applies `edit` to a copy, reseals it and expects a refusal naming `needle`.
  const auto refused = [&](std::string_view needle, auto&& edit) {
    bytes_t b = fx.bytes;
    edit(b);
    reseal(b);
    expect_refused(fx.cache, b, fx.seqs, needle);
  };

  // Header fields (compared exactly, whatever the checksum says).
  refused("magic", [](bytes_t& b) { b[3] = std::byte{'X'}; });
  refused("version = 2", [](bytes_t& b) { set<std::uint32_t>(b, 8, 2); });
  refused("header_bytes = 112", [](bytes_t& b) { set<std::uint32_t>(b, 12, 112); });
  refused("format id of tier mid", [](bytes_t& b) { b[41] ^= std::byte{1}; });
  refused("window_tokens = 5", [](bytes_t& b) { set<std::uint32_t>(b, 76, 5); });
  refused("chunk_tokens = 32", [](bytes_t& b) { set<std::uint32_t>(b, 80, 32); });
  refused("block_bytes of tier low", [](bytes_t& b) { set<std::uint64_t>(b, 100, 1); });
  {
    bytes_t b = fx.bytes;
    set<std::uint64_t>(b, 16, b.size());  // payload_bytes one too large, checksum intact
    expect_refused(fx.cache, b, fx.seqs, "payload_bytes");
  }

  // Entry counts.
  refused("appended",
          [&](bytes_t& b) { set<std::uint64_t>(b, e0.appended, std::uint64_t{1} << 63); });
  refused("n_sinks = 3", [&](bytes_t& b) { set<std::uint32_t>(b, e0.n_sinks, 3); });
  refused("n_sinks = 2", [&](bytes_t& b) { set<std::uint64_t>(b, e0.appended, 1); });
  refused("n_window = 5", [&](bytes_t& b) { set<std::uint32_t>(b, e0.n_window, 5); });
  refused("n_window = 4294967295", [&](bytes_t& b) { set<std::uint32_t>(b, e0.n_window, ~0u); });
  refused("n_blocks = 4294967295", [&](bytes_t& b) { set<std::uint32_t>(b, e0.n_blocks, ~0u); });
  refused("n_blocks", [&](bytes_t& b) { set<std::uint32_t>(b, e1.n_blocks, 40); });
  refused("tokens held", [&](bytes_t& b) { set<std::uint64_t>(b, e0.appended, 20); });
  refused("every token is a sink", [&](bytes_t& b) {
    // A payload whose entry 0 claims appended <= sink_tokens while it has window rows: give
    // it only its window (held = window), so the held check passes and this rule fires.
    set<std::uint64_t>(b, e0.appended, 2);
    set<std::uint32_t>(b, e0.n_sinks, 0);
    set<std::uint32_t>(b, e0.n_window, 1);
    // Rebuild entry 0: appended, counts, one window row pair, params, no blocks.
    bytes_t entry(b.begin() + static_cast<std::ptrdiff_t>(e0.appended),
                  b.begin() + static_cast<std::ptrdiff_t>(e0.sink_k));
    entry.insert(entry.end(), b.begin() + static_cast<std::ptrdiff_t>(e0.window_k),
                 b.begin() + static_cast<std::ptrdiff_t>(e0.window_k + 64 * 2));
    entry.insert(entry.end(), b.begin() + static_cast<std::ptrdiff_t>(e0.window_v),
                 b.begin() + static_cast<std::ptrdiff_t>(e0.window_v + 64 * 2));
    entry.insert(entry.end(), b.begin() + static_cast<std::ptrdiff_t>(e0.key_params[0]),
                 b.begin() + static_cast<std::ptrdiff_t>(e0.n_blocks));
    for (int i = 0; i < 4; ++i) entry.push_back(std::byte{0});
    bytes_t rebuilt(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(header_bytes));
    rebuilt.insert(rebuilt.end(), entry.begin(), entry.end());
    rebuilt.insert(rebuilt.end(), b.begin() + static_cast<std::ptrdiff_t>(e1.appended), b.end());
    b = rebuilt;
  });
  refused("follow the last entry", [](bytes_t& b) { b.push_back(std::byte{0}); });

  // fp16 rows.
  refused("sink K rows", [&](bytes_t& b) { set<std::uint16_t>(b, e0.sink_k + 6, 0x7e00); });
  refused("sink V rows", [&](bytes_t& b) { set<std::uint16_t>(b, e0.sink_v, 0xfc00); });
  refused("window K rows", [&](bytes_t& b) { set<std::uint16_t>(b, e0.window_k + 2, 0x7c01); });
  refused("window V rows", [&](bytes_t& b) { set<std::uint16_t>(b, e0.window_v + 100, 0x7c00); });

  // Head params and flags (tier low is fp2plus: one int8 exponent each for K and V).
  refused("scale_exponent = 101", [&](bytes_t& b) { b[e0.key_params[2]] = std::byte{101}; });
  refused("scale_exponent = -101", [&](bytes_t& b) {
    b[e0.value_params[2]] = static_cast<std::byte>(static_cast<std::uint8_t>(-101));
  });
  refused("calibrated flag of tier mid = 2",
          [&](bytes_t& b) { b[e0.calibrated[1]] = std::byte{2}; });
  refused("is not calibrated", [&](bytes_t& b) {
    for (const block_at& x : e0.blocks) {
      if (x.level == 0) return void(b[e0.calibrated[0]] = std::byte{0});
    }
    FAIL("entry 0 has no full-tier block");
  });
  refused("not calibrated", [&](bytes_t& b) {
    // Clearing low's flag leaves its (non-default) exponents, or its blocks, uncalibrated.
    b[e0.calibrated[2]] = std::byte{0};
  });

  // Block records.
  refused("tier = 3", [&](bytes_t& b) { b[blk.tier] = std::byte{3}; });
  refused("tier = 255", [&](bytes_t& b) { b[blk.tier] = std::byte{255}; });
  refused("fill = 0", [&](bytes_t& b) { set<std::uint16_t>(b, blk.fill, 0); });
  refused("fill = 17", [&](bytes_t& b) { set<std::uint16_t>(b, blk.fill, 17); });
  refused("fill = 65535", [&](bytes_t& b) { set<std::uint16_t>(b, blk.fill, 0xffff); });
  refused("valid mask is empty", [&](bytes_t& b) {
    for (std::size_t i = 0; i < 32; ++i) b[blk.mask + i] = std::byte{0};
  });
  refused("valid mask bit 200", [&](bytes_t& b) { b[blk.mask + 25] = std::byte{1}; });
  {
    // A partly filled block: a bit at fill, and a non-zero byte past the filled tiles.
    const block_at* partial = nullptr;
    for (const entry_at& e : layout)
      for (const block_at& x : e.blocks)
        if (x.fill_value < cfg.block_tokens && partial == nullptr) partial = &x;
    REQUIRE(partial != nullptr);
    const int fill = partial->fill_value;
    refused("valid mask bit " + std::to_string(fill), [&](bytes_t& b) {
      b[partial->mask + static_cast<std::size_t>(fill / 8)] |=
          static_cast<std::byte>(1u << (fill % 8));
    });
    refused("block byte",
            [&](bytes_t& b) { b[partial->bytes + partial->block_bytes - 1] = std::byte{1}; });
    // Shrinking fill to a smaller multiple (with the mask cut to match) exposes written tiles
    // as unused bytes that are not zero.
    if (fill >= 2) {
      refused("block byte", [&](bytes_t& b) {
        set<std::uint16_t>(b, partial->fill, static_cast<std::uint16_t>(fill - 1));
        for (std::size_t i = 0; i < 32; ++i) b[partial->mask + i] = std::byte{0};
        b[partial->mask] = std::byte{1};
      });
    }
  }
  {
    // A full-tier (fp16) block whose first key decodes to Inf, and one with NaN.
    const block_at* full = nullptr;
    for (const entry_at& e : layout)
      for (const block_at& x : e.blocks)
        if (x.level == 0 && full == nullptr) full = &x;
    REQUIRE(full != nullptr);
    refused("key of token 0, channel 0 decodes to inf",
            [&](bytes_t& b) { set<std::uint16_t>(b, full->bytes, 0x7c00); });
    refused("value of token 0, channel 0 decodes to nan",
            [&](bytes_t& b) { set<std::uint16_t>(b, full->bytes + 16 * 64 * 2, 0x7e00); });
  }
  refused("block bytes needs", [&](bytes_t& b) { b.resize(b.size() - 1); });  // last block cut
}

TEST_CASE("deserialize: corrupt fp8 scales are refused", "[cache][serialize]") {
  fp8_cache cache(setup<fp8_cache>::config(), roomy, mixed_policy);
  const seq_id a = cache.create();
  feed(cache, a, 60, 4);
  const std::vector<seq_id> seqs{a};
  const bytes_t bytes = serialize(cache, a);
  const auto layout = walk(bytes, setup<fp8_cache>::params);
  const entry_at& e = layout[0];
  REQUIRE(bytes[e.calibrated[1]] == std::byte{1});  // tier mid (fp8) is calibrated
  const auto with_scale = [&](std::size_t at, std::uint32_t bits, std::string_view needle) {
    bytes_t b = bytes;
    set<std::uint32_t>(b, at, bits);
    reseal(b);
    expect_refused(cache, b, seqs, needle);
  };
  with_scale(e.key_params[1], 0x7fc00000u, "scale = nan");
  with_scale(e.value_params[1], 0x7f800000u, "scale = inf");
  with_scale(e.key_params[1], 0x00000000u, "scale = 0");
  with_scale(e.key_params[1], 0xbf800000u, "scale = -1");
  with_scale(e.value_params[1], 0x00000001u, "scale = 1.4");  // subnormal
  // A finite scale so large that stored codes decode to Inf.
  bool has_mid_block = false;
  for (const block_at& x : e.blocks) has_mid_block |= x.level == 1;
  REQUIRE(has_mid_block);
  with_scale(e.key_params[1], std::bit_cast<std::uint32_t>(1e37f), "decodes to inf");

  // A sane scale is accepted (and the import is canonical).
  bytes_t b = bytes;
  set<std::uint32_t>(b, e.value_params[1], std::bit_cast<std::uint32_t>(0.5f));
  reseal(b);
  const seq_id c = deserialize(cache, b);
  CHECK(serialize(cache, c) == b);
}

TEST_CASE("deserialize: an uncalibrated tier must keep default params", "[cache][serialize]") {
  per_token_cache cache(setup<per_token_cache>::config(), roomy, mixed_policy);
  const seq_id a = cache.create();
  feed(cache, a, 6, 1);  // sinks and window only: no tier calibrated
  const std::vector<seq_id> seqs{a};
  bytes_t b = serialize(cache, a);
  const auto layout = walk(b, setup<per_token_cache>::params);
  REQUIRE(b[layout[0].calibrated[2]] == std::byte{0});
  b[layout[0].key_params[2]] = std::byte{3};
  reseal(b);
  expect_refused(cache, b, seqs,
                 "key head params of tier low are set but the tier is not calibrated");
}

TEST_CASE("deserialize: a cache of another config or formats is named", "[cache][serialize]") {
  const cache_config base = setup<per_token_cache>::config();
  per_token_cache source(base, roomy, mixed_policy);
  const seq_id a = source.create();
  feed(source, a, 50, 9);
  const bytes_t bytes = serialize(source, a);

  const auto refused_by = [&](auto& target, std::string_view needle) {
    const seq_id mine = target.create();
    feed(target, mine, 30, 2);
    const std::vector<seq_id> seqs{mine};
    expect_refused(target, bytes, seqs, needle);
  };
  const auto with = [&](auto change) {
    cache_config c = base;
    change(c);
    return c;
  };
  {
    per_token_cache t(with([](cache_config& c) { c.head_dim = 128; }), roomy, mixed_policy);
    refused_by(t, "head_dim = 64 is not allowed (expected 128");
  }
  {
    per_token_cache t(with([](cache_config& c) { c.block_tokens = 32; }), roomy, mixed_policy);
    refused_by(t, "block_tokens = 16 is not allowed (expected 32");
  }
  {
    per_token_cache t(with([](cache_config& c) { c.layers = 3; }), roomy, mixed_policy);
    refused_by(t, "layers = 2 is not allowed (expected 3");
  }
  {
    per_token_cache t(with([](cache_config& c) { c.kv_heads = 1; }), roomy, mixed_policy);
    refused_by(t, "kv_heads = 2 is not allowed (expected 1");
  }
  {
    per_token_cache t(with([](cache_config& c) { c.sink_tokens = 0; }), roomy, mixed_policy);
    refused_by(t, "sink_tokens = 4 is not allowed (expected 0");
  }
  {
    per_token_cache t(with([](cache_config& c) { c.window_tokens = 64; }), roomy, mixed_policy);
    refused_by(t, "window_tokens = 8 is not allowed (expected 64");
  }
  {
    kv_cache<quant::fp2plus_kh, quant::fp4plus, quant::kv_bf16> t(base, roomy, mixed_policy);
    refused_by(t, "format id of tier full");
  }
  {
    fp8_cache t(base, roomy, mixed_policy);
    refused_by(t, "format id of tier mid");
  }
  {
    kivi_cache t(with([](cache_config& c) { c.block_tokens = 64; }), roomy, mixed_policy);
    refused_by(t, "key format 'fp4-u-g32t-fp16-z-minmax'");
  }
}

TEST_CASE("deserialize: a pool without room is out_of_memory and changes nothing",
          "[cache][serialize]") {
  const cache_config c = setup<per_token_cache>::config();
  per_token_cache source(c, roomy, mixed_policy);
  const seq_id a = source.create();
  feed(source, a, 60, 3);
  const bytes_t bytes = serialize(source, a);
  const auto need = blocks_per_tier(source, a);
  REQUIRE(need[1] >= 2);

  // Room for all tiers but mid, which has one block too few (the target's own sequence is low).
  per_token_cache probe(c, roomy, mixed_policy);
  const std::size_t mid_block = std::as_const(probe).pool(tier::mid).block_bytes();
  per_token_cache target(c, tier_budget{roomy.full, mid_block * (need[1] - 1), roomy.low},
                       [](const block_request&) { return tier::low; });
  const seq_id mine = target.create();
  feed(target, mine, 40, 1);
  const std::vector<seq_id> seqs{mine};
  expect_refused(target, bytes, seqs, "new blocks of tier mid", errc::out_of_memory);

  // With the room, the same bytes import.
  per_token_cache roomier(c, tier_budget{roomy.full, mid_block * need[1], roomy.low}, mixed_policy);
  const seq_id b = deserialize(roomier, bytes);
  require_same_sequence(source, a, roomier, b);
  // Now full: a second import is refused.
  const std::vector<seq_id> seqs2{b};
  expect_refused(roomier, bytes, seqs2, "tier mid", errc::out_of_memory);
}
