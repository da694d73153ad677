// SPDX-License-Identifier: Apache-2.0
/// \file
/// Where block pools get their memory: the `block_allocator` concept and `host_allocator`.
///
/// A pool asks its allocator once, at construction, for all the bytes its capacity needs, and
/// gives them back when it is destroyed. Engines pass their own allocator to place pools in
/// pinned memory, a NUMA node, or (with the GPU backends) device memory.
#pragma once

#include <concepts>
#include <cstddef>
#include <new>

namespace oscar::cache {

/// An allocator of raw, suitably aligned bytes. `allocate` throws (e.g. `std::bad_alloc`) or
/// returns non-null; `deallocate` receives exactly what `allocate` returned.
template <class A>
concept block_allocator = requires(A a, std::size_t bytes, void* p) {
  { a.allocate(bytes) } -> std::same_as<void*>;
  a.deallocate(p, bytes);
};

/// Host memory from `operator new`, aligned to 64 bytes (a cache line, and enough for AVX-512).
struct host_allocator {
  static constexpr std::size_t alignment = 64;
  void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t{alignment}); }
  void deallocate(void* p, std::size_t) noexcept {
    ::operator delete(p, std::align_val_t{alignment});
  }
};
static_assert(block_allocator<host_allocator>);

}  // namespace oscar::cache
