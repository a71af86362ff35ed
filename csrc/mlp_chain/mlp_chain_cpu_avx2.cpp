// The CPU MLP row-block kernels built for x86-64 processors with AVX2 and FMA (chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define TGTFAST_MLP_CHAIN_ISA mlp_chain_isa_avx2
#define TGTFAST_MLP_CHAIN_AVX2 1  // the target pragma does not define __AVX2__ for the preprocessor
#define TGTFAST_CPU_SSE41 1  // nor __SSE4_1__ (cpu_math.h then rounds with one instruction)
#include "mlp_chain_cpu_kernel.inc"
#else
#include "mlp_chain_cpu_kernel.h"
namespace tgtfast {
namespace cpu {
MlpChainIsa mlp_chain_isa_avx2() { return mlp_chain_isa_base(); }
}  // namespace cpu
}  // namespace tgtfast
#endif
