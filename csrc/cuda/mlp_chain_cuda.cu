// See mlp_chain_cuda.h. Tiles: 64 x 64 outputs per block of 256 threads (4 x 4 per thread), K in steps of 16 through
// shared memory; plain float32 FMA.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "mlp_chain_cuda.h"
#include "philox.h"

namespace tgtfast {
namespace cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;
constexpr int kSoftmaxThreads = 256;

__device__ __forceinline__ float load_as_float(const void* p, MlpChainDType t, int64_t i) {
  return t == MlpChainDType::kBFloat16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
                                  : static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store_from_float(void* p, MlpChainDType t, int64_t i, float v) {
  if (t == MlpChainDType::kBFloat16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ float sigmoid_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float activate(float x, int act) {
  switch (act) {
    case 1: return x > 0.0f ? x : (x != x ? x : 0.0f);
    case 2: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case 3: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case 4: return x * sigmoid_(x);
    case 5: return tanhf(x);
    case 6: return sigmoid_(x);
    default: return x;
  }
}

__global__ void __launch_bounds__(kThreads) linear_kernel(MlpLayerArgs a) {
  __shared__ float xs[kTileK][kTileM + 4];
  __shared__ float ws[kTileK][kTileN + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // this thread owns rows ty*4..+3 and columns tx*4..+3 of the tile
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < a.in; k0 += kTileK) {
    // 64 x 16 elements of x and of W per step: 4 each per thread, k fastest for coalesced reads
    for (int e = tid; e < kTileM * kTileK; e += kThreads) {
      const int kk = e % kTileK, mm = e / kTileK;
      const int64_t m = m0 + mm, k = k0 + kk;
      float v = 0.0f;
      if (m < a.rows && k < a.in) {
        const int64_t i = m * a.in + k;
        v = load_as_float(a.x, a.x_dtype, i);
        if (a.noise) {
          v += a.sigma * philox::normal_at(a.seed, a.noise_base + static_cast<uint64_t>(i));
          if (a.perturbed != nullptr && blockIdx.y == 0) a.perturbed[i] = v;
        }
      }
      xs[kk][mm] = v;
      const int64_t n = n0 + mm;
      ws[kk][mm] = (n < a.outs && k < a.in) ? a.w[n * a.in + k] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float xv[4], wv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xv[i] = xs[kk][ty * 4 + i];
        wv[i] = ws[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= a.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= a.outs) continue;
      const float v = activate(acc[i][j] + (a.bias != nullptr ? a.bias[n] : 0.0f), a.act);
      a.y[m * a.outs + n] = v;
      if (a.out != nullptr) store_from_float(a.out, a.out_dtype, m * a.outs + n, v);
    }
  }
}

__device__ float block_reduce(float v, bool is_max) {
  __shared__ float part[kSoftmaxThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // part[] may still be read by a previous reduction
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = part[0];
  for (int w = 1; w < kSoftmaxThreads / 32; ++w) v = is_max ? fmaxf(v, part[w]) : v + part[w];
  return v;
}

__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_kernel(const float* x, void* out, MlpChainDType out_dtype, int64_t cols, float inv_t) {
  const float* row = x + static_cast<int64_t>(blockIdx.x) * cols;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  float mx = -FLT_MAX;
  bool nan = false;
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) {
    const float u = row[c] * inv_t;
    nan |= u != u;
    mx = fmaxf(mx, u);
  }
  mx = block_reduce(mx, true);
  const float any_nan = block_reduce(nan ? 1.0f : 0.0f, false);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) sum += expf(row[c] * inv_t - mx);
  sum = block_reduce(sum, false);
  const float inv = 1.0f / sum;
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) {
    const float v = any_nan > 0.0f ? __int_as_float(0x7fc00000) : expf(row[c] * inv_t - mx) * inv;
    store_from_float(out, out_dtype, base + c, v);
  }
}

}  // namespace

cudaError_t mlp_linear(const MlpLayerArgs& args, cudaStream_t stream) {
  if (args.x == nullptr || args.w == nullptr || args.y == nullptr || args.rows < 0 || args.in <= 0 ||
      args.outs <= 0 || args.act < 0 || args.act >= kMlpNumActs) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  const int64_t grid_m = (args.rows + kTileM - 1) / kTileM, grid_n = (args.outs + kTileN - 1) / kTileN;
  if (grid_m > 2147483647LL || grid_n > 65535) return cudaErrorInvalidValue;
  linear_kernel<<<dim3(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n)), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t mlp_softmax(const float* x, void* out, MlpChainDType out_dtype, int64_t rows, int64_t cols,
                        float inv_temperature, cudaStream_t stream) {
  if (x == nullptr || out == nullptr || rows < 0 || cols <= 0 || rows > 2147483647LL) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  softmax_kernel<<<static_cast<unsigned>(rows), kSoftmaxThreads, 0, stream>>>(x, out, out_dtype, cols,
                                                                              inv_temperature);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tgtfast
