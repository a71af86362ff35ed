// The CPU latent noise kernel built for the compiler's baseline instruction set (any processor).
#define TGTFAST_NOISE_ISA(name) name##_base
#include "noise_cpu_kernel.inc"
