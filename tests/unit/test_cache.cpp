// SPDX-License-Identifier: Apache-2.0
// Tests of the paged KV cache (oscar/cache/kv_cache.hpp).
//
// The centrepiece is a property test against `cache_model`, an independent reference written
// from the spec in kv_cache.hpp's file comment and member docs: it keeps, per (sequence, layer,
// head), the tokens as the cache should decode them (sinks and window: the fp16 rounding of the
// input; aged-out tokens: that rounding passed through the tier format's encode_tile and
// decode_tile, with head_params calibrated over the window when the first chunk ages out into
// the tier), the block tables (tier, fill, valid tokens, sharing between forks), and the pools'
// block counts. It never calls the cache's internals; only format_traits and the public API.
// Long random runs of append / fork / evict / compact / free are compared after every
// operation, bit for bit, with gather(), with the blocks' bytes decoded by hand, with the key
// summaries, and with the pools' reference counts.
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "oscar/cache/kv_cache.hpp"
#include "oscar/oscar.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace c = oscar::cache;
namespace q = oscar::quant;
using Catch::Matchers::ContainsSubstring;
using oscar::bfloat16;
using oscar::half;
using oscar::index_t;

namespace {

// ---- small helpers ----------------------------------------------------------------------------

/// splitmix64: the same numbers on every platform and standard library.
struct rng {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int below(int n) { return static_cast<int>(next() % static_cast<std::uint64_t>(n)); }
  bool chance(int percent) { return below(100) < percent; }
  float uniform() { return static_cast<float>(next() >> 40) * 0x1p-24f; }  // [0, 1)
};

/// Index of the first element where two float arrays differ bit for bit; -1 when identical,
/// -2 when the sizes differ.
long first_difference(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return -2;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return static_cast<long>(i);
  }
  return -1;
}

/// `float(half(x))`: what the cache keeps of an input element in its fp16 sinks and window.
/// (The random data stays far inside fp16's range; beyond it, see the saturation test.)
float fp16_round(float x) { return static_cast<float>(half(x)); }

/// `cache.pool(t)` through a const reference, which always names the public const overload (in
/// the first version of kv_cache.hpp, a non-const cache picked a private non-const overload).
template <class Cache>
const typename Cache::pool_type& pool_of(const Cache& cache, c::tier t) {
  return cache.pool(t);
}

/// Calls `f.operator()<I>()` with the tier index of `t` as a constant.
template <class F>
decltype(auto) with_tier(c::tier t, F&& f) {
  switch (t) {
    case c::tier::full: return f.template operator()<0>();
    case c::tier::mid: return f.template operator()<1>();
    default: return f.template operator()<2>();
  }
}

/// Runs `f`, which must throw `oscar::error` with `code` and a message containing every string
/// of `needles`.
template <class F>
void require_error(F&& f, oscar::errc code, std::initializer_list<std::string> needles) {
  try {
    f();
  } catch (const oscar::error& e) {
    INFO("message: " << e.what());
    CHECK(e.code() == code);
    for (const std::string& n : needles) CHECK_THAT(e.what(), ContainsSubstring(n));
    return;
  }
  FAIL("expected an oscar::error (" << oscar::to_string(code) << "), nothing was thrown");
}

// ---- format helpers written from format_traits (not from the cache) ---------------------------

/// Encodes `rows` rows of `d` floats with format F, tile by tile, and decodes them into `y`.
template <class F>
void round_trip_rows(const float* x, int rows, int d,
                     const typename q::format_traits<F>::head_params& params, float* y) {
  using traits = q::format_traits<F>;
  const int tile_tokens = q::tokens_per_tile<F>();
  std::vector<typename traits::block> tile(static_cast<std::size_t>(q::blocks_per_tile<F>(d)));
  for (int t = 0; t < rows; t += tile_tokens) {
    traits::encode_tile(x + static_cast<std::size_t>(t) * d, d, params, tile.data());
    traits::decode_tile(tile.data(), d, params, y + static_cast<std::size_t>(t) * d);
  }
}

/// Bytes of one tile of format F.
template <class F>
std::size_t tile_bytes(int d) {
  return static_cast<std::size_t>(q::blocks_per_tile<F>(d)) *
         sizeof(typename q::format_traits<F>::block);
}

/// Bytes of the key tiles of a block of `block_tokens` tokens (the value tiles follow).
template <class KV>
std::size_t key_bytes(int block_tokens, int d) {
  return tile_bytes<typename KV::key>(d) *
         static_cast<std::size_t>(block_tokens / q::tokens_per_tile<typename KV::key>());
}

/// Bytes of a block: key tiles, then value tiles, padded to 64 bytes.
template <class KV>
std::size_t block_bytes(int block_tokens, int d) {
  const std::size_t values =
      tile_bytes<typename KV::value>(d) *
      static_cast<std::size_t>(block_tokens / q::tokens_per_tile<typename KV::value>());
  return (key_bytes<KV>(block_tokens, d) + values + 63) / 64 * 64;
}

/// Decodes rows [0, rows) of format F stored tile after tile at `bytes`.
template <class F>
void decode_rows(const std::byte* bytes, int rows, int d,
                 const typename q::format_traits<F>::head_params& params, float* y) {
  using traits = q::format_traits<F>;
  const int tile_tokens = q::tokens_per_tile<F>();
  for (int t = 0; t < rows; t += tile_tokens) {
    const auto* in = reinterpret_cast<const typename traits::block*>(
        bytes + static_cast<std::size_t>(t / tile_tokens) * tile_bytes<F>(d));
    traits::decode_tile(in, d, params, y + static_cast<std::size_t>(t) * d);
  }
}

/// The chunk of a cache with these tiers: the largest tile of any of their formats.
template <class Cache>
int expected_chunk() {
  int chunk = 1;
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    ((chunk = std::max({chunk, q::tokens_per_tile<typename Cache::template tier_format<I>::key>(),
                        q::tokens_per_tile<typename Cache::template tier_format<I>::value>()})),
     ...);
  }(std::make_index_sequence<3>{});
  return chunk;
}

// ---- input data -------------------------------------------------------------------------------

/// K or V for `tokens` tokens, `[tokens, heads, d]`: per (token, head) a magnitude from 2^-6 to
/// 2^8, and about one element in 32 an outlier 16 times larger.
std::vector<float> random_kv(rng& r, index_t tokens, int heads, int d) {
  std::vector<float> x(static_cast<std::size_t>(tokens * heads * d));
  for (index_t th = 0; th < tokens * heads; ++th) {
    const float scale = std::ldexp(1.0f, r.below(15) - 6);
    for (int i = 0; i < d; ++i) {
      float e = scale * (2.0f * r.uniform() - 1.0f);
      if (r.below(32) == 0) e *= 16.0f;
      x[static_cast<std::size_t>(th * d + i)] = e;
    }
  }
  return x;
}

/// K and V converted to element type T, laid out `[tokens, heads, d]` or, head-major,
/// `[heads, tokens, d]`, with views over them.
template <class T>
struct typed_kv {
  index_t tokens;
  int heads, d;
  bool head_major;
  std::vector<T> k, v;

  typed_kv(const std::vector<float>& kf, const std::vector<float>& vf, index_t tokens_, int heads_,
           int d_, bool head_major_)
      : tokens(tokens_), heads(heads_), d(d_), head_major(head_major_ && tokens_ > 0),
        k(layout(kf)), v(layout(vf)) {}

  std::vector<T> layout(const std::vector<float>& x) const {
    std::vector<T> out(x.size(), T(0.0f));
    for (index_t t = 0; t < tokens; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < d; ++i) {
          const index_t dst = head_major ? (h * tokens + t) * d + i : (t * heads + h) * d + i;
          out[static_cast<std::size_t>(dst)] = T(x[static_cast<std::size_t>((t * heads + h) * d + i)]);
        }
    return out;
  }
  oscar::kv_view<const T> view(const std::vector<T>& x) const {
    if (head_major) return oscar::make_kv_view(x.data(), tokens, heads, d, d, tokens * d);
    return oscar::make_kv_view(x.data(), tokens, heads, d);
  }
  oscar::kv_view<const T> kview() const { return view(k); }
  oscar::kv_view<const T> vview() const { return view(v); }
};

/// A deterministic, pseudo-random tier for every block request (all three tiers appear).
c::tier hashed_tier(const c::block_request& r) {
  std::uint64_t h = r.seq * 0x9E3779B97F4A7C15ull ^ static_cast<std::uint64_t>(r.layer) * 0x632BE59BD9B4E019ull ^
                    static_cast<std::uint64_t>(r.head) * 0x85EBCA77C2B2AE63ull ^
                    static_cast<std::uint64_t>(r.block_index) * 0xC2B2AE3D27D4EB4Full ^
                    static_cast<std::uint64_t>(r.tokens_appended) * 0x165667B19E3779F9ull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return static_cast<c::tier>(h % 3);
}

// ---- the reference model ----------------------------------------------------------------------

/// What a cache of type `Cache` should hold, written from the spec.
template <class Cache>
class cache_model {
 public:
  template <int I>
  using kv = typename Cache::template tier_format<I>;

  template <class KV>
  struct tier_params {
    typename q::format_traits<typename KV::key>::head_params key{};
    typename q::format_traits<typename KV::value>::head_params value{};
    bool calibrated = false;
  };
  using params_tuple = std::tuple<tier_params<kv<0>>, tier_params<kv<1>>, tier_params<kv<2>>>;

  /// A block: its tier and its first `fill` rows of decoded K and V (valid or not).
  struct block {
    c::tier level;
    int fill = 0;
    std::vector<float> k, v;  // [block_tokens, d]
  };
  struct slot {
    std::shared_ptr<block> data;  // shared between forks until one side writes
    std::vector<bool> valid;      // [block_tokens], per table entry
  };
  struct entry {
    index_t appended = 0;
    std::vector<float> sink_k, sink_v, window_k, window_v;  // rows of d
    std::vector<slot> slots;
    params_tuple params;
  };
  using sequence = std::vector<entry>;  // [layers * kv_heads]

  cache_model(const c::cache_config& config, const c::tier_budget& budget, c::tier_policy policy)
      : cfg(config), chunk(expected_chunk<Cache>()), policy_(std::move(policy)) {
    for (int t = 0; t < c::tier_count; ++t) {
      with_tier(static_cast<c::tier>(t), [&]<int I>() {
        block_size[t] = block_bytes<kv<I>>(cfg.block_tokens, cfg.head_dim);
      });
      capacity[t] = budget[static_cast<c::tier>(t)] / block_size[t];
    }
  }

