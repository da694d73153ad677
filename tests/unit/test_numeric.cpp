// SPDX-License-Identifier: Apache-2.0
// Tests for include/oscar/core/numeric.hpp: binary16, bfloat16 and fp8 e4m3 (FN) conversions.
//
// Every expected value comes from a reference written here, independently of the header:
// decoders built from the format definitions with std::ldexp, nearest-value searches in double
// with ties to the even code, and (for binary16) the compiler's own `_Float16` conversion.

#include <catch2/catch_test_macros.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "oscar/core/numeric.hpp"

namespace {

// ---- helpers ------------------------------------------------------------------------------

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t b) { return std::bit_cast<float>(b); }

std::string hex(std::uint32_t v, int digits) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%0*X", digits, static_cast<unsigned>(v));
  return buf;
}

std::string describe(float f) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g (bits 0x%08X)", static_cast<double>(f),
                static_cast<unsigned>(bits_of(f)));
  return buf;
}

/// Collects mismatches from a large loop; reports the count and the first few examples.
struct mismatches {
  std::size_t count = 0;
  std::string examples;
  void add(const std::string& line) {
    if (count++ < 10) examples += line + "\n";
  }
};

/// Floats whose bits are uniformly random (so every exponent is covered), NaNs included.
std::vector<float> random_bit_patterns(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> out(n);
  for (auto& f : out) f = float_of(static_cast<std::uint32_t>(rng()));
  return out;
}

/// A few values every encoder must handle: zeros, infinities, NaNs, float subnormals, extremes.
std::vector<float> special_floats() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> out = {0.0f,
                            -0.0f,
                            inf,
                            -inf,
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::signaling_NaN(),
                            float_of(0x7f800001u),  // NaN with only the lowest payload bit
                            float_of(0xff800001u),
                            float_of(0x7fffffffu),
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::min(),
                            float_of(0x007fffffu),  // largest float subnormal
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max(),
                            1.0f,
                            -1.0f};
  return out;
}

/// Adds x, and x +- 1 float ulp (when finite), with both signs.
void add_with_neighbours(std::vector<float>& out, double x) {
  const auto f = static_cast<float>(x);
  for (float v : {f, std::nextafter(f, 0.0f), std::nextafter(f, std::numeric_limits<float>::infinity())}) {
    out.push_back(v);
    out.push_back(-v);
  }
}

// ---- binary16 references -------------------------------------------------------------------

/// binary16 decoder from the format definition: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
double ref_half_to_double(std::uint16_t h) {
  const bool negative = (h & 0x8000u) != 0;
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -24);  // subnormal: m * 2^-24
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else {
    magnitude = std::ldexp(static_cast<double>(1024 + mantissa), exponent - 25);
  }
  return negative ? -magnitude : magnitude;
}

bool half_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

/// The value of a non-negative binary16 code for rounding purposes: finite codes as decoded,
/// and 0x7C00 (Inf) as 2^16, the value the next binade would start at, so that nearest-search
/// rounds to Inf exactly when IEEE 754 does (|x| >= 65520).
std::vector<double> half_rounding_table() {
  std::vector<double> values;
  for (std::uint32_t code = 0; code <= 0x7bffu; ++code) {
    values.push_back(ref_half_to_double(static_cast<std::uint16_t>(code)));
  }
  values.push_back(65536.0);  // code 0x7C00
  return values;
}

/// float -> binary16 bits by nearest search in double, ties to the even code.
std::uint16_t ref_float_to_half_by_search(float f, const std::vector<double>& table) {
  const std::uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  if (std::isnan(f)) return static_cast<std::uint16_t>(sign | 0x7e00u);
  const double x = std::fabs(static_cast<double>(f));
  if (std::isinf(x)) return static_cast<std::uint16_t>(sign | 0x7c00u);
  if (x >= table.back()) return static_cast<std::uint16_t>(sign | 0x7c00u);
  // First code with value >= x; the answer is it or the one below.
  const auto hi = static_cast<std::size_t>(std::lower_bound(table.begin(), table.end(), x) - table.begin());
  std::size_t best = hi;
  if (hi > 0) {
    const double d_lo = x - table[hi - 1];
    const double d_hi = table[hi] - x;
    if (d_lo < d_hi || (d_lo == d_hi && (hi - 1) % 2 == 0)) best = hi - 1;
  }
  return static_cast<std::uint16_t>(sign | best);
}

#if defined(__FLT16_MAX__)
#define OSCAR_TEST_HAVE_FLOAT16 1
/// The compiler's float -> _Float16 conversion (IEEE 754, round to nearest even).
std::uint16_t compiler_float_to_half(float f) {
  const auto h = static_cast<_Float16>(f);
  return std::bit_cast<std::uint16_t>(h);
}
float compiler_half_to_float(std::uint16_t bits) {
  return static_cast<float>(std::bit_cast<_Float16>(bits));
}
#endif

