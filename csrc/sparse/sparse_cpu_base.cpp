// The CPU sparse-teacher kernels built for the compiler's baseline instruction set (any processor).
#define TGTFAST_FWD_NAME sparse_coarse_fwd_base
#define TGTFAST_BWD_NAME sparse_coarse_bwd_base
#define TGTFAST_FUSED_NAME sparse_divergence_rows_base
#define TGTFAST_TOPK_NAME sparse_topk_rows_base
#define TGTFAST_DIV_NAME divergence_rows_base
#include "sparse_cpu_kernel.inc"
