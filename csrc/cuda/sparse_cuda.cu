// The sparse teacher's coarse student logits and their gradient: CUDA kernels on raw pointers (see sparse_cuda.h for
// the contract).
//
// Design. A group of G threads owns one row: G = 32 (a warp, several rows per 256-thread block) for short rows,
// G = 256 or 1024 (one block per row) for long ones; the row machinery (16-byte vector loads after a scalar head,
// online max / sum-exp, group reductions) is ptloss_cuda_rows.cuh.
//
// Forward: one read of the row. The group marks the kept classes in a bitmap in shared memory (one bit per class,
// set with shared atomicOr while the kept logits are gathered into coarse[n, :k]), then walks the row and folds the
// classes whose bit is clear into an online (max, sum of exp): the tail is a log-sum-exp over the rest, exact to
// float32 rounding however little mass the rest holds (total minus kept would cancel when the kept classes hold
// almost everything, and underflow when the rest lies more than ~87 below them). The bitmap covers 256 classes per
// thread of the group (262144 for a 1024-thread row, 32 KiB); longer rows are walked in segments of that many
// classes, each with its own bitmap (the indices are scanned once per segment). A kept NaN is not marked, so it stays
// in the rest and makes the tail NaN, and a NaN tail makes the whole coarse row NaN; +inf among the rest is counted
// apart (it would turn the running sum into inf - inf) and makes the tail +inf.
//
// Backward: one read of the row and one write of the gradient. The group writes scale grad_tail exp(u - tail) over
// the whole row (streaming stores; zeros without reading the row where the tail is -inf or grad_tail is 0),
// synchronises, then writes scale grad_coarse[n, j] over the k kept classes: the barrier orders the two writes of a
// kept class within the group.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ptloss_cuda_rows.cuh"
#include "sparse_cuda.h"