/// The float inputs used for the binary16 encoder checks.
std::vector<float> half_encoder_inputs() {
  std::vector<float> in = special_floats();
  // Every binary16 value, and every midpoint between adjacent ones (+- 1 float ulp), both signs.
  // 0x7C00 stands for 2^16 so the midpoint 65520 (which must round to Inf) is included.
  std::vector<double> values = half_rounding_table();
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i + 1 < values.size()) add_with_neighbours(in, values[i]);
    if (i > 0) add_with_neighbours(in, (values[i - 1] + values[i]) / 2);
  }
  // Random floats over all exponents, and in and around the binary16 subnormal range.
  for (float f : random_bit_patterns(1u << 20, 1234u)) in.push_back(f);
  std::mt19937 rng(99u);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int i = 0; i < 100000; ++i) {
    const double x = std::ldexp(unit(rng), -12 - static_cast<int>(rng() % 16));  // [0, 2^-12)
    in.push_back(static_cast<float>(x));
    in.push_back(static_cast<float>(-x));
  }
  // Around the overflow threshold.
  for (float f = 65400.0f; f < 65700.0f; f += 0.25f) in.push_back(f);
  return in;
}

// ---- bfloat16 references -------------------------------------------------------------------

/// bfloat16 decoder from the format definition: 1 sign, 8 exponent (bias 127), 7 mantissa bits.
double ref_bf16_to_double(std::uint16_t b) {
  const bool negative = (b & 0x8000u) != 0;
  const int exponent = (b >> 7) & 0xff;
  const int mantissa = b & 0x7f;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -133);  // m * 2^-126 / 2^7
  } else if (exponent == 255) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else {
    magnitude = std::ldexp(static_cast<double>(128 + mantissa), exponent - 134);
  }
  return negative ? -magnitude : magnitude;
}

/// float -> bfloat16 bits for non-NaN input: of the two bfloat16 codes around |x| (the one
/// below by truncation, and the next one), the nearer in double; ties to the even code. The
/// code after the largest finite one is Inf, taken as 2^128 for rounding, as IEEE 754 does.
std::uint16_t ref_float_to_bf16(float f) {
  const std::uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const double x = std::fabs(static_cast<double>(f));
  if (std::isinf(x)) return static_cast<std::uint16_t>(sign | 0x7f80u);
  const auto lo = static_cast<std::uint16_t>((bits_of(f) & 0x7fffffffu) >> 16);
  const auto hi = static_cast<std::uint16_t>(lo + 1);
  const double v_lo = ref_bf16_to_double(lo);
  const double v_hi = hi == 0x7f80u ? std::ldexp(1.0, 128) : ref_bf16_to_double(hi);
  const double d_lo = x - v_lo;
  const double d_hi = v_hi - x;
  const std::uint16_t best = (d_lo < d_hi || (d_lo == d_hi && lo % 2 == 0)) ? lo : hi;
  return static_cast<std::uint16_t>(sign | best);
}

bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// ---- fp8 e4m3 (FN) references --------------------------------------------------------------

/// fp8 e4m3 FN decoder from the format definition: bias 7, subnormals in units of 2^-9,
/// S.1111.111 is NaN, no infinities.
double ref_e4m3_to_double(std::uint8_t c) {
  const bool negative = (c & 0x80u) != 0;
  const int exponent = (c >> 3) & 0xf;
  const int mantissa = c & 0x7;
  double magnitude;
  if (exponent == 15 && mantissa == 7) {
    magnitude = std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), -9);
  } else {
    magnitude = std::ldexp(static_cast<double>(8 + mantissa), exponent - 10);  // 1.m * 2^(e-7)
  }
  return negative ? -magnitude : magnitude;
}

bool e4m3_is_nan(std::uint8_t c) { return (c & 0x7fu) == 0x7fu; }

/// float -> e4m3 by exhaustive nearest search over the finite codes 0x00..0x7E by |x - v| in
/// double, ties to the even code; saturating (anything at or beyond 448, Inf included, is 448).
std::uint8_t ref_float_to_e4m3(float f) {
  const std::uint8_t sign = std::signbit(f) ? 0x80u : 0u;
  if (std::isnan(f)) return static_cast<std::uint8_t>(sign | 0x7fu);
  const double x = std::fabs(static_cast<double>(f));
  if (std::isinf(x)) return static_cast<std::uint8_t>(sign | 0x7eu);
  int best = 0;
  double best_distance = std::numeric_limits<double>::infinity();
  for (int code = 0; code <= 0x7e; ++code) {
    const double d = std::fabs(x - ref_e4m3_to_double(static_cast<std::uint8_t>(code)));
    if (d < best_distance || (d == best_distance && code % 2 == 0)) {
      best = code;
      best_distance = d;
    }
  }
  return static_cast<std::uint8_t>(sign | best);
}

