// Torch-facing launchers of the CUDA latent noise kernel (noise_cuda.cu): checks, allocation, the current stream,
// and the CUDA registrations of tgtfast::perturb and tgtfast::latent_noise_ (schemas in csrc/ops.cpp). Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "noise_cuda.h"

namespace tgtfast {
namespace {

cuda::NoiseDType to_kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return cuda::NoiseDType::kFloat32;
    case at::kHalf: return cuda::NoiseDType::kFloat16;
    case at::kBFloat16: return cuda::NoiseDType::kBFloat16;
    case at::kDouble: return cuda::NoiseDType::kFloat64;
    default: TORCH_CHECK(false, op, " (CUDA): ", arg, " must be float32, float64, float16 or bfloat16, got ", t);
  }
  return cuda::NoiseDType::kFloat32;  // unreachable
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

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) {
  m.impl("perturb", &tgtfast::perturb_cuda);
  m.impl("latent_noise_", &tgtfast::latent_noise_cuda);
}
