// The CPU sparse-teacher kernels built for the compiler's baseline instruction set (any processor).
#define TGTFAST_FWD_NAME sparse_coarse_fwd_base
#define TGTFAST_BWD_NAME sparse_coarse_bwd_base
#include "sparse_cpu_kernel.inc"
