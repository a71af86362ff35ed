// What the CPU kernels of every stem share about their inputs and the processor: the element type of the raw
// buffers they receive and the run-time choice between the AVX2+FMA and the baseline build of each kernel body.
#pragma once

#include <cstdint>

namespace tgtfast {
namespace cpu {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Whether this processor has AVX2 and FMA (the kernels' *_avx2 builds may run); cpu_isa.cpp.
bool cpu_has_avx2();

}  // namespace cpu
}  // namespace tgtfast
