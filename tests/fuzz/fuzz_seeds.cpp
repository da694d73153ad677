// SPDX-License-Identifier: Apache-2.0
// oscar-fuzz-seeds <directory>: writes valid serialized sequences for the caches of
// fuzz_caches.hpp, the seed corpus of oscar-import-fuzz: empty, sinks only, sinks and window,
// blocks in every tier, evicted and compacted, and a fork. Each is checked to import back to
// the same bytes before it is written.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_caches.hpp"
#include "oscar/cache/serialize.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace {

using namespace oscar;
using namespace oscar::cache;

template <class Cache>
void feed(Cache& cache, seq_id id, int tokens, std::uint64_t seed) {
  const cache_config& c = cache.config();
  for (int layer = 0; layer < c.layers; ++layer) {
    const auto k = testing::synthetic_keys(tokens, c.kv_heads, c.head_dim, seed + 2 * layer);
    const auto v = testing::synthetic_values(tokens, c.kv_heads, c.head_dim, seed + 2 * layer + 1);
    cache.append(id, layer, k.view(), v.view());
  }
}

template <class Cache>
void edit(Cache& cache, seq_id id) {
  const cache_config& c = cache.config();
  for (int layer = 0; layer < c.layers; ++layer) {
    for (int head = 0; head < c.kv_heads; ++head) {
      const index_t n = cache.tokens(id, layer, head);
      std::vector<index_t> positions;
      for (index_t p = head; p < n; p += 3) positions.push_back(p);
      cache.evict(id, layer, head, positions);
      std::vector<float> importance(static_cast<std::size_t>(cache.tokens(id, layer, head)));
      for (std::size_t i = 0; i < importance.size(); ++i) importance[i] = std::cos(0.3f * i);
      cache.compact(id, layer, head, importance);
    }
  }
}

int written = 0;

template <class Cache>
void write_seed(const std::filesystem::path& dir, const std::string& name, Cache& cache,
                seq_id id) {
  const std::vector<std::byte> bytes = serialize(cache, id);
  const seq_id back = deserialize(cache, bytes);
  if (serialize(cache, back) != bytes) {
    throw std::runtime_error("seed " + name + " does not import to the same bytes");
  }
  cache.free(back);
  std::ofstream out(dir / (name + ".bin"), std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + (dir / (name + ".bin")).string());
  std::printf("  %-24s %7zu bytes\n", (name + ".bin").c_str(), bytes.size());
  ++written;
}

template <class Cache>
void seeds_for(const std::filesystem::path& dir, const std::string& prefix,
               const cache_config& config, int block_tokens_worth) {
  Cache cache(config, oscar_fuzz::budget, oscar_fuzz::mixed_policy);
  const seq_id empty = cache.create();
  write_seed(dir, prefix + "-empty", cache, empty);
  const seq_id sinks = cache.create();
  feed(cache, sinks, 1, 1);
  write_seed(dir, prefix + "-sinks", cache, sinks);
  const seq_id window = cache.create();
  feed(cache, window, config.sink_tokens + config.window_tokens, 2);
  write_seed(dir, prefix + "-window", cache, window);
  const seq_id blocks = cache.create();
  feed(cache, blocks, block_tokens_worth, 3);
  write_seed(dir, prefix + "-blocks", cache, blocks);
  const seq_id forked = cache.fork(blocks);
  edit(cache, forked);
  write_seed(dir, prefix + "-edited", cache, forked);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <directory>\n", argv[0]);
    return 2;
  }
  try {
    const std::filesystem::path dir = argv[1];
    std::filesystem::create_directories(dir);
    std::printf("oscar-fuzz-seeds: writing to %s\n", dir.string().c_str());
    // Enough tokens for blocks in all three tiers in every head.
    seeds_for<oscar_fuzz::per_token_cache>(dir, "per-token", oscar_fuzz::per_token_config(), 56);
    seeds_for<oscar_fuzz::kivi_cache>(dir, "kivi", oscar_fuzz::kivi_config(), 3 * 32 + 8);
    seeds_for<oscar_fuzz::default_cache>(dir, "fp2plus", oscar_fuzz::default_config(), 3 * 128 + 8);
    std::printf("oscar-fuzz-seeds: %d seeds\n", written);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "oscar-fuzz-seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
