// SPDX-License-Identifier: Apache-2.0
// Tests for include/oscar/core/hadamard.hpp: the randomized Walsh-Hadamard rotation.
//
// The reference is the explicit dense matrix R = H D / sqrt(n), built here in double with the
// Sylvester construction H_1 = [1], H_2m = [[H_m, H_m], [H_m, -H_m]] and D = diag(sign_i), where
// sign_i = -1 exactly when bit 0 of rotation_sign_hash(i) is set (the documented definition).

#include <catch2/catch_test_macros.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "support.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/hadamard.hpp"

namespace {

using Catch::Matchers::ContainsSubstring;

/// Row-major n x n matrix in double.
struct dense {
  int n = 0;
  std::vector<double> a;
  double operator()(int i, int j) const {
    return a[static_cast<std::size_t>(i) * static_cast<std::size_t>(n) + static_cast<std::size_t>(j)];
  }
  double& operator()(int i, int j) {
    return a[static_cast<std::size_t>(i) * static_cast<std::size_t>(n) + static_cast<std::size_t>(j)];
  }
};

/// Sylvester-Hadamard matrix H_n by block doubling.
dense sylvester(int n) {
  dense h{1, {1.0}};
  while (h.n < n) {
    const int m = h.n;
    dense next{2 * m, std::vector<double>(static_cast<std::size_t>(4 * m * m))};
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < m; ++j) {
        next(i, j) = h(i, j);
        next(i, j + m) = h(i, j);
        next(i + m, j) = h(i, j);
        next(i + m, j + m) = -h(i, j);
      }
    }
    h = std::move(next);
  }
  return h;
}

double sign_of(int i) {
  return (oscar::rotation_sign_hash(static_cast<std::uint32_t>(i)) & 1u) ? -1.0 : 1.0;
}

/// R = H D / sqrt(n).
dense rotation_matrix(int n) {
  dense r = sylvester(n);
  const double scale = 1.0 / std::sqrt(static_cast<double>(n));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) r(i, j) *= sign_of(j) * scale;
  }
  return r;
}

std::vector<double> multiply(const dense& m, const std::vector<float>& x, bool transpose) {
  std::vector<double> y(static_cast<std::size_t>(m.n), 0.0);
  for (int i = 0; i < m.n; ++i) {
    for (int j = 0; j < m.n; ++j) {
      y[static_cast<std::size_t>(i)] += (transpose ? m(j, i) : m(i, j)) * x[static_cast<std::size_t>(j)];
    }
  }
  return y;
}

std::vector<float> random_vector(std::mt19937& rng, int n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (auto& v : x) v = dist(rng);
  return x;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

double norm(const std::vector<float>& a) { return std::sqrt(dot(a, a)); }

double max_abs_diff(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
  return worst;
}

using oscar_test::error_from;

// Float rounding budget: log2(n) butterfly stages plus signs and the final scale, each adding at
// most ~1 float ulp of the running magnitude; 1e-6 * ||x|| is well above that (observed errors
// are around 1e-7 * ||x||) and far below any structural error (a wrong sign or order is O(||x||/sqrt(n))).
constexpr double kRelTol = 1e-6;

constexpr std::array<int, 3> kDims = {64, 128, 256};

// The rotation is constexpr: rotating e_0 gives sign_0 * 1/8 in every channel for n = 64.
constexpr bool rotated_basis_vector_is_flat() {
  std::array<float, 64> x{};
  x[0] = 1.0f;
  oscar::rotate_unchecked(x.data(), 64);
  for (float v : x) {
    if (v != 0.125f * oscar::rotation_sign(0)) return false;
  }
  return true;
}
static_assert(rotated_basis_vector_is_flat());
static_assert(oscar::is_rotation_dim(64) && oscar::is_rotation_dim(128) && oscar::is_rotation_dim(256));
static_assert(!oscar::is_rotation_dim(32) && !oscar::is_rotation_dim(512) && !oscar::is_rotation_dim(0));

}  // namespace

