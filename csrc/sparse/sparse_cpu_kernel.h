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

// Per-row verdict of the fused kernel's checks of the teacher (the first that fails, in this order).
enum SparseRowStatus : int8_t {
  kSparseOk = 0,
  kSparseBadIndex = 1,       // an index outside [0, classes)
  kSparseRepeatedIndex = 2,  // an index repeated within the row
  kSparseNaN = 3,            // a NaN log-probability
  kSparsePositive = 4,       // a log-probability above `slack`
  kSparseMassAboveOne = 5,   // (tail bucket) kept probabilities summing to more than 1 + slack * kept
};

struct SparseDivergenceArgs {
  SparseCoarseArgs coarse;        // student, dtype, indices, valid, rows, classes, kept, scale (out/coarse unused)
  const double* teacher = nullptr;  // [rows, kept]: the teacher's log-probabilities at its cached temperature
  bool tail = true;               // a tail bucket of mass 1 - sum exp(teacher); false: renormalised, no tail
  double slack = 1e-5;            // rounding allowed above log-probability 0 (and above mass 1, per kept class)
  double teacher_scale = 1.0;     // cached temperature / loss temperature
  int divergence = 0;             // index in tgtfast.reference.DIVERGENCES
  double param_a = 0.0;
  double param_b = 0.0;
  double grad_scale = 1.0;        // the gradient is that of grad_scale * loss[n]
  void* loss = nullptr;           // [rows] (double if dtype is kFloat64, else float); 0 where invalid or bad
  void* grad = nullptr;           // [rows, classes] of dtype, or null (no gradient)
  int8_t* status = nullptr;       // [rows] SparseRowStatus (kSparseOk where valid is false)
};

// Fused loss: per row, check the teacher (status), coarse-grain the student, run the divergence on the k + 1
// classes and write the gradient wrt the student (when `grad`); rows [begin, end).
void sparse_divergence_rows_avx2(const SparseDivergenceArgs& args, int64_t begin, int64_t end);
void sparse_divergence_rows_base(const SparseDivergenceArgs& args, int64_t begin, int64_t end);

struct SparseTopkArgs {
  const void* logits = nullptr;      // [*, classes] of `dtype`, rows contiguous
  DType dtype = DType::kFloat32;
  const int64_t* rows = nullptr;     // [rows]: the logits' rows to reduce, or null (rows 0 .. rows - 1)
  int64_t rows_count = 0;
  int64_t classes = 0;
  int64_t kept = 0;
  double inv_temperature = 1.0;
  float* values = nullptr;           // [rows, kept]: log-probabilities, most probable first
  int64_t* indices = nullptr;        // [rows, kept]: their class ids (lower id first among equal values)
};

// The teacher cache's reduction: per row, log_softmax(logits * inv_temperature) and its `kept` largest entries, in
// one sweep (a min-heap of the kept candidates; blocks whose max does not beat the heap's minimum are skipped). A row
// with NaN, +inf, or only -inf gets NaN values.
void sparse_topk_rows_avx2(const SparseTopkArgs& args, int64_t begin, int64_t end);
void sparse_topk_rows_base(const SparseTopkArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