// ---- compile-time checks -------------------------------------------------------------------

static_assert(oscar::float_to_half_bits(1.0f) == 0x3c00u);
static_assert(oscar::float_to_half_bits(-2.0f) == 0xc000u);
static_assert(oscar::float_to_half_bits(65520.0f) == 0x7c00u);
static_assert(oscar::half_bits_to_float(0x7bffu) == 65504.0f);
static_assert(oscar::half_bits_to_float(0x0001u) == 0x1p-24f);
static_assert(oscar::float_to_bf16_bits(1.0f) == 0x3f80u);
static_assert(oscar::bf16_bits_to_float(0xc040u) == -3.0f);
static_assert(oscar::float_to_e4m3_bits(448.0f) == 0x7eu);
static_assert(oscar::float_to_e4m3_bits(-1.0e9f) == 0xfeu);
static_assert(oscar::e4m3_bits_to_float(0x01u) == 0x1p-9f);
static_assert(static_cast<float>(oscar::half(0.5f)) == 0.5f);
static_assert(static_cast<float>(oscar::fp8_e4m3(-0.75f)) == -0.75f);
static_assert(oscar::from_float<oscar::bfloat16>(2.0f) == oscar::bfloat16::from_bits(0x4000u));
static_assert(oscar::to_float(oscar::half::from_bits(0x3555u)) == 0x1.554p-2f);

}  // namespace

// ---- storage types -------------------------------------------------------------------------

TEST_CASE("storage types: trivially copyable, exact sizes, standard layout", "[numeric]") {
  STATIC_CHECK(std::is_trivially_copyable_v<oscar::half>);
  STATIC_CHECK(std::is_trivially_copyable_v<oscar::bfloat16>);
  STATIC_CHECK(std::is_trivially_copyable_v<oscar::fp8_e4m3>);
  STATIC_CHECK(std::is_trivial_v<oscar::half>);
  STATIC_CHECK(std::is_trivial_v<oscar::bfloat16>);
  STATIC_CHECK(std::is_trivial_v<oscar::fp8_e4m3>);
  STATIC_CHECK(std::is_standard_layout_v<oscar::half>);
  STATIC_CHECK(std::is_standard_layout_v<oscar::bfloat16>);
  STATIC_CHECK(std::is_standard_layout_v<oscar::fp8_e4m3>);
  STATIC_CHECK(sizeof(oscar::half) == 2);
  STATIC_CHECK(sizeof(oscar::bfloat16) == 2);
  STATIC_CHECK(sizeof(oscar::fp8_e4m3) == 1);
  // Conversions from float are explicit, so a float never silently becomes a narrower type.
  STATIC_CHECK_FALSE(std::is_convertible_v<float, oscar::half>);
  STATIC_CHECK_FALSE(std::is_convertible_v<float, oscar::bfloat16>);
  STATIC_CHECK_FALSE(std::is_convertible_v<float, oscar::fp8_e4m3>);
  STATIC_CHECK_FALSE(std::is_convertible_v<oscar::half, float>);
}

TEST_CASE("storage types: every bit pattern round trips exactly through the struct",
          "[numeric]") {
  mismatches bad;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const auto h = oscar::half::from_bits(bits);
    const auto bf = oscar::bfloat16::from_bits(bits);
    if (h.bits != bits || std::bit_cast<std::uint16_t>(h) != bits) bad.add("half " + hex(b, 4));
    if (bf.bits != bits || std::bit_cast<std::uint16_t>(bf) != bits) bad.add("bf16 " + hex(b, 4));
    if (!(h == oscar::half::from_bits(bits))) bad.add("half == " + hex(b, 4));
  }
  for (std::uint32_t b = 0; b <= 0xffu; ++b) {
    const auto bits = static_cast<std::uint8_t>(b);
    const auto e = oscar::fp8_e4m3::from_bits(bits);
    if (e.bits != bits || std::bit_cast<std::uint8_t>(e) != bits) bad.add("e4m3 " + hex(b, 2));
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
  // Equality compares the stored bits.
  CHECK(oscar::half::from_bits(0x3c00u) == oscar::half(1.0f));
  CHECK_FALSE(oscar::half::from_bits(0x3c00u) == oscar::half::from_bits(0x3c01u));
}