TEST_CASE("hadamard: sign diagonal follows rotation_sign_hash and is not degenerate",
          "[hadamard]") {
  int negatives = 0;
  for (int i = 0; i < 256; ++i) {
    CAPTURE(i);
    CHECK(static_cast<double>(oscar::rotation_sign(i)) == sign_of(i));
    if (sign_of(i) < 0) ++negatives;
  }
  // A hash-derived pattern should be roughly balanced; all +1 would be a plain Hadamard.
  CHECK(negatives > 256 / 4);
  CHECK(negatives < 3 * 256 / 4);
}

TEST_CASE("hadamard: rotation_scale is 1/sqrt(n)", "[hadamard]") {
  for (int n : kDims) {
    CAPTURE(n);
    CHECK(std::fabs(oscar::rotation_scale(n) - 1.0 / std::sqrt(static_cast<double>(n))) < 1e-8);
  }
  CHECK(oscar::rotation_scale(64) == 0.125f);
  CHECK(oscar::rotation_scale(256) == 0.0625f);
}

TEST_CASE("hadamard: rotate matches the dense matrix H D / sqrt(n)", "[hadamard]") {
  std::mt19937 rng(11u);
  for (int n : kDims) {
    CAPTURE(n);
    const dense r = rotation_matrix(n);
    // Every basis vector e_j must give column j of R.
    for (int j = 0; j < n; ++j) {
      std::vector<float> x(static_cast<std::size_t>(n), 0.0f);
      x[static_cast<std::size_t>(j)] = 1.0f;
      const std::vector<double> want = multiply(r, x, false);
      oscar::rotate_unchecked(x.data(), n);
      CAPTURE(j);
      CHECK(max_abs_diff(x, want) <= 1e-7);
    }
    // Random vectors of two scales.
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x = random_vector(rng, n, trial % 2 ? 100.0f : 1.0f);
      const std::vector<double> want = multiply(r, x, false);
      const double tol = kRelTol * norm(x);
      oscar::rotate_unchecked(x.data(), n);
      CAPTURE(trial);
      CHECK(max_abs_diff(x, want) <= tol);
    }
  }
}

TEST_CASE("hadamard: unrotate matches the dense transpose D H / sqrt(n)", "[hadamard]") {
  std::mt19937 rng(12u);
  for (int n : kDims) {
    CAPTURE(n);
    const dense r = rotation_matrix(n);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> x = random_vector(rng, n);
      const std::vector<double> want = multiply(r, x, true);
      const double tol = kRelTol * norm(x);
      oscar::unrotate_unchecked(x.data(), n);
      CAPTURE(trial);
      CHECK(max_abs_diff(x, want) <= tol);
    }
  }
}

TEST_CASE("hadamard: rotation preserves norms and dot products", "[hadamard]") {
  std::mt19937 rng(13u);
  for (int n : kDims) {
    CAPTURE(n);
    for (int trial = 0; trial < 50; ++trial) {
      CAPTURE(trial);
      std::vector<float> q = random_vector(rng, n);
      std::vector<float> k = random_vector(rng, n, 3.0f);
      const double qk = dot(q, k);
      const double nq = norm(q);
      const double nk = norm(k);
      oscar::rotate(q.data(), n);
      oscar::rotate(k.data(), n);
      CHECK(std::fabs(norm(q) - nq) <= kRelTol * nq);
      CHECK(std::fabs(norm(k) - nk) <= kRelTol * nk);
      CHECK(std::fabs(dot(q, k) - qk) <= kRelTol * nq * nk);
    }
  }
}

