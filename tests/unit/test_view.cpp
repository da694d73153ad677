// SPDX-License-Identifier: Apache-2.0
// Tests for include/oscar/core/view.hpp (strided K/V views, make_kv_view validation) and
// include/oscar/core/error.hpp (oscar::error, OSCAR_CHECK_ARG, OSCAR_CHECK).
//
// Buffers are filled by walking the intended memory layout in order and writing the value
// code(t, h, d) = 10000 t + 100 h + d at each element (padding gets -1), so the expected values
// never depend on the view's own index arithmetic.

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "support.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/view.hpp"

namespace {

using Catch::Matchers::ContainsSubstring;
using oscar::index_t;

float code(index_t t, index_t h, index_t d) { return static_cast<float>(10000 * t + 100 * h + d); }

constexpr float kPad = -1.0f;

/// [tokens][heads][head_dim + head_pad] with token_pad extra elements after each token.
std::vector<float> tokens_outer_buffer(index_t tokens, index_t heads, index_t head_dim,
                                       index_t head_pad, index_t token_pad) {
  std::vector<float> buf;
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t h = 0; h < heads; ++h) {
      for (index_t d = 0; d < head_dim; ++d) buf.push_back(code(t, h, d));
      for (index_t p = 0; p < head_pad; ++p) buf.push_back(kPad);
    }
    for (index_t p = 0; p < token_pad; ++p) buf.push_back(kPad);
  }
  return buf;
}

/// [heads][tokens][head_dim] (heads outer), each head followed by head_pad extra elements.
std::vector<float> heads_outer_buffer(index_t tokens, index_t heads, index_t head_dim,
                                      index_t head_pad) {
  std::vector<float> buf;
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t d = 0; d < head_dim; ++d) buf.push_back(code(t, h, d));
    }
    for (index_t p = 0; p < head_pad; ++p) buf.push_back(kPad);
  }
  return buf;
}

/// Checks that view(t, h, d) and row(t, h)[d] read code(t + token_offset, h, d) everywhere.
template <class T>
void check_codes(const oscar::kv_view<T>& v, index_t token_offset = 0) {
  std::size_t bad = 0;
  std::size_t seen = 0;
  for (index_t t = 0; t < v.tokens; ++t) {
    for (index_t h = 0; h < v.heads; ++h) {
      for (index_t d = 0; d < v.head_dim; ++d) {
        ++seen;
        if (v(t, h, d) != code(t + token_offset, h, d)) ++bad;
        if (v.row(t, h)[d] != code(t + token_offset, h, d)) ++bad;
      }
    }
  }
  CHECK(bad == 0);
  CHECK(seen == static_cast<std::size_t>(v.elements()));
}

using oscar_test::error_from;

/// Asserts that `f` throws oscar::error(invalid_argument) whose message contains each fragment.
template <class F>
void check_rejected(F&& f, const std::vector<std::string>& fragments) {
  const auto err = error_from(f);
  REQUIRE(err.has_value());
  CHECK(err->code() == oscar::errc::invalid_argument);
  const std::string what = err->what();
  CAPTURE(what);
  CHECK_THAT(what, ContainsSubstring("oscar: "));
  CHECK_THAT(what, ContainsSubstring(" is not allowed (allowed: "));
  for (const auto& fragment : fragments) CHECK_THAT(what, ContainsSubstring(fragment));
}

float sum_of(oscar::kv_view<const float> v) {  // takes a read-only view
  float s = 0;
  for (index_t t = 0; t < v.tokens; ++t)
    for (index_t h = 0; h < v.heads; ++h)
      for (index_t d = 0; d < v.head_dim; ++d) s += v(t, h, d);
  return s;
}

// Clang before 16 evaluates std::source_location::current() in a default argument at the
// callee (llvm/llvm-project#56379, CWG 2631), so error messages there name error.hpp instead of
// the failing check; location assertions only run where the compiler implements the rule.
#if defined(__clang__) && __clang_major__ < 16
constexpr bool kCallSiteLocations = false;
#else
constexpr bool kCallSiteLocations = true;
#endif

