// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for oscar::cache::deserialize, which must treat its bytes as untrusted.
//
// Each input is imported into three small caches (fuzz_caches.hpp) twice: as it is (the header,
// size and checksum checks), and with payload_bytes and the checksum rewritten to match, so
// that mutations reach the payload's checks. The oracles, beyond ASan and UBSan:
//   - a refusal is oscar::error with corrupt_data or out_of_memory, and leaves usage() as it was;
//   - an accepted input is canonical (serialize of the import gives the same bytes), gathers
//     to finite values, and stays a working sequence: evict, compact and append on it succeed
//     (or append runs out of blocks) and it still gathers finite values; freeing it restores
//     usage().
// Any broken oracle aborts, which libFuzzer reports as a crash.
//
// Build with the fuzz preset (clang++-14, -fsanitize=fuzzer,address,undefined), seed it with
// oscar-fuzz-seeds:
//   cmake --workflow --preset fuzz
//   build/fuzz/tests/fuzz/oscar-fuzz-seeds seeds
//   build/fuzz/tests/fuzz/oscar-import-fuzz -max_total_time=60 corpus seeds

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

#include "fuzz_caches.hpp"
#include "oscar/cache/serialize.hpp"
#include "oscar/core/error.hpp"

namespace {

using namespace oscar;
using namespace oscar::cache;

[[noreturn]] void oracle_failed(const char* what) {
  std::fprintf(stderr, "oscar-import-fuzz: oracle failed: %s\n", what);
  std::abort();
}

template <class Cache>
void require_finite(const Cache& cache, seq_id id) {
  for (int layer = 0; layer < cache.config().layers; ++layer) {
    for (const gathered_head& g : cache.gather(id, layer)) {
      const bool finite =
          std::all_of(g.k.begin(), g.k.end(), [](float x) { return std::isfinite(x); }) &&
          std::all_of(g.v.begin(), g.v.end(), [](float x) { return std::isfinite(x); });
      if (!finite) oracle_failed("an imported sequence gathers a non-finite value");
    }
  }
}

/// Runs `f`, which may throw only oscar::error with one of the allowed codes.
template <class F>
bool allowed_failure(F&& f, errc a, errc b) {
  try {
    f();
    return false;
  } catch (const oscar::error& e) {
    if (e.code() != a && e.code() != b) oracle_failed(e.what());
    return true;
  }
}

template <class Cache>
void try_import(Cache& cache, std::span<const std::byte> bytes) {
  const auto before = cache.usage();
  seq_id id = 0;
  if (allowed_failure([&] { id = deserialize(cache, bytes); }, errc::corrupt_data,
                      errc::out_of_memory)) {
    if (cache.usage() != before) oracle_failed("a refused import changed usage()");
    return;
  }

  const std::vector<std::byte> again = serialize(cache, id);
  if (!std::equal(again.begin(), again.end(), bytes.begin(), bytes.end())) {
    oracle_failed("an accepted input is not canonical");
  }
  require_finite(cache, id);

  // The import must be a working sequence.
  const cache_config& c = cache.config();
  for (int layer = 0; layer < c.layers; ++layer) {
    const index_t n = cache.tokens(id, layer, 0);
    if (n > 1) {
      const index_t positions[] = {n / 2};
      cache.evict(id, layer, 0, positions);
      std::vector<float> importance(static_cast<std::size_t>(n - 1));
      for (std::size_t i = 0; i < importance.size(); ++i) importance[i] = static_cast<float>(i % 7);
      (void)allowed_failure([&] { cache.compact(id, layer, 0, importance); }, errc::out_of_memory,
                            errc::out_of_memory);
    }
    const index_t tokens = cache.chunk_tokens();
    std::vector<float> k(static_cast<std::size_t>(tokens * c.kv_heads * c.head_dim));
    std::vector<float> v(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = std::sin(0.1f * static_cast<float>(i)) * 3.0f;
      v[i] = std::cos(0.07f * static_cast<float>(i));
    }
    (void)allowed_failure(
        [&] {
          cache.append(id, layer, make_kv_view(k.data(), tokens, c.kv_heads, c.head_dim),
                       make_kv_view(v.data(), tokens, c.kv_heads, c.head_dim));
        },
        errc::out_of_memory, errc::out_of_memory);
  }
  require_finite(cache, id);
  cache.free(id);
  if (cache.usage() != before) oracle_failed("freeing the import leaked blocks");
}

template <class U>
void store(std::vector<std::byte>& b, std::size_t at, U v) {
  for (std::size_t i = 0; i < sizeof(U); ++i) {
    b[at + i] = static_cast<std::byte>(static_cast<std::uint8_t>(v >> (8 * i)));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static oscar_fuzz::per_token_cache per_token(oscar_fuzz::per_token_config(), oscar_fuzz::budget);
  static oscar_fuzz::kivi_cache kivi(oscar_fuzz::kivi_config(), oscar_fuzz::budget);
  static oscar_fuzz::default_cache fp2plus(oscar_fuzz::default_config(), oscar_fuzz::budget);

  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try_import(per_token, bytes);
  try_import(kivi, bytes);
  try_import(fp2plus, bytes);

  if (size >= serial_header_bytes) {
    std::vector<std::byte> sealed(bytes.begin(), bytes.end());
    const auto payload = std::span<const std::byte>(sealed).subspan(serial_header_bytes);
    store<std::uint64_t>(sealed, 16, payload.size());
    store<std::uint64_t>(sealed, 24, oscar::cache::detail::fnv1a64(payload));
    try_import(per_token, sealed);
    try_import(kivi, sealed);
    try_import(fp2plus, sealed);
  }
  return 0;
}