TEST_CASE("hadamard: unrotate undoes rotate", "[hadamard]") {
  std::mt19937 rng(14u);
  for (int n : kDims) {
    CAPTURE(n);
    for (int trial = 0; trial < 50; ++trial) {
      const std::vector<float> original = random_vector(rng, n, 10.0f);
      std::vector<float> x = original;
      oscar::rotate(x.data(), n);
      oscar::unrotate(x.data(), n);
      std::vector<double> want(original.begin(), original.end());
      CAPTURE(trial);
      CHECK(max_abs_diff(x, want) <= kRelTol * norm(original));
      // ...and the other way round.
      oscar::unrotate(x.data(), n);
      oscar::rotate(x.data(), n);
      CHECK(max_abs_diff(x, want) <= 2 * kRelTol * norm(original));
    }
  }
}

TEST_CASE("hadamard: an outlier channel is spread evenly over all channels", "[hadamard]") {
  for (int n : kDims) {
    for (float c : {1.0f, 37.5f, -1000.0f}) {
      for (int j = 0; j < n; j += 7) {
        CAPTURE(n, c, j);
        std::vector<float> x(static_cast<std::size_t>(n), 0.0f);
        x[static_cast<std::size_t>(j)] = c;
        oscar::rotate(x.data(), n);
        const double want = std::fabs(c) / std::sqrt(static_cast<double>(n));
        double lo = 1e300;
        double hi = 0;
        for (float v : x) {
          lo = std::min(lo, static_cast<double>(std::fabs(v)));
          hi = std::max(hi, static_cast<double>(std::fabs(v)));
        }
        CHECK(std::fabs(hi - want) <= 1e-6 * want);
        CHECK(std::fabs(lo - want) <= 1e-6 * want);
      }
    }
  }
}

TEST_CASE("hadamard: the sign diagonal spreads a constant vector", "[hadamard]") {
  // A plain Hadamard transform maps the all-ones vector to sqrt(n) * e_0; with the sign diagonal
  // the energy must be spread out instead.
  for (int n : kDims) {
    CAPTURE(n);
    std::vector<float> x(static_cast<std::size_t>(n), 1.0f);
    oscar::rotate(x.data(), n);
    double hi = 0;
    for (float v : x) hi = std::max(hi, static_cast<double>(std::fabs(v)));
    CHECK(hi < 0.5 * std::sqrt(static_cast<double>(n)));
  }
}

TEST_CASE("hadamard: rotation is deterministic", "[hadamard]") {
  std::mt19937 rng(15u);
  for (int n : kDims) {
    CAPTURE(n);
    const std::vector<float> x = random_vector(rng, n);
    std::vector<float> a = x;
    std::vector<float> b = x;
    std::vector<float> c = x;
    oscar::rotate(a.data(), n);
    oscar::rotate(b.data(), n);
    oscar::rotate_unchecked(c.data(), n);
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(a.data(), c.data(), a.size() * sizeof(float)) == 0);
    oscar::unrotate(a.data(), n);
    oscar::unrotate_unchecked(b.data(), n);
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("hadamard: unsupported sizes throw oscar::error naming the value", "[hadamard]") {
  for (int n : {0, 1, 32, 63, 65, 96, 512, -64}) {
    CAPTURE(n);
    std::vector<float> x(1024, 1.5f);
    for (bool inverse : {false, true}) {
      CAPTURE(inverse);
      const auto err = error_from([&] {
        if (inverse) {
          oscar::unrotate(x.data(), n);
        } else {
          oscar::rotate(x.data(), n);
        }
      });
      REQUIRE(err.has_value());
      CHECK(err->code() == oscar::errc::invalid_argument);
      const std::string what = err->what();
      CHECK_THAT(what, ContainsSubstring("64, 128 or 256"));
      CHECK_THAT(what, ContainsSubstring("n = " + std::to_string(n) + " is not allowed (allowed:"));
#if !defined(__clang__) || __clang_major__ >= 16  // older Clang: llvm/llvm-project#56379
      CHECK_THAT(what, ContainsSubstring("oscar/core/hadamard.hpp"));
#endif
      // Validation happens before the data is touched.
      CHECK(std::all_of(x.begin(), x.end(), [](float v) { return v == 1.5f; }));
    }
  }
}
