// Torch-facing launcher of the CUDA temperature softmax (softmax_cuda.cu): checks, allocation, the current stream,
// and the CUDA registration of tgtfast::temperature_softmax (schema in csrc/ops.cpp). Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "softmax_cuda.h"

namespace tgtfast {
namespace {

cuda::SoftmaxDType to_kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return cuda::SoftmaxDType::kFloat32;
    case at::kHalf: return cuda::SoftmaxDType::kFloat16;
    case at::kBFloat16: return cuda::SoftmaxDType::kBFloat16;
    case at::kDouble: return cuda::SoftmaxDType::kFloat64;
    default: TORCH_CHECK(false, op, " (CUDA): ", arg, " must be float32, float64, float16 or bfloat16, got ", t);
  }
  return cuda::SoftmaxDType::kFloat32;  // unreachable
}

at::Tensor temperature_softmax_cuda(const at::Tensor& logits, double temperature) {
  TORCH_CHECK(logits.is_cuda(), "temperature_softmax (CUDA): logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "temperature_softmax (CUDA): temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(logits.dim() >= 1, "temperature_softmax (CUDA): logits must have at least one dimension");
  const auto dtype = to_kernel_dtype(logits.scalar_type(), "temperature_softmax", "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t K = x.size(-1);
  const int64_t rows = K == 0 ? 0 : x.numel() / K;
  if (rows == 0) return y;
  TORCH_CHECK(rows <= INT32_MAX, "temperature_softmax (CUDA): at most 2^31 - 1 rows, got ", rows);
  cuda::SoftmaxArgs args;
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.dtype = dtype;
  args.rows = rows;
  args.cols = K;
  args.inv_temperature = 1.0 / temperature;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = cuda::temperature_softmax(args, stream);
  TORCH_CHECK(err == cudaSuccess, "temperature_softmax (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) { m.impl("temperature_softmax", &tgtfast::temperature_softmax_cuda); }
