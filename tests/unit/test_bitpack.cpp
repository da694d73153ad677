// SPDX-License-Identifier: Apache-2.0
// Tests for include/oscar/core/bitpack.hpp: packing of 2-bit and 4-bit (and 1/8-bit) codes.
//
// The layout is part of the serialized format: code i lives in byte i / (8 / B) at bit offset
// B * (i % (8 / B)), least significant bits first. Expected bytes are computed by hand or by a
// bit-by-bit reference packer written here.

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <array>
#include <cstdint>
#include <random>
#include <vector>

#include "oscar/core/bitpack.hpp"

namespace {

/// Reference packer: writes code i bit by bit at absolute bit position B * i (LSB-first).
template <int Bits>
std::vector<std::uint8_t> ref_pack(const std::vector<std::uint8_t>& codes) {
  std::vector<std::uint8_t> out((codes.size() * Bits + 7) / 8, 0);
  for (std::size_t i = 0; i < codes.size(); ++i) {
    for (int b = 0; b < Bits; ++b) {
      if ((codes[i] >> b) & 1u) {
        const std::size_t bit = i * Bits + static_cast<std::size_t>(b);
        out[bit / 8] = static_cast<std::uint8_t>(out[bit / 8] | (1u << (bit % 8)));
      }
    }
  }
  return out;
}

/// Byte vectors compared as ints, so that Catch prints failures as numbers rather than chars.
std::vector<int> as_ints(const std::vector<std::uint8_t>& bytes) {
  return std::vector<int>(bytes.begin(), bytes.end());
}

/// Index of the first element where a and b differ (or the shorter size), -1 if equal.
long first_difference(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
  const std::size_t n = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return static_cast<long>(i);
  }
  return a.size() == b.size() ? -1 : static_cast<long>(n);
}

/// Random codes with random garbage in the bits above `Bits` (which packing must ignore).
std::vector<std::uint8_t> random_codes(std::mt19937& rng, int n) {
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n));
  for (auto& c : codes) c = static_cast<std::uint8_t>(rng());
  return codes;
}

template <int Bits>
std::vector<std::uint8_t> low_bits(std::vector<std::uint8_t> codes) {
  for (auto& c : codes) c = static_cast<std::uint8_t>(c & ((1u << Bits) - 1u));
  return codes;
}

/// Packs random codes for every n in [0, 70) and checks bytes, padding, get_code and unpack.
template <int Bits>
void check_random_round_trips() {
  std::mt19937 rng(1000u + Bits);
  constexpr int sentinel = 0xCD;
  for (int n = 0; n < 70; ++n) {
    for (int trial = 0; trial < 5; ++trial) {
      CAPTURE(Bits, n, trial);
      const std::vector<std::uint8_t> raw = random_codes(rng, n);
      const std::vector<std::uint8_t> codes = low_bits<Bits>(raw);
      const int bytes = oscar::packed_bytes<Bits>(n);
      REQUIRE(bytes == (n * Bits + 7) / 8);

      // One guard byte after the packed bytes: pack_codes must not write past packed_bytes(n).
      std::vector<std::uint8_t> packed(static_cast<std::size_t>(bytes) + 1, sentinel);
      oscar::pack_codes<Bits>(raw.data(), n, packed.data());
      CHECK(packed.back() == sentinel);
      packed.pop_back();
      CHECK(as_ints(packed) == as_ints(ref_pack<Bits>(codes)));  // includes zero padding of a final partial byte

      std::vector<std::uint8_t> unpacked(static_cast<std::size_t>(n), sentinel);
      oscar::unpack_codes<Bits>(packed.data(), n, unpacked.data());
      CHECK(as_ints(unpacked) == as_ints(codes));

      std::vector<std::uint8_t> via_get;
      for (int i = 0; i < n; ++i) via_get.push_back(oscar::get_code<Bits>(packed.data(), i));
      CHECK(as_ints(via_get) == as_ints(codes));
    }
  }
}

constexpr std::uint8_t pack4_2bit(std::uint8_t c0, std::uint8_t c1, std::uint8_t c2,
                                  std::uint8_t c3) {
  const std::array<std::uint8_t, 4> codes{c0, c1, c2, c3};
  std::uint8_t out = 0xff;
  oscar::pack_codes<2>(codes.data(), 4, &out);
  return out;
}

// Packing is constexpr.
static_assert(pack4_2bit(1, 2, 3, 0) == 0x39);
static_assert(oscar::packed_bytes<2>(5) == 2);
static_assert(oscar::packed_bytes<4>(3) == 2);
static_assert(oscar::codes_per_byte<2> == 4 && oscar::codes_per_byte<4> == 2);

}  // namespace

TEST_CASE("bitpack: packed_bytes and codes_per_byte", "[bitpack]") {
  CHECK(oscar::codes_per_byte<1> == 8);
  CHECK(oscar::codes_per_byte<2> == 4);
  CHECK(oscar::codes_per_byte<4> == 2);
  CHECK(oscar::codes_per_byte<8> == 1);
  CHECK(oscar::packed_bytes<2>(0) == 0);
  CHECK(oscar::packed_bytes<2>(1) == 1);
  CHECK(oscar::packed_bytes<2>(4) == 1);
  CHECK(oscar::packed_bytes<2>(5) == 2);
  CHECK(oscar::packed_bytes<2>(128) == 32);
  CHECK(oscar::packed_bytes<4>(1) == 1);
  CHECK(oscar::packed_bytes<4>(2) == 1);
  CHECK(oscar::packed_bytes<4>(3) == 2);
  CHECK(oscar::packed_bytes<4>(128) == 64);
  CHECK(oscar::packed_bytes<1>(9) == 2);
  CHECK(oscar::packed_bytes<8>(7) == 7);
  STATIC_CHECK(oscar::is_packable_width_v<2>);
  STATIC_CHECK(oscar::is_packable_width_v<4>);
  STATIC_CHECK_FALSE(oscar::is_packable_width_v<3>);
  STATIC_CHECK_FALSE(oscar::is_packable_width_v<5>);
}

