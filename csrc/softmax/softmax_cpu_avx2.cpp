// The CPU temperature softmax built for x86-64 processors with AVX2 and FMA (chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define TGTFAST_SOFTMAX_ISA(name) name##_avx2
#include "softmax_cpu_kernel.inc"
#else
#include "softmax_cpu_kernel.h"
namespace tgtfast {
namespace cpu {
void softmax_rows_avx2(const SoftmaxArgs& args, int64_t begin, int64_t end) { softmax_rows_base(args, begin, end); }
}  // namespace cpu
}  // namespace tgtfast
#endif
