// The row machinery of the PTLoss CUDA kernel (ptloss_cuda.cu): a group of G threads walks one row of K
// elements in 16-byte vector chunks (element types kept as raw bits, cache hints on loads and stores), keeps
// online softmax statistics, and reduces within the group by warp shuffles (and shared memory for whole-block
// groups). Nothing here knows the loss; the kernel's math is in ptloss_cuda.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace tgtfast {
namespace cuda {
namespace ptloss_rows {

enum class Load : int { kKeep = 0, kLast = 1 };  // cache policy: keep in cache / last use (evict first)

template <int N>
struct IntC {
  static constexpr int value = N;
};

// ------------------------------------------------------------------------------------------------
// Element types: float32, float16, bfloat16 held as raw bits; converted to float where used.

template <typename T>
struct Elem {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

template <typename T>
__device__ __forceinline__ float bits16_to_float(unsigned short b);
template <>
__device__ __forceinline__ float bits16_to_float<__half>(unsigned short b) {
  return __half2float(__ushort_as_half(b));
}
template <>
__device__ __forceinline__ float bits16_to_float<__nv_bfloat16>(unsigned short b) {
  return __uint_as_float(static_cast<unsigned int>(b) << 16);
}

template <typename T>
__device__ __forceinline__ unsigned short float_to_bits16(float f);
template <>
__device__ __forceinline__ unsigned short float_to_bits16<__half>(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
template <>
__device__ __forceinline__ unsigned short float_to_bits16<__nv_bfloat16>(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// W consecutive elements of T kept as raw 32-bit words (one 16-byte vector, or one element in the low bits
// of w[0]) and converted element by element: fewer live registers than W floats per operand.
template <typename T, int W>
struct Pack {
  static_assert(W == 1 || W * sizeof(T) == 16, "one element or one 16-byte vector");
  static constexpr int kWords = W == 1 ? 1 : 4;
  unsigned int w[kWords];

  __device__ __forceinline__ float get(int i) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[i]);
    } else {
      return bits16_to_float<T>(static_cast<unsigned short>(w[i >> 1] >> (16 * (i & 1))));
    }
  }
  // Elements must be set in increasing i (the odd half of a word is or-ed into the even one).
  __device__ __forceinline__ void set(int i, float v) {
    if constexpr (sizeof(T) == 4) {
      w[i] = __float_as_uint(v);
    } else {
      const unsigned int b = float_to_bits16<T>(v);
      if (i & 1) {
        w[i >> 1] |= b << 16;
      } else {
        w[i >> 1] = b;
      }
    }
  }
};

// Loads W consecutive elements starting at p (W == 1, or W == kVec with p 16-byte aligned).
template <typename T, int W, Load L>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p) {
  Pack<T, W> r;
  if constexpr (W == 1) {
    if constexpr (sizeof(T) == 4) {
      const unsigned int* u = reinterpret_cast<const unsigned int*>(p);
      r.w[0] = L == Load::kKeep ? __ldg(u) : __ldcs(u);
    } else {
      const unsigned short* u = reinterpret_cast<const unsigned short*>(p);
      r.w[0] = L == Load::kKeep ? __ldg(u) : __ldcs(u);
    }
  } else {
    const uint4* v = reinterpret_cast<const uint4*>(p);
    const uint4 raw = L == Load::kKeep ? __ldg(v) : __ldcs(v);
    r.w[0] = raw.x;
    r.w[1] = raw.y;
    r.w[2] = raw.z;
    r.w[3] = raw.w;
  }
  return r;
}

// Stores W elements with streaming (evict-first) stores.
template <typename T, int W>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, W>& v) {
  if constexpr (W == 1) {
    if constexpr (sizeof(T) == 4) {
      __stcs(reinterpret_cast<unsigned int*>(p), v.w[0]);
    } else {
      __stcs(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(v.w[0]));
    }
  } else {
    __stcs(reinterpret_cast<uint4*>(p), make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]));
  }
}

// Calls body(IntC<W>{}, j) for the chunks [j, j + W) of a row of K elements that this lane owns: W == V
// for 16-byte aligned chunks (when vec is true), W == 1 for the unaligned head and the tail.
template <int V, int G, typename Body>
__device__ __forceinline__ void for_each_chunk(int K, int head, bool vec, int lane, Body&& body) {
  if (vec) {
    for (int j = lane; j < head; j += G) body(IntC<1>{}, j);
    const int body_end = head + ((K - head) / V) * V;
    for (int j = head + lane * V; j < body_end; j += G * V) body(IntC<V>{}, j);
    for (int j = body_end + lane; j < K; j += G) body(IntC<1>{}, j);
  } else {
    for (int j = lane; j < K; j += G) body(IntC<1>{}, j);
  }
}