  c::cache_config cfg;
  int chunk;
  std::array<std::size_t, c::tier_count> block_size{}, capacity{};
  std::map<c::seq_id, sequence> seqs;
  std::size_t copies_on_write = 0;  // statistics, to check the runs reach the interesting paths

  // -- sequences --
  void create(c::seq_id id) {
    seqs.emplace(id, sequence(static_cast<std::size_t>(cfg.layers * cfg.kv_heads)));
  }
  void fork(c::seq_id parent, c::seq_id child) { seqs.emplace(child, seqs.at(parent)); }
  void free(c::seq_id id) { seqs.erase(id); }

  entry& at(c::seq_id id, int layer, int head) {
    return seqs.at(id)[static_cast<std::size_t>(layer * cfg.kv_heads + head)];
  }
  const entry& at(c::seq_id id, int layer, int head) const {
    return seqs.at(id)[static_cast<std::size_t>(layer * cfg.kv_heads + head)];
  }

  // -- accounting --
  /// How many table entries of live sequences reference each block.
  std::map<const block*, int> references() const {
    std::map<const block*, int> refs;
    for (const auto& [id, seq] : seqs)
      for (const entry& e : seq)
        for (const slot& s : e.slots) ++refs[s.data.get()];
    return refs;
  }
  std::array<std::size_t, c::tier_count> used_blocks() const {
    std::array<std::size_t, c::tier_count> used{};
    for (const auto& [b, n] : references()) ++used[static_cast<int>(b->level)];
    return used;
  }
  index_t rows(const std::vector<float>& x) const {
    return static_cast<index_t>(x.size()) / cfg.head_dim;
  }
  index_t tokens(const entry& e) const {
    index_t n = rows(e.sink_k) + rows(e.window_k);
    for (const slot& s : e.slots) n += std::count(s.valid.begin(), s.valid.end(), true);
    return n;
  }
  index_t tokens(c::seq_id id, int layer, int head) const { return tokens(at(id, layer, head)); }
  index_t token_heads() const {
    index_t n = 0;
    for (const auto& [id, seq] : seqs)
      for (const entry& e : seq) n += tokens(e);
    return n;
  }
  std::size_t window_bytes() const {
    std::size_t n = 0;
    for (const auto& [id, seq] : seqs)
      for (const entry& e : seq)
        n += (e.sink_k.size() + e.sink_v.size() + e.window_k.size() + e.window_v.size()) * 2;
    return n;
  }

  // -- reading --
  /// The head's tokens in entry order: sinks, valid block tokens in table order, window.
  c::gathered_head gather(c::seq_id id, int layer, int head) const {
    const entry& e = at(id, layer, head);
    const auto d = static_cast<std::size_t>(cfg.head_dim);
    c::gathered_head g;
    g.k = e.sink_k;
    g.v = e.sink_v;
    for (const slot& s : e.slots) {
      for (int t = 0; t < s.data->fill; ++t) {
        if (!s.valid[static_cast<std::size_t>(t)]) continue;
        g.k.insert(g.k.end(), s.data->k.begin() + t * d, s.data->k.begin() + (t + 1) * d);
        g.v.insert(g.v.end(), s.data->v.begin() + t * d, s.data->v.begin() + (t + 1) * d);
      }
    }
    g.k.insert(g.k.end(), e.window_k.begin(), e.window_k.end());
    g.v.insert(g.v.end(), e.window_v.begin(), e.window_v.end());
    g.tokens = rows(g.k);
    return g;
  }

  // -- append --
  /// Appends like the spec says. Returns the new blocks per tier it needs; when they do not
  /// fit in the free blocks (capacity minus used), nothing changes (the cache must throw
  /// out_of_memory) and `fits` is false.
  struct result {
    bool fits = true;
    std::array<std::size_t, c::tier_count> needed{};
  };
  template <class T>
  result append(c::seq_id id, int layer, oscar::kv_view<const T> k, oscar::kv_view<const T> v) {
    const auto refs = references();
    sequence next = seqs.at(id);  // a detached copy: `refs` still counts the original
    result r;
    std::size_t copies = 0;
    const int d = cfg.head_dim;
    for (int h = 0; h < cfg.kv_heads; ++h) {
      entry& e = next[static_cast<std::size_t>(layer * cfg.kv_heads + h)];
      const index_t appended_before = e.appended;
      for (index_t t = 0; t < k.tokens; ++t) {
        const bool sink = e.appended < cfg.sink_tokens;
        for (int i = 0; i < d; ++i) {
          (sink ? e.sink_k : e.window_k).push_back(fp16_round(static_cast<float>(k.row(t, h)[i])));
          (sink ? e.sink_v : e.window_v).push_back(fp16_round(static_cast<float>(v.row(t, h)[i])));
        }
        ++e.appended;
      }
      while (rows(e.window_k) >= cfg.window_tokens + chunk) {
        const bool last_has_room =
            !e.slots.empty() && e.slots.back().data->fill < cfg.block_tokens;
        if (last_has_room) {
          slot& last = e.slots.back();
          auto it = refs.find(last.data.get());
          const int holders = it == refs.end() ? 0 : it->second;  // 0: new in this call
          if (holders > 0) {
            // Write into a private copy, so that the original stays as it is if the append
            // does not fit; when it was not shared, the copy simply replaces it on commit.
            last.data = std::make_shared<block>(*last.data);
          }
          if (holders > 1) {  // shared: the cache copies the block (copy-on-write)
            ++r.needed[static_cast<int>(last.data->level)];
            ++copies;
          }
        } else {
          const c::tier t = policy_(c::block_request{
              id, layer, h, static_cast<index_t>(e.slots.size()), appended_before});
          auto b = std::make_shared<block>();
          b->level = t;
          b->k.assign(static_cast<std::size_t>(cfg.block_tokens * d), 0.0f);
          b->v = b->k;
          e.slots.push_back(slot{std::move(b), std::vector<bool>(static_cast<std::size_t>(cfg.block_tokens))});
          ++r.needed[static_cast<int>(t)];
        }
        age_out(e, e.slots.back());
      }
    }
    const auto used = used_blocks();
    for (int t = 0; t < c::tier_count; ++t) r.fits = r.fits && used[t] + r.needed[t] <= capacity[t];
    if (r.fits) {
      seqs.at(id) = std::move(next);
      copies_on_write += copies;
    }
    return r;
  }

  /// The window's oldest chunk, quantized into `s`, which has room.
  void age_out(entry& e, slot& s) {
    with_tier(s.data->level, [&]<int I>() {
      using KV = kv<I>;
      auto& p = std::get<I>(e.params);
      const int d = cfg.head_dim;
      const int window = static_cast<int>(rows(e.window_k));
      if (!p.calibrated) {  // once per (entry, tier): over the whole window, in window order
        p.key = q::format_traits<typename KV::key>::calibrate(e.window_k.data(), window, d);
        p.value = q::format_traits<typename KV::value>::calibrate(e.window_v.data(), window, d);
        p.calibrated = true;
      }
      block& b = *s.data;
      round_trip_rows<typename KV::key>(e.window_k.data(), chunk, d, p.key,
                                        b.k.data() + static_cast<std::size_t>(b.fill) * d);
      round_trip_rows<typename KV::value>(e.window_v.data(), chunk, d, p.value,
                                          b.v.data() + static_cast<std::size_t>(b.fill) * d);
      for (int t = 0; t < chunk; ++t) s.valid[static_cast<std::size_t>(b.fill + t)] = true;
      b.fill += chunk;
      e.window_k.erase(e.window_k.begin(), e.window_k.begin() + chunk * d);
      e.window_v.erase(e.window_v.begin(), e.window_v.begin() + chunk * d);
    });
  }

  // -- evict --
  /// Removes the tokens at `positions` (valid, distinct); empty blocks leave the table.
  void evict(c::seq_id id, int layer, int head, std::span<const index_t> positions) {
    entry& e = at(id, layer, head);
    std::vector<bool> gone(static_cast<std::size_t>(tokens(e)));
    for (index_t p : positions) gone[static_cast<std::size_t>(p)] = true;
    const auto d = static_cast<std::size_t>(cfg.head_dim);
    std::size_t pos = 0;
    auto filter_rows = [&](std::vector<float>& kk, std::vector<float>& vv) {
      std::vector<float> k2, v2;
      for (std::size_t r = 0; r < kk.size() / d; ++r, ++pos) {
        if (gone[pos]) continue;
        k2.insert(k2.end(), kk.begin() + r * d, kk.begin() + (r + 1) * d);
        v2.insert(v2.end(), vv.begin() + r * d, vv.begin() + (r + 1) * d);
      }
      kk = std::move(k2);
      vv = std::move(v2);
    };
    filter_rows(e.sink_k, e.sink_v);
    for (slot& s : e.slots)
      for (int t = 0; t < s.data->fill; ++t)
        if (s.valid[static_cast<std::size_t>(t)] && gone[pos++]) s.valid[static_cast<std::size_t>(t)] = false;
    std::erase_if(e.slots, [](const slot& s) {
      return std::none_of(s.valid.begin(), s.valid.end(), [](bool b) { return b; });
    });
    filter_rows(e.window_k, e.window_v);
  }

