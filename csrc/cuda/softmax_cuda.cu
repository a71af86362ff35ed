// The temperature softmax on the GPU (contract in softmax_cuda.h).
//
// One block of 256 threads per row, three sweeps (max, sum of exp, write) with warp shuffles and one
// shared-memory step per reduction; the second and third sweeps re-read the row from L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_convert.cuh"
#include "softmax_cuda.h"

namespace tgtfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename A, typename Op>
__device__ A block_reduce(A v, Op op, A* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by the previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
#pragma unroll
  for (int k = 1; k < kThreads / 32; ++k) v = op(v, shared[k]);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t cols,
                                                           typename Conv<T>::Acc inv_t) {
  using A = typename Conv<T>::Acc;
  __shared__ A shared[kThreads / 32];
  const T* xr = x + static_cast<int64_t>(blockIdx.x) * cols;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * cols;
  A mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const A v = Conv<T>::load(xr, j);
    mx = v > mx ? v : mx;  // NaN never wins here; it reaches the sum below
  }
  mx = block_reduce(mx, [](A a, A b) { return b > a ? b : a; }, shared);
  A sum = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) sum += exp((Conv<T>::load(xr, j) - mx) * inv_t);
  sum = block_reduce(sum, [](A a, A b) { return a + b; }, shared);
  const A inv_sum = A(1) / sum;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    Conv<T>::store(yr, j, exp((Conv<T>::load(xr, j) - mx) * inv_t) * inv_sum);
  }
}

template <typename T>
cudaError_t launch_softmax(const SoftmaxArgs& a, cudaStream_t stream) {
  softmax_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<T*>(a.y), a.cols, static_cast<typename Conv<T>::Acc>(a.inv_temperature));
  return cudaGetLastError();
}

}  // namespace

cudaError_t temperature_softmax(const SoftmaxArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.cols <= 0 || a.rows > 0x7fffffff || !(a.inv_temperature > 0)) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  switch (a.dtype) {
    case SoftmaxDType::kFloat32: return launch_softmax<float>(a, stream);
    case SoftmaxDType::kFloat16: return launch_softmax<__half>(a, stream);
    case SoftmaxDType::kBFloat16: return launch_softmax<__nv_bfloat16>(a, stream);
    case SoftmaxDType::kFloat64: return launch_softmax<double>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tgtfast
