// The latent noise on the GPU (schemas perturb and latent_noise_): plain CUDA on raw pointers and a stream, no
// torch headers (the torch-facing launcher is noise_cuda_launcher.cpp).
//
//   perturb:  out[i] = z[i] + sigma * n(seed, offset + i)      (z may be null: out[i] = sigma * n(...))
//
// n(seed, j) is tgtfast::philox::normal_at (csrc/common/philox.h) in float32, the same stream as the CPU kernels,
// the Triton kernels (kernels/noise.py) and tgtfast.reference.latent_noise. Arithmetic is float32 for
// float32/float16/bfloat16 data and float64 for float64 data.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tgtfast {
namespace cuda {

enum class NoiseDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct PerturbArgs {
  const void* z = nullptr;  // [numel] of `dtype`, contiguous, or null (noise only)
  void* out = nullptr;      // [numel] of `dtype`, contiguous
  NoiseDType dtype = NoiseDType::kFloat32;
  int64_t numel = 0;
  double sigma = 1.0;
  uint64_t seed = 0;
  uint64_t offset = 0;  // stream index of element 0; offset + numel < 2^63
};

// Enqueue on `stream` (asynchronous). Return cudaErrorInvalidValue for bad arguments (nothing launched),
// otherwise the launch status.
cudaError_t perturb(const PerturbArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