TEST_CASE("bitpack: 2-bit layout is LSB-first (hand-computed bytes)", "[bitpack]") {
  // {1, 2, 3, 0} -> 01 | 10 << 2 | 11 << 4 | 00 << 6 = 0b00'11'10'01 = 0x39
  const std::uint8_t codes[] = {1, 2, 3, 0, 3, 3, 0, 1, 2};
  std::uint8_t packed[3] = {0xff, 0xff, 0xff};
  oscar::pack_codes<2>(codes, 9, packed);
  CHECK(packed[0] == 0x39);
  CHECK(packed[1] == 0x4F);  // {3, 3, 0, 1} -> 0b01'00'11'11
  CHECK(packed[2] == 0x02);  // {2} then zero padding
  CHECK(oscar::get_code<2>(packed, 0) == 1);
  CHECK(oscar::get_code<2>(packed, 1) == 2);
  CHECK(oscar::get_code<2>(packed, 2) == 3);
  CHECK(oscar::get_code<2>(packed, 3) == 0);
  CHECK(oscar::get_code<2>(packed, 7) == 1);
  CHECK(oscar::get_code<2>(packed, 8) == 2);

  const std::uint8_t one_hot[] = {0, 0, 0, 3};
  std::uint8_t top = 0;
  oscar::pack_codes<2>(one_hot, 4, &top);
  CHECK(top == 0xC0);
}

TEST_CASE("bitpack: 4-bit layout is LSB-first (hand-computed bytes)", "[bitpack]") {
  // {0xA, 0x5} -> 0xA | 0x5 << 4 = 0x5A
  const std::uint8_t codes[] = {0xA, 0x5, 0xF, 0x0, 0x3};
  std::uint8_t packed[3] = {0xff, 0xff, 0xff};
  oscar::pack_codes<4>(codes, 5, packed);
  CHECK(packed[0] == 0x5A);
  CHECK(packed[1] == 0x0F);
  CHECK(packed[2] == 0x03);  // {0x3} then zero padding
  CHECK(oscar::get_code<4>(packed, 0) == 0xA);
  CHECK(oscar::get_code<4>(packed, 1) == 0x5);
  CHECK(oscar::get_code<4>(packed, 2) == 0xF);
  CHECK(oscar::get_code<4>(packed, 3) == 0x0);
  CHECK(oscar::get_code<4>(packed, 4) == 0x3);
}

TEST_CASE("bitpack: high bits of input codes are ignored", "[bitpack]") {
  SECTION("2-bit") {
    const std::uint8_t codes[] = {0xFD, 0x06, 0xAB, 0x80};  // low bits {1, 2, 3, 0}
    std::uint8_t packed = 0;
    oscar::pack_codes<2>(codes, 4, &packed);
    CHECK(packed == 0x39);
  }
  SECTION("4-bit") {
    const std::uint8_t codes[] = {0xFA, 0x35, 0x70};  // low nibbles {0xA, 0x5, 0x0}
    std::uint8_t packed[2] = {0xff, 0xff};
    oscar::pack_codes<4>(codes, 3, packed);
    CHECK(packed[0] == 0x5A);
    CHECK(packed[1] == 0x00);  // code 0 and zero padding, nothing from 0x70's high nibble
  }
}

TEST_CASE("bitpack: get_code reads a single code without touching its neighbours", "[bitpack]") {
  // Each code of a packed all-ones byte except one position set to zero.
  for (int pos = 0; pos < 4; ++pos) {
    CAPTURE(pos);
    const auto byte = static_cast<std::uint8_t>(0xFF & ~(0x3u << (2 * pos)));
    for (int i = 0; i < 4; ++i) CHECK(oscar::get_code<2>(&byte, i) == (i == pos ? 0 : 3));
  }
  for (int pos = 0; pos < 2; ++pos) {
    CAPTURE(pos);
    const auto byte = static_cast<std::uint8_t>(0xFF & ~(0xFu << (4 * pos)));
    for (int i = 0; i < 2; ++i) CHECK(oscar::get_code<4>(&byte, i) == (i == pos ? 0 : 15));
  }
}

TEST_CASE("bitpack: random round trips with partial final bytes", "[bitpack]") {
  SECTION("2-bit") { check_random_round_trips<2>(); }
  SECTION("4-bit") { check_random_round_trips<4>(); }
  SECTION("1-bit") { check_random_round_trips<1>(); }
  SECTION("8-bit") { check_random_round_trips<8>(); }
}

TEST_CASE("bitpack: large buffers round trip", "[bitpack]") {
  std::mt19937 rng(7u);
  const int n = 100003;  // not a multiple of 4
  const std::vector<std::uint8_t> codes = low_bits<2>(random_codes(rng, n));
  std::vector<std::uint8_t> packed(static_cast<std::size_t>(oscar::packed_bytes<2>(n)));
  oscar::pack_codes<2>(codes.data(), n, packed.data());
  CHECK(first_difference(packed, ref_pack<2>(codes)) == -1);
  std::vector<std::uint8_t> unpacked(codes.size());
  oscar::unpack_codes<2>(packed.data(), n, unpacked.data());
  CHECK(first_difference(unpacked, codes) == -1);
}
