// Fused PTLoss forward + gradients on the CPU: plain C++ on raw pointers, no torch headers.
//
// The kernel body lives in ptloss_cpu_kernel.inc and is compiled once per instruction set
// (ptloss_cpu_avx2.cpp with AVX2+FMA, ptloss_cpu_base.cpp with the compiler's baseline); the torch-facing
// launcher (ptloss_cpu.cpp) picks one at run time, so one binary runs on any x86-64 and uses AVX2 where
// the processor has it.
#pragma once

#include <cstdint>

#include "cpu_isa.h"  // DType, cpu_has_avx2

namespace tgtfast {
namespace cpu {

struct PTLossArgs {
  const void* student = nullptr;   // [rows, classes] of `dtype`
  const void* teacher = nullptr;   // [rows, classes] of `dtype`: logits or probabilities
  DType dtype = DType::kFloat32;
  const void* coeffs = nullptr;    // [orders] or [orders, classes]; double if dtype is kFloat64, else float
  bool coeffs_per_class = false;
  int64_t orders = 0;
  const bool* valid = nullptr;     // [rows] or null (all rows valid)
  void* loss = nullptr;            // [rows]; double if dtype is kFloat64, else float
  void* grad_student = nullptr;    // [rows, classes] of `dtype`, or null
  void* grad_teacher = nullptr;    // [rows, classes] of `dtype`, or null
  int64_t rows = 0;
  int64_t classes = 0;
  double inv_temperature = 1.0;
  double label_smoothing = 0.0;
  bool teacher_is_logits = true;
  double grad_scale = 1.0;        // gradients are those of grad_scale * loss[n]
};

// Processes rows [begin, end). Thread-safe for disjoint row ranges.
void ptloss_rows_avx2(const PTLossArgs& args, int64_t begin, int64_t end);
void ptloss_rows_base(const PTLossArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
