// SPDX-License-Identifier: Apache-2.0
// A float64 attention reference with Eigen, independent of every OSCAR backend, for the
// attention tests: softmax(scale * K q) V over rows of decoded (gathered) K/V.
#pragma once

#include <Eigen/Dense>
#include <cmath>
#include <cstddef>
#include <vector>

#include "oscar/core/view.hpp"

namespace oscar_test {

/// One query head's output, log-sum-exp, entropy (nats) and probabilities.
struct attention_reference {
  Eigen::VectorXd out, p;
  double lse = 0, entropy = 0;
};

inline attention_reference reference_attention(const Eigen::VectorXd& q,
                                               Eigen::Ref<const Eigen::MatrixXd> k,
                                               Eigen::Ref<const Eigen::MatrixXd> v, double scale) {
  const Eigen::VectorXd s = scale * (k * q);
  const double m = s.maxCoeff();
  const double log_z = m + std::log((s.array() - m).exp().sum());
  attention_reference r;
  r.p = (s.array() - log_z).exp().matrix();
  r.out = v.transpose() * r.p;
  r.lse = log_z;
  r.entropy = -(r.p.array() * (s.array() - log_z)).sum();
  return r;
}

/// `[tokens, d]` row-major floats as a matrix.
inline Eigen::MatrixXd as_matrix(const std::vector<float>& x, oscar::index_t tokens, int d) {
  Eigen::MatrixXd m(tokens, d);
  for (oscar::index_t t = 0; t < tokens; ++t)
    for (int c = 0; c < d; ++c) m(t, c) = x[static_cast<std::size_t>(t * d + c)];
  return m;
}

/// A query row as a vector.
inline Eigen::VectorXd as_vector(const float* x, int d) {
  Eigen::VectorXd v(d);
  for (int c = 0; c < d; ++c) v(c) = x[c];
  return v;
}

/// ||got - want|| / ||want||.
inline double relative_error(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

}  // namespace oscar_test
