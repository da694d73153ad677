// expect-error: group must be 16, 32, 64, 128 or 256
// SPDX-License-Identifier: Apache-2.0
#include "oscar/quant/fpq.hpp"

using odd_group = oscar::quant::fpq<oscar::quant::fpq_config{.group = 24}>;
constexpr auto bytes = oscar::quant::format_traits<odd_group>::bytes_per_block;
int main() { return static_cast<int>(bytes); }
