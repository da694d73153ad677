// expect-error: the policy needs gradient head importance \(needs_gradients\) but this driver has none
// SPDX-License-Identifier: Apache-2.0
// A policy that needs gradient head importance, driven without it, is a compile error.
#include "oscar/cache/kv_cache.hpp"
#include "oscar/policy/driver.hpp"

struct taylor_pruner {
  static constexpr bool needs_gradients = true;
  oscar::cache::tier on_append(const oscar::cache::block_request&) { return oscar::cache::tier::low; }
  oscar::policy::decision on_prefill(const oscar::policy::context&) { return {}; }
  oscar::policy::decision on_decode(const oscar::policy::context&) { return {}; }
  oscar::index_t decode_interval() const { return 0; }
};

int main() { return sizeof(oscar::policy::driver<taylor_pruner, oscar::cache::kv_cache<>>) > 0; }