// ---- binary16 ------------------------------------------------------------------------------

TEST_CASE("fp16: all 65536 patterns decode exactly", "[numeric][fp16]") {
  mismatches bad;
  std::size_t nan_patterns = 0;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float got = oscar::half_bits_to_float(bits);
    const double want = ref_half_to_double(bits);
    if (std::isnan(want)) {
      ++nan_patterns;
      if (!std::isnan(got)) bad.add(hex(b, 4) + " is NaN but decoded to " + describe(got));
      continue;
    }
    // Compare bits, so that -0 and +0 are told apart.
    if (bits_of(got) != bits_of(static_cast<float>(want))) {
      bad.add(hex(b, 4) + ": got " + describe(got) + ", want " + describe(static_cast<float>(want)));
    }
    if (static_cast<double>(got) != want) bad.add(hex(b, 4) + ": not exact");
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
  CHECK(nan_patterns == 2 * 1023);
}

TEST_CASE("fp16: hand-checked values", "[numeric][fp16]") {
  CHECK(oscar::float_to_half_bits(0.0f) == 0x0000u);
  CHECK(oscar::float_to_half_bits(-0.0f) == 0x8000u);
  CHECK(oscar::float_to_half_bits(1.0f) == 0x3c00u);
  CHECK(oscar::float_to_half_bits(-1.5f) == 0xbe00u);
  CHECK(oscar::float_to_half_bits(65504.0f) == 0x7bffu);
  CHECK(oscar::float_to_half_bits(0x1p-14f) == 0x0400u);   // smallest normal
  CHECK(oscar::float_to_half_bits(0x1p-24f) == 0x0001u);   // smallest subnormal
  CHECK(oscar::float_to_half_bits(0x1p-25f) == 0x0000u);   // tie between 0 and 2^-24: even is 0
  CHECK(oscar::float_to_half_bits(-0x1p-25f) == 0x8000u);
  CHECK(oscar::float_to_half_bits(std::nextafter(0x1p-25f, 1.0f)) == 0x0001u);
  CHECK(oscar::float_to_half_bits(0x3p-25f) == 0x0002u);   // tie between 1 and 2 units: 2
  CHECK(oscar::float_to_half_bits(0x5p-25f) == 0x0002u);   // tie between 2 and 3 units: 2
  CHECK(oscar::float_to_half_bits(1.0f + 0x1p-11f) == 0x3c00u);  // tie: stays at even 1.0
  CHECK(oscar::float_to_half_bits(1.0f + 0x3p-11f) == 0x3c02u);  // tie: up to even
  CHECK(oscar::float_to_half_bits(2047.0f) == 0x67ffu);         // 11 significant bits: exact
  CHECK(oscar::float_to_half_bits(2047.5f) == 0x6800u);         // tie 2047 / 2048: even 2048
  CHECK(oscar::float_to_half_bits(2049.0f) == 0x6800u);         // tie 2048 / 2050: even 2048
  CHECK(oscar::float_to_half_bits(2051.0f) == 0x6802u);         // tie 2050 / 2052: even 2052
  CHECK(oscar::float_to_half_bits(std::nextafter(0x1p-14f, 0.0f)) == 0x0400u);  // rounds up
}

TEST_CASE("fp16: overflow threshold at 65520", "[numeric][fp16]") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(oscar::float_to_half_bits(65520.0f) == 0x7c00u);
  CHECK(oscar::float_to_half_bits(-65520.0f) == 0xfc00u);
  CHECK(oscar::float_to_half_bits(65519.996f) == 0x7bffu);
  CHECK(oscar::float_to_half_bits(std::nextafter(65520.0f, 0.0f)) == 0x7bffu);
  CHECK(oscar::float_to_half_bits(std::nextafter(65520.0f, inf)) == 0x7c00u);
  CHECK(oscar::float_to_half_bits(65505.0f) == 0x7bffu);
  CHECK(oscar::float_to_half_bits(1.0e6f) == 0x7c00u);
  CHECK(oscar::float_to_half_bits(std::numeric_limits<float>::max()) == 0x7c00u);
  CHECK(oscar::float_to_half_bits(inf) == 0x7c00u);
  CHECK(oscar::float_to_half_bits(-inf) == 0xfc00u);
}

TEST_CASE("fp16: NaN stays NaN", "[numeric][fp16]") {
  for (std::uint32_t nan_bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fa00000u,
                                 0x7fffffffu, 0x7f802000u}) {
    CAPTURE(hex(nan_bits, 8));
    const std::uint16_t h = oscar::float_to_half_bits(float_of(nan_bits));
    CHECK(half_is_nan(h));
    CHECK(std::isnan(oscar::half_bits_to_float(h)));
    CHECK(std::isnan(static_cast<float>(oscar::half(float_of(nan_bits)))));
  }
}

