// The torch-facing side of cpu::DType (csrc/common/cpu_isa.h): the launchers of every CPU op map a tensor's
// scalar type to the element type their torch-free kernel bodies take, with one error for the others.
#pragma once

#include <ATen/ATen.h>

#include "cpu_isa.h"

namespace tgtfast {
namespace cpu {

inline DType to_kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, op, ": ", arg, " must be float32, float64, bfloat16 or float16, got ", t);
  }
  return DType::kFloat32;  // unreachable
}

}  // namespace cpu
}  // namespace tgtfast