// ------------------------------------------------------------------------------------------------
// Online softmax statistics: running max m and sum s of exp((x - m) / T), with k2 = log2(e) / T.

// exp2 argument base: a max of -inf (nothing seen yet, or only -inf) is replaced by 0 so that
// exp2((-inf - base) k2) = 0 instead of NaN.
static __device__ __forceinline__ float safe_base(float m) { return m == -INFINITY ? 0.f : m; }

template <typename T, int W>
__device__ __forceinline__ void online_add(float& m, float& s, const Pack<T, W>& x, float k2) {
  float cm = x.get(0);
#pragma unroll
  for (int i = 1; i < W; ++i) cm = fmaxf(cm, x.get(i));  // fmaxf skips NaN; exp2(NaN) below keeps it in s
  if (cm > m) {
    s *= exp2f((m - cm) * k2);
    m = cm;
  }
  const float b = safe_base(m);
#pragma unroll
  for (int i = 0; i < W; ++i) s += exp2f((x.get(i) - b) * k2);
}

static __device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2, float k2) {
  const float mm = fmaxf(m, m2);
  const float b = safe_base(mm);
  s = s * exp2f((m - b) * k2) + s2 * exp2f((m2 - b) * k2);  // commutative: every lane gets the same bits
  m = mm;
}

// ------------------------------------------------------------------------------------------------
// Group reductions. G <= 32: the group is G aligned lanes of one warp (butterfly shuffles within the
// group's lanes). G > 32: the group is the whole block (G == blockDim.x): butterfly within each warp, then
// warp 0 combines the per-warp partials from shared memory and broadcasts the result. Every thread of the
// group ends with identical bits.

template <int G>
__device__ __forceinline__ unsigned int group_mask() {
  if constexpr (G >= 32) {
    return 0xffffffffu;
  } else {
    const unsigned int lane = threadIdx.x & 31u;
    return ((1u << G) - 1u) << (lane & ~static_cast<unsigned int>(G - 1));
  }
}

template <int W, int N>
__device__ __forceinline__ void warp_sum(float (&v)[N], unsigned int mask) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(mask, v[i], off);
  }
}

// v holds N / 2 (max, sum) pairs.
template <int W, int N>
__device__ __forceinline__ void warp_merge(float (&v)[N], unsigned int mask, float k2) {
#pragma unroll
  for (int off = W / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < N; i += 2) {
      const float m2 = __shfl_xor_sync(mask, v[i], off);
      const float s2 = __shfl_xor_sync(mask, v[i + 1], off);
      online_merge(v[i], v[i + 1], m2, s2, k2);
    }
  }
}

constexpr int kMaxReduce = 4;  // values per reduction (two (max, sum) pairs, or three sums)

struct ReduceSmem {
  float partial[kMaxReduce][32];
  float result[kMaxReduce];
};

// kMerge: v holds (max, sum) pairs merged with online_merge; otherwise plain sums.
template <int G, bool kMerge, int N>
__device__ __forceinline__ void group_reduce(float (&v)[N], float k2, ReduceSmem& sm) {
  static_assert(N <= kMaxReduce, "too many values");
  const unsigned int mask = group_mask<G>();
  constexpr int W = G < 32 ? G : 32;
  if constexpr (kMerge) {
    warp_merge<W>(v, mask, k2);
  } else {
    warp_sum<W>(v, mask);
  }
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int lane = static_cast<int>(threadIdx.x) & 31;
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) sm.partial[i][warp] = v[i];
    }
    __syncthreads();
    if (warp == 0) {
      // Lanes past the warp count hold the identity: sum 0, (max, sum) = (-inf, 0).
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float identity = (kMerge && (i % 2 == 0)) ? -INFINITY : 0.f;
        v[i] = lane < kWarps ? sm.partial[i][lane] : identity;
      }
      if constexpr (kMerge) {
        warp_merge<kWarps>(v, 0xffffffffu, k2);
      } else {
        warp_sum<kWarps>(v, 0xffffffffu);
      }
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) sm.result[i] = v[i];
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = sm.result[i];
    // No trailing barrier: the next reduction writes `partial` (last read by warp 0 before the barrier
    // above) and rewrites `result` only after its own first barrier, which every reader of `result` has
    // passed by then.
  }
}

}  // namespace ptloss_rows
}  // namespace cuda
}  // namespace tgtfast