int check_value(int value) {
  OSCAR_CHECK_ARG(value % 2 == 0, value, "an even number");
  return value;
}

}  // namespace

// ---- kv_view -------------------------------------------------------------------------------

TEST_CASE("view: contiguous [tokens, heads, dim] indexing", "[view]") {
  std::vector<float> buf = tokens_outer_buffer(5, 3, 8, 0, 0);
  const auto v = oscar::make_kv_view(buf.data(), 5, 3, 8);
  CHECK(v.data == buf.data());
  CHECK(v.tokens == 5);
  CHECK(v.heads == 3);
  CHECK(v.head_dim == 8);
  CHECK(v.token_stride == 24);
  CHECK(v.head_stride == 8);
  CHECK(v.elements() == 5 * 3 * 8);
  CHECK_FALSE(v.empty());
  check_codes(v);
  CHECK(v(4, 2, 7) == buf.back());
  CHECK(v.row(1, 2) == buf.data() + 40);
}

TEST_CASE("view: strided tokens-outer layout with padding", "[view]") {
  // head_stride = 8 + 3, token_stride = 4 * 11 + 5
  std::vector<float> buf = tokens_outer_buffer(6, 4, 8, 3, 5);
  const auto v = oscar::make_kv_view(buf.data(), 6, 4, 8, 4 * 11 + 5, 11);
  check_codes(v);
}

TEST_CASE("view: heads-outer [heads, tokens, dim] layout", "[view]") {
  std::vector<float> buf = heads_outer_buffer(7, 3, 16, 4);
  const auto v = oscar::make_kv_view(buf.data(), 7, 3, 16, /*token_stride=*/16,
                                     /*head_stride=*/7 * 16 + 4);
  check_codes(v);
}

TEST_CASE("view: one head of a [tokens, heads, dim] buffer", "[view]") {
  std::vector<float> buf = tokens_outer_buffer(4, 3, 8, 0, 0);
  const index_t h = 2;
  const auto v = oscar::make_kv_view(buf.data() + h * 8, 4, 1, 8, 3 * 8, 8);
  for (index_t t = 0; t < 4; ++t) {
    for (index_t d = 0; d < 8; ++d) {
      CAPTURE(t, d);
      CHECK(v(t, 0, d) == code(t, h, d));
    }
  }
}

TEST_CASE("view: writes through a mutable view land in the buffer", "[view]") {
  std::vector<float> buf = heads_outer_buffer(3, 2, 4, 0);
  const auto v = oscar::make_kv_view(buf.data(), 3, 2, 4, 4, 12);
  v(2, 1, 3) = 42.0f;
  v.row(0, 1)[0] = 7.0f;
  // [heads, tokens, dim]: (t=2, h=1, d=3) is element 1*12 + 2*4 + 3 = 23; (0, 1, 0) is 12.
  CHECK(buf[23] == 42.0f);
  CHECK(buf[12] == 7.0f);
}

TEST_CASE("view: half and bfloat16 element types", "[view]") {
  std::vector<oscar::half> hbuf(2 * 2 * 4);
  for (std::size_t i = 0; i < hbuf.size(); ++i) hbuf[i] = oscar::half(static_cast<float>(i));
  const auto hv = oscar::make_kv_view(hbuf.data(), 2, 2, 4);
  CHECK(static_cast<float>(hv(1, 1, 3)) == 15.0f);
  CHECK(static_cast<float>(hv(1, 0, 2)) == 10.0f);

  std::vector<oscar::bfloat16> bbuf(2 * 2 * 4);
  for (std::size_t i = 0; i < bbuf.size(); ++i) bbuf[i] = oscar::bfloat16(static_cast<float>(i));
  const oscar::kv_view<const oscar::bfloat16> bv =
      oscar::make_kv_view(static_cast<const oscar::bfloat16*>(bbuf.data()), 2, 2, 4);
  CHECK(static_cast<float>(bv(0, 1, 1)) == 5.0f);

  STATIC_CHECK(oscar::dtype_of<float>() == oscar::dtype::f32);
  STATIC_CHECK(oscar::dtype_of<const float>() == oscar::dtype::f32);
  STATIC_CHECK(oscar::dtype_of<oscar::half>() == oscar::dtype::f16);
  STATIC_CHECK(oscar::dtype_of<const oscar::bfloat16>() == oscar::dtype::bf16);
  STATIC_CHECK(oscar::is_kv_element_v<const oscar::half>);
  STATIC_CHECK_FALSE(oscar::is_kv_element_v<double>);
  STATIC_CHECK_FALSE(oscar::is_kv_element_v<oscar::fp8_e4m3>);
  CHECK(oscar::to_string(oscar::dtype::f32) == "f32");
  CHECK(oscar::to_string(oscar::dtype::f16) == "f16");
  CHECK(oscar::to_string(oscar::dtype::bf16) == "bf16");
}

