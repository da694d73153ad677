// SPDX-License-Identifier: Apache-2.0
// Properties every tensor format must have, checked over the list of shipped formats, plus
// format-specific checks against references written here from the formats' definitions.
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "oscar/oscar.hpp"
#include "oscar/testing/synthetic_kv.hpp"

namespace q = oscar::quant;
using oscar::index_t;
using oscar::testing::dense_kv;

namespace {

/// Every distinct tensor format shipped (keys and values of every KV format).
using tensor_formats =
    std::tuple<q::fp16, q::bf16, q::e4m3, q::q8_0, q::q4_0, q::kivi_key<2>, q::kivi_value<2>,
               q::kivi_key<4>, q::kivi_value<4>, q::fp2plus_key, q::fp2plus_value,
               q::fp2plus_g16, q::fp2plus_channel_g64, q::fp4plus_key,
               // FP2+ family members exercising the other parameters:
               q::fpq<q::fpq_config{.levels = q::codebook::uniform, .group = 64,
                                    .zero_point = true, .rotate = true}>,
               q::fpq<q::fpq_config{.group = 128, .scale = q::scale_type::bf16, .rotate = true,
                                    .outliers = 2}>,
               q::fpq<q::fpq_config{.group = 32, .axis = q::group_axis::tokens, .rotate = true}>>;

template <class F>
dense_kv round_trip(const dense_kv& x) {
  auto encoded = q::quantize<F>(x.view());
  dense_kv y = x;
  std::fill(y.data.begin(), y.data.end(), std::numeric_limits<float>::quiet_NaN());
  q::dequantize(encoded, y.view());
  return y;
}

double relative_error(const dense_kv& ref, const dense_kv& got) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.data.size(); ++i) {
    const double d = double(ref.data[i]) - got.data[i];
    num += d * d;
    den += double(ref.data[i]) * ref.data[i];
  }
  return std::sqrt(num / den);
}

/// Round-trip relative L2 error bounds on N(0,1) data and on keys with outlier channels.
/// Floating formats: half an ulp of their mantissa, relative (fp16 2^-11, bf16 2^-8, e4m3 2^-4
/// worst case). Integer-grid formats: bounded by the grid step over the data's spread; the
/// numbers are the measured values (test output) rounded up by about 25%.
template <class F>
struct error_bound;
template <> struct error_bound<q::fp16> { static constexpr double gauss = 0x1p-11, keys = 0x1p-11; };
template <> struct error_bound<q::bf16> { static constexpr double gauss = 0x1p-8, keys = 0x1p-8; };
template <> struct error_bound<q::e4m3> { static constexpr double gauss = 0x1p-4, keys = 0x1p-4; };
template <> struct error_bound<q::q8_0> { static constexpr double gauss = 0.012, keys = 0.014; };
template <> struct error_bound<q::q4_0> { static constexpr double gauss = 0.13, keys = 0.2; };
template <> struct error_bound<q::kivi_key<2>> { static constexpr double gauss = 0.55, keys = 0.45; };
template <> struct error_bound<q::kivi_value<2>> { static constexpr double gauss = 0.5, keys = 0.72; };
template <> struct error_bound<q::kivi_key<4>> { static constexpr double gauss = 0.1, keys = 0.09; };
template <> struct error_bound<q::kivi_value<4>> { static constexpr double gauss = 0.1, keys = 0.15; };
template <> struct error_bound<q::fp2plus_key> { static constexpr double gauss = 0.5, keys = 0.47; };
template <> struct error_bound<q::fp2plus_channel_g64> { static constexpr double gauss = 0.56, keys = 0.5; };
template <> struct error_bound<q::fp2plus_g16> { static constexpr double gauss = 0.38, keys = 0.34; };
template <> struct error_bound<q::fp4plus_key> { static constexpr double gauss = 0.1, keys = 0.1; };
template <class F> struct error_bound { static constexpr double gauss = 0.4, keys = 0.4; };

}  // namespace

