// The CPU sparse-teacher kernels built for x86-64 processors with AVX2 and FMA (chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#define TGTFAST_CPU_SSE41 1  // the target pragma does not define __SSE4_1__ for the preprocessor
#define TGTFAST_FWD_NAME sparse_coarse_fwd_avx2
#define TGTFAST_BWD_NAME sparse_coarse_bwd_avx2
#define TGTFAST_FUSED_NAME sparse_divergence_rows_avx2
#define TGTFAST_TOPK_NAME sparse_topk_rows_avx2
#define TGTFAST_DIV_NAME divergence_rows_avx2
#include "sparse_cpu_kernel.inc"
#else
#include "sparse_cpu_kernel.h"
namespace tgtfast {
namespace cpu {
void sparse_coarse_fwd_avx2(const SparseCoarseArgs& args, int64_t begin, int64_t end) {
  sparse_coarse_fwd_base(args, begin, end);
}
void sparse_coarse_bwd_avx2(const SparseCoarseArgs& args, int64_t begin, int64_t end) {
  sparse_coarse_bwd_base(args, begin, end);
}
void sparse_divergence_rows_avx2(const SparseDivergenceArgs& args, int64_t begin, int64_t end) {
  sparse_divergence_rows_base(args, begin, end);
}
void sparse_topk_rows_avx2(const SparseTopkArgs& args, int64_t begin, int64_t end) {
  sparse_topk_rows_base(args, begin, end);
}
}  // namespace cpu
}  // namespace tgtfast
#endif
