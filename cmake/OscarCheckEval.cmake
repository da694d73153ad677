# SPDX-License-Identifier: Apache-2.0
#
# cmake -P script behind the `quality.targets` test: runs oscar-eval --json on the shipped model
# and checks the quality targets for the FP2+ configuration the real-model sweep chose
# (`fp2plus-kc`, FP2+ with per-channel keys) against KIVI-2 and the fp32 cache:
#   at <= 2.5 bits/element: attention error and KL below KIVI-2's, perplexity within 2% of the
#   fp32 cache, top-1 agreement >= 95%.
#
#   cmake -DEVAL=<oscar-eval> -DARGS="<args;...>" -P OscarCheckEval.cmake

execute_process(COMMAND "${EVAL}" ${ARGS} --json
  OUTPUT_VARIABLE json ERROR_VARIABLE progress RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "oscar-eval failed (exit ${rc}):\n${progress}\n${json}")
endif()

string(JSON count LENGTH "${json}")
math(EXPR last "${count} - 1")
foreach(i RANGE ${last})
  string(JSON name GET "${json}" ${i} format)
  foreach(field bits_per_element attn_rel_err kl top1 ppl ppl_vs_fp32)
    string(JSON value GET "${json}" ${i} ${field})
    set(${name}_${field} "${value}")
  endforeach()
endforeach()
foreach(name fp32 kivi2 fp2plus-kc)
  if(NOT DEFINED ${name}_ppl)
    message(FATAL_ERROR "oscar-eval --json has no row for ${name}:\n${json}")
  endif()
endforeach()

message(STATUS "fp2plus-kc: bits ${fp2plus-kc_bits_per_element}, attn err ${fp2plus-kc_attn_rel_err}, "
               "KL ${fp2plus-kc_kl}, top-1 ${fp2plus-kc_top1}, ppl ${fp2plus-kc_ppl} "
               "(${fp2plus-kc_ppl_vs_fp32} x fp32)")
message(STATUS "kivi2:   bits ${kivi2_bits_per_element}, attn err ${kivi2_attn_rel_err}, "
               "KL ${kivi2_kl}, top-1 ${kivi2_top1}, ppl ${kivi2_ppl}")
message(STATUS "fp32:    ppl ${fp32_ppl}")

# CMake's if() compares numbers as doubles, including exponents like 1.5e-3.
set(failures "")
if(fp2plus-kc_bits_per_element GREATER 2.5)
  string(APPEND failures "FP2+ (per-channel keys) uses ${fp2plus-kc_bits_per_element} bits/element (allowed: <= 2.5)\n")
endif()
if(NOT fp2plus-kc_attn_rel_err LESS kivi2_attn_rel_err)
  string(APPEND failures "FP2+ (per-channel keys) attention error ${fp2plus-kc_attn_rel_err} is not below KIVI-2's ${kivi2_attn_rel_err}\n")
endif()
if(NOT fp2plus-kc_kl LESS kivi2_kl)
  string(APPEND failures "FP2+ (per-channel keys) KL ${fp2plus-kc_kl} is not below KIVI-2's ${kivi2_kl}\n")
endif()
if(fp2plus-kc_ppl_vs_fp32 GREATER 1.02)
  string(APPEND failures "FP2+ (per-channel keys) perplexity is ${fp2plus-kc_ppl_vs_fp32} x the fp32 cache's (allowed: <= 1.02)\n")
endif()
if(fp2plus-kc_top1 LESS 0.95)
  string(APPEND failures "FP2+ (per-channel keys) top-1 agreement ${fp2plus-kc_top1} (allowed: >= 0.95)\n")
endif()
if(failures)
  message(FATAL_ERROR "quality targets not met:\n${failures}")
endif()