TEST_CASE("fp16: round to nearest even on exact ties", "[numeric][fp16]") {
  // The midpoint between adjacent binary16 values a < b (b = 0x7C00 standing for 2^16) is exactly
  // representable as a float; it must round to whichever of the two codes is even.
  const std::vector<double> table = half_rounding_table();
  mismatches bad;
  std::size_t ties = 0;
  for (std::size_t code = 0; code + 1 < table.size(); ++code) {
    const double mid = (table[code] + table[code + 1]) / 2;
    const auto f = static_cast<float>(mid);
    if (static_cast<double>(f) != mid) bad.add("midpoint not representable (test bug)");
    const auto even = static_cast<std::uint16_t>(code % 2 == 0 ? code : code + 1);
    for (int s = 0; s < 2; ++s) {
      const float x = s ? -f : f;
      const auto want = static_cast<std::uint16_t>(even | (s ? 0x8000u : 0u));
      const std::uint16_t got = oscar::float_to_half_bits(x);
      ++ties;
      if (got != want) bad.add(describe(x) + ": got " + hex(got, 4) + ", want " + hex(want, 4));
    }
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
  CHECK(ties == 2 * 0x7c00u);
}

TEST_CASE("fp16: encoder matches nearest-even search in double", "[numeric][fp16]") {
  const std::vector<double> table = half_rounding_table();
  const std::vector<float> inputs = half_encoder_inputs();
  mismatches bad;
  for (float x : inputs) {
    const std::uint16_t got = oscar::float_to_half_bits(x);
    const std::uint16_t want = ref_float_to_half_by_search(x, table);
    if (std::isnan(x)) {
      if (!half_is_nan(got)) bad.add(describe(x) + ": NaN became " + hex(got, 4));
    } else if (got != want) {
      bad.add(describe(x) + ": got " + hex(got, 4) + ", want " + hex(want, 4));
    }
    if (oscar::half(x).bits != got) bad.add(describe(x) + ": half(float) differs");
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
  CHECK(inputs.size() > 1'000'000);
}

TEST_CASE("fp16: decoding then encoding every non-NaN pattern is the identity", "[numeric][fp16]") {
  mismatches bad;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    if (half_is_nan(bits)) continue;
    const std::uint16_t again = oscar::float_to_half_bits(oscar::half_bits_to_float(bits));
    if (again != bits) bad.add(hex(b, 4) + " -> " + hex(again, 4));
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
}

#if defined(OSCAR_TEST_HAVE_FLOAT16)
TEST_CASE("fp16: cross-check against the compiler's _Float16 conversions", "[numeric][fp16]") {
  mismatches bad;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float want = compiler_half_to_float(bits);
    const float got = oscar::half_bits_to_float(bits);
    if (std::isnan(want) ? !std::isnan(got) : bits_of(got) != bits_of(want)) {
      bad.add("decode " + hex(b, 4) + ": got " + describe(got) + ", want " + describe(want));
    }
  }
  const std::vector<float> inputs = half_encoder_inputs();
  for (float x : inputs) {
    const std::uint16_t want = compiler_float_to_half(x);
    const std::uint16_t got = oscar::float_to_half_bits(x);
    if (std::isnan(x) ? !half_is_nan(got) : got != want) {
      bad.add("encode " + describe(x) + ": got " + hex(got, 4) + ", want " + hex(want, 4));
    }
  }
  // Extra random inputs that the search reference above does not see.
  for (float x : random_bit_patterns(1u << 22, 77u)) {
    const std::uint16_t want = compiler_float_to_half(x);
    const std::uint16_t got = oscar::float_to_half_bits(x);
    if (std::isnan(x) ? !half_is_nan(got) : got != want) {
      bad.add("encode " + describe(x) + ": got " + hex(got, 4) + ", want " + hex(want, 4));
    }
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
}
#endif

// ---- bfloat16 ------------------------------------------------------------------------------

TEST_CASE("bf16: all 65536 patterns decode exactly", "[numeric][bf16]") {
  mismatches bad;
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float got = oscar::bf16_bits_to_float(bits);
    const double want = ref_bf16_to_double(bits);
    if (std::isnan(want)) {
      if (!std::isnan(got)) bad.add(hex(b, 4) + " is NaN but decoded to " + describe(got));
    } else if (bits_of(got) != bits_of(static_cast<float>(want)) ||
               static_cast<double>(got) != want) {
      bad.add(hex(b, 4) + ": got " + describe(got) + ", want " + describe(static_cast<float>(want)));
    }
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
}

TEST_CASE("bf16: hand-checked values", "[numeric][bf16]") {
  CHECK(oscar::float_to_bf16_bits(1.0f) == 0x3f80u);
  CHECK(oscar::float_to_bf16_bits(-0.0f) == 0x8000u);
  CHECK(oscar::float_to_bf16_bits(1.0f + 0x1p-8f) == 0x3f80u);   // tie: stays at even 1.0
  CHECK(oscar::float_to_bf16_bits(1.0f + 0x3p-8f) == 0x3f82u);   // tie: up to even
  CHECK(oscar::float_to_bf16_bits(std::nextafter(1.0f + 0x1p-8f, 2.0f)) == 0x3f81u);
  CHECK(oscar::float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7f80u);  // -> Inf
  CHECK(oscar::float_to_bf16_bits(float_of(0x7f7f7fffu)) == 0x7f7fu);  // just below the tie
  CHECK(oscar::float_to_bf16_bits(float_of(0x7f7f8000u)) == 0x7f80u);  // tie with Inf: even
  CHECK(oscar::float_to_bf16_bits(std::numeric_limits<float>::infinity()) == 0x7f80u);
  CHECK(oscar::float_to_bf16_bits(-std::numeric_limits<float>::infinity()) == 0xff80u);
  CHECK(oscar::float_to_bf16_bits(std::numeric_limits<float>::denorm_min()) == 0x0000u);
  CHECK(oscar::float_to_bf16_bits(float_of(0x00008000u)) == 0x0000u);  // subnormal tie: even
  CHECK(oscar::float_to_bf16_bits(float_of(0x00018000u)) == 0x0002u);  // subnormal tie: even
}

TEST_CASE("bf16: NaN stays NaN", "[numeric][bf16]") {
  // Includes NaNs whose payload lies only in the 16 bits that bfloat16 drops: plain truncation
  // or rounding would turn them into Inf.
  for (std::uint32_t nan_bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7f80ffffu,
                                 0x7fffffffu, 0xffffffffu, 0x7fff8000u}) {
    CAPTURE(hex(nan_bits, 8));
    const std::uint16_t b = oscar::float_to_bf16_bits(float_of(nan_bits));
    CHECK(bf16_is_nan(b));
    CHECK(std::isnan(oscar::bf16_bits_to_float(b)));
    CHECK(std::isnan(static_cast<float>(oscar::bfloat16(float_of(nan_bits)))));
  }
}

TEST_CASE("bf16: encoder matches nearest-even search over the two neighbours",
          "[numeric][bf16]") {
  std::vector<float> inputs = special_floats();
  // Every bfloat16 value, and every midpoint (+- 1 float ulp) between it and the next code.
  for (std::uint32_t code = 0; code < 0x7f80u; ++code) {
    const std::uint32_t base = code << 16;
    for (std::uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      inputs.push_back(float_of(base | low));
      inputs.push_back(float_of(base | low | 0x80000000u));
    }
  }
  for (float f : random_bit_patterns(1u << 22, 4321u)) inputs.push_back(f);

  mismatches bad;
  for (float x : inputs) {
    const std::uint16_t got = oscar::float_to_bf16_bits(x);
    if (std::isnan(x)) {
      if (!bf16_is_nan(got)) bad.add(describe(x) + ": NaN became " + hex(got, 4));
      continue;
    }
    const std::uint16_t want = ref_float_to_bf16(x);
    if (got != want) bad.add(describe(x) + ": got " + hex(got, 4) + ", want " + hex(want, 4));
    if (oscar::bfloat16(x).bits != got) bad.add(describe(x) + ": bfloat16(float) differs");
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
  CHECK(inputs.size() > 4'000'000);
}

TEST_CASE("bf16: round to nearest even on exact ties", "[numeric][bf16]") {
  mismatches bad;
  for (std::uint32_t code = 0; code < 0x7f80u; ++code) {
    const float mid = float_of((code << 16) | 0x8000u);  // exactly between code and code + 1
    const auto even = static_cast<std::uint16_t>(code % 2 == 0 ? code : code + 1);
    if (oscar::float_to_bf16_bits(mid) != even) bad.add(describe(mid) + " should give " + hex(even, 4));
    if (oscar::float_to_bf16_bits(-mid) != (even | 0x8000u)) bad.add(describe(-mid) + " (negative)");
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
}

// ---- fp8 e4m3 (FN) -------------------------------------------------------------------------

TEST_CASE("fp8 e4m3: all 256 codes decode exactly", "[numeric][fp8]") {
  for (std::uint32_t c = 0; c <= 0xffu; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    CAPTURE(hex(c, 2));
    const float got = oscar::e4m3_bits_to_float(code);
    const double want = ref_e4m3_to_double(code);
    if (std::isnan(want)) {
      CHECK(std::isnan(got));
    } else {
      CHECK(bits_of(got) == bits_of(static_cast<float>(want)));
      CHECK(static_cast<double>(got) == want);
    }
  }
  CHECK(oscar::e4m3_bits_to_float(0x7eu) == 448.0f);
  CHECK(oscar::e4m3_bits_to_float(0xfeu) == -448.0f);
  CHECK(oscar::e4m3_bits_to_float(0x08u) == 0x1p-6f);  // smallest normal
  CHECK(oscar::e4m3_bits_to_float(0x07u) == 0x7p-9f);  // largest subnormal
  CHECK(oscar::e4m3_bits_to_float(0x78u) == 256.0f);   // 0x78 is finite in the FN variant
  CHECK(oscar::fp8_e4m3_max == 448.0f);
}

TEST_CASE("fp8 e4m3: hand-checked encodings", "[numeric][fp8]") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(oscar::float_to_e4m3_bits(0.0f) == 0x00u);
  CHECK(oscar::float_to_e4m3_bits(-0.0f) == 0x80u);
  CHECK(oscar::float_to_e4m3_bits(1.0f) == 0x38u);
  CHECK(oscar::float_to_e4m3_bits(-2.0f) == 0xc0u);
  CHECK(oscar::float_to_e4m3_bits(448.0f) == 0x7eu);
  CHECK(oscar::float_to_e4m3_bits(449.0f) == 0x7eu);      // saturates
  CHECK(oscar::float_to_e4m3_bits(464.0f) == 0x7eu);      // would be NaN without saturation
  CHECK(oscar::float_to_e4m3_bits(1.0e30f) == 0x7eu);
  CHECK(oscar::float_to_e4m3_bits(inf) == 0x7eu);         // Inf saturates too
  CHECK(oscar::float_to_e4m3_bits(-inf) == 0xfeu);
  CHECK(oscar::float_to_e4m3_bits(432.0f) == 0x7eu);      // tie 416 (odd 0x7D) / 448: even
  CHECK(oscar::float_to_e4m3_bits(std::nextafter(432.0f, 0.0f)) == 0x7du);
  CHECK(oscar::float_to_e4m3_bits(1.0625f) == 0x38u);     // tie 1.0 / 1.125: even 1.0
  CHECK(oscar::float_to_e4m3_bits(1.1875f) == 0x3au);     // tie 1.125 / 1.25: even 1.25
  CHECK(oscar::float_to_e4m3_bits(0x1p-9f) == 0x01u);     // smallest subnormal
  CHECK(oscar::float_to_e4m3_bits(0x1p-10f) == 0x00u);    // tie 0 / 2^-9: even 0
  CHECK(oscar::float_to_e4m3_bits(-0x1p-10f) == 0x80u);
  CHECK(oscar::float_to_e4m3_bits(std::nextafter(0x1p-10f, 1.0f)) == 0x01u);
  CHECK(oscar::float_to_e4m3_bits(0x3p-10f) == 0x02u);    // tie 1 / 2 units: even 2
  CHECK(oscar::float_to_e4m3_bits(0xfp-10f) == 0x08u);    // tie 7 units / 2^-6: even 0x08
  CHECK(oscar::float_to_e4m3_bits(std::numeric_limits<float>::denorm_min()) == 0x00u);
}

TEST_CASE("fp8 e4m3: NaN gives the NaN code", "[numeric][fp8]") {
  for (std::uint32_t nan_bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu}) {
    CAPTURE(hex(nan_bits, 8));
    const std::uint8_t code = oscar::float_to_e4m3_bits(float_of(nan_bits));
    CHECK(e4m3_is_nan(code));
    CHECK(std::isnan(static_cast<float>(oscar::fp8_e4m3(float_of(nan_bits)))));
  }
}

TEST_CASE("fp8 e4m3: round to nearest even on exact ties", "[numeric][fp8]") {
  // Midpoints between adjacent finite positive codes 0x00..0x7E.
  mismatches bad;
  for (int code = 0; code < 0x7e; ++code) {
    const double mid = (ref_e4m3_to_double(static_cast<std::uint8_t>(code)) +
                        ref_e4m3_to_double(static_cast<std::uint8_t>(code + 1))) / 2;
    const auto f = static_cast<float>(mid);
    if (static_cast<double>(f) != mid) bad.add("midpoint not representable (test bug)");
    const auto even = static_cast<std::uint8_t>(code % 2 == 0 ? code : code + 1);
    if (oscar::float_to_e4m3_bits(f) != even) bad.add(describe(f) + " should give " + hex(even, 2));
    if (oscar::float_to_e4m3_bits(-f) != (even | 0x80u)) bad.add(describe(-f) + " (negative)");
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
}

TEST_CASE("fp8 e4m3: encoder matches exhaustive nearest-even search, saturating",
          "[numeric][fp8]") {
  std::vector<float> inputs = special_floats();
  for (int code = 0; code <= 0x7e; ++code) {
    const double v = ref_e4m3_to_double(static_cast<std::uint8_t>(code));
    add_with_neighbours(inputs, v);
    if (code < 0x7e) {
      add_with_neighbours(inputs, (v + ref_e4m3_to_double(static_cast<std::uint8_t>(code + 1))) / 2);
    }
  }
  add_with_neighbours(inputs, 464.0);  // midpoint 448 / 512 in the non-FN format
  add_with_neighbours(inputs, 480.0);
  std::mt19937 rng(2024u);
  std::uniform_real_distribution<double> unit(0.5, 1.0);
  for (int i = 0; i < 200000; ++i) {
    // Magnitudes from 2^-13 to 2^10, covering zero, subnormals, normals and saturation.
    const double x = std::ldexp(unit(rng), -12 + static_cast<int>(rng() % 23));
    inputs.push_back(static_cast<float>(i % 2 ? -x : x));
  }
  for (float f : random_bit_patterns(200000, 555u)) inputs.push_back(f);

  mismatches bad;
  for (float x : inputs) {
    const std::uint8_t got = oscar::float_to_e4m3_bits(x);
    if (std::isnan(x)) {
      if (!e4m3_is_nan(got)) bad.add(describe(x) + ": NaN became " + hex(got, 2));
      continue;
    }
    const std::uint8_t want = ref_float_to_e4m3(x);
    if (got != want) bad.add(describe(x) + ": got " + hex(got, 2) + ", want " + hex(want, 2));
    if (oscar::fp8_e4m3(x).bits != got) bad.add(describe(x) + ": fp8_e4m3(float) differs");
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
  CHECK(inputs.size() > 400'000);
}

TEST_CASE("fp8 e4m3: never produces NaN from a non-NaN input", "[numeric][fp8]") {
  mismatches bad;
  for (float x : random_bit_patterns(1u << 20, 808u)) {
    if (std::isnan(x)) continue;
    const std::uint8_t code = oscar::float_to_e4m3_bits(x);
    if (e4m3_is_nan(code)) bad.add(describe(x) + " -> " + hex(code, 2));
    // Saturation: the magnitude never exceeds 448, and keeps the sign.
    const float back = oscar::e4m3_bits_to_float(code);
    if (std::fabs(back) > 448.0f || std::signbit(back) != std::signbit(x)) {
      bad.add(describe(x) + " -> " + describe(back));
    }
  }
  INFO(bad.examples);
  CHECK(bad.count == 0);
}

TEST_CASE("fp16: rounding toward -Inf and +Inf gives the nearest bounds", "[numeric]") {
  // Reference: every finite half value (and +-Inf) in increasing order, searched directly.
  std::vector<double> values;
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    if ((h & 0x7fffu) > 0x7c00u || h == 0x8000u) continue;  // NaN; -0 equals +0
    values.push_back(static_cast<double>(oscar::half_bits_to_float(h)));
  }
  std::sort(values.begin(), values.end());
  std::mt19937 rng(99);
  std::uniform_int_distribution<int> exponent(-30, 17);
  std::uniform_real_distribution<double> mantissa(-2.0, 2.0);
  int bad = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = i < 65536 ? oscar::half_bits_to_float(static_cast<std::uint16_t>(i))
                              : static_cast<float>(std::ldexp(mantissa(rng), exponent(rng)));
    if (std::isnan(x)) continue;
    const double want_down = *(std::upper_bound(values.begin(), values.end(), double(x)) - 1);
    const double want_up = *std::lower_bound(values.begin(), values.end(), double(x));
    const double down = oscar::half_bits_to_float(oscar::float_to_half_bits_down(x));
    const double up = oscar::half_bits_to_float(oscar::float_to_half_bits_up(x));
    bad += (down != want_down) + (up != want_up);
  }
  CHECK(bad == 0);
  CHECK(std::isnan(oscar::half_bits_to_float(oscar::float_to_half_bits_down(NAN))));
  CHECK(oscar::float_to_half_bits_up(1e9f) == 0x7c00u);    // beyond 65504: +Inf bounds it
  CHECK(oscar::float_to_half_bits_down(1e9f) == 0x7bffu);  // 65504 is the largest below
}
