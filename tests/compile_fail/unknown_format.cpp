// expect-error: F is not a known format\. Allowed: fp16, bf16, e4m3, q8_0, q4_0, fpq<config>
// SPDX-License-Identifier: Apache-2.0
// Asking for the traits of a type that is not a format names the formats that exist.
#include "oscar/quant/formats.hpp"

struct not_a_format {};
constexpr auto bits = oscar::quant::format_traits<not_a_format>::bits;
int main() { return bits; }
