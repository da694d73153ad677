# SPDX-License-Identifier: Apache-2.0
#
# Compiler options for OSCAR's own targets (tests, benchmarks, examples, the header check).
# Never applied to the oscar INTERFACE targets: users choose their own warnings and sanitizers.

include_guard(GLOBAL)

option(OSCAR_WARNINGS_AS_ERRORS "Treat warnings in OSCAR's own targets as errors" ON)
option(OSCAR_SANITIZE "Build OSCAR's tests with AddressSanitizer + UndefinedBehaviorSanitizer" OFF)

# oscar_target_warnings(<target>)
#   -Wall -Wextra -Wpedantic (-Werror) on the target's C++ sources. Imported dependencies
#   (Catch2, Eigen, oneDNN, benchmark) are included as system headers and stay quiet.
function(oscar_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    set(flags -Wall -Wextra -Wpedantic)
    if(OSCAR_WARNINGS_AS_ERRORS)
      list(APPEND flags -Werror)
    endif()
  elseif(MSVC)
    set(flags /W4 /permissive-)
    if(OSCAR_WARNINGS_AS_ERRORS)
      list(APPEND flags /WX)
    endif()
  endif()
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${flags}>")
endfunction()

# oscar_target_sanitizers(<target>)
#   With OSCAR_SANITIZE (the asan preset): ASan + UBSan, every UB report fatal.
function(oscar_target_sanitizers target)
  if(NOT OSCAR_SANITIZE)
    return()
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "OSCAR_SANITIZE needs GCC or Clang (have ${CMAKE_CXX_COMPILER_ID})")
  endif()
  set(flags -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:${flags}>")
  target_link_options(${target} PRIVATE -fsanitize=address,undefined)
endfunction()