  // -- compact --
  /// Per tier, the chunks with a valid token, by summed importance (highest first, stable),
  /// packed into the fewest blocks; table: full, mid, low. Returns, like append, whether the
  /// blocks it allocates fit (it may reuse blocks no other table references).
  result compact(c::seq_id id, int layer, int head, std::span<const float> importance) {
    const auto refs = references();
    entry& e = at(id, layer, head);
    struct chunk_ref {
      const slot* from;
      int index;
      double weight;
    };
    std::array<std::vector<chunk_ref>, c::tier_count> chunks;
    std::size_t pos = static_cast<std::size_t>(rows(e.sink_k));
    std::array<std::size_t, c::tier_count> reusable{};
    for (const slot& s : e.slots) {
      if (refs.at(s.data.get()) == 1) ++reusable[static_cast<int>(s.data->level)];
      for (int ci = 0; ci < s.data->fill / chunk; ++ci) {
        chunk_ref r{&s, ci, 0.0};
        bool any = false;
        for (int t = ci * chunk; t < (ci + 1) * chunk; ++t) {
          if (!s.valid[static_cast<std::size_t>(t)]) continue;
          any = true;
          r.weight += importance[pos++];
        }
        if (any) chunks[static_cast<int>(s.data->level)].push_back(r);
      }
    }
    const int per_block = cfg.block_tokens / chunk;
    result res;
    const auto used = used_blocks();
    for (int t = 0; t < c::tier_count; ++t) {
      std::stable_sort(chunks[t].begin(), chunks[t].end(),
                       [](const chunk_ref& a, const chunk_ref& b) { return a.weight > b.weight; });
      const std::size_t blocks = (chunks[t].size() + per_block - 1) / per_block;
      res.needed[t] = blocks > reusable[t] ? blocks - reusable[t] : 0;
      res.fits = res.fits && used[t] + res.needed[t] <= capacity[t];
    }
    if (!res.fits) return res;
    const auto d = static_cast<std::size_t>(cfg.head_dim);
    std::vector<slot> slots;
    for (int t = 0; t < c::tier_count; ++t) {
      for (std::size_t i = 0; i < chunks[t].size(); ++i) {
        if (i % per_block == 0) {
          auto b = std::make_shared<block>();
          b->level = static_cast<c::tier>(t);
          b->k.assign(static_cast<std::size_t>(cfg.block_tokens) * d, 0.0f);
          b->v = b->k;
          slots.push_back(slot{std::move(b), std::vector<bool>(static_cast<std::size_t>(cfg.block_tokens))});
        }
        slot& dst = slots.back();
        const chunk_ref& r = chunks[t][i];
        const auto from = static_cast<std::size_t>(r.index * chunk) * d;
        const auto to = static_cast<std::size_t>(dst.data->fill) * d;
        std::copy_n(r.from->data->k.begin() + from, chunk * d, dst.data->k.begin() + to);
        std::copy_n(r.from->data->v.begin() + from, chunk * d, dst.data->v.begin() + to);
        for (int k = 0; k < chunk; ++k)
          dst.valid[static_cast<std::size_t>(dst.data->fill + k)] =
              r.from->valid[static_cast<std::size_t>(r.index * chunk + k)];
        dst.data->fill += chunk;
      }
    }
    e.slots = std::move(slots);
    return res;
  }

 private:
  c::tier_policy policy_;
};

// ---- comparing a cache with the model ---------------------------------------------------------

/// Blocks already decoded by hand and found equal to the model, by (tier, id): the model block,
/// its fill, the block's bytes and key summary then. A block is decoded again when any changed.
struct verified_block {
  std::shared_ptr<const void> model_block;  // kept alive: its address is not reused
  int fill = 0;
  std::vector<std::byte> bytes;
  std::vector<float> summary;
};
using verified_blocks = std::map<std::pair<int, c::block_id>, verified_block>;

/// One head of (seq, layer): gather equals the model bit for bit, the block table matches
/// (tier, fill, valid tokens), every block's bytes decode (with the model's head_params) to the
/// model's rows, and the key summaries are the per-channel min and max of the filled keys.
template <class Cache>
void check_head(const Cache& cache, const cache_model<Cache>& m, c::seq_id id, int layer, int head,
                const c::gathered_head& got, verified_blocks& memo) {
  INFO("seq " << id << ", layer " << layer << ", head " << head);
  const c::gathered_head want = m.gather(id, layer, head);
  REQUIRE(got.tokens == want.tokens);
  REQUIRE(cache.tokens(id, layer, head) == want.tokens);
  REQUIRE(first_difference(got.k, want.k) == -1);
  REQUIRE(first_difference(got.v, want.v) == -1);

  const auto& e = m.at(id, layer, head);
  const auto table = cache.blocks(id, layer, head);
  REQUIRE(table.size() == e.slots.size());
  const int d = m.cfg.head_dim;
  std::vector<float> k, v;
  for (std::size_t i = 0; i < table.size(); ++i) {
    INFO("block " << i << " of " << table.size());
    const auto& mb = *e.slots[i].data;
    REQUIRE(table[i].level == mb.level);
    const auto& pool = pool_of(cache, table[i].level);
    REQUIRE(pool.fill(table[i].id) == mb.fill);
    bool valid_same = true;
    for (int t = 0; t < c::max_block_tokens; ++t) {
      const bool valid = t < mb.fill && e.slots[i].valid[static_cast<std::size_t>(t)];
      valid_same = valid_same && table[i].valid.test(static_cast<std::size_t>(t)) == valid;
    }
    REQUIRE(valid_same);

    const std::span<const std::byte> bytes(pool.data(table[i].id), pool.block_bytes());
    const auto lo = pool.key_min(table[i].id);
    const auto hi = pool.key_max(table[i].id);
    std::vector<float> summary;
    for (oscar::half x : lo) summary.push_back(static_cast<float>(x));
    for (oscar::half x : hi) summary.push_back(static_cast<float>(x));
    verified_block& seen = memo[{static_cast<int>(table[i].level), table[i].id}];
    if (seen.model_block == e.slots[i].data && seen.fill == mb.fill &&
        std::equal(bytes.begin(), bytes.end(), seen.bytes.begin(), seen.bytes.end()) &&
        seen.summary == summary)
      continue;  // decoded before, nothing changed since

    const auto rows = static_cast<std::size_t>(mb.fill) * static_cast<std::size_t>(d);
    k.assign(rows, 0.0f);
    v.assign(rows, 0.0f);
    with_tier(mb.level, [&]<int I>() {
      using KV = typename Cache::template tier_format<I>;
      const auto& p = std::get<I>(e.params);
      const std::byte* bytes = pool.data(table[i].id);
      decode_rows<typename KV::key>(bytes, mb.fill, d, p.key, k.data());
      decode_rows<typename KV::value>(bytes + key_bytes<KV>(m.cfg.block_tokens, d), mb.fill, d,
                                      p.value, v.data());
    });
    REQUIRE(first_difference(k, std::span(mb.k).first(rows)) == -1);
    REQUIRE(first_difference(v, std::span(mb.v).first(rows)) == -1);
    bool summary_ok = true;
    for (int ch = 0; ch < d; ++ch) {
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      for (int t = 0; t < mb.fill; ++t) {
        mn = std::min(mn, mb.k[static_cast<std::size_t>(t * d + ch)]);
        mx = std::max(mx, mb.k[static_cast<std::size_t>(t * d + ch)]);
      }
      // Stored in fp16, rounded outward: the largest fp16 <= min, the smallest fp16 >= max.
      const float mn16 = oscar::half_bits_to_float(oscar::float_to_half_bits_down(mn));
      const float mx16 = oscar::half_bits_to_float(oscar::float_to_half_bits_up(mx));
      summary_ok = summary_ok && static_cast<float>(lo[static_cast<std::size_t>(ch)]) == mn16 &&
                   static_cast<float>(hi[static_cast<std::size_t>(ch)]) == mx16 && mn16 <= mn &&
                   mx <= mx16;
    }
    REQUIRE(summary_ok);
    seen = verified_block{e.slots[i].data, mb.fill, {bytes.begin(), bytes.end()}, std::move(summary)};
  }
}

/// Every head of (seq, layer).
template <class Cache>
void check_layer(const Cache& cache, const cache_model<Cache>& m, c::seq_id id, int layer,
                 verified_blocks& memo) {
  const auto got = cache.gather(id, layer);
  REQUIRE(static_cast<int>(got.size()) == m.cfg.kv_heads);
  for (int h = 0; h < m.cfg.kv_heads; ++h) check_head(cache, m, id, layer, h, got[static_cast<std::size_t>(h)], memo);
}

/// Whole-cache invariants: the pools' used blocks are exactly the distinct (tier, id) the live
/// tables reference, with matching reference counts; the model's blocks map one to one onto
/// (tier, id) (sharing is the same); usage() counts the model's tokens and fp16 bytes.
template <class Cache>
void check_pools(const Cache& cache, const cache_model<Cache>& m) {
  std::map<std::pair<int, c::block_id>, std::uint32_t> refs;
  std::map<const void*, std::pair<int, c::block_id>> model_to_cache;
  std::map<std::pair<int, c::block_id>, const void*> cache_to_model;
  bool one_to_one = true;
  for (const auto& [id, seq] : m.seqs) {
    REQUIRE(cache.contains(id));
    for (int l = 0; l < m.cfg.layers; ++l) {
      for (int h = 0; h < m.cfg.kv_heads; ++h) {
        const auto table = cache.blocks(id, l, h);
        const auto& slots = m.at(id, l, h).slots;
        REQUIRE(table.size() == slots.size());
        for (std::size_t i = 0; i < table.size(); ++i) {
          const std::pair<int, c::block_id> key{static_cast<int>(table[i].level), table[i].id};
          ++refs[key];
          const void* mb = slots[i].data.get();
          const auto [a, new_a] = model_to_cache.emplace(mb, key);
          const auto [b, new_b] = cache_to_model.emplace(key, mb);
          one_to_one = one_to_one && a->second == key && b->second == mb;
        }
      }
    }
  }
  REQUIRE(one_to_one);
  std::array<std::size_t, c::tier_count> used{};
  bool refcounts_ok = true;
  for (const auto& [key, n] : refs) {
    ++used[static_cast<std::size_t>(key.first)];
    refcounts_ok = refcounts_ok && pool_of(cache, static_cast<c::tier>(key.first)).refcount(key.second) == n;
  }
  REQUIRE(refcounts_ok);
  const auto model_used = m.used_blocks();
  const c::cache_usage u = cache.usage();
  for (int t = 0; t < c::tier_count; ++t) {
    INFO("tier " << c::to_string(static_cast<c::tier>(t)));
    REQUIRE(pool_of(cache, static_cast<c::tier>(t)).used_blocks() == used[static_cast<std::size_t>(t)]);
    REQUIRE(model_used[static_cast<std::size_t>(t)] == used[static_cast<std::size_t>(t)]);
    REQUIRE(u.tiers[static_cast<std::size_t>(t)].used == used[static_cast<std::size_t>(t)]);
  }
  REQUIRE(u.token_heads == m.token_heads());
  REQUIRE(u.window_bytes == m.window_bytes());
  REQUIRE(u.sequences == static_cast<index_t>(m.seqs.size()));
  REQUIRE(cache.sequence_count() == static_cast<index_t>(m.seqs.size()));
}

// ---- the random driver ------------------------------------------------------------------------

