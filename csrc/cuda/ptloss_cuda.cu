// Fused PTLoss forward + gradients: CUDA kernels on raw pointers (see ptloss_cuda.h for the contract).
//
// Design. A group of G threads owns one row: G = 4 or 32 (sub-warp / warp groups, several rows per
// 256-thread block, shuffle-only reductions) for short rows, G = 256 or 1024 (one block per row, warp
// shuffles + one shared-memory step) for long rows. Three sweeps over the row, the later two re-reading it
// from L2:
//   1. online (max, sum of exp) of the student logits and, for a logit teacher, of the teacher logits
//   2. loss = sum_j [p_j (log p_j - log q_j) + p_j h_j], and the row sums A = sum_j a_j q_j (student
//      gradient) and G = sum_j p0_j g_j (teacher gradient), h and h' by Horner in one sweep
//   3. the gradients, written once (skipped when neither is requested)
// Loads are 16 bytes wide (4 floats or 8 halves) when the row pointers allow it (a scalar head peels
// elements until the row is 16-byte aligned, a scalar tail finishes it); the last sweep loads with
// evict-first and stores the gradients with streaming stores, so the outputs do not push the inputs out of
// L2 while other rows still need them. Everything accumulates in float32.
//
// Numerics. log q_j = (s_j - max s) / T - log S is formed from the raw logits (s_j - max s is exact for
// nearby values), never as exp then log, so logits of +-1e4 give finite results; q_j = exp2((s_j - max s)
// log2(e) / T - log2 S). 1 - q_j is -expm1(log q_j) where q_j >= 1/2 (no cancellation). Terms with p_j == 0
// contribute 0 (xlogy), including the teacher gradient of a logit whose probability underflows; a subnormal p_j
// contributes p_j log p_j with log p_j taken exactly (log_prob), never -inf. NaN in a
// row reaches the row's sum of exponentials (fmaxf skips NaN but exp2(NaN) does not) and so the loss.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ptloss_cuda.h"
#include "ptloss_cuda_rows.cuh"

