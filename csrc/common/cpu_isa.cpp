// cpu_has_avx2 (cpu_isa.h), compiled for the baseline instruction set.
#include "cpu_isa.h"

namespace tgtfast {
namespace cpu {

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace tgtfast
