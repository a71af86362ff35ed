// Torch-facing launchers of the CUDA TGT kernels (tgt_cuda.cu): checks, allocation, the current stream, and
// the CUDA registrations of tgtfast::perturb, tgtfast::latent_noise_ and tgtfast::temperature_softmax
// (schemas in csrc/ops.cpp). Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "tgt_cuda.h"

namespace tgtfast {
namespace {

cuda::TgtDType to_kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return cuda::TgtDType::kFloat32;
    case at::kHalf: return cuda::TgtDType::kFloat16;
    case at::kBFloat16: return cuda::TgtDType::kBFloat16;
    case at::kDouble: return cuda::TgtDType::kFloat64;
    default: TORCH_CHECK(false, op, " (CUDA): ", arg, " must be float32, float64, float16 or bfloat16, got ", t);
  }
  return cuda::TgtDType::kFloat32;  // unreachable
}

void check_stream(int64_t offset, int64_t numel, const char* op) {
  TORCH_CHECK(offset >= 0, op, " (CUDA): offset must be >= 0, got ", offset);
  TORCH_CHECK(offset <= INT64_MAX - numel, op, " (CUDA): offset + numel must be < 2^63, got offset ", offset,
              " and ", numel, " elements");
}

void launch(const cuda::PerturbArgs& args, const at::Tensor& like, const char* op) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
  const cudaError_t err = cuda::perturb(args, stream);
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor perturb_cuda(const at::Tensor& z, double sigma, int64_t seed, int64_t offset) {
  TORCH_CHECK(z.is_cuda(), "perturb (CUDA): z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, "perturb (CUDA): sigma must be finite and >= 0, got ", sigma);
  check_stream(offset, z.numel(), "perturb");
  const auto dtype = to_kernel_dtype(z.scalar_type(), "perturb", "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty_like(zc, at::MemoryFormat::Contiguous);
  if (zc.numel() == 0) return out;
  cuda::PerturbArgs args;
  args.z = zc.data_ptr();
  args.out = out.data_ptr();
  args.dtype = dtype;
  args.numel = zc.numel();
  args.sigma = sigma;
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  launch(args, zc, "perturb");
  return out;
}

void latent_noise_cuda(at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.is_cuda(), "latent_noise_ (CUDA): out must be a CUDA tensor, got ", out.device());
  TORCH_CHECK(out.is_contiguous(), "latent_noise_ (CUDA): out must be contiguous");
  check_stream(offset, out.numel(), "latent_noise_");
  const auto dtype = to_kernel_dtype(out.scalar_type(), "latent_noise_", "out");
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  cuda::PerturbArgs args;
  args.z = nullptr;
  args.out = out.data_ptr();
  args.dtype = dtype;
  args.numel = out.numel();
  args.sigma = 1.0;
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  launch(args, out, "latent_noise_");
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

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) {
  m.impl("perturb", &tgtfast::perturb_cuda);
  m.impl("latent_noise_", &tgtfast::latent_noise_cuda);
  m.impl("temperature_softmax", &tgtfast::temperature_softmax_cuda);
}
