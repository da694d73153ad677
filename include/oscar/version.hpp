// SPDX-License-Identifier: Apache-2.0
/// \file
/// OSCAR's version.
///
/// The top-level CMakeLists.txt checks at configure time that these numbers equal
/// `project(oscar VERSION ...)`, so the header and the installed package config never disagree.
#pragma once

#define OSCAR_VERSION_MAJOR 0
#define OSCAR_VERSION_MINOR 1
#define OSCAR_VERSION_PATCH 0
#define OSCAR_VERSION_STRING "0.1.0"

/// The version as one integer, `MAJOR * 10000 + MINOR * 100 + PATCH`, for `#if` comparisons.
#define OSCAR_VERSION \
  (OSCAR_VERSION_MAJOR * 10000 + OSCAR_VERSION_MINOR * 100 + OSCAR_VERSION_PATCH)
