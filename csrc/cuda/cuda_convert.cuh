// Loads and stores of the CUDA kernels' element types with their accumulation type (float for half precision,
// double for double): shared by the kernels of every stem that take any floating dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace tgtfast {
namespace cuda {

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  using Acc = float;
  __device__ static float load(const float* p, int64_t i) { return p[i]; }
  __device__ static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Conv<double> {
  using Acc = double;
  __device__ static double load(const double* p, int64_t i) { return p[i]; }
  __device__ static void store(double* p, int64_t i, double v) { p[i] = v; }
};
template <>
struct Conv<__half> {
  using Acc = float;
  __device__ static float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  __device__ static void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  __device__ static void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

}  // namespace cuda
}  // namespace tgtfast
