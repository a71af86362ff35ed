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

// One K step of a block's tile from shared memory: this thread's 4 x 4 outputs (rows ty*4.., columns tx*4..)
// acc[i][j] += sum_kk a[kk][ty*4 + i] * b[kk][tx*4 + j].
__device__ __forceinline__ void tile_fma(float (&acc)[4][4], const float (&a)[kTileK][kTileM + 4],
                                         const float (&b)[kTileK][kTileN + 4], int tx, int ty) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      av[i] = a[kk][ty * 4 + i];
      bv[i] = b[kk][tx * 4 + i];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
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
    tile_fma(acc, xs, ws, tx, ty);
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
      const float z = acc[i][j] + (a.bias != nullptr ? a.bias[n] : 0.0f);
      const float v = activate(z, a.act);
      if (a.pre != nullptr) a.pre[m * a.outs + n] = z;
      a.y[m * a.outs + n] = v;
      if (a.out != nullptr) store_from_float(a.out, a.out_dtype, m * a.outs + n, v);
    }
  }
}

// act'(x) from the pre-activation x (as the CPU kernels and autograd: relu' = [x > 0], GELU's Phi(x) + x phi(x)).
__device__ __forceinline__ float activate_grad(float x, int act) {
  switch (act) {
    case 1: return x > 0.0f ? 1.0f : 0.0f;
    case 2: return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
    case 3: {
      const float t = tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x));
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 0.134145f * x * x);
    }
    case 4: {
      const float sg = sigmoid_(x);
      return sg * (1.0f + x * (1.0f - sg));
    }
    case 5: {
      const float t = tanhf(x);
      return 1.0f - t * t;
    }
    case 6: {
      const float sg = sigmoid_(x);
      return sg * (1.0f - sg);
    }
    default: return 1.0f;
  }
}

// dx[m, k] = sum_j (g[m, j] + g_extra[m, j]) act'(pre[m, j]) w[j, k]: the forward's tiling with the roles of the
// dimensions swapped (64 rows x 64 input columns per block, the layer's outputs j reduced in steps of 16).
__global__ void __launch_bounds__(kThreads) linear_bwd_kernel(MlpLayerBwdArgs a) {
  __shared__ float gs[kTileK][kTileM + 4];
  __shared__ float ws[kTileK][kTileN + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  float acc[4][4] = {};
  for (int64_t j0 = 0; j0 < a.outs; j0 += kTileK) {
    for (int e = tid; e < kTileM * kTileK; e += kThreads) {
      const int jj = e % kTileK, mm = e / kTileK;  // 16 consecutive outputs of a row: j fastest
      const int64_t m = m0 + mm, j = j0 + jj;
      float v = 0.0f;
      if (m < a.rows && j < a.outs) {
        const int64_t i = m * a.outs + j;
        const float dy = (a.g != nullptr ? a.g[i] : 0.0f) + (a.g_extra != nullptr ? a.g_extra[i] : 0.0f);
        v = a.act == 0 ? dy : dy * activate_grad(a.pre[i], a.act);
      }
      gs[jj][mm] = v;
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kk = e % kTileN, jj = e / kTileN;  // 64 consecutive inputs of a weight row: k fastest
      const int64_t j = j0 + jj, k = k0 + kk;
      ws[jj][kk] = (j < a.outs && k < a.in) ? a.w[j * a.in + k] : 0.0f;
    }
    __syncthreads();
    tile_fma(acc, gs, ws, tx, ty);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= a.rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx * 4 + j;
      if (k < a.in) a.dx[m * a.in + k] = acc[i][j];
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

// One row per block: soft = softmax(act(pre) * inv_t) recomputed (written to out, then read back by the same
// thread), dot = <g_soft, soft>, out = soft * (g_soft - dot) * inv_t. A row holding NaN (or +inf) gives NaN, as the
// forward's NaN row.
__global__ void __launch_bounds__(kSoftmaxThreads) softmax_bwd_kernel(const float* pre, int act, const float* g_soft,
                                                                     float* out, int64_t cols, float inv_t) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  float mx = -FLT_MAX;
  bool nan = false;
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) {
    const float u = activate(pre[base + c], act) * inv_t;
    nan |= u != u;
    mx = fmaxf(mx, u);
  }
  mx = block_reduce(mx, true);
  const bool bad = block_reduce(nan ? 1.0f : 0.0f, false) > 0.0f || mx == INFINITY;
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) sum += expf(activate(pre[base + c], act) * inv_t - mx);
  sum = block_reduce(sum, false);
  const float inv = 1.0f / sum;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) {
    const float p = bad ? __int_as_float(0x7fc00000) : expf(activate(pre[base + c], act) * inv_t - mx) * inv;
    out[base + c] = p;
    dot += g_soft[base + c] * p;
  }
  dot = block_reduce(dot, false);
  for (int64_t c = threadIdx.x; c < cols; c += kSoftmaxThreads) {
    const float p = out[base + c];
    out[base + c] = p * (g_soft[base + c] - dot) * inv_t;
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

cudaError_t mlp_linear_bwd(const MlpLayerBwdArgs& args, cudaStream_t stream) {
  if (args.w == nullptr || args.dx == nullptr || (args.g == nullptr && args.g_extra == nullptr) ||
      (args.act != 0 && args.pre == nullptr) || args.rows < 0 || args.in <= 0 || args.outs <= 0 || args.act < 0 ||
      args.act >= kMlpNumActs) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  const int64_t grid_m = (args.rows + kTileM - 1) / kTileM, grid_n = (args.in + kTileN - 1) / kTileN;
  if (grid_m > 2147483647LL || grid_n > 65535) return cudaErrorInvalidValue;
  linear_bwd_kernel<<<dim3(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n)), kThreads, 0, stream>>>(
      args);
  return cudaGetLastError();
}

cudaError_t mlp_softmax_bwd(const float* pre, int act, const float* g_soft, float* out, int64_t rows, int64_t cols,
                            float inv_temperature, cudaStream_t stream) {
  if (pre == nullptr || g_soft == nullptr || out == nullptr || act < 0 || act >= kMlpNumActs || rows < 0 ||
      cols <= 0 || rows > 2147483647LL) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  softmax_bwd_kernel<<<static_cast<unsigned>(rows), kSoftmaxThreads, 0, stream>>>(pre, act, g_soft, out, cols,
                                                                                  inv_temperature);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tgtfast
