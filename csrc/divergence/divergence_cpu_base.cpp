// The CPU divergence kernel built for the compiler's baseline instruction set (any processor).
#define TGTFAST_ISA_NAME divergence_rows_base
#include "divergence_cpu_kernel.inc"
