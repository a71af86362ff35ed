// The CPU divergence kernel built for x86-64 processors with AVX2 and FMA (chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define TGTFAST_CPU_SSE41 1  // the target pragma does not define __SSE4_1__ for the preprocessor
#define TGTFAST_ISA_NAME divergence_rows_avx2
#include "divergence_cpu_kernel.inc"
#else
#include "divergence_cpu_kernel.h"
namespace tgtfast {
namespace cpu {
void divergence_rows_avx2(const DivergenceArgs& args, int64_t begin, int64_t end) {
  divergence_rows_base(args, begin, end);
}
}  // namespace cpu
}  // namespace tgtfast
#endif
