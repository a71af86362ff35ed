// Fused PTLoss forward + gradients on the GPU: plain CUDA on raw pointers and a stream, no torch headers,
// so the kernels (ptloss_cuda.cu) compile with nvcc on a machine whose torch has no CUDA. The torch-facing
// launcher is ptloss_cuda_launcher.cpp.
//
// Per row n (u = s / T, q = softmax(u), p0 = softmax(t / T) or t, p = (1 - delta) p0 + delta / K):
//   loss[n]          = sum_j [p_j (log p_j - log q_j)] + sum_j p_j h_j,  h_j = sum_m eta[m, j] (1 - q_j)^m
//   grad_student[n]  = [(q - p) + q (a - sum_j a_j q_j)] / T,            a_j = -p_j h'_j
//   grad_teacher[n]  = (1 - delta) p0 (g - sum_j p0_j g_j) / T   (logits)
//                      (1 - delta) (g + 1)                         (probabilities)
//   with g_j = log p_j - log q_j + h_j; both gradients are multiplied by grad_scale (the weight the
//   caller's reduction gives each row), the loss is not. Terms with p_j == 0 add 0 to the loss (xlogy convention); with
//   probabilities, a teacher entry p_j == 0 (delta == 0) has grad_teacher -inf (d/dp of p log p at 0).
// Accumulation is float32 for every input dtype. Rows with valid[n] == false get loss 0 and zero gradients
// (their inputs are never read). NaN in a row's inputs makes that row's loss NaN.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tgtfast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest number of orders M the kernels accept (ptloss_fwd returns cudaErrorInvalidValue above it).
constexpr int64_t kMaxOrders = 32;

struct PTLossArgs {
  const void* student = nullptr;   // [rows, classes] of `dtype`, contiguous (row stride = classes)
  const void* teacher = nullptr;   // [rows, classes] of `dtype`, contiguous: logits or probabilities
  DType dtype = DType::kFloat32;
  const float* coeffs = nullptr;   // [orders] (shared by all classes) or [orders, classes]; may be null if orders == 0
  bool coeffs_per_class = false;
  int64_t orders = 0;              // M in [0, kMaxOrders]
  const bool* valid = nullptr;     // [rows] or null (all rows valid)
  float* loss = nullptr;           // [rows]
  void* grad_student = nullptr;    // [rows, classes] of `dtype`, or null (not computed)
  void* grad_teacher = nullptr;    // [rows, classes] of `dtype`, or null (not computed)
  int64_t rows = 0;
  int64_t classes = 0;             // K in [0, 2^30]
  double inv_temperature = 1.0;    // 1 / T, finite and > 0
  double label_smoothing = 0.0;    // delta in [0, 1)
  bool teacher_is_logits = true;
  double grad_scale = 1.0;         // the gradients are those of grad_scale * loss[n] (loss itself unscaled)
};

// Enqueues the kernel on `stream` (asynchronous). All pointers are device pointers. Returns
// cudaErrorInvalidValue for bad arguments (nothing is launched), otherwise the launch status
// (cudaGetLastError() right after the launch).
cudaError_t ptloss_fwd(const PTLossArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
