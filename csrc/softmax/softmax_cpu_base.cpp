// The CPU temperature softmax built for the compiler's baseline instruction set (any processor).
#define TGTFAST_SOFTMAX_ISA(name) name##_base
#include "softmax_cpu_kernel.inc"
