// The latent noise on the GPU (contract in noise_cuda.h).
//
// perturb: one thread per group of four stream indices (one Philox4x32-10 call, two Box-Muller pairs with one
// log and one sincos each), grid-stride over the groups the tensor touches. The data is read and written once,
// and the noise never exists in memory. Accurate logf / sincosf (no fast-math intrinsics), so the numbers agree
// with the CPU kernel within float rounding.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_convert.cuh"
#include "philox.h"
#include "noise_cuda.h"

namespace tgtfast {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ void put(const T* __restrict__ z, T* __restrict__ out, int64_t i,
                                    typename Conv<T>::Acc sigma, float n) {
  using A = typename Conv<T>::Acc;
  const A v = sigma * static_cast<A>(n);
  Conv<T>::store(out, i, z != nullptr ? Conv<T>::load(z, i) + v : v);
}

template <typename T>
__global__ void perturb_kernel(const T* __restrict__ z, T* __restrict__ out, int64_t numel,
                               typename Conv<T>::Acc sigma, uint64_t seed, uint64_t offset) {
  const uint64_t g_first = offset >> 2;
  const uint64_t g_count = ((offset + static_cast<uint64_t>(numel) - 1) >> 2) - g_first + 1;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t t = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < g_count; t += stride) {
    const uint64_t g = g_first + t;
    const philox::U4 w = philox::group_words(seed, g);
    const int64_t i0 = static_cast<int64_t>(4 * g - offset);  // element of stream index 4g (may be < 0)
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      const uint32_t a = pair ? w.x2 : w.x0;
      const uint32_t b = pair ? w.x3 : w.x1;
      const int64_t ie = i0 + 2 * pair, io = ie + 1;
      if (io < 0 || ie >= numel) continue;
      const float radius = sqrtf(-2.0f * logf(philox::to_open_unit(a)));
      const float theta = 6.283185307179586f * philox::to_open_unit(b);
      float s, c;
      sincosf(theta, &s, &c);
      if (ie >= 0) put(z, out, ie, sigma, radius * c);
      if (io < numel) put(z, out, io, sigma, radius * s);
    }
  }
}

constexpr int kThreads = 256;

template <typename T>
cudaError_t launch_perturb(const PerturbArgs& a, cudaStream_t stream) {
  const uint64_t groups = ((a.offset + static_cast<uint64_t>(a.numel) - 1) >> 2) - (a.offset >> 2) + 1;
  const uint64_t blocks = (groups + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  perturb_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(a.z), static_cast<T*>(a.out), a.numel,
                                                   static_cast<typename Conv<T>::Acc>(a.sigma), a.seed, a.offset);
  return cudaGetLastError();
}

}  // namespace

cudaError_t perturb(const PerturbArgs& a, cudaStream_t stream) {
  if (a.numel < 0 || a.out == nullptr || !(a.sigma >= 0) || a.offset >= (uint64_t{1} << 63) ||
      static_cast<uint64_t>(a.numel) > (uint64_t{1} << 63) - a.offset) {
    return cudaErrorInvalidValue;
  }
  if (a.numel == 0) return cudaSuccess;
  switch (a.dtype) {
    case NoiseDType::kFloat32: return launch_perturb<float>(a, stream);
    case NoiseDType::kFloat16: return launch_perturb<__half>(a, stream);
    case NoiseDType::kBFloat16: return launch_perturb<__nv_bfloat16>(a, stream);
    case NoiseDType::kFloat64: return launch_perturb<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tgtfast