TEMPLATE_LIST_TEST_CASE("formats: round trip stays within the format's error bound",
                        "[formats]", tensor_formats) {
  using traits = q::format_traits<TestType>;
  const dense_kv gauss = oscar::testing::gaussian_kv(256, 4, 128, 11);
  const dense_kv keys = oscar::testing::synthetic_keys(256, 4, 128, 12);
  const double e_gauss = relative_error(gauss, round_trip<TestType>(gauss));
  const double e_keys = relative_error(keys, round_trip<TestType>(keys));
  INFO(traits::name << ": gaussian " << e_gauss << ", outlier-channel keys " << e_keys);
  CHECK(e_gauss <= error_bound<TestType>::gauss);
  CHECK(e_keys <= error_bound<TestType>::keys);
  CHECK(e_gauss > 0.0);  // a lossy format that reports zero error is not quantizing
}

TEMPLATE_LIST_TEST_CASE("formats: encoding is deterministic and independent of input type",
                        "[formats]", tensor_formats) {
  using traits = q::format_traits<TestType>;
  dense_kv x = oscar::testing::synthetic_keys(128, 2, 128, 21);
  for (float& v : x.data) v = static_cast<float>(oscar::half(v));  // exactly representable
  std::vector<oscar::half> h(x.data.size());
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = oscar::half(x.data[i]);
  const auto a = q::quantize<TestType>(x.view());
  const auto b = q::quantize<TestType>(x.view());
  const auto c = q::quantize<TestType>(oscar::make_kv_view<const oscar::half>(h.data(), 128, 2, 128));
  for (index_t head = 0; head < 2; ++head) {
    const auto sa = a.head_blocks(head), sb = b.head_blocks(head), sc = c.head_blocks(head);
    REQUIRE(sa.size_bytes() == sb.size_bytes());
    CHECK(std::memcmp(sa.data(), sb.data(), sa.size_bytes()) == 0);
    CHECK(std::memcmp(sa.data(), sc.data(), sa.size_bytes()) == 0);
    CHECK(a.params(head) == c.params(head));
  }
  CHECK(traits::bytes_per_block == sizeof(typename traits::block));
}

TEMPLATE_LIST_TEST_CASE("formats: all-in bits per element match the block definition",
                        "[formats]", tensor_formats) {
  using traits = q::format_traits<TestType>;
  CHECK(traits::bits_per_element == 8.0 * sizeof(typename traits::block) / traits::group);
  // What a tensor really occupies: blocks plus per-head metadata, which vanishes per element.
  const index_t tokens = 256, heads = 2, dim = 128;
  const auto x = oscar::testing::gaussian_kv(tokens, heads, dim, 5);
  const auto encoded = q::quantize<TestType>(x.view());
  const double measured = 8.0 * encoded.bytes() / double(tokens * heads * dim);
  CHECK(measured >= traits::bits_per_element);
  CHECK(measured <= traits::bits_per_element + 8.0 * 8 * heads / double(tokens * heads * dim));
}

TEST_CASE("formats: all-in bits per element of the shipped KV formats", "[formats]") {
  // bits = code bits + metadata bits per element, from each format's documented layout.
  CHECK(q::kv_fp32::bits_per_element == 32.0);
  CHECK(q::kv_fp16::bits_per_element == 16.0);
  CHECK(q::kv_bf16::bits_per_element == 16.0);
  CHECK(q::kv_fp8::bits_per_element == 8.0);           // + one fp32 scale per head
  CHECK(q::kv_q8_0::bits_per_element == 8.0 + 16.0 / 32);
  CHECK(q::kv_q4_0::bits_per_element == 4.0 + 16.0 / 32);
  CHECK(q::kivi2::bits_per_element == 2.0 + 32.0 / 32);  // fp16 scale + fp16 min per 32
  CHECK(q::kivi4::bits_per_element == 4.0 + 32.0 / 32);
  // FP2+ keys: fp16 scale and min, 3 fp16 outliers with 1-byte indices per 128; values: e4m3
  // scale per 64.
  CHECK(q::fp2plus::bits_per_element == ((2.0 + 8.0 * (2 + 2 + 3 * 3) / 128) + (2.0 + 8.0 / 64)) / 2);
  CHECK(q::fp2plus_kh::bits_per_element == 2.0 + 8.0 / 16);  // e4m3 scale per 16
  CHECK(q::fp2plus_kc::bits_per_element == ((2.0 + 32.0 / 64) + (2.0 + 8.0 / 16)) / 2);
  CHECK(q::fp4plus::bits_per_element == 4.0 + 16.0 / 32); // fp16 scale per 32
  CHECK(q::fp2plus::bits_per_element <= 2.5);
}

