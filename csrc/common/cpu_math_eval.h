// Test-only entry points: every helper of cpu_math.h applied elementwise to a float32 array, in the AVX2+FMA build
// (cpu_math_eval_avx2.cpp) and the baseline build (cpu_math_eval_base.cpp), inside the same `#pragma omp simd`
// loops the kernels use, so that tests/test_cpu_math.py checks the vectorised code the kernels run.
// Exposed to Python as tgtfast._C._math_eval (csrc/ops.cpp).
#pragma once

#include <cstdint>

namespace tgtfast {
namespace cpu {

// Helpers by name: exp, exp_nonpos, log, tanh, sigmoid, sin, cos (sin and cos of fast_sincos).
// Returns false for an unknown name (nothing written).
bool math_eval_avx2(const char* name, const float* x, float* y, int64_t n);
bool math_eval_base(const char* name, const float* x, float* y, int64_t n);

}  // namespace cpu
}  // namespace tgtfast