struct run_stats {
  int appends = 0, append_oom = 0, evicts = 0, compacts = 0, compact_oom = 0, forks = 0,
      frees = 0;
  std::array<int, c::tier_count> blocks_by_tier{};
};

/// Appends `tokens` random tokens (as float, half or bfloat16; token- or head-major) to the cache
/// and the model; expects out_of_memory exactly when the model says the blocks do not fit.
template <class Cache, class T>
bool append_both(Cache& cache, cache_model<Cache>& m, c::seq_id id, int layer,
                 const std::vector<float>& kf, const std::vector<float>& vf, index_t tokens,
                 bool head_major) {
  const typed_kv<T> data(kf, vf, tokens, m.cfg.kv_heads, m.cfg.head_dim, head_major);
  const auto r = m.template append<T>(id, layer, data.kview(), data.vview());
  if (r.fits) {
    cache.append(id, layer, data.kview(), data.vview());
  } else {
    require_error([&] { cache.append(id, layer, data.kview(), data.vview()); },
                  oscar::errc::out_of_memory, {"append needs", "nothing was changed"});
  }
  return r.fits;
}

/// Operations per random run: as given in optimized builds, a twelfth in unoptimized ones (the
/// asan preset builds Debug, where an operation costs about 15 times more; the runs are
/// prefixes of the same sequences). OSCAR_TEST_SCALE=<n> in the environment multiplies them, for
/// longer soak runs.
int scaled_ops(int ops) {
#ifdef NDEBUG
  int scaled = ops;
#else
  int scaled = ops / 12;
#endif
  if (const char* env = std::getenv("OSCAR_TEST_SCALE")) scaled *= std::max(1, std::atoi(env));
  return scaled;
}

/// `ops` random operations on `Cache` (several sequences, forks, tight pools so appends and
/// compactions sometimes run out of blocks), compared with the model after every one.
template <class Cache>
run_stats run_random_ops(const c::cache_config& cfg, std::array<std::size_t, 3> budget_blocks,
                         std::uint64_t seed, int ops) {
  INFO("seed " << seed << ", block_tokens " << cfg.block_tokens);
  const c::tier_policy policy = hashed_tier;
  cache_model<Cache> m(cfg, {}, policy);  // budget set below, in blocks
  const c::tier_budget budget{budget_blocks[0] * m.block_size[0], budget_blocks[1] * m.block_size[1],
                              budget_blocks[2] * m.block_size[2]};
  m = cache_model<Cache>(cfg, budget, policy);
  Cache cache(cfg, budget, policy);
  REQUIRE(cache.chunk_tokens() == m.chunk);
  for (int t = 0; t < c::tier_count; ++t) {
    REQUIRE(cache.usage().tiers[static_cast<std::size_t>(t)].block_bytes == m.block_size[static_cast<std::size_t>(t)]);
    REQUIRE(cache.usage().tiers[static_cast<std::size_t>(t)].capacity == budget_blocks[static_cast<std::size_t>(t)]);
  }

  rng r{seed};
  run_stats stats;
  verified_blocks memo;
  std::vector<c::seq_id> live;
  std::set<c::seq_id> issued;
  const int max_live = 5;
  const index_t max_tokens = 4 * cfg.block_tokens + 24;  // per head; longer heads get evicted
  auto new_id = [&](c::seq_id id) {
    REQUIRE(issued.insert(id).second);  // ids are never reused
    live.push_back(id);
  };

  const int full_length = ops;
  ops = scaled_ops(ops);
  for (int op = 0; op < ops; ++op) {
    if (live.size() < 2) {
      const c::seq_id id = cache.create();
      new_id(id);
      m.create(id);
      continue;
    }
    const c::seq_id id = live[static_cast<std::size_t>(r.below(static_cast<int>(live.size())))];
    const int layer = r.below(cfg.layers);
    const int head = r.below(cfg.kv_heads);
    const index_t n = m.tokens(id, layer, head);
    int kind = r.below(100);
    if (n > max_tokens) kind = 60;  // evict
    INFO("op " << op << ", kind " << kind << ", seq " << id << ", layer " << layer << ", head " << head);

    if (kind < 50) {  // append
      const index_t tokens = r.below(71);
      const auto kf = random_kv(r, tokens, cfg.kv_heads, cfg.head_dim);
      const auto vf = random_kv(r, tokens, cfg.kv_heads, cfg.head_dim);
      const bool head_major = r.chance(25);
      bool fits = false;
      switch (r.below(3)) {
        case 0: fits = append_both<Cache, float>(cache, m, id, layer, kf, vf, tokens, head_major); break;
        case 1: fits = append_both<Cache, half>(cache, m, id, layer, kf, vf, tokens, head_major); break;
        default: fits = append_both<Cache, bfloat16>(cache, m, id, layer, kf, vf, tokens, head_major); break;
      }
      ++stats.appends;
      stats.append_oom += fits ? 0 : 1;
      check_layer(cache, m, id, layer, memo);
    } else if (kind < 70) {  // evict
      std::vector<index_t> positions;
      if (n > 0) {
        if (n > max_tokens || r.chance(20)) {  // a run of positions: drops whole blocks
          // Too long: at least half of the head goes.
          const index_t first = n > max_tokens ? r.below(static_cast<int>(n / 2)) : r.below(static_cast<int>(n));
          const index_t least = n > max_tokens ? n / 2 : 1;
          const index_t count = least + r.below(static_cast<int>(n - first - least + 1));
          for (index_t p = first; p < first + count; ++p) positions.push_back(p);
        } else {
          std::vector<index_t> all(static_cast<std::size_t>(n));
          for (index_t p = 0; p < n; ++p) all[static_cast<std::size_t>(p)] = p;
          const int count = r.below(static_cast<int>(std::min<index_t>(n, 12)) + 1);
          for (int i = 0; i < count; ++i) {  // partial Fisher-Yates: distinct positions
            std::swap(all[static_cast<std::size_t>(i)],
                      all[static_cast<std::size_t>(i + r.below(static_cast<int>(n) - i))]);
            positions.push_back(all[static_cast<std::size_t>(i)]);
          }
        }
        for (std::size_t i = positions.size(); i > 1; --i)  // any order
          std::swap(positions[i - 1], positions[static_cast<std::size_t>(r.below(static_cast<int>(i)))]);
      }
      cache.evict(id, layer, head, positions);
      m.evict(id, layer, head, positions);
      ++stats.evicts;
      check_layer(cache, m, id, layer, memo);
    } else if (kind < 82) {  // compact, with small integer importance: exact sums, many ties
      std::vector<float> importance(static_cast<std::size_t>(n));
      for (float& x : importance) x = static_cast<float>(r.below(6) - 2);
      const auto res = m.compact(id, layer, head, importance);
      if (res.fits) {
        cache.compact(id, layer, head, importance);
      } else {
        require_error([&] { cache.compact(id, layer, head, importance); },
                      oscar::errc::out_of_memory, {"compact needs"});
        ++stats.compact_oom;
      }
      ++stats.compacts;
      check_layer(cache, m, id, layer, memo);
    } else if (kind < 92) {  // fork
      if (static_cast<int>(live.size()) < max_live) {
        const c::seq_id child = cache.fork(id);
        new_id(child);
        m.fork(id, child);
        ++stats.forks;
        for (int l = 0; l < cfg.layers; ++l) check_layer(cache, m, child, l, memo);
      }
    } else {  // free
      cache.free(id);
      m.free(id);
      std::erase(live, id);
      REQUIRE_FALSE(cache.contains(id));
      ++stats.frees;
    }
    check_pools(cache, m);
    if (op % 50 == 49) {  // now and then, every head of every sequence
      for (c::seq_id s : live)
        for (int l = 0; l < cfg.layers; ++l) check_layer(cache, m, s, l, memo);
    }
    const auto used = m.used_blocks();
    for (int t = 0; t < c::tier_count; ++t)
      stats.blocks_by_tier[static_cast<std::size_t>(t)] += used[static_cast<std::size_t>(t)] > 0 ? 1 : 0;
  }
  for (c::seq_id s : live)
    for (int l = 0; l < cfg.layers; ++l) check_layer(cache, m, s, l, memo);
  // Full-length runs must reach the paths they exist for.
  if (ops < full_length) return stats;
  CHECK(stats.forks > 0);
  if (cfg.block_tokens > m.chunk) CHECK(m.copies_on_write > 0);  // else blocks are never partial
  CHECK(stats.append_oom > 0);
  for (int b : stats.blocks_by_tier) CHECK(b > 0);
  return stats;
}

/// 1 MiB per tier: the default budget (1 GiB of low tier) costs a few hundred MB of pool
/// metadata and a few tenths of a second per cache.
const c::tier_budget mib{1 << 20, 1 << 20, 1 << 20};

c::cache_config small_config(int block_tokens) {
  return c::cache_config{.layers = 2, .kv_heads = 2, .head_dim = 64, .block_tokens = block_tokens,
                         .sink_tokens = 2, .window_tokens = 8};
}

/// The FP2+ family with per-token tiles (`fp2plus_kh`, keys grouped along head_dim): chunk 1, so
/// 16- and 32-token blocks exercise aging, partial blocks and copy-on-write token by token. The
/// default cache (`kv_cache<>`, FP2+ keys in 128-token tiles) runs the same properties at 128-
/// and 256-token blocks.
using per_token_cache = c::kv_cache<q::fp2plus_kh, q::fp4plus, q::kv_fp16>;
using default_cache = c::kv_cache<>;
using kivi_cache = c::kv_cache<q::kivi2, q::kivi4, q::kv_fp16>;
using fp8_cache = c::kv_cache<q::kv_q4_0, q::kv_fp8, q::kv_bf16>;

/// Appends `tokens` tokens of seeded data (float) to every layer of `id`.
template <class Cache>
void fill(Cache& cache, c::seq_id id, index_t tokens, std::uint64_t seed) {
  const auto& cfg = cache.config();
  for (int l = 0; l < cfg.layers; ++l) {
    auto k = oscar::testing::synthetic_keys(tokens, cfg.kv_heads, cfg.head_dim, seed + 2 * l);
    auto v = oscar::testing::synthetic_values(tokens, cfg.kv_heads, cfg.head_dim, seed + 2 * l + 1);
    cache.append(id, l, k.view(), v.view());
  }
}

/// gather of every layer of each sequence.
template <class Cache>
std::vector<std::vector<c::gathered_head>> snapshot(const Cache& cache,
                                                    const std::vector<c::seq_id>& ids) {
  std::vector<std::vector<c::gathered_head>> out;
  for (c::seq_id id : ids)
    for (int l = 0; l < cache.config().layers; ++l) out.push_back(cache.gather(id, l));
  return out;
}