TEST_CASE("view: implicit conversion to a const view", "[view]") {
  STATIC_CHECK(std::is_convertible_v<oscar::kv_view<float>, oscar::kv_view<const float>>);
  STATIC_CHECK(std::is_convertible_v<oscar::kv_view<oscar::half>, oscar::kv_view<const oscar::half>>);
  STATIC_CHECK_FALSE(std::is_convertible_v<oscar::kv_view<const float>, oscar::kv_view<float>>);
  STATIC_CHECK_FALSE(std::is_convertible_v<oscar::kv_view<float>, oscar::kv_view<oscar::half>>);
  STATIC_CHECK(std::is_trivially_copyable_v<oscar::kv_view<float>>);

  std::vector<float> buf = heads_outer_buffer(3, 2, 4, 2);
  const auto v = oscar::make_kv_view(buf.data(), 3, 2, 4, 4, 14);
  const oscar::kv_view<const float> cv = v;
  CHECK(cv.data == v.data);
  CHECK(cv.tokens == v.tokens);
  CHECK(cv.heads == v.heads);
  CHECK(cv.head_dim == v.head_dim);
  CHECK(cv.token_stride == v.token_stride);
  CHECK(cv.head_stride == v.head_stride);
  check_codes(cv);
  STATIC_CHECK(std::is_same_v<decltype(cv(0, 0, 0)), const float&>);

  float expected = 0;
  for (float x : buf) expected += x == kPad ? 0.0f : x;
  CHECK(sum_of(v) == expected);  // a mutable view passed where a const view is expected
}

TEST_CASE("view: slice_tokens", "[view]") {
  SECTION("tokens-outer") {
    std::vector<float> buf = tokens_outer_buffer(6, 2, 4, 1, 3);
    const auto v = oscar::make_kv_view(buf.data(), 6, 2, 4, 2 * 5 + 3, 5);
    const auto s = v.slice_tokens(2, 3);
    CHECK(s.tokens == 3);
    CHECK(s.heads == 2);
    CHECK(s.head_dim == 4);
    CHECK(s.token_stride == v.token_stride);
    CHECK(s.head_stride == v.head_stride);
    check_codes(s, 2);
    check_codes(v.slice_tokens(0, 6), 0);
    check_codes(v.slice_tokens(5, 1), 5);
  }
  SECTION("heads-outer") {
    std::vector<float> buf = heads_outer_buffer(6, 3, 4, 0);
    const auto v = oscar::make_kv_view(buf.data(), 6, 3, 4, 4, 24);
    check_codes(v.slice_tokens(1, 4), 1);
    check_codes(v.slice_tokens(4, 2), 4);
  }
  SECTION("empty slices") {
    std::vector<float> buf = tokens_outer_buffer(4, 1, 2, 0, 0);
    const auto v = oscar::make_kv_view(buf.data(), 4, 1, 2);
    for (index_t first : {0, 2, 4}) {
      CAPTURE(first);
      const auto s = v.slice_tokens(first, 0);
      CHECK(s.empty());
      CHECK(s.tokens == 0);
      CHECK(s.elements() == 0);
    }
  }
  SECTION("out-of-range slices are rejected") {
    std::vector<float> buf = tokens_outer_buffer(4, 1, 2, 0, 0);
    const auto v = oscar::make_kv_view(buf.data(), 4, 1, 2);
    check_rejected([&] { (void)v.slice_tokens(-1, 2); }, {"first = -1", "[0, 4)"});
    check_rejected([&] { (void)v.slice_tokens(3, 2); }, {"first = 3", "count = 2"});
    check_rejected([&] { (void)v.slice_tokens(5, 0); }, {"first = 5"});
    check_rejected([&] { (void)v.slice_tokens(0, -1); }, {"count = -1"});
  }
}

