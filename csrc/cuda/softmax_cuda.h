// The temperature softmax on the GPU (schema temperature_softmax): plain CUDA on raw pointers and a stream, no
// torch headers (the torch-facing launcher is softmax_cuda_launcher.cpp).
//
//   softmax:  y[r, :] = softmax(x[r, :] * inv_temperature)
//
// Arithmetic is float32 for float32/float16/bfloat16 data and float64 for float64 data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tgtfast {
namespace cuda {

enum class SoftmaxDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct SoftmaxArgs {
  const void* x = nullptr;  // [rows, cols] of `dtype`, contiguous
  void* y = nullptr;        // [rows, cols] of `dtype`, contiguous
  SoftmaxDType dtype = SoftmaxDType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;         // in [1, 2^31)
  double inv_temperature = 1.0;
};

// Enqueue on `stream` (asynchronous). Returns cudaErrorInvalidValue for bad arguments (nothing launched),
// otherwise the launch status.
cudaError_t temperature_softmax(const SoftmaxArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