namespace tgtfast {
namespace cuda {
namespace {

using namespace ptloss_rows;  // NOLINT: the row machinery shared with the PTLoss kernel

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kSubBlock = 256;  // block size of the warp-per-row kernels
constexpr int kWordsPerThread = 8;  // bitmap words per thread of a group: 256 classes

struct KernelArgs {
  const void* student;
  const int64_t* indices;
  const bool* valid;
  float* coarse;
  const float* grad_coarse;
  void* grad;
  int64_t rows;
  int V;
  int k;
  float scale;
  bool vec;  // the row pointers (student, grad) share their address modulo 16: 16-byte chunks after a common head
};

template <int G>
constexpr int block_threads() {
  return G <= 32 ? kSubBlock : G;
}

// Orders the shared and global memory accesses of the group: a warp (G <= 32) or the whole block.
template <int G>
__device__ __forceinline__ void group_sync() {
  if constexpr (G > 32) {
    __syncthreads();
  } else {
    __syncwarp(group_mask<G>());
  }
}

// Elements of the row's unaligned head (scalar loads until the row pointer is 16-byte aligned), 0 without vectors.
template <typename T>
__device__ __forceinline__ int row_head(const T* row, int K, bool vec) {
  if (!vec) return 0;
  const unsigned int mis = static_cast<unsigned int>(reinterpret_cast<uintptr_t>(row) & 15u);
  return min(static_cast<int>(((16u - mis) & 15u) / sizeof(T)), K);
}

// Folds the W classes [c, c + W) of a segment whose bit in `bm` is clear into (m, s), s = sum exp(u - m); +inf sets
// `pinf` instead (kept out of m). W <= 8, so the bits come from at most two neighbouring words.
template <typename T, int W>
__device__ __forceinline__ void add_rest(float& m, float& s, bool& pinf, const Pack<T, W>& x, int c,
                                         const unsigned int* bm, float scale) {
  const int w = c >> 5;
  const unsigned long long pair =
      bm[w] | (W > 1 && ((c + W - 1) >> 5) != w ? static_cast<unsigned long long>(bm[w + 1]) << 32 : 0ull);
  const unsigned int bits = static_cast<unsigned int>(pair >> (c & 31));
  float u[W];
  float cm = -INFINITY;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    float v = x.get(i) * scale;
    if ((bits >> i) & 1u) {
      v = -INFINITY;  // kept
    } else if (v == INFINITY) {
      pinf = true;
      v = -INFINITY;
    }
    u[i] = v;
    cm = fmaxf(cm, v);  // skips NaN; exp2(NaN) below keeps it in s
  }
  if (cm > m) {
    s *= exp2f((m - cm) * kLog2e);
    m = cm;
  }
  const float b = safe_base(m);
#pragma unroll
  for (int i = 0; i < W; ++i) s += exp2f((u[i] - b) * kLog2e);
}

template <typename T, int G>
__global__ void __launch_bounds__(block_threads<G>(), G > 256 ? 1 : 2) sparse_fwd_kernel(const KernelArgs a) {
  constexpr int kGroups = block_threads<G>() / G;
  constexpr int kVec = Elem<T>::kVec;
  constexpr int kWords = G * kWordsPerThread;
  constexpr int kSeg = kWords * 32;  // classes per bitmap segment
  __shared__ unsigned int bitmaps[kGroups][kWords];
  __shared__ ReduceSmem red;

  const int lane = static_cast<int>(threadIdx.x) % G;
  const int group = static_cast<int>(threadIdx.x) / G;
  unsigned int* bm = bitmaps[group];
  const int K = a.V, k = a.k;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + group; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kGroups) {
    const T* s_row = static_cast<const T*>(a.student) + row * static_cast<int64_t>(K);
    const int64_t* kept = a.indices + row * static_cast<int64_t>(k);
    float* out = a.coarse + row * static_cast<int64_t>(k + 1);
    if (a.valid != nullptr && !a.valid[row]) {  // ignored row: zeros, inputs never read
      for (int j = lane; j <= k; j += G) out[j] = 0.f;
      continue;
    }
    const int head = row_head(s_row, K, a.vec);  // a segment starts 16-byte aligned relative to the row

    float m = -INFINITY, s = 0.f;  // the rest's max and sum of exp(u - m)
    bool pinf = false;
    for (int seg0 = 0; seg0 < K; seg0 += kSeg) {
      const int len = min(kSeg, K - seg0);
      for (int w = lane; w < (len + 31) / 32; w += G) bm[w] = 0u;
      group_sync<G>();
      // Gather the kept logits of this segment and mark them (a NaN stays unmarked: it belongs to the tail too).
      for (int j = lane; j < k; j += G) {
        const int64_t c = kept[j] - seg0;
        if (c < 0 || c >= len) continue;
        const float u = load_pack<T, 1, Load::kKeep>(s_row + kept[j]).get(0) * a.scale;
        out[j] = u;
        if (!isnan(u)) atomicOr(&bm[c >> 5], 1u << (c & 31));
      }
      group_sync<G>();
      const T* seg = s_row + seg0;
      for_each_chunk<kVec, G>(len, min(head, len), a.vec, lane, [&](auto w, int j) {
        constexpr int W = decltype(w)::value;
        add_rest<T, W>(m, s, pinf, load_pack<T, W, Load::kLast>(seg + j), j, bm, a.scale);
      });
      group_sync<G>();  // the bitmap is cleared for the next segment
    }
    // (max, sum) pairs merged across the group: the rest's, and (0, 1) / (-inf, 0) for a +inf seen or not.
    float st[4] = {m, s, pinf ? 0.f : -INFINITY, pinf ? 1.f : 0.f};
    group_reduce<G, true>(st, kLog2e, red);
    const float tail = isnan(st[1]) ? st[1] : (st[3] > 0.f ? INFINITY : st[0] + logf(st[1]));  // -inf + log 0
    if (lane == 0) out[k] = tail;
    if (isnan(tail)) {  // a NaN anywhere in the row: the whole row (each lane rewrites the entries it gathered)
      for (int j = lane; j < k; j += G) out[j] = tail;
    }
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(block_threads<G>(), G > 256 ? 1 : 2) sparse_bwd_kernel(const KernelArgs a) {
  constexpr int kGroups = block_threads<G>() / G;
  constexpr int kVec = Elem<T>::kVec;
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int group = static_cast<int>(threadIdx.x) / G;
  const int K = a.V, k = a.k;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + group; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t off = row * static_cast<int64_t>(K);
    const T* s_row = static_cast<const T*>(a.student) + off;
    T* g_row = static_cast<T*>(a.grad) + off;
    const int head = row_head(s_row, K, a.vec);
    const bool live = a.valid == nullptr || a.valid[row];
    const float* gc = a.grad_coarse + row * static_cast<int64_t>(k + 1);
    float tail = -INFINITY, factor = 0.f;
    if (live) {
      tail = a.coarse[row * static_cast<int64_t>(k + 1) + k];
      factor = gc[k] * a.scale;
    }
    const bool dead = tail == -INFINITY || factor == 0.f;  // no tail, no gradient into it, ignored: zeros, no read
    for_each_chunk<kVec, G>(K, head, a.vec, lane, [&](auto w, int j) {
      constexpr int W = decltype(w)::value;
      Pack<T, W> g;
      if (dead) {
#pragma unroll
        for (int i = 0; i < Pack<T, W>::kWords; ++i) g.w[i] = 0u;  // +0.0 in every dtype
      } else {
        const Pack<T, W> x = load_pack<T, W, Load::kLast>(s_row + j);
#pragma unroll
        for (int i = 0; i < W; ++i) g.set(i, factor * exp2f((x.get(i) * a.scale - tail) * kLog2e));
      }
      store_pack<T, W>(g_row + j, g);
    });
    if (!live) continue;
    group_sync<G>();  // the dense part of the row is written before its kept classes
    const int64_t* kept = a.indices + row * static_cast<int64_t>(k);
    for (int j = lane; j < k; j += G) {
      Pack<T, 1> g;
      g.set(0, gc[j] * a.scale);
      store_pack<T, 1>(g_row + kept[j], g);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: configuration and dispatch.

template <typename T, int G, bool kForward>
cudaError_t launch(const KernelArgs& a, cudaStream_t stream) {
  constexpr int64_t kGroups = block_threads<G>() / G;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // the kernels stride over the remaining rows
  const auto blocks = static_cast<unsigned int>(std::min<int64_t>((a.rows + kGroups - 1) / kGroups, kMaxBlocks));
  if constexpr (kForward) {
    sparse_fwd_kernel<T, G><<<blocks, block_threads<G>(), 0, stream>>>(a);
  } else {
    sparse_bwd_kernel<T, G><<<blocks, block_threads<G>(), 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// Threads per row: a warp up to 256 16-byte chunks, a 256-thread block up to 32 KiB of row, 1024 threads beyond.
template <typename T, bool kForward>
cudaError_t dispatch_type(const KernelArgs& a, cudaStream_t stream) {
  const int64_t chunks = (a.V + Elem<T>::kVec - 1) / Elem<T>::kVec;
  if (chunks <= 256) return launch<T, 32, kForward>(a, stream);
  if (a.V * static_cast<int64_t>(sizeof(T)) <= 32 * 1024) return launch<T, 256, kForward>(a, stream);
  return launch<T, 1024, kForward>(a, stream);
}

template <bool kForward>
cudaError_t run(const SparseCoarseArgs& args, cudaStream_t stream) {
  const int64_t N = args.rows, V = args.classes, k = args.kept;
  if (N < 0 || V < 0 || V > (int64_t{1} << 30) || k < 0 || k > V) return cudaErrorInvalidValue;
  if (!std::isfinite(args.scale)) return cudaErrorInvalidValue;
  if (N == 0 || (!kForward && V == 0)) return cudaSuccess;
  if (args.coarse == nullptr || (V > 0 && args.student == nullptr) || (k > 0 && args.indices == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (!kForward && (args.grad_coarse == nullptr || args.grad_student == nullptr)) return cudaErrorInvalidValue;

  // The backward walks 16-byte vectors only where the student and its gradient share their address modulo 16.
  const uintptr_t apart = reinterpret_cast<uintptr_t>(args.student) ^ reinterpret_cast<uintptr_t>(args.grad_student);
  const KernelArgs a{args.student, args.indices, args.valid, args.coarse, args.grad_coarse, args.grad_student, N,
                     static_cast<int>(V), static_cast<int>(k), static_cast<float>(args.scale),
                     kForward || (apart & 15u) == 0};
  switch (args.dtype) {
    case DType::kFloat32: return dispatch_type<float, kForward>(a, stream);
    case DType::kFloat16: return dispatch_type<__half, kForward>(a, stream);
    case DType::kBFloat16: return dispatch_type<__nv_bfloat16, kForward>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t sparse_coarse_fwd(const SparseCoarseArgs& args, cudaStream_t stream) { return run<true>(args, stream); }

cudaError_t sparse_coarse_bwd(const SparseCoarseArgs& args, cudaStream_t stream) { return run<false>(args, stream); }

}  // namespace cuda
}  // namespace tgtfast