bool same(const std::vector<std::vector<c::gathered_head>>& a,
          const std::vector<std::vector<c::gathered_head>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size()) return false;
    for (std::size_t h = 0; h < a[i].size(); ++h) {
      if (a[i][h].tokens != b[i][h].tokens || first_difference(a[i][h].k, b[i][h].k) != -1 ||
          first_difference(a[i][h].v, b[i][h].v) != -1)
        return false;
    }
  }
  return true;
}

}  // namespace

// ================================================================================================
// 1. Property tests against the reference model
// ================================================================================================

TEST_CASE("kv_cache: random operations match the reference model (FP2+/FP4+/fp16 tiers)",
          "[cache]") {
  for (std::uint64_t seed : {11u, 12u, 13u}) {
    // 16-token blocks; pools of 40 blocks per tier: appends sometimes run out.
    run_random_ops<per_token_cache>(small_config(16), {40, 40, 40}, seed, 700);
  }
  // 32-token blocks.
  run_random_ops<per_token_cache>(small_config(32), {24, 24, 24}, 14, 500);
  // No sinks, no window: every token ages out in the append that brings it.
  auto bare = small_config(16);
  bare.sink_tokens = 0;
  bare.window_tokens = 0;
  run_random_ops<per_token_cache>(bare, {40, 40, 40}, 15, 300);
}

TEST_CASE("kv_cache: random operations match the reference model (default FP2+ cache)",
          "[cache]") {
  // FP2+ keys are encoded 128 tokens at a time: one chunk per 128-token block, two per 256.
  run_random_ops<default_cache>(small_config(128), {10, 10, 10}, 16, 500);
  auto odd = small_config(256);
  odd.sink_tokens = 3;
  odd.window_tokens = 70;  // not a multiple of the chunk
  run_random_ops<default_cache>(odd, {5, 5, 5}, 18, 400);
}

TEST_CASE("kv_cache: random operations match the reference model (KIVI-2/KIVI-4/fp16 tiers)",
          "[cache]") {
  // Chunks of 32 tokens (KIVI keys group 32 tokens per channel): 2 chunks per 64-token block,
  // 1 per 32-token block.
  for (std::uint64_t seed : {21u, 22u}) run_random_ops<kivi_cache>(small_config(64), {14, 14, 14}, seed, 600);
  run_random_ops<kivi_cache>(small_config(32), {16, 16, 16}, 23, 500);
  // 4 chunks per 128-token block; 5 sinks and a window of 37 (not a multiple of the chunk).
  auto odd = small_config(128);
  odd.sink_tokens = 5;
  odd.window_tokens = 37;
  run_random_ops<kivi_cache>(odd, {6, 6, 6}, 24, 400);
}

TEST_CASE("kv_cache: random operations match the reference model (q4_0/fp8/bf16 tiers)",
          "[cache]") {
  // fp8's per-head scale is calibrated on the window when the first chunk ages into the tier;
  // later, larger tokens saturate, which the model reproduces through encode_tile.
  for (std::uint64_t seed : {31u, 32u}) run_random_ops<fp8_cache>(small_config(16), {32, 32, 32}, seed, 600);
}

// ================================================================================================
// 2. Copy-on-write
// ================================================================================================

TEST_CASE("kv_cache: a fork shares blocks; writes on either side never show on the other",
          "[cache]") {
  const auto cfg = small_config(16);  // chunk 1, S = 2, R = 8
  per_token_cache cache(cfg, mib);
  const c::seq_id parent = cache.create();
  // 2 sinks + 8 window + 20 aged out: one full block and one block holding 4 of 16.
  fill(cache, parent, 30, 100);
  REQUIRE(cache.blocks(parent, 0, 0).size() == 2);
  REQUIRE(pool_of(cache, c::tier::low).fill(cache.blocks(parent, 0, 0)[1].id) == 4);

  const c::seq_id child = cache.fork(parent);
  REQUIRE(cache.usage().tiers[2].used == 2 * 2 * 2);  // nothing copied yet
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) {
      const auto a = cache.blocks(parent, l, h), b = cache.blocks(child, l, h);
      REQUIRE(a.size() == b.size());
      for (std::size_t i = 0; i < a.size(); ++i) {
        CHECK(a[i].id == b[i].id);
        CHECK(pool_of(cache, a[i].level).refcount(a[i].id) == 2);
      }
    }
  const auto parent_before = snapshot(cache, {parent});
  const auto child_before = snapshot(cache, {child});
  REQUIRE(same(parent_before, child_before));

  auto append_some = [&](c::seq_id id, std::uint64_t seed) {
    // 5 tokens: 5 more age out into the shared, partial last block.
    auto k = oscar::testing::gaussian_kv(5, 2, 64, seed), v = oscar::testing::gaussian_kv(5, 2, 64, seed + 1);
    cache.append(id, 0, k.view(), v.view());
  };

  SECTION("append to the child copies the shared last block; the parent is unchanged") {
    append_some(child, 200);
    CHECK(same(snapshot(cache, {parent}), parent_before));
    CHECK(cache.blocks(child, 0, 0)[0].id == cache.blocks(parent, 0, 0)[0].id);  // full: shared
    CHECK(cache.blocks(child, 0, 0)[1].id != cache.blocks(parent, 0, 0)[1].id);  // copied
    CHECK(pool_of(cache, c::tier::low).fill(cache.blocks(child, 0, 0)[1].id) == 9);
    CHECK(pool_of(cache, c::tier::low).fill(cache.blocks(parent, 0, 0)[1].id) == 4);
    // Then the parent writes in place (its block is no longer shared); the child is unchanged.
    const auto child_after = snapshot(cache, {child});
    const c::block_id before = cache.blocks(parent, 0, 0)[1].id;
    append_some(parent, 300);
    CHECK(cache.blocks(parent, 0, 0)[1].id == before);
    CHECK(same(snapshot(cache, {child}), child_after));
  }
  SECTION("append to the parent copies; the child is unchanged") {
    append_some(parent, 400);
    CHECK(same(snapshot(cache, {child}), child_before));
    CHECK(cache.blocks(child, 0, 0)[1].id != cache.blocks(parent, 0, 0)[1].id);
  }
  SECTION("evict and compact on one side never change the other") {
    const std::vector<index_t> positions{0, 3, 5, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 25, 29};
    cache.evict(parent, 0, 0, positions);
    std::vector<float> importance(static_cast<std::size_t>(cache.tokens(parent, 0, 0)));
    for (std::size_t i = 0; i < importance.size(); ++i) importance[i] = static_cast<float>(i % 7);
    cache.compact(parent, 0, 0, importance);
    cache.evict(parent, 1, 1, std::vector<index_t>{2, 4, 6, 8});
    CHECK(same(snapshot(cache, {child}), child_before));
    // And the other way round.
    const auto parent_now = snapshot(cache, {parent});
    std::vector<float> child_importance(static_cast<std::size_t>(cache.tokens(child, 1, 0)), 1.0f);
    child_importance[20] = 5.0f;
    cache.compact(child, 1, 0, child_importance);
    cache.evict(child, 0, 1, std::vector<index_t>{1, 9, 10});
    CHECK(same(snapshot(cache, {parent}), parent_now));
  }
  SECTION("freeing either side leaves the other whole") {
    cache.free(parent);
    CHECK(same(snapshot(cache, {child}), child_before));
    CHECK(cache.usage().tiers[2].used == 2 * 2 * 2);
    append_some(child, 500);  // no longer shared: written in place
    CHECK(cache.usage().tiers[2].used == 2 * 2 * 2);
    cache.free(child);
    CHECK(cache.usage().tiers[2].used == 0);
  }
}

TEST_CASE("kv_cache: copy-on-write with 32-token chunks (KIVI) and a partial shared block",
          "[cache]") {
  kivi_cache cache(small_config(64), mib);  // chunk 32: a block holds 2 chunks
  const c::seq_id a = cache.create();
  fill(cache, a, 2 + 8 + 32, 600);  // one chunk aged out: the block is half full
  REQUIRE(pool_of(cache, cache.blocks(a, 0, 0)[0].level).fill(cache.blocks(a, 0, 0)[0].id) == 32);
  const c::seq_id b = cache.fork(a);
  const auto a_before = snapshot(cache, {a});
  fill(cache, b, 40, 700);  // the second chunk ages out into the shared block: b copies it
  CHECK(same(snapshot(cache, {a}), a_before));
  CHECK(cache.blocks(a, 0, 0)[0].id != cache.blocks(b, 0, 0)[0].id);
  const auto b_before = snapshot(cache, {b});
  fill(cache, a, 40, 800);
  CHECK(same(snapshot(cache, {b}), b_before));
}

// ================================================================================================
// 3. Block summaries
// ================================================================================================

