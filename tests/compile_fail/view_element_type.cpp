// expect-error: K/V views hold float
// SPDX-License-Identifier: Apache-2.0
// kv_view only holds float, oscar::half or oscar::bfloat16: an int view must be rejected by the
// static_assert in oscar/core/view.hpp, whose message says what is allowed.
#include "oscar/core/view.hpp"

int main() {
  oscar::kv_view<int> view{};
  return static_cast<int>(view.tokens);
}
