# SPDX-License-Identifier: Apache-2.0
#
# cmake -P script behind the `quality.targets` test: runs oscar-eval --json on the shipped model
# and checks the quality targets of the default FP2+ (`fp2plus`, the real-model sweep's choice)
# against KIVI-2 and the fp32 cache, and of FP4+ against q4_0:
#   FP2+ at <= 2.5 bits/element: attention error and KL below KIVI-2's, perplexity within 2% of
#   the fp32 cache, top-1 agreement >= 95%;
#   FP4+ at <= 4.5 bits/element: attention error below q4_0's.
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
foreach(name fp32 kivi2 fp2plus fp4plus q4_0)
  if(NOT DEFINED ${name}_ppl)
    message(FATAL_ERROR "oscar-eval --json has no row for ${name}:\n${json}")
  endif()
endforeach()

message(STATUS "fp2plus: bits ${fp2plus_bits_per_element}, attn err ${fp2plus_attn_rel_err}, "
               "KL ${fp2plus_kl}, top-1 ${fp2plus_top1}, ppl ${fp2plus_ppl} "
               "(${fp2plus_ppl_vs_fp32} x fp32)")
message(STATUS "kivi2:   bits ${kivi2_bits_per_element}, attn err ${kivi2_attn_rel_err}, "
               "KL ${kivi2_kl}, top-1 ${kivi2_top1}, ppl ${kivi2_ppl}")
message(STATUS "fp4plus: bits ${fp4plus_bits_per_element}, attn err ${fp4plus_attn_rel_err}; "
               "q4_0: bits ${q4_0_bits_per_element}, attn err ${q4_0_attn_rel_err}")
message(STATUS "fp32:    ppl ${fp32_ppl}")

# CMake's if() compares numbers as doubles, including exponents like 1.5e-3.
set(failures "")
if(fp2plus_bits_per_element GREATER 2.5)
  string(APPEND failures "FP2+ uses ${fp2plus_bits_per_element} bits/element (allowed: <= 2.5)\n")
endif()
if(NOT fp2plus_attn_rel_err LESS kivi2_attn_rel_err)
  string(APPEND failures "FP2+ attention error ${fp2plus_attn_rel_err} is not below KIVI-2's ${kivi2_attn_rel_err}\n")
endif()
if(NOT fp2plus_kl LESS kivi2_kl)
  string(APPEND failures "FP2+ KL ${fp2plus_kl} is not below KIVI-2's ${kivi2_kl}\n")
endif()
if(fp2plus_ppl_vs_fp32 GREATER 1.02)
  string(APPEND failures "FP2+ perplexity is ${fp2plus_ppl_vs_fp32} x the fp32 cache's (allowed: <= 1.02)\n")
endif()
if(fp2plus_top1 LESS 0.95)
  string(APPEND failures "FP2+ top-1 agreement ${fp2plus_top1} (allowed: >= 0.95)\n")
endif()
if(fp4plus_bits_per_element GREATER 4.5)
  string(APPEND failures "FP4+ uses ${fp4plus_bits_per_element} bits/element (allowed: <= 4.5)\n")
endif()
if(NOT fp4plus_attn_rel_err LESS q4_0_attn_rel_err)
  string(APPEND failures "FP4+ attention error ${fp4plus_attn_rel_err} is not below q4_0's ${q4_0_attn_rel_err}\n")
endif()
if(failures)
  message(FATAL_ERROR "quality targets not met:\n${failures}")
endif()