TEST_CASE("kv_cache: block key summaries are the min and max of the block's decoded keys",
          "[cache]") {
  // check_head decodes every block from pool(t).data(id) with the format's decode_tile and
  // compares the key summaries exactly; the random runs above call it after every operation.
  // Here: evicted tokens still count (the summary covers all filled tokens).
  const auto cfg = small_config(16);
  const c::tier_policy policy = hashed_tier;
  const c::tier_budget budget = mib;
  per_token_cache cache(cfg, budget, policy);
  cache_model<per_token_cache> m(cfg, budget, policy);
  verified_blocks memo;
  const c::seq_id id = cache.create();
  m.create(id);
  rng r{7};
  for (int step = 0; step < 6; ++step) {
    const auto kf = random_kv(r, 23, 2, 64), vf = random_kv(r, 23, 2, 64);
    REQUIRE(append_both<per_token_cache, float>(cache, m, id, 0, kf, vf, 23, false));
  }
  check_layer(cache, m, id, 0, memo);
  // Evict every block token but the first of each block: the summaries must not change.
  const auto table = cache.blocks(id, 0, 0);
  std::vector<std::vector<oscar::half>> lo, hi;
  for (const auto& s : table) {
    lo.emplace_back(pool_of(cache, s.level).key_min(s.id).begin(), pool_of(cache, s.level).key_min(s.id).end());
    hi.emplace_back(pool_of(cache, s.level).key_max(s.id).begin(), pool_of(cache, s.level).key_max(s.id).end());
  }
  std::vector<index_t> positions;
  index_t pos = cfg.sink_tokens;
  for (const auto& s : table) {
    const auto count = static_cast<index_t>(s.valid.count());
    for (index_t t = 1; t < count; ++t) positions.push_back(pos + t);
    pos += count;
  }
  cache.evict(id, 0, 0, positions);
  m.evict(id, 0, 0, positions);
  check_layer(cache, m, id, 0, memo);
  const auto after = cache.blocks(id, 0, 0);
  REQUIRE(after.size() == table.size());
  for (std::size_t i = 0; i < after.size(); ++i) {
    CHECK(after[i].valid.count() == 1);
    const auto now_lo = pool_of(cache, after[i].level).key_min(after[i].id);
    const auto now_hi = pool_of(cache, after[i].level).key_max(after[i].id);
    CHECK(std::equal(now_lo.begin(), now_lo.end(), lo[i].begin()));
    CHECK(std::equal(now_hi.begin(), now_hi.end(), hi[i].begin()));
  }
  // Valid gathered keys lie inside their block's bounds.
  const auto g = cache.gather(id, 0)[0];
  for (std::size_t i = 0; i < after.size(); ++i) {
    const auto row = static_cast<std::size_t>(cfg.sink_tokens) + i;  // one valid token per block
    for (int ch = 0; ch < 64; ++ch) {
      const float x = g.k[row * 64 + static_cast<std::size_t>(ch)];
      CHECK(static_cast<float>(pool_of(cache, after[i].level).key_min(after[i].id)[static_cast<std::size_t>(ch)]) <= x);
      CHECK(x <= static_cast<float>(pool_of(cache, after[i].level).key_max(after[i].id)[static_cast<std::size_t>(ch)]));
    }
  }
}

// ================================================================================================
// 4. Compaction
// ================================================================================================

namespace {

/// Rows of a gathered head as (K, V) pairs, sorted: the head's multiset of tokens.
std::vector<std::vector<float>> sorted_rows(const c::gathered_head& g, int d) {
  std::vector<std::vector<float>> rows;
  for (index_t t = 0; t < g.tokens; ++t) {
    std::vector<float> row(g.k.begin() + t * d, g.k.begin() + (t + 1) * d);
    row.insert(row.end(), g.v.begin() + t * d, g.v.begin() + (t + 1) * d);
    rows.push_back(std::move(row));
  }
  std::sort(rows.begin(), rows.end());
  return rows;
}

/// Runs compaction on every head of `id`, layer 0, with random importance and checks: the
/// multiset of rows is kept exactly; sinks and window do not move; blocks never increase, and
/// each tier's blocks are the fewest its chunks fit in; the table runs full, mid, low; within a
/// tier, chunk weights (summed importance of valid tokens) do not increase.
template <class Cache>
void check_compaction(Cache& cache, c::seq_id id, rng& r) {
  const auto& cfg = cache.config();
  const int d = cfg.head_dim, chunk = cache.chunk_tokens(), per_block = cfg.block_tokens / chunk;
  for (int h = 0; h < cfg.kv_heads; ++h) {
    INFO("head " << h);
    const auto before = cache.gather(id, 0)[static_cast<std::size_t>(h)];
    const auto blocks_before = cache.blocks(id, 0, h).size();
    // Importance by row content (rows are distinct random data), in entry order.
    std::map<std::vector<float>, float> importance_of;
    std::vector<float> importance(static_cast<std::size_t>(before.tokens));
    for (index_t t = 0; t < before.tokens; ++t) {
      importance[static_cast<std::size_t>(t)] = std::ldexp(static_cast<float>(r.below(1000)), -4);
      std::vector<float> row(before.k.begin() + t * d, before.k.begin() + (t + 1) * d);
      importance_of[row] = importance[static_cast<std::size_t>(t)];
    }
    REQUIRE(importance_of.size() == static_cast<std::size_t>(before.tokens));
    cache.compact(id, 0, h, importance);

    const auto after = cache.gather(id, 0)[static_cast<std::size_t>(h)];
    CHECK(sorted_rows(after, d) == sorted_rows(before, d));
    const auto table = cache.blocks(id, 0, h);
    CHECK(table.size() <= blocks_before);
    // Sinks and window stay where they are.
    const auto fixed_head = static_cast<std::size_t>(cfg.sink_tokens) * d;
    CHECK(first_difference(std::span(after.k).first(fixed_head), std::span(before.k).first(fixed_head)) == -1);
    index_t in_blocks = 0;
    for (const auto& s : table) in_blocks += static_cast<index_t>(s.valid.count());
    const auto window = static_cast<std::size_t>(after.tokens - cfg.sink_tokens - in_blocks) * d;
    CHECK(first_difference(std::span(after.k).last(window), std::span(before.k).last(window)) == -1);
    // Walk the table: tiers in order, fewest blocks, weights non-increasing within a tier.
    std::array<int, c::tier_count> chunks_in_tier{}, blocks_in_tier{};
    int last_tier = 0;
    double last_weight = std::numeric_limits<double>::infinity();
    bool ordered = true;
    std::size_t row = static_cast<std::size_t>(cfg.sink_tokens);
    for (const auto& s : table) {
      const int t = static_cast<int>(s.level);
      if (t != last_tier) last_weight = std::numeric_limits<double>::infinity();
      ordered = ordered && t >= last_tier;
      last_tier = t;
      ++blocks_in_tier[static_cast<std::size_t>(t)];
      const int fill = pool_of(cache, s.level).fill(s.id);
      for (int ci = 0; ci < fill / chunk; ++ci) {
        double w = 0;
        bool any = false;
        for (int k = ci * chunk; k < (ci + 1) * chunk; ++k) {
          if (!s.valid.test(static_cast<std::size_t>(k))) continue;
          std::vector<float> key(after.k.begin() + static_cast<long>(row * d),
                                 after.k.begin() + static_cast<long>((row + 1) * d));
          w += importance_of.at(key);
          any = true;
          ++row;
        }
        CHECK(any);  // only chunks with a valid token are kept
        ordered = ordered && w <= last_weight;
        last_weight = w;
        ++chunks_in_tier[static_cast<std::size_t>(t)];
      }
    }
    CHECK(ordered);
    for (int t = 0; t < c::tier_count; ++t)
      CHECK(blocks_in_tier[static_cast<std::size_t>(t)] ==
            (chunks_in_tier[static_cast<std::size_t>(t)] + per_block - 1) / per_block);
  }
}

}  // namespace

TEST_CASE("kv_cache: compaction keeps every token, packs blocks and puts important chunks first",
          "[cache]") {
  rng r{41};
  SECTION("FP2+ with per-token keys, one tier, chunk 1: block tokens come out sorted by importance") {
    const auto cfg = small_config(16);
    per_token_cache cache(cfg, mib);
    const c::seq_id id = cache.create();
    fill(cache, id, 120, 900);
    // Holes: every third block token.
    std::vector<index_t> holes;
    for (index_t p = cfg.sink_tokens; p < 120 - cfg.window_tokens; p += 3) holes.push_back(p);
    for (int h = 0; h < 2; ++h) cache.evict(id, 0, h, holes);
    const auto before = cache.gather(id, 0)[0];
    const auto n_before = cache.blocks(id, 0, 0).size();
    // Importance with ties: the stable order keeps equal tokens in their entry order.
    std::vector<float> importance(static_cast<std::size_t>(before.tokens));
    for (std::size_t i = 0; i < importance.size(); ++i) importance[i] = static_cast<float>((i * 7) % 5);
    cache.compact(id, 0, 0, importance);
    const auto after = cache.gather(id, 0)[0];
    const auto first = static_cast<std::size_t>(cfg.sink_tokens);
    const auto count = static_cast<std::size_t>(before.tokens) - first - static_cast<std::size_t>(cfg.window_tokens);
    std::vector<std::size_t> order(count);
    for (std::size_t i = 0; i < count; ++i) order[i] = first + i;
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return importance[a] > importance[b]; });
    std::vector<float> want_k(before.k.begin(), before.k.begin() + static_cast<long>(first * 64));
    for (std::size_t i : order)
      want_k.insert(want_k.end(), before.k.begin() + static_cast<long>(i * 64), before.k.begin() + static_cast<long>((i + 1) * 64));
    want_k.insert(want_k.end(), before.k.end() - cfg.window_tokens * 64, before.k.end());
    CHECK(first_difference(after.k, want_k) == -1);
    CHECK(cache.blocks(id, 0, 0).size() == (count + 15) / 16);
    CHECK(cache.blocks(id, 0, 0).size() < n_before);
    check_compaction(cache, id, r);
  }
  SECTION("default FP2+: 128-token chunks move whole") {
    default_cache cache(small_config(256), mib, hashed_tier);
    const c::seq_id id = cache.create();
    fill(cache, id, 1100, 1100);
    std::vector<index_t> holes;
    for (index_t p = 7; p < 1000; p += 5) holes.push_back(p);
    cache.evict(id, 0, 0, holes);
    check_compaction(cache, id, r);
  }
  SECTION("FP2+/FP4+/fp16 tiers") {
    per_token_cache cache(small_config(16), mib, hashed_tier);
    const c::seq_id id = cache.create();
    fill(cache, id, 200, 1000);
    std::vector<index_t> holes;
    for (index_t p = 5; p < 150; p += 4) holes.push_back(p);
    cache.evict(id, 0, 1, holes);
    check_compaction(cache, id, r);
    check_compaction(cache, id, r);  // again, on an already compacted table
  }
  SECTION("KIVI tiers, chunk 32, chunks with holes") {
    kivi_cache cache(small_config(64), mib, hashed_tier);
    const c::seq_id id = cache.create();
    fill(cache, id, 2 + 8 + 32 * 11, 1100);
    std::vector<index_t> holes;
    for (index_t p = 2; p < 2 + 32 * 11; p += 5) holes.push_back(p);
    for (index_t p = 2 + 64; p < 2 + 96; ++p) holes.push_back(p);  // a whole chunk
    std::sort(holes.begin(), holes.end());
    holes.erase(std::unique(holes.begin(), holes.end()), holes.end());
    cache.evict(id, 0, 0, holes);
    check_compaction(cache, id, r);
  }
}

// ================================================================================================
// 5. Errors: oscar::error with the right code, the value named, and nothing changed
// ================================================================================================