TEMPLATE_LIST_TEST_CASE("formats: NaN and Inf are rejected before anything is written",
                        "[formats][errors]", tensor_formats) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    dense_kv x = oscar::testing::gaussian_kv(128, 2, 128, 3);
    x.view()(37, 1, 5) = bad;
    try {
      (void)q::quantize<TestType>(x.view());
      FAIL("non-finite input was accepted");
    } catch (const oscar::error& e) {
      CHECK(e.code() == oscar::errc::non_finite);
      CHECK_THAT(e.what(), Catch::Matchers::ContainsSubstring("token 37, head 1, channel 5"));
    }
  }
}

TEMPLATE_LIST_TEST_CASE("formats: shapes the format cannot hold are rejected", "[formats][errors]",
                        tensor_formats) {
  using traits = q::format_traits<TestType>;
  const auto expect_invalid = [](auto&& call, const char* fragment) {
    try {
      call();
      FAIL("accepted an invalid shape");
    } catch (const oscar::error& e) {
      CHECK(e.code() == oscar::errc::invalid_argument);
      CHECK_THAT(e.what(), Catch::Matchers::ContainsSubstring(fragment));
      CHECK_THAT(e.what(), Catch::Matchers::ContainsSubstring("allowed"));
    }
  };
  // 96 channels: not a supported rotation size, not a multiple of 64 or 128.
  if (!traits::supports_head_dim(96)) {
    dense_kv x = oscar::testing::gaussian_kv(128, 1, 96, 1);
    expect_invalid([&] { (void)q::quantize<TestType>(x.view()); }, "head_dim = 96");
  }
  expect_invalid([] { q::quantized_tensor<TestType> t(64, 1, 0); }, "head_dim = 0");
  expect_invalid([] { q::quantized_tensor<TestType> t(64, 0, 128); }, "heads = 0");
  if (q::tokens_per_tile<TestType>() > 1) {
    dense_kv x = oscar::testing::gaussian_kv(33, 1, 128, 1);
    expect_invalid([&] { (void)q::quantize<TestType>(x.view()); }, "tokens = 33");
  }
  // Decoding into a view of another shape.
  dense_kv x = oscar::testing::gaussian_kv(128, 2, 128, 1);
  const auto encoded = q::quantize<TestType>(x.view());
  dense_kv wrong = oscar::testing::gaussian_kv(128, 1, 128, 1);
  expect_invalid([&] { q::dequantize(encoded, wrong.view()); }, "[128, 2, 128]");
}

TEMPLATE_LIST_TEST_CASE("formats: huge finite inputs saturate instead of becoming Inf",
                        "[formats]", tensor_formats) {
  dense_kv x = oscar::testing::gaussian_kv(128, 1, 128, 9);
  for (float& v : x.data) v *= 1e6f;
  const dense_kv y = round_trip<TestType>(x);
  for (float v : y.data) REQUIRE(std::isfinite(v));
}

// ---- format-specific references -----------------------------------------------------------

TEST_CASE("kivi: codes sit on the fp16 min/step grid, nearest level, no clipping", "[formats]") {
  // KIVI's definition: per group, min m and step s = (max - min) / (2^b - 1), both in fp16;
  // x is stored as the level m + q s nearest to it.
  const dense_kv keys = oscar::testing::synthetic_keys(64, 2, 64, 31);
  const dense_kv y = round_trip<q::kivi_key<2>>(keys);
  for (index_t h = 0; h < 2; ++h) {
    for (index_t c = 0; c < 64; ++c) {
      for (index_t t0 = 0; t0 < 64; t0 += 32) {  // keys: groups of 32 tokens per channel
        float lo = keys.view()(t0, h, c), hi = lo;
        for (index_t t = t0; t < t0 + 32; ++t) {
          lo = std::min(lo, keys.view()(t, h, c));
          hi = std::max(hi, keys.view()(t, h, c));
        }
        const float m = static_cast<float>(oscar::half(lo));
        const float s = static_cast<float>(oscar::half((hi - lo) / 3.0f));
        for (index_t t = t0; t < t0 + 32; ++t) {
          const float x = keys.view()(t, h, c), got = y.view()(t, h, c);
          double best = 1e30;
          bool on_grid = false;
          for (int level = 0; level < 4; ++level) {
            const float v = m + s * static_cast<float>(level);
            best = std::min(best, std::abs(double(x) - v));
            on_grid = on_grid || got == v;
          }
          REQUIRE(on_grid);
          REQUIRE(std::abs(double(x) - got) <= best + 1e-6 * s);
        }
      }
    }
  }
}

