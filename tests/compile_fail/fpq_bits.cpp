// expect-error: bits must be 2 \(FP2\+\) or 4 \(FP4\+\)
// SPDX-License-Identifier: Apache-2.0
// A 3-bit member of the FP2+ family does not exist: the traits must say which widths do.
#include "oscar/quant/fpq.hpp"

using three_bit = oscar::quant::fpq<oscar::quant::fpq_config{.bits = 3}>;
constexpr auto bytes = oscar::quant::format_traits<three_bit>::bytes_per_block;
int main() { return static_cast<int>(bytes); }
