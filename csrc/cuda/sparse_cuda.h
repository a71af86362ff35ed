// A dense student coarse-grained to a sparse (top-k) teacher on the GPU: plain CUDA on raw pointers and a stream, no
// torch headers, so the kernels (sparse_cuda.cu) compile with nvcc on a machine whose torch has no CUDA. The
// torch-facing launcher is sparse_cuda_launcher.cpp; the math is docs/design.md, section "Sparse teachers".
//
// Per row n, with u = scale * student[n] and the kept classes indices[n, 0..k):
//   coarse[n, j]       = u[indices[n, j]]                                  j < k
//   coarse[n, k]       = log sum_{i not kept} exp(u_i)                     (-inf when nothing is left)
//   grad_student[n, i] = scale grad_coarse[n, j]                           i = indices[n, j]
//                        scale grad_coarse[n, k] exp(u_i - coarse[n, k])   i not kept
//                        (0 where coarse[n, k] = -inf or grad_coarse[n, k] = 0)
// The tail is a log-sum-exp over the classes that are not kept (never total minus kept: no cancellation when the
// kept classes hold almost all the mass). NaN anywhere in a row makes the row's coarse logits all NaN; +inf among
// the rest makes the tail +inf (a kept +inf only its own entry). Accumulation is float32 for every input dtype.
// Rows with valid[n] == false are 0 in both directions and their inputs (student, indices) are never read.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ptloss_cuda.h"  // DType

namespace tgtfast {
namespace cuda {

struct SparseCoarseArgs {
  const void* student = nullptr;       // [rows, classes] of `dtype`, contiguous (row stride = classes)
  DType dtype = DType::kFloat32;
  const int64_t* indices = nullptr;    // [rows, kept], contiguous: in [0, classes), distinct within a row
  const bool* valid = nullptr;         // [rows] or null (all rows valid)
  int64_t rows = 0;
  int64_t classes = 0;                 // V in [0, 2^30]
  int64_t kept = 0;                    // k in [0, V]
  double scale = 1.0;                  // u = scale * student
  float* coarse = nullptr;             // [rows, kept + 1]: written by the forward, its tail column read backward
  const float* grad_coarse = nullptr;  // [rows, kept + 1] (backward)
  void* grad_student = nullptr;        // [rows, classes] of `dtype` (backward)
};

// Enqueue the kernel on `stream` (asynchronous). All pointers are device pointers. They return
// cudaErrorInvalidValue for bad arguments (nothing is launched), otherwise the launch status (cudaGetLastError()
// right after the launch). The forward writes `coarse`; the backward reads `coarse` and `grad_coarse` and writes
// `grad_student`.
cudaError_t sparse_coarse_fwd(const SparseCoarseArgs& args, cudaStream_t stream);
cudaError_t sparse_coarse_bwd(const SparseCoarseArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