TEST_CASE("fp32: the reference format is lossless", "[formats]") {
  const dense_kv x = oscar::testing::synthetic_keys(64, 2, 128, 41);
  const dense_kv y = round_trip<q::fp32>(x);
  CHECK(std::memcmp(x.data.data(), y.data.data(), x.data.size() * sizeof(float)) == 0);
  CHECK(q::format_traits<q::fp32>::bits_per_element == 32.0);
}

TEST_CASE("q8_0 and q4_0: hand-computed blocks", "[formats]") {
  std::vector<float> x(32);
  for (int i = 0; i < 32; ++i) x[i] = static_cast<float>(i - 16) * 0.5f;  // -8 .. 7.5
  using t8 = q::format_traits<q::q8_0>;
  q::block_q8_0 b8{};
  t8::encode_tile(x.data(), 32, {}, &b8);
  CHECK(b8.d == oscar::half(8.0f / 127.0f));  // d = amax / 127, amax = 8
  CHECK(b8.qs[0] == -127);                    // -8 / d
  CHECK(b8.qs[16] == 0);
  CHECK(b8.qs[17] == 8);                      // 0.5 * 127 / 8 = 7.94 -> 8
  CHECK(b8.qs[31] == 119);                    // 7.5 * 127 / 8 = 119.06 -> 119

  using t4 = q::format_traits<q::q4_0>;
  q::block_q4_0 b4{};
  t4::encode_tile(x.data(), 32, {}, &b4);
  CHECK(static_cast<float>(b4.d) == 1.0f);  // largest magnitude is -8: d = -8 / -8
  std::vector<float> y(32);
  t4::decode_tile(&b4, 32, {}, y.data());
  for (int i = 0; i < 32; ++i) {
    // q = trunc(x / d + 8.5), clamped to 15; decodes to (q - 8) * d.
    const int code = std::min(15, static_cast<int>(x[i] + 8.5f));
    CHECK(y[i] == static_cast<float>(code - 8));
  }
  CHECK(b4.qs[0] == ((1 << 4) | 0));  // elements 0, 1 -> codes 0 and 1 (LSB first)
}

TEST_CASE("fpq: values on the codebook grid decode exactly; bytes follow the documented layout",
          "[formats]") {
  // 2-bit Lloyd-Max, group 16, fp16 scale, no rotation, no search: x = 2 * level(q).
  using F = q::fpq<q::fpq_config{.group = 16, .search_scale = false}>;
  using traits = q::format_traits<F>;
  static_assert(traits::block_bytes == 2 + 4);
  const float levels[4] = {-1.510418f, -0.452780f, 0.452780f, 1.510418f};
  std::vector<float> x(16);
  for (int i = 0; i < 16; ++i) x[i] = 2.0f * levels[i % 4];
  typename traits::block b{};
  traits::encode_tile(x.data(), 16, {}, &b);
  // scale = absmax / level_max = 2 (fp16 0x4000, little-endian), codes 0,1,2,3 -> 0b11100100.
  CHECK(b.bytes[0] == 0x00);
  CHECK(b.bytes[1] == 0x40);
  for (int i = 2; i < 6; ++i) CHECK(b.bytes[i] == 0xE4);
  std::vector<float> y(16);
  traits::decode_tile(&b, 16, {}, y.data());
  for (int i = 0; i < 16; ++i) CHECK(y[i] == 2.0f * levels[i % 4]);
}

TEST_CASE("fpq: the scale search never does worse than the unclipped scale", "[formats]") {
  using searched = q::fpq<q::fpq_config{.group = 32}>;
  using unclipped = q::fpq<q::fpq_config{.group = 32, .search_scale = false}>;
  const dense_kv x = oscar::testing::gaussian_kv(512, 1, 128, 77);
  const dense_kv a = round_trip<searched>(x), b = round_trip<unclipped>(x);
  // Per group, the search tries ratio 1 (the unclipped scale) first and keeps the best.
  for (std::size_t g = 0; g < x.data.size(); g += 32) {
    double ea = 0, eb = 0;
    for (std::size_t i = g; i < g + 32; ++i) {
      ea += (double(x.data[i]) - a.data[i]) * (double(x.data[i]) - a.data[i]);
      eb += (double(x.data[i]) - b.data[i]) * (double(x.data[i]) - b.data[i]);
    }
    REQUIRE(ea <= eb * (1 + 1e-5) + 1e-12);
  }
  CHECK(relative_error(x, a) < 0.9 * relative_error(x, b));  // and on Gaussian data it pays
}