namespace tgtfast {
namespace cuda {
namespace {

using namespace ptloss_rows;  // NOLINT: the row machinery of this kernel

constexpr double kLog2e = 1.4426950408889634;  // log2(e)
constexpr int kSubBlock = 256;  // block size of the sub-warp / warp-per-row kernels

enum class CoefMode : int { kNone = 0, kShared = 1, kPerClass = 2 };

// ------------------------------------------------------------------------------------------------
// The kernel.

struct KernelArgs {
  const void* student;
  const void* teacher;
  const float* coeffs;
  const bool* valid;
  float* loss;
  void* grad_student;
  void* grad_teacher;
  int64_t rows;
  int K;
  int M;
  float inv_t;     // 1 / T
  float k2;        // log2(e) / T
  float keep;      // 1 - delta
  float spread;    // delta / K
  float log_spread;  // log(delta / K) from double: log p where p0 = 0 and delta / K is below float range
  float gs_scale;  // grad_scale / T
  float gt_scale;  // grad_scale (1 - delta) / T for logits, grad_scale (1 - delta) for probabilities
  bool smooth;   // delta > 0
  bool vec;      // all row pointers share their address modulo 16: 16-byte chunks after a common head
};

// log x for a probability x >= 0 that stays right when x is a float32 subnormal (a teacher probability or
// delta / K below 2^-126) even in a build that flushes denormals (-ftz=true, --use_fast_math: logf(subnormal) is
// -inf there, and p log p would become -inf): a subnormal is m 2^-149 with its integer bits m, so its log is
// log(float(m)) - 149 log 2 (the integer conversion is never flushed).
__device__ __forceinline__ float log_prob(float x) {
  const int bits = __float_as_int(x);
  return bits > 0 && bits < 0x00800000 ? logf(static_cast<float>(bits)) - 103.27892990343184f : logf(x);
}

// Per-row constants of sweeps 2 and 3.
struct RowStats {
  float ms, ln_ss, log2_ss;  // student max, log S, log2 S
  float mt, ln_st, log2_st;  // teacher (logits only)
};

// What sweeps 2 and 3 need about element j.
struct ElemVals {
  float q, lq, p0, p, lp, h, hp;
};

template <bool kLogits, CoefMode CM>
__device__ __forceinline__ ElemVals element(float s, float t, int j, const KernelArgs& a, const RowStats& r,
                                            const float* eta_shared, bool need_lp) {
  ElemVals e;
  const float ds = s - r.ms;
  e.lq = fmaf(ds, a.inv_t, -r.ln_ss);
  e.q = exp2f(fmaf(ds, a.k2, -r.log2_ss));
  float lp0 = 0.f;
  if constexpr (kLogits) {
    const float dt = t - r.mt;
    lp0 = fmaf(dt, a.inv_t, -r.ln_st);
    e.p0 = exp2f(fmaf(dt, a.k2, -r.log2_st));
  } else {
    e.p0 = t;
  }
  if (a.smooth) {
    e.p = fmaf(a.keep, e.p0, a.spread);
    e.lp = need_lp ? (e.p == 0.f ? a.log_spread : log_prob(e.p)) : 0.f;
  } else {
    e.p = e.p0;
    if constexpr (kLogits) {
      e.lp = lp0;
    } else {
      e.lp = need_lp ? log_prob(e.p0) : 0.f;
    }
  }
  if constexpr (CM == CoefMode::kNone) {
    e.h = 0.f;
    e.hp = 0.f;
  } else {
    const float x = e.q < 0.5f ? 1.f - e.q : -expm1f(e.lq);  // 1 - q_j without cancellation
    // Horner on Q(x) = sum_{m=1..M} eta_m x^(m-1) and its derivative; h = x Q, h' = Q + x Q'.
    auto coef = [&](int m) {
      if constexpr (CM == CoefMode::kShared) {
        return eta_shared[m];
      } else {
        return __ldg(a.coeffs + static_cast<int64_t>(m) * a.K + j);
      }
    };
    float b = coef(a.M - 1), db = 0.f;
    for (int m = a.M - 2; m >= 0; --m) {
      db = fmaf(db, x, b);
      b = fmaf(b, x, coef(m));
    }
    e.h = x * b;
    e.hp = fmaf(x, db, b);
  }
  return e;
}

template <typename T, int G, bool kLogits, CoefMode CM>
__global__ void __launch_bounds__(G <= 32 ? kSubBlock : G, G > 256 ? 1 : 2) ptloss_kernel(const KernelArgs a) {
  constexpr int kBlock = G <= 32 ? kSubBlock : G;
  constexpr int kGroups = kBlock / G;  // rows in flight per block
  constexpr int V = Elem<T>::kVec;

  __shared__ float eta_shared[kMaxOrders];
  __shared__ ReduceSmem red;
  if constexpr (CM == CoefMode::kShared) {
    for (int i = static_cast<int>(threadIdx.x); i < a.M; i += kBlock) eta_shared[i] = a.coeffs[i];
    __syncthreads();
  }

  const int lane = static_cast<int>(threadIdx.x) % G;
  const int group = static_cast<int>(threadIdx.x) / G;
  const int K = a.K;
  const bool need_gs = a.grad_student != nullptr;
  const bool need_gt = a.grad_teacher != nullptr;
  const bool need_A = need_gs && CM != CoefMode::kNone;
  const bool need_G = need_gt && kLogits;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + group; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t off = row * static_cast<int64_t>(K);
    const T* s_row = static_cast<const T*>(a.student) + off;
    const T* t_row = static_cast<const T*>(a.teacher) + off;
    T* gs_row = need_gs ? static_cast<T*>(a.grad_student) + off : nullptr;
    T* gt_row = need_gt ? static_cast<T*>(a.grad_teacher) + off : nullptr;
    int head = 0;
    if (a.vec) {
      const unsigned int mis = static_cast<unsigned int>(reinterpret_cast<uintptr_t>(s_row) & 15u);
      head = min(static_cast<int>(((16u - mis) & 15u) / sizeof(T)), K);
    }

    if (a.valid != nullptr && !a.valid[row]) {  // ignored row: zeros, inputs never read
      if (need_gs || need_gt) {
        for_each_chunk<V, G>(K, head, a.vec, lane, [&](auto w, int j) {
          constexpr int W = decltype(w)::value;
          Pack<T, W> z;
#pragma unroll
          for (int i = 0; i < Pack<T, W>::kWords; ++i) z.w[i] = 0u;  // +0.0 in every dtype
          if (need_gs) store_pack<T, W>(gs_row + j, z);
          if (need_gt) store_pack<T, W>(gt_row + j, z);
        });
      }
      if (lane == 0) a.loss[row] = 0.f;
      continue;
    }

    // Sweep 1: online max and sum of exponentials.
    float st[4] = {-INFINITY, 0.f, -INFINITY, 0.f};  // student (max, sum), teacher (max, sum)
    for_each_chunk<V, G>(K, head, a.vec, lane, [&](auto w, int j) {
      constexpr int W = decltype(w)::value;
      online_add<T, W>(st[0], st[1], load_pack<T, W, Load::kKeep>(s_row + j), a.k2);
      if constexpr (kLogits) online_add<T, W>(st[2], st[3], load_pack<T, W, Load::kKeep>(t_row + j), a.k2);
    });
    RowStats r;
    if constexpr (kLogits) {
      group_reduce<G, true>(st, a.k2, red);
      r.mt = st[2];
      r.ln_st = logf(st[3]);
      r.log2_st = log2f(st[3]);
    } else {
      float st2[2] = {st[0], st[1]};
      group_reduce<G, true>(st2, a.k2, red);
      st[0] = st2[0];
      st[1] = st2[1];
      r.mt = 0.f;
      r.ln_st = 0.f;
      r.log2_st = 0.f;
    }
    r.ms = st[0];
    r.ln_ss = logf(st[1]);
    r.log2_ss = log2f(st[1]);

    // Sweep 2: loss, A = sum_j a_j q_j, and Gt = sum_j p0_j g_j (teacher logits) or sum_j p_j (probabilities).
    float acc[3] = {0.f, 0.f, 0.f};
    for_each_chunk<V, G>(K, head, a.vec, lane, [&](auto w, int j) {
      constexpr int W = decltype(w)::value;
      const Pack<T, W> x = load_pack<T, W, Load::kKeep>(s_row + j);
      const Pack<T, W> y = load_pack<T, W, Load::kKeep>(t_row + j);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const ElemVals e = element<kLogits, CM>(x.get(i), y.get(i), j + i, a, r, eta_shared, true);
        const float kl = e.p == 0.f ? 0.f : e.p * (e.lp - e.lq);  // xlogy: p_j == 0 adds nothing
        acc[0] += fmaf(e.p, e.h, kl);
        if (need_A) acc[1] = fmaf(-e.p * e.hp, e.q, acc[1]);
        if constexpr (kLogits) {
          if (need_G && e.p0 != 0.f) acc[2] = fmaf(e.p0, e.lp - e.lq + e.h, acc[2]);
        } else {
          acc[2] += e.p;  // sum_j p_j: given probabilities need not sum to exactly 1
        }
      }
    });
    group_reduce<G, false>(acc, 0.f, red);
    if (lane == 0) a.loss[row] = acc[0];
    if (!need_gs && !need_gt) continue;