TEST_CASE("view: an empty view", "[view]") {
  const auto v = oscar::make_kv_view(static_cast<float*>(nullptr), 0, 2, 8);
  CHECK(v.empty());
  CHECK(v.elements() == 0);
  const oscar::kv_view<float> defaulted{};
  CHECK(defaulted.empty());
  CHECK(defaulted.data == nullptr);
}

// ---- make_kv_view validation ---------------------------------------------------------------

TEST_CASE("view: make_kv_view rejects bad shapes naming the value", "[view][error]") {
  std::vector<float> buf(1024);
  float* p = buf.data();
  check_rejected([&] { (void)oscar::make_kv_view(p, -1, 2, 8); }, {"tokens = -1", ">= 0"});
  check_rejected([&] { (void)oscar::make_kv_view(p, -7, 2, 8, 16, 8); }, {"tokens = -7"});
  check_rejected([&] { (void)oscar::make_kv_view(p, 4, 0, 8); }, {"heads = 0", ">= 1"});
  check_rejected([&] { (void)oscar::make_kv_view(p, 4, -3, 8, 16, 8); }, {"heads = -3"});
  check_rejected([&] { (void)oscar::make_kv_view(p, 4, 2, 0); }, {"head_dim = 0", ">= 1"});
}

TEST_CASE("view: make_kv_view rejects a null pointer with tokens > 0", "[view][error]") {
  check_rejected([] { (void)oscar::make_kv_view(static_cast<float*>(nullptr), 1, 2, 8); },
                 {"non-null pointer"});
  check_rejected(
      [] { (void)oscar::make_kv_view(static_cast<const oscar::half*>(nullptr), 3, 1, 4, 4, 4); },
      {"non-null pointer"});
  // No tokens, no data needed.
  CHECK_NOTHROW(oscar::make_kv_view(static_cast<float*>(nullptr), 0, 2, 8));
}

TEST_CASE("view: make_kv_view rejects aliasing strides", "[view][error]") {
  std::vector<float> buf(4096);
  float* p = buf.data();
  // Tokens overlap: token_stride smaller than heads * head_stride.
  check_rejected([&] { (void)oscar::make_kv_view(p, 3, 2, 8, 8, 8); },
                 {"token_stride = 8", "strides that do not alias"});
  // Heads overlap inside a token: head_stride smaller than head_dim.
  check_rejected([&] { (void)oscar::make_kv_view(p, 3, 2, 8, 32, 4); }, {"token_stride = 32"});
  // Every token at the same place (a broadcast) is aliasing too.
  check_rejected([&] { (void)oscar::make_kv_view(p, 2, 1, 8, 0, 8); }, {"token_stride = 0"});
  // Heads-outer with heads overlapping tokens.
  check_rejected([&] { (void)oscar::make_kv_view(p, 4, 2, 8, 8, 24); }, {"token_stride = 8"});
  // Negative strides.
  check_rejected([&] { (void)oscar::make_kv_view(p + 2048, 3, 2, 8, -16, 8); }, {"token_stride = -16"});

  // The tight layouts of both nestings are accepted.
  CHECK_NOTHROW(oscar::make_kv_view(p, 3, 2, 8, 16, 8));
  CHECK_NOTHROW(oscar::make_kv_view(p, 3, 2, 8, 8, 24));
  CHECK_NOTHROW(oscar::make_kv_view(p, 3, 2, 8, 100, 9));
}

