// The student's logits coarse-grained to a sparse teacher's kept classes plus one tail bucket, and its gradient
// (docs/design.md, "Sparse teachers"): plain C++ on raw pointers, no torch headers.
//
// The bodies live in sparse_cpu_kernel.inc and are compiled once per instruction set (sparse_cpu_avx2.cpp with
// AVX2+FMA, sparse_cpu_base.cpp with the compiler's baseline); the launcher (sparse_cpu.cpp) picks one at run time.
#pragma once

#include <cstdint>

#include "cpu_isa.h"  // DType, cpu_has_avx2

namespace tgtfast {
namespace cpu {

struct SparseCoarseArgs {
  const void* student = nullptr;     // [rows, classes] of `dtype`
  DType dtype = DType::kFloat32;
  const int64_t* indices = nullptr;  // [rows, kept]: in range, distinct within a row
  const bool* valid = nullptr;       // [rows] or null (all rows valid)
  const void* coarse = nullptr;      // backward: [rows, kept + 1] (double if dtype is kFloat64, else float)
  const void* grad_coarse = nullptr; // backward: like coarse
  void* out = nullptr;               // forward: coarse [rows, kept + 1]; backward: grad [rows, classes] of `dtype`
  int64_t rows = 0;
  int64_t classes = 0;
  int64_t kept = 0;
  double scale = 1.0;                // u = student * scale
};

// Forward: out[n, j] = u[n, indices[n, j]], out[n, kept] = log sum_{i not kept} exp(u[n, i]); rows [begin, end).
void sparse_coarse_fwd_avx2(const SparseCoarseArgs& args, int64_t begin, int64_t end);
void sparse_coarse_fwd_base(const SparseCoarseArgs& args, int64_t begin, int64_t end);
// Backward: out[n, i] = scale * grad_coarse[n, kept] * exp(u[n, i] - coarse[n, kept]) off the kept classes,
// scale * grad_coarse[n, j] at indices[n, j]; rows [begin, end).
void sparse_coarse_bwd_avx2(const SparseCoarseArgs& args, int64_t begin, int64_t end);
void sparse_coarse_bwd_base(const SparseCoarseArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