    // Sweep 3: gradients.
    const float sum_aq = acc[1], sum_pg = acc[2], sum_p = acc[2];
    for_each_chunk<V, G>(K, head, a.vec, lane, [&](auto w, int j) {
      constexpr int W = decltype(w)::value;
      const Pack<T, W> x = load_pack<T, W, Load::kLast>(s_row + j);
      const Pack<T, W> y = load_pack<T, W, Load::kLast>(t_row + j);
      Pack<T, W> gs, gt;
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const ElemVals e = element<kLogits, CM>(x.get(i), y.get(i), j + i, a, r, eta_shared, need_gt);
        const float aj = -e.p * e.hp;
        // d/ds of -sum_j p_j log q_j is q sum_j p_j - p: q - p for a teacher softmax, as written for probabilities
        const float base = kLogits ? e.q - e.p : fmaf(e.q, sum_p, -e.p);
        gs.set(i, fmaf(e.q, aj - sum_aq, base) * a.gs_scale);
        const float g = e.lp - e.lq + e.h;
        if constexpr (kLogits) {
          gt.set(i, e.p0 == 0.f ? 0.f : a.gt_scale * e.p0 * (g - sum_pg));
        } else {
          gt.set(i, a.gt_scale * (g + 1.f));
        }
      }
      if (need_gs) store_pack<T, W>(gs_row + j, gs);
      if (need_gt) store_pack<T, W>(gt_row + j, gt);
    });
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: configuration and dispatch.

template <typename T, int G, bool kLogits, CoefMode CM>
cudaError_t launch(const KernelArgs& a, cudaStream_t stream) {
  constexpr int kBlock = G <= 32 ? kSubBlock : G;
  constexpr int64_t kGroups = kBlock / G;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // the kernel strides over the remaining rows
  const int64_t blocks = std::min<int64_t>((a.rows + kGroups - 1) / kGroups, kMaxBlocks);
  ptloss_kernel<T, G, kLogits, CM><<<static_cast<unsigned int>(blocks), kBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int G>
cudaError_t dispatch_modes(const KernelArgs& a, bool logits, CoefMode cm, cudaStream_t stream) {
  if (logits) {
    switch (cm) {
      case CoefMode::kNone: return launch<T, G, true, CoefMode::kNone>(a, stream);
      case CoefMode::kShared: return launch<T, G, true, CoefMode::kShared>(a, stream);
      case CoefMode::kPerClass: return launch<T, G, true, CoefMode::kPerClass>(a, stream);
    }
  } else {
    switch (cm) {
      case CoefMode::kNone: return launch<T, G, false, CoefMode::kNone>(a, stream);
      case CoefMode::kShared: return launch<T, G, false, CoefMode::kShared>(a, stream);
      case CoefMode::kPerClass: return launch<T, G, false, CoefMode::kPerClass>(a, stream);
    }
  }
  return cudaErrorInvalidValue;
}

// Threads per row: enough for about 2-8 16-byte chunks per thread; long rows take a whole 1024-thread
// block (one block per SM), which also bounds the bytes of rows in flight that sweeps 2 and 3 re-read
// from L2.
template <typename T>
int threads_per_row(int64_t K) {
  constexpr int64_t V = Elem<T>::kVec;
  const int64_t chunks = (K + V - 1) / V;
  const int64_t row_bytes = 2 * K * static_cast<int64_t>(sizeof(T));  // student + teacher
  if (chunks <= 8) return 4;
  if (chunks <= 256) return 32;
  if (row_bytes <= 32 * 1024) return 256;
  return 1024;
}

template <typename T>
cudaError_t dispatch_type(const KernelArgs& a, bool logits, CoefMode cm, cudaStream_t stream) {
  switch (threads_per_row<T>(a.K)) {
    case 4: return dispatch_modes<T, 4>(a, logits, cm, stream);
    case 32: return dispatch_modes<T, 32>(a, logits, cm, stream);
    case 256: return dispatch_modes<T, 256>(a, logits, cm, stream);
    default: return dispatch_modes<T, 1024>(a, logits, cm, stream);
  }
}

bool same_alignment(const void* const* ptrs, int n) {
  int ref = -1;
  for (int i = 0; i < n; ++i) {
    if (ptrs[i] == nullptr) continue;
    const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(ptrs[i]) & 15u);
    if (ref < 0) ref = mis;
    if (mis != ref) return false;
  }
  return true;
}

}  // namespace

cudaError_t ptloss_fwd(const PTLossArgs& args, cudaStream_t stream) {
  const int64_t N = args.rows, K = args.classes, M = args.orders;
  if (N < 0 || K < 0 || K > (int64_t{1} << 30) || M < 0 || M > kMaxOrders) return cudaErrorInvalidValue;
  if (!(args.inv_temperature > 0.0) || !std::isfinite(args.inv_temperature)) return cudaErrorInvalidValue;
  if (!(args.label_smoothing >= 0.0 && args.label_smoothing < 1.0)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  if (args.loss == nullptr) return cudaErrorInvalidValue;
  if (K == 0) return cudaMemsetAsync(args.loss, 0, static_cast<size_t>(N) * sizeof(float), stream);  // empty sums
  if (args.student == nullptr || args.teacher == nullptr || (M > 0 && args.coeffs == nullptr)) {
    return cudaErrorInvalidValue;
  }

  KernelArgs a;
  a.student = args.student;
  a.teacher = args.teacher;
  a.coeffs = args.coeffs;
  a.valid = args.valid;
  a.loss = args.loss;
  a.grad_student = args.grad_student;
  a.grad_teacher = args.grad_teacher;
  a.rows = N;
  a.K = static_cast<int>(K);
  a.M = static_cast<int>(M);
  a.inv_t = static_cast<float>(args.inv_temperature);
  a.k2 = static_cast<float>(args.inv_temperature * kLog2e);
  a.keep = static_cast<float>(1.0 - args.label_smoothing);
  a.spread = static_cast<float>(args.label_smoothing / static_cast<double>(K));
  a.log_spread = static_cast<float>(std::log(args.label_smoothing / static_cast<double>(K)));
  a.smooth = args.label_smoothing > 0.0;
  a.gs_scale = static_cast<float>(args.grad_scale * args.inv_temperature);
  a.gt_scale = static_cast<float>(args.grad_scale * (1.0 - args.label_smoothing) *
                                  (args.teacher_is_logits ? args.inv_temperature : 1.0));
  const void* ptrs[4] = {args.student, args.teacher, args.grad_student, args.grad_teacher};
  a.vec = same_alignment(ptrs, 4);

  const CoefMode cm = M == 0 ? CoefMode::kNone : (args.coeffs_per_class ? CoefMode::kPerClass : CoefMode::kShared);
  switch (args.dtype) {
    case DType::kFloat32: return dispatch_type<float>(a, args.teacher_is_logits, cm, stream);
    case DType::kFloat16: return dispatch_type<__half>(a, args.teacher_is_logits, cm, stream);
    case DType::kBFloat16: return dispatch_type<__nv_bfloat16>(a, args.teacher_is_logits, cm, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tgtfast
