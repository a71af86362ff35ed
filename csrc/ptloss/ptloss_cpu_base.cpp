// The CPU PTLoss kernel built for the compiler's baseline instruction set (any processor).
#define TGTFAST_ISA_NAME ptloss_rows_base
#include "ptloss_cpu_kernel.inc"

