// expect-error: lacks the hook on_append: it must have `oscar::cache::tier on_append
// SPDX-License-Identifier: Apache-2.0
// A policy type without on_append cannot pick the tiers of a cache's blocks.
#include "oscar/policy/driver.hpp"

struct no_append {
  oscar::policy::decision on_prefill(const oscar::policy::context&) { return {}; }
  oscar::policy::decision on_decode(const oscar::policy::context&) { return {}; }
  oscar::index_t decode_interval() const { return 0; }
};

int main() {
  no_append p;
  return oscar::policy::tier_hook(p) ? 0 : 1;
}
