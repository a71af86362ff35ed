// The CPU latent noise kernel built for x86-64 processors with AVX2 and FMA (chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define TGTFAST_NOISE_ISA(name) name##_avx2
#include "noise_cpu_kernel.inc"
#else
#include "noise_cpu_kernel.h"
namespace tgtfast {
namespace cpu {
void perturb_range_avx2(const PerturbArgs& args, int64_t begin, int64_t end) { perturb_range_base(args, begin, end); }
}  // namespace cpu
}  // namespace tgtfast
#endif
