// expect-error: has_on_prefill
// SPDX-License-Identifier: Apache-2.0
// Constraining on the concept: the compiler's diagnosis names the hook concept that failed.
#include "oscar/policy/concept.hpp"

struct no_prefill {
  oscar::cache::tier on_append(const oscar::cache::block_request&) { return oscar::cache::tier::low; }
  oscar::policy::decision on_decode(const oscar::policy::context&) { return {}; }
  oscar::index_t decode_interval() const { return 0; }
};

template <oscar::policy::cache_policy P>
int use(P&) { return 0; }

int main() {
  no_prefill p;
  return use(p);
}
