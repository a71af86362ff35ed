// Test-only evaluation of cpu_math.h built for the compiler's baseline instruction set (cpu_math_eval.h).
#define TGTFAST_MATH_EVAL_NAME math_eval_base
#include "cpu_math_eval.inc"