TEST_CASE("fpq: outliers are kept at fp16 precision", "[formats]") {
  using F = q::fpq<q::fpq_config{.group = 32, .outliers = 2}>;
  dense_kv x = oscar::testing::gaussian_kv(16, 1, 128, 4);
  for (index_t t = 0; t < 16; ++t) {
    x.view()(t, 0, 3) = 40.0f + static_cast<float>(t);   // group 0
    x.view()(t, 0, 70) = -25.0f - static_cast<float>(t);  // group 2
  }
  const dense_kv y = round_trip<F>(x);
  for (index_t t = 0; t < 16; ++t) {
    CHECK(y.view()(t, 0, 3) == static_cast<float>(oscar::half(x.view()(t, 0, 3))));
    CHECK(y.view()(t, 0, 70) == static_cast<float>(oscar::half(x.view()(t, 0, 70))));
  }
}

TEST_CASE("fpq: rotation is what lets 2 bits survive outlier channels", "[formats]") {
  using plain = q::fpq<q::fpq_config{.group = 32}>;
  using rotated = q::fpq<q::fpq_config{.group = 32, .rotate = true}>;
  const dense_kv keys = oscar::testing::synthetic_keys(256, 4, 128, 8);
  const double e_plain = relative_error(keys, round_trip<plain>(keys));
  const double e_rotated = relative_error(keys, round_trip<rotated>(keys));
  INFO("plain " << e_plain << ", rotated " << e_rotated);
  CHECK(e_rotated < 0.6 * e_plain);
}

TEST_CASE("e4m3 scales: the per-head exponent makes FP2+ values scale-invariant", "[formats]") {
  // Scaling a head by 2^k moves its exponent by k and nothing else: the decoded values scale by
  // exactly 2^k, even far outside e4m3's own range (2^-9 .. 448).
  const dense_kv x = oscar::testing::synthetic_keys(64, 2, 128, 15);
  const dense_kv base = round_trip<q::fp2plus_g16>(x);
  for (float factor : {0x1p-24f, 0x1p-12f, 0x1p12f}) {
    dense_kv scaled = x;
    for (float& v : scaled.data) v *= factor;
    const dense_kv y = round_trip<q::fp2plus_g16>(scaled);
    for (std::size_t i = 0; i < x.data.size(); ++i) REQUIRE(y.data[i] == base.data[i] * factor);
  }
}

TEST_CASE("fp8 e4m3 baseline: per-head scale maps the head's absmax to 448", "[formats]") {
  dense_kv x = oscar::testing::gaussian_kv(32, 2, 64, 2);
  x.view()(5, 1, 7) = -1000.0f;
  const auto encoded = q::quantize<q::e4m3>(x.view());
  CHECK(encoded.params(1).scale == 1000.0f / 448.0f);
  const dense_kv y = round_trip<q::e4m3>(x);
  CHECK(std::abs(y.view()(5, 1, 7) + 1000.0f) < 1e-3f);  // absmax maps to e4m3's 448 exactly
}

TEST_CASE("formats: names are unique and describe the configuration", "[formats]") {
  CHECK(q::format_traits<q::fp2plus_key>::name == "fp2-lm-g128t-fp16-z-o3-minmax");
  CHECK(q::format_traits<q::fp2plus_value>::name == "fp2-lm-g64h-e4m3-rot");
  CHECK(q::format_traits<q::fp2plus_g16>::name == "fp2-lm-g16h-e4m3-rot");
  CHECK(q::format_traits<q::kivi_key<2>>::name == "fp2-u-g32t-fp16-z-minmax");
  CHECK(q::format_traits<q::kivi_value<4>>::name == "fp4-u-g32h-fp16-z-minmax");
  CHECK(q::format_traits<q::fpq<q::fpq_config{.group = 128, .rotate = true, .outliers = 2}>>::name ==
        "fp2-lm-g128h-fp16-rot-o2");
}
