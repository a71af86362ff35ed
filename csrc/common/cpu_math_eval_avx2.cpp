// Test-only evaluation of cpu_math.h built for x86-64 processors with AVX2 and FMA (cpu_math_eval.h).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define TGTFAST_CPU_SSE41 1  // the target pragma does not define __SSE4_1__ for the preprocessor
#define TGTFAST_MATH_EVAL_NAME math_eval_avx2
#include "cpu_math_eval.inc"
#else
#include "cpu_math_eval.h"
namespace tgtfast {
namespace cpu {
bool math_eval_avx2(const char* name, const float* x, float* y, int64_t n) { return math_eval_base(name, x, y, n); }
}  // namespace cpu
}  // namespace tgtfast
#endif
