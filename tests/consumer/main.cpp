// SPDX-License-Identifier: Apache-2.0
// Uses an installed OSCAR through find_package(oscar COMPONENTS onednn): the umbrella header,
// the version header, oneDNN through oscar::onednn, and one conversion checked at compile time
// and at run time.
#include <cstdio>
#include <dnnl.hpp>
#include <oscar/oscar.hpp>
#include <oscar/version.hpp>

#if !defined(OSCAR_WITH_ONEDNN) || OSCAR_WITH_ONEDNN != 1
#error "oscar::onednn must define OSCAR_WITH_ONEDNN=1"
#endif

static_assert(oscar::float_to_half_bits(1.5f) == 0x3e00, "1.5f is 0x3e00 in binary16");

int main() {
  const dnnl_version_t* dnnl = dnnl_version();
  std::printf("oscar %s (%d.%d.%d), oneDNN %d.%d.%d\n", OSCAR_VERSION_STRING, OSCAR_VERSION_MAJOR,
              OSCAR_VERSION_MINOR, OSCAR_VERSION_PATCH, dnnl->major, dnnl->minor, dnnl->patch);

  volatile float x = 1.5f;  // volatile: convert at run time too, not only in the static_assert
  const unsigned bits = oscar::float_to_half_bits(x);
  if (bits != 0x3e00u) {
    std::fprintf(stderr, "FAIL: float_to_half_bits(1.5f) = 0x%04x, expected 0x3e00\n", bits);
    return 1;
  }
  std::printf("float_to_half_bits(1.5f) = 0x%04x: ok\n", bits);
  return 0;
}