TEST_CASE("view: make_kv_view rejects heads that alias within a single token",
          "[view][error]") {
  // With one token, head_stride = 2 < head_dim = 4 would put heads 0 and 1 on shared elements:
  // view(0, 0, 2) and view(0, 1, 0) would be the same float.
  std::vector<float> buf(64);
  check_rejected([&] { (void)oscar::make_kv_view(buf.data(), 1, 2, 4, 8, 2); },
                 {"not allowed (allowed:", "head_stride = 2"});
  check_rejected([&] { (void)oscar::make_kv_view(buf.data(), 1, 3, 4, 0, 0); },
                 {"not allowed (allowed:", "head_stride = 0"});
}

TEST_CASE("view: strides of a dimension of extent 1 do not matter", "[view]") {
  std::vector<float> buf(64);
  CHECK_NOTHROW(oscar::make_kv_view(buf.data(), 2, 1, 4, 4, 0));  // one head: any head_stride
  CHECK_NOTHROW(oscar::make_kv_view(buf.data(), 1, 2, 4, 0, 4));  // one token: any token_stride
  // Huge extents must be rejected, not overflow: 2^40 heads of stride 2^40 need 2^80 elements.
  check_rejected([&] { (void)oscar::make_kv_view(buf.data(), 2, index_t{1} << 40, 4, index_t{1} << 41, index_t{1} << 40); },
                 {"not allowed (allowed:"});
}

// ---- error.hpp -----------------------------------------------------------------------------

TEST_CASE("error: OSCAR_CHECK_ARG message format and error code", "[error]") {
  CHECK(check_value(4) == 4);
  const auto err = error_from([] { (void)check_value(7); });
  REQUIRE(err.has_value());
  CHECK(err->code() == oscar::errc::invalid_argument);
  const std::string what = err->what();
  CAPTURE(what);
  CHECK(what.rfind("oscar: value = 7 is not allowed (allowed: an even number)\n  in ", 0) == 0);
  if (kCallSiteLocations) {
    CHECK_THAT(what, ContainsSubstring("check_value"));
    CHECK_THAT(what, ContainsSubstring("test_view.cpp:"));
  }
  // oscar::error is a std::runtime_error, so generic handlers see it.
  STATIC_CHECK(std::is_base_of_v<std::runtime_error, oscar::error>);
}

TEST_CASE("error: OSCAR_CHECK carries the given code and streams the message", "[error]") {
  const auto err = error_from([] {
    const int pages = 3;
    OSCAR_CHECK(pages == 0, oscar::errc::out_of_memory, "pool exhausted: ", pages, " pages");
  });
  REQUIRE(err.has_value());
  CHECK(err->code() == oscar::errc::out_of_memory);
  CHECK(std::string(err->what()).rfind("oscar: pool exhausted: 3 pages\n  in ", 0) == 0);
  CHECK_NOTHROW([] { OSCAR_CHECK(true, oscar::errc::corrupt_data, "never"); }());
}

TEST_CASE("error: the file path is shortened to start at oscar/", "[error]") {
  if (!kCallSiteLocations) SKIP("this compiler reports the callee's source location");
  // fail() keeps the path from the last "/oscar/" on, so messages do not leak build paths.
  std::vector<float> buf(8);
  const auto err = error_from([&] { (void)oscar::make_kv_view(buf.data(), 1, 0, 8); });
  REQUIRE(err.has_value());
  const std::string what = err->what();
  CAPTURE(what);
  CHECK_THAT(what, ContainsSubstring(" at oscar/core/view.hpp:"));
  CHECK_THAT(what, !ContainsSubstring(" at /"));
}

TEST_CASE("error: errc names", "[error]") {
  CHECK(oscar::to_string(oscar::errc::invalid_argument) == "invalid argument");
  CHECK(oscar::to_string(oscar::errc::non_finite) == "non-finite input");
  CHECK(oscar::to_string(oscar::errc::out_of_memory) == "out of memory");
  CHECK(oscar::to_string(oscar::errc::corrupt_data) == "corrupt data");
  CHECK(oscar::to_string(oscar::errc::unsupported) == "unsupported");
  const oscar::error e(oscar::errc::corrupt_data, "bad page");
  CHECK(e.code() == oscar::errc::corrupt_data);
  CHECK(std::string(e.what()) == "bad page");
}
