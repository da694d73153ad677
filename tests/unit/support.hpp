// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the unit tests.
#pragma once

#include <optional>
#include <utility>

#include "oscar/core/error.hpp"

namespace oscar_test {

/// Runs `f` and returns the `oscar::error` it threw, or nothing if it returned normally.
template <class F>
std::optional<oscar::error> error_from(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const oscar::error& e) {
    return e;
  }
  return std::nullopt;
}

}  // namespace oscar_test
