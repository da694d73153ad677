// expect-error: a zero point needs an fp16 or bf16 scale_type
// SPDX-License-Identifier: Apache-2.0
// e4m3 zero points are refused at compile time, with the allowed alternatives named.
#include "oscar/quant/fpq.hpp"

namespace q = oscar::quant;
using bad = q::fpq<q::fpq_config{.scale = q::scale_type::e4m3, .zero_point = true}>;
constexpr auto bytes = q::format_traits<bad>::bytes_per_block;
int main() { return static_cast<int>(bytes); }