TEST_CASE("kv_cache: running out of blocks throws out_of_memory and changes nothing", "[cache]") {
  const auto cfg = c::cache_config{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 16,
                                   .sink_tokens = 2, .window_tokens = 8};
  const std::size_t bytes = block_bytes<q::fp2plus_kh>(16, 64);

  SECTION("append; free another sequence, then the same append succeeds") {
    // Low tier: 3 blocks. A holds 2 (one per head), B has tokens only in sinks and window.
    per_token_cache cache(cfg, c::tier_budget{.full = 0, .mid = 0, .low = 3 * bytes});
    const c::seq_id a = cache.create(), b = cache.create();
    fill(cache, a, 2 + 8 + 10, 1200);
    fill(cache, b, 2 + 5, 1300);
    REQUIRE(cache.usage().tiers[2].free == 1);
    const auto before = snapshot(cache, {a, b});
    // 6 tokens: both of B's heads need a block, one is free; head 0 must not change either.
    auto k = oscar::testing::gaussian_kv(6, 2, 64, 1400), v = oscar::testing::gaussian_kv(6, 2, 64, 1401);
    require_error([&] { cache.append(b, 0, k.view(), v.view()); }, oscar::errc::out_of_memory,
                  {"append needs 2 new blocks of tier low", "1 of 3 are free"});
    CHECK(same(snapshot(cache, {a, b}), before));
    CHECK(cache.usage().tiers[2].used == 2);

    cache.free(a);
    cache.append(b, 0, k.view(), v.view());
    CHECK(cache.tokens(b, 0, 0) == 2 + 5 + 6);
    CHECK(cache.usage().tiers[2].used == 2);
    // The same result as a cache that never failed.
    per_token_cache fresh(cfg, mib);
    const c::seq_id f = fresh.create();
    fill(fresh, f, 2 + 5, 1300);
    fresh.append(f, 0, k.view(), v.view());
    CHECK(same(snapshot(cache, {b}), snapshot(fresh, {f})));
  }
  SECTION("a copy-on-write copy needs a block too") {
    per_token_cache cache(cfg, c::tier_budget{.full = 0, .mid = 0, .low = 3 * bytes});
    const c::seq_id a = cache.create();
    fill(cache, a, 2 + 8 + 10, 1500);  // 2 partial blocks, 1 free
    const c::seq_id a2 = cache.fork(a);
    const auto before = snapshot(cache, {a, a2});
    // One token: one token per head ages out into the shared blocks, so both are copied.
    auto k = oscar::testing::gaussian_kv(1, 2, 64, 1600), v = oscar::testing::gaussian_kv(1, 2, 64, 1601);
    require_error([&] { cache.append(a2, 0, k.view(), v.view()); }, oscar::errc::out_of_memory,
                  {"append needs 2 new blocks of tier low", "1 of 3 are free"});
    CHECK(same(snapshot(cache, {a, a2}), before));
    CHECK(cache.usage().tiers[2].used == 2);
    cache.free(a);  // a2's blocks are its own now: written in place
    cache.append(a2, 0, k.view(), v.view());
    CHECK(cache.tokens(a2, 0, 1) == 21);
    CHECK(cache.usage().tiers[2].used == 2);
  }
  SECTION("compaction that needs new blocks while the pool is full") {
    per_token_cache cache(cfg, c::tier_budget{.full = 0, .mid = 0, .low = 2 * bytes});
    const c::seq_id a = cache.create();
    fill(cache, a, 2 + 8 + 10, 1700);  // 2 blocks, 0 free
    const c::seq_id a2 = cache.fork(a);  // shared blocks are not rewritten in place
    const auto before = snapshot(cache, {a, a2});
    std::vector<float> importance(static_cast<std::size_t>(cache.tokens(a2, 0, 0)), 1.0f);
    importance[5] = 2.0f;
    require_error([&] { cache.compact(a2, 0, 0, importance); }, oscar::errc::out_of_memory,
                  {"compact needs 1 new blocks of tier low", "0 of 2 are free"});
    CHECK(same(snapshot(cache, {a, a2}), before));
    cache.free(a);
    cache.compact(a2, 0, 0, importance);  // now rewritten in place
    CHECK(cache.usage().tiers[2].used == 2);
  }
}

TEST_CASE("kv_cache: a tier policy choosing a tier without budget runs out of memory", "[cache]") {
  const auto cfg = small_config(16);
  per_token_cache cache(cfg, c::tier_budget{.full = 0, .mid = 0, .low = 1 << 20},
                      [](const c::block_request&) { return c::tier::mid; });
  const c::seq_id id = cache.create();
  fill(cache, id, 10, 1700);  // sinks and window only
  const auto before = snapshot(cache, {id});
  auto k = oscar::testing::gaussian_kv(1, 2, 64, 1800), v = oscar::testing::gaussian_kv(1, 2, 64, 1801);
  require_error([&] { cache.append(id, 0, k.view(), v.view()); }, oscar::errc::out_of_memory,
                {"tier mid", "0 of 0 are free"});
  CHECK(same(snapshot(cache, {id}), before));

  per_token_cache bad(cfg, mib, [](const c::block_request&) { return static_cast<c::tier>(7); });
  const c::seq_id b = bad.create();
  fill(bad, b, 10, 1700);
  require_error([&] { bad.append(b, 0, k.view(), v.view()); }, oscar::errc::invalid_argument,
                {"= 7", "a tier"});
  CHECK(bad.tokens(b, 0, 0) == 10);
}

TEST_CASE("kv_cache: bad arguments throw oscar::error naming the value; nothing changes",
          "[cache]") {
  const auto cfg = small_config(16);
  per_token_cache cache(cfg, mib, hashed_tier);
  const c::seq_id a = cache.create(), b = cache.create();
  fill(cache, a, 60, 1900);
  fill(cache, b, 37, 2000);
  const c::seq_id gone = cache.create();
  cache.free(gone);
  const auto before = snapshot(cache, {a, b});
  const auto usage_before = cache.usage();
  const index_t n = cache.tokens(a, 0, 0);

  auto k = oscar::testing::gaussian_kv(4, 2, 64, 2100), v = oscar::testing::gaussian_kv(4, 2, 64, 2101);
  using E = oscar::errc;

  SECTION("append: shapes") {
    auto k3 = oscar::testing::gaussian_kv(4, 3, 64, 1), k32 = oscar::testing::gaussian_kv(4, 2, 32, 2);
    auto v3 = oscar::testing::gaussian_kv(3, 2, 64, 3);
    require_error([&] { cache.append(a, 0, k3.view(), v.view()); }, E::invalid_argument,
                  {"k shape [4, 3, 64]", "[tokens, 2, 64]"});
    require_error([&] { cache.append(a, 0, k32.view(), v.view()); }, E::invalid_argument,
                  {"k shape [4, 2, 32]"});
    require_error([&] { cache.append(a, 0, k.view(), k3.view()); }, E::invalid_argument,
                  {"v shape [4, 3, 64]"});
    require_error([&] { cache.append(a, 0, k.view(), v3.view()); }, E::invalid_argument,
                  {"v.tokens = 3", "as many tokens as k (4)"});
  }
  SECTION("append: NaN and Inf, float and half") {
    auto bad_k = k;
    bad_k.data[(2 * 2 + 1) * 64 + 5] = std::numeric_limits<float>::quiet_NaN();  // token 2, head 1, ch 5
    require_error([&] { cache.append(a, 0, bad_k.view(), v.view()); }, E::non_finite,
                  {"nan", "token 2, head 1, channel 5"});
    auto bad_v = v;
    bad_v.data[(3 * 2 + 0) * 64 + 63] = -std::numeric_limits<float>::infinity();
    require_error([&] { cache.append(b, 1, k.view(), bad_v.view()); }, E::non_finite,
                  {"inf", "token 3, head 0, channel 63"});
    std::vector<half> hk(k.data.size()), hv(v.data.size());
    for (std::size_t i = 0; i < hk.size(); ++i) hk[i] = half(k.data[i]), hv[i] = half(v.data[i]);
    hv[7] = half(std::numeric_limits<float>::infinity());
    require_error([&] {
      cache.append(a, 1, oscar::make_kv_view(static_cast<const half*>(hk.data()), 4, 2, 64),
                   oscar::make_kv_view(static_cast<const half*>(hv.data()), 4, 2, 64));
    }, E::non_finite, {"inf", "token 0, head 0, channel 7"});
    // A finite float beyond fp16's range is not an error: it saturates to fp16's largest value.
  }
  SECTION("layer and head out of range") {
    require_error([&] { cache.append(a, 2, k.view(), v.view()); }, E::invalid_argument,
                  {"layer = 2", "0 to 1"});
    require_error([&] { cache.append(a, -1, k.view(), v.view()); }, E::invalid_argument, {"layer = -1"});
    require_error([&] { (void)cache.gather(a, 2); }, E::invalid_argument, {"layer = 2"});
    require_error([&] { (void)cache.tokens(a, 0, 2); }, E::invalid_argument, {"head = 2", "0 to 1"});
    require_error([&] { (void)cache.blocks(a, 5, 0); }, E::invalid_argument, {"layer = 5"});
    require_error([&] { cache.evict(a, 0, -1, std::vector<index_t>{0}); }, E::invalid_argument,
                  {"head = -1"});
    require_error([&] { cache.compact(a, 2, 0, std::vector<float>(1)); }, E::invalid_argument,
                  {"layer = 2"});
  }
  SECTION("stale and never-issued sequence ids") {
    for (c::seq_id id : {gone, c::seq_id{999}}) {
      const std::string name = "sequence id " + std::to_string(id);
      require_error([&] { cache.append(id, 0, k.view(), v.view()); }, E::invalid_argument, {name});
      require_error([&] { (void)cache.gather(id, 0); }, E::invalid_argument, {name});
      require_error([&] { (void)cache.fork(id); }, E::invalid_argument, {name});
      require_error([&] { cache.free(id); }, E::invalid_argument, {name});
      require_error([&] { cache.evict(id, 0, 0, std::vector<index_t>{}); }, E::invalid_argument, {name});
      require_error([&] { cache.compact(id, 0, 0, std::vector<float>{}); }, E::invalid_argument, {name});
      require_error([&] { (void)cache.tokens(id, 0, 0); }, E::invalid_argument, {name});
      CHECK_FALSE(cache.contains(id));
    }
  }
  SECTION("evict: out-of-range and duplicate positions") {
    const std::string range = "positions in [0, " + std::to_string(n) + ")";
    require_error([&] { cache.evict(a, 0, 0, std::vector<index_t>{0, 5, n}); }, E::invalid_argument,
                  {"= " + std::to_string(n), range});
    require_error([&] { cache.evict(a, 0, 0, std::vector<index_t>{3, -1}); }, E::invalid_argument,
                  {"= -1", range});
    require_error([&] { cache.evict(a, 0, 0, std::vector<index_t>{30, 4, 30}); }, E::invalid_argument,
                  {"= 30", "each position once"});
  }
  SECTION("compact: wrong importance length, NaN and Inf") {
    require_error([&] { cache.compact(a, 0, 0, std::vector<float>(static_cast<std::size_t>(n - 1))); },
                  E::invalid_argument, {"= " + std::to_string(n - 1), "(" + std::to_string(n) + ")"});
    std::vector<float> importance(static_cast<std::size_t>(n), 1.0f);
    importance[17] = std::numeric_limits<float>::quiet_NaN();
    require_error([&] { cache.compact(a, 0, 0, importance); }, E::non_finite, {"importance[17] = nan"});
    importance[17] = 1.0f;
    importance[3] = std::numeric_limits<float>::infinity();
    require_error([&] { cache.compact(a, 0, 0, importance); }, E::non_finite, {"importance[3] = inf"});
  }
  CHECK(same(snapshot(cache, {a, b}), before));
  const auto usage_after = cache.usage();
  CHECK(usage_after.token_heads == usage_before.token_heads);
  for (int t = 0; t < c::tier_count; ++t) CHECK(usage_after.tiers[static_cast<std::size_t>(t)].used == usage_before.tiers[static_cast<std::size_t>(t)].used);
}

