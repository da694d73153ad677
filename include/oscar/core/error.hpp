// SPDX-License-Identifier: Apache-2.0
/// \file
/// `oscar::error`, the one exception type of OSCAR's public host API, and the validation macros.
///
/// Every public host entry point checks its arguments before it touches any state and throws
/// `oscar::error` with a message that names the bad value and what is allowed, e.g.
///
///     oscar: head_dim = 96 is not allowed (allowed: 64, 128 or 256)
///       in quantize() at include/oscar/quant/tensor.hpp:120
///
/// Device code never throws; kernels report status codes instead.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace oscar {

/// What kind of failure an `oscar::error` reports, so engines can react (evict and retry on
/// `out_of_memory`, drop the payload on `corrupt_data`, and so on).
enum class errc {
  invalid_argument,  ///< a shape, size, index or parameter outside what is allowed
  non_finite,        ///< NaN or Inf in input data
  out_of_memory,     ///< a pool or allocator has no room left
  corrupt_data,      ///< untrusted bytes failed validation
  unsupported,       ///< a valid request this build or backend cannot serve
};

constexpr std::string_view to_string(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument: return "invalid argument";
    case errc::non_finite: return "non-finite input";
    case errc::out_of_memory: return "out of memory";
    case errc::corrupt_data: return "corrupt data";
    case errc::unsupported: return "unsupported";
  }
  return "unknown";
}

/// The exception thrown by OSCAR's public host API.
class error : public std::runtime_error {
 public:
  error(errc code, const std::string& message) : std::runtime_error(message), code_(code) {}
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// Throws `oscar::error`. The defaults capture the caller's location; the builtins work on
/// every compiler OSCAR supports (std::source_location needs clang >= 15 with libstdc++).
[[noreturn]] inline void fail(errc code, const std::string& what,
                              const char* function = __builtin_FUNCTION(),
                              const char* file_name = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  std::string file = file_name;
  if (auto pos = file.rfind("/oscar/"); pos != std::string::npos) file = file.substr(pos + 1);
  throw error(code, concat("oscar: ", what, "\n  in ", function, " at ", file, ":", line));
}

}  // namespace detail
}  // namespace oscar

/// Throws `oscar::error` (invalid_argument) unless `cond` holds. `value` is printed as
/// `name = value`, followed by `allowed`, a phrase saying what would have been accepted.
///
///     OSCAR_CHECK_ARG(head_dim == 64 || head_dim == 128, head_dim, "64 or 128");
#define OSCAR_CHECK_ARG(cond, value, allowed)                                                   \
  do {                                                                                          \
    if (!(cond)) [[unlikely]] {                                                                 \
      ::oscar::detail::fail(::oscar::errc::invalid_argument,                                    \
                            ::oscar::detail::concat(#value " = ", (value),                      \
                                                    " is not allowed (allowed: ", allowed, ")")); \
    }                                                                                           \
  } while (0)

/// Throws `oscar::error` with the given code unless `cond` holds; the message parts are streamed.
#define OSCAR_CHECK(cond, code, ...)                                                            \
  do {                                                                                          \
    if (!(cond)) [[unlikely]] {                                                                 \
      ::oscar::detail::fail((code), ::oscar::detail::concat(__VA_ARGS__));                      \
    }                                                                                           \
  } while (0)
