# SPDX-License-Identifier: Apache-2.0
#
# Must-not-compile tests (as Eigen has): each <dir>/*.cpp starts with the line
#
#   // expect-error: <CMake regex>
#
# and becomes the CTest test `compile_fail.<stem>` (labels `unit` and `compile_fail`), which runs
# the C++ compiler with -fsyntax-only -std=c++20 -I<include> on the file and passes only when the
# compilation FAILS and the compiler's output matches the regex. The regex is what keeps a file
# that fails for the wrong reason (a typo, a missing include) from passing.
# The check itself is cmake/OscarRunCompileFail.cmake, run with `cmake -P`.

include_guard(GLOBAL)

# oscar_add_compile_fail_tests(<dir>)
function(oscar_add_compile_fail_tests dir)
  file(GLOB cases CONFIGURE_DEPENDS "${dir}/*.cpp")
  list(SORT cases)
  foreach(case IN LISTS cases)
    # Fail at configure time, not at test time, when the header line is missing.
    file(STRINGS "${case}" first_line LIMIT_COUNT 1)
    if(NOT first_line MATCHES "^// expect-error: .+")
      message(FATAL_ERROR "${case}: the first line must be `// expect-error: <regex>`")
    endif()
    get_filename_component(stem "${case}" NAME_WE)
    add_test(NAME compile_fail.${stem}
      COMMAND "${CMAKE_COMMAND}"
        "-DCOMPILER=${CMAKE_CXX_COMPILER}"
        "-DSOURCE=${case}"
        "-DINCLUDE_DIR=${PROJECT_SOURCE_DIR}/include"
        -P "${PROJECT_SOURCE_DIR}/cmake/OscarRunCompileFail.cmake")
    set_tests_properties(compile_fail.${stem} PROPERTIES
      LABELS "unit;compile_fail"
      TIMEOUT 120)
  endforeach()
endfunction()
