// Fused distillation divergences, forward + gradients on the GPU: plain CUDA on raw pointers and a stream, no torch
// headers, so the kernels (divergence_cuda.cu) compile with nvcc on a machine whose torch has no CUDA. The
// torch-facing launcher is divergence_cuda_launcher.cpp; the math is docs/design.md, section "Divergences".
//
// Per row n, with q = softmax(a_s s), p = softmax(a_t t) (a_s, a_t: the scales; TAID: p = softmax((1 - t) a_s s +
// t a_t t), its student part detached) and the per-class terms f, dq = q df/dq, dp = p df/dp of the divergence:
//   loss[n]          = max(sum_j f(p_j, q_j), 0)          (NaN and +inf kept)
//   grad_student[n]  = grad_scale a_s   (dq - q sum_j dq_j)
//   grad_teacher[n]  = grad_scale a_t   (dp - p sum_j dp_j)   (TAID: times t)
// Accumulation is float32 for every input dtype. Rows with valid[n] == false get loss 0 and zero gradients (their
// inputs are never read). NaN or +inf in a row's inputs makes that row's loss and gradients NaN; a teacher logit of
// -inf is a class without mass; a student row of only -inf is NaN.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ptloss_cuda.h"  // DType

namespace tgtfast {
namespace cuda {

// The divergence codes: indices into tgtfast.reference.DIVERGENCES.
enum class Divergence : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,             // param_a = beta in [0, 1]
  kSkewKL = 3,          // param_a = alpha in [0, 1]
  kSkewReverseKL = 4,   // param_a = alpha in [0, 1]
  kTVD = 5,
  kSymmetricKL = 6,     // param_a = lam in [0, 1]
  kABDivergence = 7,    // param_a = alpha, param_b = beta, finite
  kTAID = 8,            // param_a = t in [0, 1]
};
constexpr int kNumDivergences = 9;

struct DivergenceArgs {
  const void* student = nullptr;   // [rows, classes] of `dtype`, contiguous (row stride = classes)
  const void* teacher = nullptr;   // [rows, classes] of `dtype`, contiguous
  DType dtype = DType::kFloat32;
  const bool* valid = nullptr;     // [rows] or null (all rows valid)
  float* loss = nullptr;           // [rows]
  void* grad_student = nullptr;    // [rows, classes] of `dtype`, or null (not computed)
  void* grad_teacher = nullptr;    // [rows, classes] of `dtype`, or null (not computed)
  int64_t rows = 0;
  int64_t classes = 0;             // K in [0, 2^30]
  int divergence = 0;              // a Divergence code
  double param_a = 0.0;            // the divergence's parameters (see Divergence)
  double param_b = 0.0;
  double student_scale = 1.0;      // a_s = logit_scale / T, finite and > 0
  double teacher_scale = 1.0;      // a_t, finite and > 0
  double grad_scale = 1.0;         // the gradients are those of grad_scale * loss[n] (loss itself unscaled)
};

// Enqueues the kernel on `stream` (asynchronous). All pointers are device pointers. Returns cudaErrorInvalidValue
// for bad arguments (nothing is launched), otherwise the launch status (cudaGetLastError() right after the launch).
cudaError_t divergence_fwd(const DivergenceArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
