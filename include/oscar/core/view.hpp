// SPDX-License-Identifier: Apache-2.0
/// \file
/// Non-owning strided views over K/V data shaped `[tokens, kv_heads, head_dim]`.
///
/// The innermost dimension (head_dim) is always contiguous; tokens and heads have element
/// strides, so a view can look at an engine's `[tokens, heads, dim]` buffer, at one head of it,
/// or at a `[heads, tokens, dim]` buffer without copying. Element types: `float`,
/// `oscar::half`, `oscar::bfloat16` (const-qualified for read-only views).
#pragma once

#include <cstdint>
#include <string_view>
#include <type_traits>

#include "oscar/core/error.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"

namespace oscar {

/// Signed index type for shapes and strides (matches what engines pass around).
using index_t = std::int64_t;

/// Runtime tag of an element type that K/V views may hold.
enum class dtype : std::uint8_t { f32, f16, bf16 };

constexpr std::string_view to_string(dtype t) noexcept {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::f16: return "f16";
    case dtype::bf16: return "bf16";
  }
  return "unknown";
}

template <class T>
inline constexpr bool is_kv_element_v = std::is_same_v<std::remove_const_t<T>, float> ||
                                        std::is_same_v<std::remove_const_t<T>, half> ||
                                        std::is_same_v<std::remove_const_t<T>, bfloat16>;

/// The `dtype` of element type `T` (cv-qualifiers ignored).
template <class T>
constexpr dtype dtype_of() noexcept {
  static_assert(is_kv_element_v<T>, "K/V views hold float, oscar::half or oscar::bfloat16");
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return dtype::f32;
  else if constexpr (std::is_same_v<U, half>) return dtype::f16;
  else return dtype::bf16;
}

/// A non-owning view of `[tokens, heads, head_dim]` elements of type `T`; head_dim is
/// contiguous, `token_stride` and `head_stride` are in elements.
template <class T>
struct kv_view {
  static_assert(is_kv_element_v<T>, "K/V views hold float, oscar::half or oscar::bfloat16");
  using element_type = T;

  T* data = nullptr;        ///< element (0, 0, 0)
  index_t tokens = 0;       ///< number of tokens
  index_t heads = 0;        ///< number of KV heads
  index_t head_dim = 0;     ///< elements per head vector (contiguous)
  index_t token_stride = 0; ///< elements between token t and t+1
  index_t head_stride = 0;  ///< elements between head h and h+1

  OSCAR_HD_INLINE T& operator()(index_t t, index_t h, index_t d) const noexcept {
    return data[t * token_stride + h * head_stride + d];
  }
  /// Pointer to the contiguous head vector of token `t`, head `h`.
  OSCAR_HD_INLINE T* row(index_t t, index_t h) const noexcept {
    return data + t * token_stride + h * head_stride;
  }
  [[nodiscard]] OSCAR_HD_INLINE bool empty() const noexcept { return tokens == 0; }
  [[nodiscard]] OSCAR_HD_INLINE index_t elements() const noexcept {
    return tokens * heads * head_dim;
  }

  /// A read-only view of the same data. (A template, so that `kv_view<const T>` declares no
  /// conversion to itself, which nvcc warns about even when constrained away.)
  template <class U = T>
    requires(!std::is_const_v<U>)
  OSCAR_HD_INLINE operator kv_view<const U>() const noexcept {  // NOLINT: implicit by design
    return {data, tokens, heads, head_dim, token_stride, head_stride};
  }

  /// Tokens `[first, first + count)` of this view.
  [[nodiscard]] kv_view slice_tokens(index_t first, index_t count) const {
    OSCAR_CHECK_ARG(first >= 0 && count >= 0 && first <= tokens && count <= tokens - first, first,
                    detail::concat("a token range [first, first + count) inside [0, ", tokens,
                                   "); count = ", count));
    kv_view out = *this;
    out.data = count ? row(first, 0) : data;
    out.tokens = count;
    return out;
  }
};

namespace detail {

/// `a * b <= c` for non-negative values, without overflow.
constexpr bool product_at_most(index_t a, index_t b, index_t c) noexcept {
  return b == 0 || a <= c / b;
}

/// True when no two elements of `[tokens, heads, head_dim]` with these strides share an address:
/// the dimension with the smaller stride must step over whole head vectors, and the one with the
/// larger stride over everything the smaller one spans. Dimensions of extent 1 never alias.
constexpr bool strides_do_not_alias(index_t tokens, index_t heads, index_t head_dim,
                                    index_t token_stride, index_t head_stride) noexcept {
  if (token_stride < 0 || head_stride < 0) return false;
  const bool many_tokens = tokens > 1, many_heads = heads > 1;
  if (!many_tokens && !many_heads) return true;
  if (many_tokens != many_heads) return (many_tokens ? token_stride : head_stride) >= head_dim;
  const bool heads_inner = head_stride <= token_stride;
  const index_t inner_count = heads_inner ? heads : tokens;
  const index_t inner_stride = heads_inner ? head_stride : token_stride;
  const index_t outer_stride = heads_inner ? token_stride : head_stride;
  return inner_stride >= head_dim && product_at_most(inner_count, inner_stride, outer_stride);
}

}  // namespace detail

/// Makes a validated strided view. Shapes must be positive (tokens may be 0), and strides must
/// not make two elements alias (`detail::strides_do_not_alias`): heads nested in tokens
/// (`head_stride >= head_dim`, `token_stride >= heads * head_stride`), tokens nested in heads,
/// or any strides for a dimension of extent 1.
template <class T>
kv_view<T> make_kv_view(T* data, index_t tokens, index_t heads, index_t head_dim,
                        index_t token_stride, index_t head_stride) {
  OSCAR_CHECK_ARG(tokens >= 0, tokens, ">= 0");
  OSCAR_CHECK_ARG(heads >= 1, heads, ">= 1");
  OSCAR_CHECK_ARG(head_dim >= 1, head_dim, ">= 1");
  OSCAR_CHECK(data != nullptr || tokens == 0, errc::invalid_argument,
              "data = nullptr is not allowed (allowed: a non-null pointer when tokens > 0)");
  OSCAR_CHECK(detail::strides_do_not_alias(tokens, heads, head_dim, token_stride, head_stride),
              errc::invalid_argument, "token_stride = ", token_stride, " with head_stride = ",
              head_stride, " for shape [", tokens, ", ", heads, ", ", head_dim,
              "] is not allowed (allowed: strides that do not alias: head_stride >= head_dim "
              "and token_stride >= heads * head_stride, or the transposed nesting)");
  return {data, tokens, heads, head_dim, token_stride, head_stride};
}

/// Makes a view over a contiguous `[tokens, heads, head_dim]` buffer.
template <class T>
kv_view<T> make_kv_view(T* data, index_t tokens, index_t heads, index_t head_dim) {
  return make_kv_view(data, tokens, heads, head_dim, heads * head_dim, head_dim);
}

}  // namespace oscar
