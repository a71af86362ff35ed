// The CPU TGT kernels built for the compiler's baseline instruction set (any processor).
#define TGTFAST_TGT_ISA(name) name##_base
#include "tgt_cpu_kernel.inc"