// A finite input beyond fp16's range (|x| >= 65520) saturates to +-65504 in the fp16 sinks and
// window, as OSCAR's fp16 format does: NaN/Inf are never stored, and a token that ages out
// into FP2+ calibrates and decodes from finite values.
TEST_CASE("kv_cache: finite inputs beyond fp16's range never become Inf in the cache",
          "[cache]") {
  const auto cfg = c::cache_config{.layers = 1, .kv_heads = 1, .head_dim = 64, .block_tokens = 16,
                                   .sink_tokens = 1, .window_tokens = 2};
  per_token_cache cache(cfg, mib);
  const c::seq_id id = cache.create();
  auto k = oscar::testing::gaussian_kv(40, 1, 64, 2200), v = oscar::testing::gaussian_kv(40, 1, 64, 2201);
  k.data[0] = 7e4f;               // token 0 (a sink)
  k.data[1 * 64 + 3] = -1e6f;     // token 1: ages out into the low tier first
  v.data[2 * 64 + 5] = 65520.0f;  // token 2: the smallest float that rounds to Inf in fp16
  k.data[39 * 64 + 9] = 1e5f;     // token 39: stays in the window
  const auto before = snapshot(cache, {id});
  bool rejected = false;
  try {
    cache.append(id, 0, k.view(), v.view());
  } catch (const oscar::error& e) {
    rejected = true;  // a rejection is fine too, if it changes nothing
    INFO(e.what());
    CHECK(same(snapshot(cache, {id}), before));
  }
  if (rejected) return;
  const auto g = cache.gather(id, 0)[0];
  REQUIRE(g.tokens == 40);
  CHECK(g.k[0] == 65504.0f);              // saturated, like the fp16 format
  CHECK(g.k[39 * 64 + 9] == 65504.0f);
  // Every value finite and within fp16's range (give or take the quantization of the tokens
  // that aged out: FP2+ decodes a group to at most about its absmax).
  auto in_range = [](float x) { return std::isfinite(x) && std::fabs(x) <= 2 * 65504.0f; };
  CHECK(std::all_of(g.k.begin(), g.k.end(), in_range));
  CHECK(std::all_of(g.v.begin(), g.v.end(), in_range));
}

TEST_CASE("kv_cache: invalid configurations are rejected, naming the value", "[cache]") {
  using E = oscar::errc;
  auto with_blocks = [](int bt) {
    auto cfg = small_config(16);
    cfg.block_tokens = bt;
    return cfg;
  };
  for (int bt : {8, 24, 512, 0, -16}) {
    INFO("block_tokens " << bt);
    require_error([&] { per_token_cache x(with_blocks(bt)); }, E::invalid_argument,
                  {"config.block_tokens = " + std::to_string(bt), "a power of two from 16 to 256"});
  }
  // KIVI groups 32 tokens: 16-token blocks cannot hold a chunk.
  require_error([&] { kivi_cache x(with_blocks(16)); }, E::invalid_argument,
                {"config.block_tokens = 16", "a multiple of 32"});
  {
    kivi_cache ok(with_blocks(32), mib);
    CHECK(ok.chunk_tokens() == 32);
  }
  // The default FP2+ keys group 128 tokens.
  require_error([&] { default_cache x(with_blocks(64)); }, E::invalid_argument,
                {"config.block_tokens = 64", "a multiple of 128"});
  {
    default_cache ok(with_blocks(128), mib);
    CHECK(ok.chunk_tokens() == 128);
  }
  // Rotated formats (FP2+, FP4+) need a power-of-two head_dim.
  auto cfg96 = small_config(16);
  cfg96.head_dim = 96;
  require_error([&] { per_token_cache x(cfg96); }, E::invalid_argument, {"head_dim = 96", "rotated"});
  {
    c::kv_cache<q::kv_q8_0, q::kv_fp8, q::kv_fp16> unrotated(cfg96, mib);  // multiples of 32 are fine
    CHECK(unrotated.chunk_tokens() == 1);
  }
  auto bad = small_config(16);
  bad.layers = 0;
  require_error([&] { per_token_cache x(bad); }, E::invalid_argument, {"config.layers = 0"});
  bad = small_config(16);
  bad.kv_heads = 0;
  require_error([&] { per_token_cache x(bad); }, E::invalid_argument, {"config.kv_heads = 0"});
  bad = small_config(16);
  bad.sink_tokens = -1;
  require_error([&] { per_token_cache x(bad); }, E::invalid_argument, {"config.sink_tokens = -1"});
  bad = small_config(16);
  bad.window_tokens = -2;
  require_error([&] { per_token_cache x(bad); }, E::invalid_argument, {"config.window_tokens = -2"});
}

// ================================================================================================
// 6. Accounting
// ================================================================================================

TEST_CASE("kv_cache: bits per element of a long sequence approach the low tier's", "[cache]") {
  const auto cfg = c::cache_config{.layers = 1, .kv_heads = 2, .head_dim = 64, .block_tokens = 64,
                                   .sink_tokens = 0, .window_tokens = 0};
  SECTION("FP2+") {
    auto cfg128 = cfg;
    cfg128.block_tokens = 128;  // one FP2+ key tile
    default_cache cache(cfg128, mib);
    const c::seq_id id = cache.create();
    for (int i = 0; i < 8; ++i) fill(cache, id, 256, 3000 + static_cast<std::uint64_t>(i));
    const auto u = cache.usage();
    const std::size_t bb = u.tiers[2].block_bytes;
    CHECK(bb == block_bytes<q::fp2plus>(128, 64));
    CHECK(bb % 64 == 0);
    CHECK(8.0 * static_cast<double>(bb) / (2.0 * 128 * 64) ==
          q::fp2plus::bits_per_element);  // 2.47: no padding at this shape
    // Key summaries: fp16 min and max per channel per block = 2 * 2 * 64 bytes, +0.125 bits.
    CHECK(u.tiers[2].summary_bytes == 2 * 2 * 64);
    const double expected = 8.0 * static_cast<double>(bb + u.tiers[2].summary_bytes) / (2.0 * 128 * 64);
    CHECK(u.token_heads == 2 * 2048);
    CHECK(u.window_bytes == 0);
    CHECK(u.tiers[2].used == 2 * 16);  // 2048 / 128 blocks per head: every chunk aged out
    const double bpe = u.bits_per_element(64);
    CHECK(bpe >= expected);
    CHECK(bpe <= expected * 1.02);
  }
  SECTION("KIVI-2: chunks of 32 tokens") {
    kivi_cache cache(cfg, mib);
    const c::seq_id id = cache.create();
    for (int i = 0; i < 8; ++i) fill(cache, id, 252, 3100 + static_cast<std::uint64_t>(i));
    const auto u = cache.usage();
    CHECK(8.0 * static_cast<double>(u.tiers[2].block_bytes) / (2.0 * 64 * 64) ==
          q::kivi2::bits_per_element);  // 3: 2-bit codes, fp16 scale and min per 32
    const double expected =
        8.0 * static_cast<double>(u.tiers[2].block_bytes + u.tiers[2].summary_bytes) /
        (2.0 * 64 * 64);
    // 2016 = 63 chunks of 32: all age out (window 0), 32 blocks per head.
    CHECK(u.token_heads == 2 * 2016);
    CHECK(u.tiers[2].used == 2 * 32);
    const double bpe = u.bits_per_element(64);
    CHECK(bpe >= expected);
    CHECK(bpe <= expected * 1.02);
  }
  SECTION("padding to 64 bytes is counted") {
    // 2-bit codes with an e4m3 scale per 16 channels, not rotated, head_dim 48: 15 bytes per
    // token, 16 * 15 = 240 bytes of K and 240 of V per block: 480 bytes, padded to 512.
    using odd = q::fpq<q::fpq_config{.bits = 2, .group = 16, .scale = q::scale_type::e4m3}>;
    struct odd_kv : q::kv_format<odd, odd> {};
    auto cfg48 = cfg;
    cfg48.head_dim = 48;
    cfg48.block_tokens = 16;
    c::kv_cache<odd_kv, odd_kv, odd_kv> cache(cfg48, mib);
    const c::seq_id id = cache.create();
    for (int i = 0; i < 2; ++i) fill(cache, id, 1000, 3200 + static_cast<std::uint64_t>(i));
    const auto u = cache.usage();
    CHECK(u.tiers[2].block_bytes == 512);
    // 2.67 bits for the padded block, not the format's 2.5, plus fp16 key summaries.
    const double expected = 8.0 * (512 + 2 * 2 * 48) / (2.0 * 16 * 48);
    CHECK(q::kv_format<odd, odd>::bits_per_element == 2.5);
    CHECK(u.tiers[2].used == 2 * 125);
    const double bpe = u.bits_per_element(48);
    CHECK(bpe >= expected);
    CHECK(bpe <= expected * 1.02);
  }
}
