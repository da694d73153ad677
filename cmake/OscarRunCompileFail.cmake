# SPDX-License-Identifier: Apache-2.0
#
# cmake -DCOMPILER=<c++> -DSOURCE=<file.cpp> -DINCLUDE_DIR=<dir> -P OscarRunCompileFail.cmake
#
# Passes when <file.cpp> does NOT compile and the compiler output matches the regex given on its
# first line, `// expect-error: <regex>` (a CMake regex). See cmake/OscarCompileFail.cmake.

foreach(var IN ITEMS COMPILER SOURCE INCLUDE_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "OscarRunCompileFail.cmake: -D${var}=... is required")
  endif()
endforeach()

file(STRINGS "${SOURCE}" first_line LIMIT_COUNT 1)
if(NOT first_line MATCHES "^// expect-error: (.+)$")
  message(FATAL_ERROR "${SOURCE}: the first line must be `// expect-error: <regex>`")
endif()
string(STRIP "${CMAKE_MATCH_1}" expected)

execute_process(
  COMMAND "${COMPILER}" -fsyntax-only -std=c++20 "-I${INCLUDE_DIR}" "${SOURCE}"
  RESULT_VARIABLE result
  OUTPUT_VARIABLE out
  ERROR_VARIABLE out)

if(result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must not (expected an error matching "
                      "'${expected}')")
endif()
if(NOT out MATCHES "${expected}")
  message(FATAL_ERROR "${SOURCE} failed to compile, but not with an error matching "
                      "'${expected}'. Compiler output:\n${out}")
endif()
message(STATUS "${SOURCE}: fails to compile as expected ('${expected}')")
