// expect-error: the policy needs attention statistics \(needs_attention_stats\) but this driver runs attention without them
// SPDX-License-Identifier: Apache-2.0
// H2O scores tokens by the attention they receive: a driver whose engine gives no attention
// statistics cannot run it.
#include "oscar/cache/kv_cache.hpp"
#include "oscar/policy/driver.hpp"
#include "oscar/policy/h2o.hpp"

using no_stats = oscar::policy::driver<oscar::policy::h2o, oscar::cache::kv_cache<>,
                                       oscar::policy::capabilities{.attention_stats = false}>;
int main() { return sizeof(no_stats) > 0; }
