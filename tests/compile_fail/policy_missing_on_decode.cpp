// expect-error: lacks the hook on_decode: it must have `oscar::policy::decision on_decode
// SPDX-License-Identifier: Apache-2.0
// A policy type without on_decode cannot be driven; the error names the hook and its signature.
#include "oscar/cache/kv_cache.hpp"
#include "oscar/policy/driver.hpp"

struct no_decode {
  oscar::cache::tier on_append(const oscar::cache::block_request&) { return oscar::cache::tier::low; }
  oscar::policy::decision on_prefill(const oscar::policy::context&) { return {}; }
  oscar::index_t decode_interval() const { return 16; }
};

int main() { return sizeof(oscar::policy::driver<no_decode, oscar::cache::kv_cache<>>) > 0; }
