// Fused divergence forward + gradients on the CPU (docs/design.md, "Divergences"): plain C++ on raw pointers, no
// torch headers.
//
// The kernel body lives in divergence_cpu_kernel.inc and is compiled once per instruction set
// (divergence_cpu_avx2.cpp with AVX2+FMA, divergence_cpu_base.cpp with the compiler's baseline); the torch-facing
// launcher (divergence_cpu.cpp) picks one at run time.
#pragma once

#include <cstdint>

#include "cpu_isa.h"  // DType, cpu_has_avx2

namespace tgtfast {
namespace cpu {

struct DivergenceArgs {
  const void* student = nullptr;  // [rows, classes] of `dtype`: logits
  const void* teacher = nullptr;  // [rows, classes] of `dtype`: logits
  DType dtype = DType::kFloat32;
  const bool* valid = nullptr;    // [rows] or null (all rows valid)
  void* loss = nullptr;           // [rows]; double if dtype is kFloat64, else float
  void* grad_student = nullptr;   // [rows, classes] of `dtype`, or null
  void* grad_teacher = nullptr;   // [rows, classes] of `dtype`, or null
  int64_t rows = 0;
  int64_t classes = 0;
  int divergence = 0;             // index in tgtfast.reference.DIVERGENCES
  double param_a = 0.0;           // jsd: beta; skew_kl, skew_reverse_kl: alpha; symmetric_kl: lam; ab: alpha; taid: t
  double param_b = 0.0;           // ab_divergence: beta
  double student_scale = 1.0;     // u_s = student * student_scale
  double teacher_scale = 1.0;     // u_t = teacher * teacher_scale
  double grad_scale = 1.0;        // gradients are those of grad_scale * loss[n] wrt the unscaled logits
};

// Number of divergence codes the kernel knows (codes are 0 .. kNumDivergences - 1).
constexpr int kNumDivergences = 9;

// Processes rows [begin, end). Thread-safe for disjoint row ranges.
void divergence_rows_avx2(const DivergenceArgs& args, int64_t begin, int64_t end);
void divergence_rows_base(const DivergenceArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
