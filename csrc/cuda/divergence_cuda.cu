// Fused distillation divergences, forward + gradients: CUDA kernels on raw pointers (see divergence_cuda.h for the
// contract, docs/design.md "Divergences" for the math).
//
// Design. A group of G threads owns one row: G = 4 or 32 (sub-warp / warp groups, several rows per 256-thread
// block, shuffle-only reductions) for short rows, G = 256 or 1024 (one block per row, warp shuffles + one
// shared-memory step) for long rows. The row is walked in 16-byte chunks (4 floats or 8 halves; a scalar head
// peels elements until the row is 16-byte aligned, a scalar tail finishes it). Three sweeps:
//   1. online (max, sum of exp) of the student logits and of the teacher's (TAID: of the mixed logits)
//   2. loss = sum_j f_j and the row sums of dq and dp
//   3. the gradients a (d - x sum_j d_j), written once (skipped when neither is requested)
// Forward KL and TAID asked for the student gradient alone (the usual distillation step) merge sweeps 2 and 3: their
// sum_j dq_j = -sum_j p_j is -1, so the gradient a (q - p) and the loss come out of one sweep.
// The first sweep copies the row's chunks into shared memory as it goes (cp.async, a few rounds ahead of their
// use) and the later sweeps read them from there, so a row that fits (both inputs: 2 K sizeof(T) bytes up to the
// device's per-block limit less 1 KiB: K <= 57856 in 16-bit types and K <= 28928 in float32 on an H100, 41472 and
// 20736 on an A100) is read from memory once and its gradients written once. A longer row stages what fits and
// re-reads the rest from L2 in the later sweeps, as the PTLoss kernel does (evict-first on the last read). Staging
// costs no registers, so every kernel keeps to 64 registers (85 for the sub-warp ones) without spilling, and the
// block-per-row kernels run up to 1024 threads per SM.
// The divergence is a template parameter (a functor per divergence and, for the AB-divergence, per limit form), so
// the per-element code has no branches on it. Everything accumulates in float32.
//
// Numerics. log q_j = a_s (s_j - max s) - log S is formed from the raw logits, never as exp then log, and q_j =
// exp2(log2(e) log q_j). Terms with a factor x = 0 (x log x, p q / m, ...) are 0 whatever the other factor. NaN or
// +inf in a row reaches its sum of exponentials (fmaxf skips NaN, exp2(NaN) does not; +inf - +inf is NaN) and from
// there every element of the row. A row's loss is clamped at 0 against float32 cancellation (NaN and +inf kept).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "divergence_cuda.h"
#include "ptloss_cuda_rows.cuh"

namespace tgtfast {
namespace cuda {
namespace {

using namespace ptloss_rows;  // NOLINT: the row machinery (vector loads and stores, softmax statistics, reductions)

#include "divergence_cuda_math.cuh"  // KernelArgs, RowStats, the divergence functors (inside this namespace)

// ------------------------------------------------------------------------------------------------
// The row walk.

// Asynchronous 16-byte copies global -> shared (cp.async, sm_80+; a plain copy before).
__device__ __forceinline__ void copy16_async(uint4* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned int d = static_cast<unsigned int>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
#else
  *dst = __ldcs(static_cast<const uint4*>(src));
#endif
}
__device__ __forceinline__ void copy_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>  // waits until at most N committed groups of this thread are in flight
__device__ __forceinline__ void copy_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

template <typename T>
__device__ __forceinline__ Pack<T, Elem<T>::kVec> unstage(const uint4* p, int k) {
  const uint4 v = p[k];
  Pack<T, Elem<T>::kVec> r;
  r.w[0] = v.x;
  r.w[1] = v.y;
  r.w[2] = v.z;
  r.w[3] = v.w;
  return r;
}

// One row as a lane of its group sees it. The body of the row is the 16-byte chunks [j, j + V) at j = head + k V,
// k < (body_end - head) / V; lane walks k = lane, lane + G, ... The first `held` chunks of both inputs are staged
// in shared memory (hs, ht) by the first sweep and read from there by the later ones; the chunks past them, the
// scalar head [0, head) and the scalar tail [body_end, K) are loaded from global memory whenever walked. Without
// 16-byte vectors head = body_end = K: all scalar.
template <typename T, int G>
struct RowWalk {
  static constexpr int V = Elem<T>::kVec;
  static constexpr int kAhead = 4;  // rounds of staging copies in flight per thread
  const T* s;
  const T* t;
  uint4* hs;
  uint4* ht;
  int K, head, body_end, held, lane;

  __device__ __forceinline__ void stage(int k) const {
    copy16_async(hs + k, s + head + k * V);
    copy16_async(ht + k, t + head + k * V);
  }

  // The first sweep: stages the held chunks (kAhead rounds ahead of their use) and calls body(IntC<W>{}, j,
  // student pack, teacher pack) on every chunk of this lane, as each() does.
  template <typename Body>
  __device__ __forceinline__ void stage_each(Body&& body) const {
    const int rounds = lane < held ? (held - lane + G - 1) / G : 0;
#pragma unroll
    for (int r = 0; r < kAhead; ++r) {
      if (r < rounds) stage(r * G + lane);
      copy_commit();
    }
#pragma unroll 1
    for (int r = 0; r < rounds; ++r) {
      copy_wait<kAhead - 1>();  // round r has landed (each thread reads only the chunks it staged itself)
      const int k = r * G + lane;
      body(IntC<V>{}, head + k * V, unstage<T>(hs, k), unstage<T>(ht, k));
      if (r + kAhead < rounds) stage(k + kAhead * G);
      copy_commit();
    }
    rest<Load::kKeep>(body);
  }

  // The later sweeps; loads from global memory use policy L.
  template <Load L, typename Body>
  __device__ __forceinline__ void each(Body&& body) const {
#pragma unroll 1
    for (int k = lane; k < held; k += G) body(IntC<V>{}, head + k * V, unstage<T>(hs, k), unstage<T>(ht, k));
    rest<L>(body);
  }

  template <Load L, typename Body>
  __device__ __forceinline__ void rest(Body&& body) const {
#pragma unroll 1
    for (int j = head + (held + lane) * V; j < body_end; j += G * V) {
      body(IntC<V>{}, j, load_pack<T, V, L>(s + j), load_pack<T, V, L>(t + j));
    }
#pragma unroll 1
    for (int j = lane; j < head; j += G) body(IntC<1>{}, j, load_pack<T, 1, L>(s + j), load_pack<T, 1, L>(t + j));
#pragma unroll 1
    for (int j = body_end + lane; j < K; j += G) {
      body(IntC<1>{}, j, load_pack<T, 1, L>(s + j), load_pack<T, 1, L>(t + j));
    }
  }
};

// Online (max, sum) of the mixed logits mix_t t + mix_s s of one chunk (TAID), in units where k2 = log2(e).
template <typename T, int W>
__device__ __forceinline__ void online_add_mixed(float& m, float& sum, const Pack<T, W>& x, const Pack<T, W>& y,
                                                 const KernelArgs& a) {
  constexpr float k2 = kLog2eF;
  float cm = -INFINITY;
#pragma unroll
  for (int i = 0; i < W; ++i) cm = fmaxf(cm, teacher_value<true>(x.get(i), y.get(i), a));
  const float b = safe_base(cm);
  float cs = 0.f;
#pragma unroll
  for (int i = 0; i < W; ++i) cs += exp2f((teacher_value<true>(x.get(i), y.get(i), a) - b) * k2);
  online_merge(m, sum, cm, cs, k2);
}

// ------------------------------------------------------------------------------------------------
// The kernel.

template <int G>
struct Config {
  static constexpr int kBlock = G <= 32 ? kSubBlock : G;
  static constexpr int kGroups = kBlock / G;        // rows in flight per block
  // Blocks per SM the registers must allow: 64 registers per thread for the block-per-row kernels; the sub-warp
  // kernels, whose per-thread work has more in flight, get up to 85 (768 threads per SM).
  static constexpr int kMinBlocks = G <= 32 ? 3 : 1024 / kBlock;
};

template <typename T, int G, class D>
__global__ void __launch_bounds__(Config<G>::kBlock, Config<G>::kMinBlocks) divergence_kernel(const KernelArgs a) {
  constexpr int kGroups = Config<G>::kGroups;
  constexpr int V = Elem<T>::kVec;

  extern __shared__ uint4 staged[];  // per group: a.held student chunks, then a.held teacher chunks
  __shared__ ReduceSmem red;
  const int lane = static_cast<int>(threadIdx.x) % G;
  const int group = static_cast<int>(threadIdx.x) / G;
  const int K = a.K;
  const bool need_gs = a.grad_student != nullptr;
  const bool need_gt = a.grad_teacher != nullptr;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGroups + group; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t off = row * static_cast<int64_t>(K);
    const T* s_row = static_cast<const T*>(a.student) + off;
    const T* t_row = static_cast<const T*>(a.teacher) + off;
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
          if (need_gs) store_pack<T, W>(static_cast<T*>(a.grad_student) + off + j, z);
          if (need_gt) store_pack<T, W>(static_cast<T*>(a.grad_teacher) + off + j, z);
        });
      }
      if (lane == 0) a.loss[row] = 0.f;
      continue;
    }

    RowWalk<T, G> rw;
    rw.s = s_row;
    rw.t = t_row;
    rw.hs = staged + static_cast<int64_t>(group) * 2 * a.held;
    rw.ht = rw.hs + a.held;
    rw.K = K;
    rw.head = a.vec ? head : K;
    rw.body_end = a.vec ? head + ((K - head) / V) * V : K;
    rw.held = min(a.held, (rw.body_end - rw.head) / V);
    rw.lane = lane;

    // Sweep 1: online max and sum of exponentials of the student and the teacher values.
    float ss[2] = {-INFINITY, 0.f}, ts[2] = {-INFINITY, 0.f};
    rw.stage_each([&](auto w, int, const auto& x, const auto& y) {
      constexpr int W = decltype(w)::value;
      online_add<T, W>(ss[0], ss[1], x, a.k2s);
      if constexpr (D::kTaid) {
        online_add_mixed<T, W>(ts[0], ts[1], x, y, a);
      } else {
        online_add<T, W>(ts[0], ts[1], y, a.k2t);
      }
    });
    group_reduce<G, true>(ss, a.k2s, red);
    group_reduce<G, true>(ts, a.k2t, red);
    const RowStats r{ss[0], logf(ss[1]), ts[0], logf(ts[1])};

    // Sweep 2: loss and the row sums of dq and dp. Forward KL and TAID with the student gradient alone skip it:
    // their sum_j dq_j is -1, and the loss is summed by sweep 3.
    const bool merged = D::kSumDqIsMinusOne && need_gs && !need_gt;
    float acc[3] = {0.f, -1.f, 0.f};
    if (!merged) {
      acc[1] = 0.f;
      rw.template each<Load::kKeep>([&](auto w, int, const auto& x, const auto& y) {
        constexpr int W = decltype(w)::value;
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const Terms d = D::eval(a.c, probs<D::kTaid>(x.get(i), y.get(i), a, r));
          acc[0] += d.f;
          acc[1] += d.dq;
          acc[2] += d.dp;
        }
      });
      group_reduce<G, false>(acc, 0.f, red);
      if (lane == 0) a.loss[row] = acc[0] < 0.f ? 0.f : acc[0];  // NaN and +inf kept
      if (!need_gs && !need_gt) continue;
    }

    // Sweep 3: gradients (and, merged, the loss).
    const float sum_dq = acc[1], sum_dp = acc[2];
    float loss[1] = {0.f};
    rw.template each<Load::kLast>([&](auto w, int j, const auto& x, const auto& y) {
      constexpr int W = decltype(w)::value;
      Pack<T, W> gs, gt;
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const Probs e = probs<D::kTaid>(x.get(i), y.get(i), a, r);
        const Terms d = D::eval(a.c, e);
        if (merged) loss[0] += d.f;
        gs.set(i, a.gs_scale * fmaf(-e.q, sum_dq, d.dq));
        gt.set(i, a.gt_scale * fmaf(-e.p, sum_dp, d.dp));
      }
      if (need_gs) store_pack<T, W>(static_cast<T*>(a.grad_student) + off + j, gs);
      if (need_gt) store_pack<T, W>(static_cast<T*>(a.grad_teacher) + off + j, gt);
    });
    if (merged) {
      group_reduce<G, false>(loss, 0.f, red);
      if (lane == 0) a.loss[row] = loss[0] < 0.f ? 0.f : loss[0];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: arguments, configuration and dispatch.

// The variant that runs (divergence, param_a, param_b) and its constants (a's pointers set already); the
// AB-divergence's form is chosen by exact comparisons in double. Ends where a mixture is one of the distributions run
// as that KL, as the CPU kernel does (log m is then the exact log q or log p); TAID at t = 0 does not read the
// teacher. Returns false for bad parameters.
bool plan(const DivergenceArgs& args, KernelArgs& a, Variant& v) {
  const double pa = args.param_a, pb = args.param_b;
  const auto unit = [](double x) { return x >= 0.0 && x <= 1.0; };
  auto set = [&a](std::initializer_list<double> c) {
    int i = 0;
    for (double x : c) a.c[i++] = static_cast<float>(x);
  };
  std::fill(a.c, a.c + 8, 0.f);
  const double as = args.student_scale, at = args.teacher_scale;
  a.as = static_cast<float>(as);
  a.at = static_cast<float>(at);
  a.k2s = static_cast<float>(as * kLog2e);
  a.k2t = static_cast<float>(at * kLog2e);
  a.mix_s = a.mix_t = 0.f;
  a.gs_scale = static_cast<float>(args.grad_scale * as);
  a.gt_scale = static_cast<float>(args.grad_scale * at);
  switch (static_cast<Divergence>(args.divergence)) {
    case Divergence::kForwardKL: v = Variant::kForwardKL; return true;
    case Divergence::kReverseKL: v = Variant::kReverseKL; return true;
    case Divergence::kTVD: v = Variant::kTVD; return true;
    case Divergence::kJSD:  // the ends are the plain KLs (exactly, -inf logits included)
      v = pa == 0.0 ? Variant::kForwardKL : (pa == 1.0 ? Variant::kReverseKL : Variant::kJSD);
      set({pa, 1.0 - pa});
      return unit(pa);
    case Divergence::kSkewKL:  // alpha = 0: m = q, forward KL
      v = pa == 0.0 ? Variant::kForwardKL : Variant::kSkewKL;
      set({pa, 1.0 - pa});
      return unit(pa);
    case Divergence::kSkewReverseKL:  // alpha = 0: m = p, reverse KL
      v = pa == 0.0 ? Variant::kReverseKL : Variant::kSkewReverseKL;
      set({pa, 1.0 - pa});
      return unit(pa);
    case Divergence::kSymmetricKL:  // lam = 0 or 1: one KL alone (no 0 * inf)
      v = pa == 0.0 ? Variant::kForwardKL : (pa == 1.0 ? Variant::kReverseKL : Variant::kSymmetricKL);
      set({1.0 - pa, pa});
      return unit(pa);
    case Divergence::kTAID:
      if (pa == 0.0) {  // r = q: forward KL with the student's logits, in the student's arithmetic, as the teacher
        v = Variant::kForwardKL;
        a.teacher = a.student;
        a.at = a.as;
        a.k2t = a.k2s;
        a.gt_scale = 0.f;
        return true;
      }
      if (pa == 1.0) {  // r = p: plain forward KL
        v = Variant::kForwardKL;
        return true;
      }
      v = Variant::kTAID;
      a.at = 1.f;  // the mixed logits carry their scales
      a.k2t = kLog2eF;
      a.mix_s = static_cast<float>((1.0 - pa) * as);
      a.mix_t = static_cast<float>(pa * at);
      a.gt_scale = static_cast<float>(args.grad_scale * pa * at);
      return unit(pa);
    case Divergence::kABDivergence: {
      if (!std::isfinite(pa) || !std::isfinite(pb)) return false;
      const double s = pa + pb;
      if (pa != 0.0 && pb != 0.0 && s != 0.0) {
        v = Variant::kABGeneral;
        set({pa, pb, s, 1.0 / (pb * s), 1.0 / (pa * s), 1.0 / (pa * pb), 1.0 / pa, 1.0 / pb});
      } else if (pa != 0.0 || pb != 0.0) {
        const double g = pb == 0.0 ? pa : (pa == 0.0 ? pb : pa);  // the nonzero one; alpha when alpha = -beta
        v = pb == 0.0 ? Variant::kABBetaZero : (pa == 0.0 ? Variant::kABAlphaZero : Variant::kABOpposite);
        set({g, 1.0 / g, 1.0 / (g * g)});
      } else {
        v = Variant::kABZero;
      }
      return true;
    }
  }
  return false;
}

// Shared memory a block may use for staging: the device's opt-in limit less the kernel's static shared memory.
int staging_budget() {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // clear: the kernel then stages within the default 48 KiB
    optin = 48 * 1024;
  }
  return std::max(optin - 1024, 0);
}

template <typename T, int G, class D>
cudaError_t launch(KernelArgs a, cudaStream_t stream) {
  using Cfg = Config<G>;
  constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // the kernel strides over the remaining rows
  constexpr int kChunkPair = 2 * static_cast<int>(sizeof(uint4));
  // Stage the whole body of a row when it fits (one read of the inputs from memory), else as much as fits.
  const int budget = staging_budget();
  a.held = a.vec ? std::min(a.K / Elem<T>::kVec, budget / (Cfg::kGroups * kChunkPair)) : 0;
  const int smem = a.held * Cfg::kGroups * kChunkPair;
  auto* kernel = divergence_kernel<T, G, D>;
  if (smem > 48 * 1024) {  // always the same value: launches from several host threads cannot undercut each other
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, budget);
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = std::min<int64_t>((a.rows + Cfg::kGroups - 1) / Cfg::kGroups, kMaxBlocks);
  kernel<<<static_cast<unsigned int>(blocks), Cfg::kBlock, static_cast<size_t>(smem), stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int G>
cudaError_t dispatch_variant(const KernelArgs& a, Variant v, cudaStream_t stream) {
  switch (v) {
    case Variant::kForwardKL: return launch<T, G, KL<false>>(a, stream);
    case Variant::kReverseKL: return launch<T, G, KL<true>>(a, stream);
    case Variant::kJSD: return launch<T, G, JSD>(a, stream);
    case Variant::kSkewKL: return launch<T, G, Skew<false>>(a, stream);
    case Variant::kSkewReverseKL: return launch<T, G, Skew<true>>(a, stream);
    case Variant::kTVD: return launch<T, G, TVD>(a, stream);
    case Variant::kSymmetricKL: return launch<T, G, SymmetricKL>(a, stream);
    case Variant::kABGeneral: return launch<T, G, ABGeneral>(a, stream);
    case Variant::kABBetaZero: return launch<T, G, ABOneSided<false>>(a, stream);
    case Variant::kABAlphaZero: return launch<T, G, ABOneSided<true>>(a, stream);
    case Variant::kABOpposite: return launch<T, G, ABOpposite>(a, stream);
    case Variant::kABZero: return launch<T, G, ABZero>(a, stream);
    case Variant::kTAID: return launch<T, G, TAID>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// Threads per row: enough for about 2-8 16-byte chunks of each input per thread; long rows take a whole
// 1024-thread block.
template <typename T>
cudaError_t dispatch_type(const KernelArgs& a, Variant v, cudaStream_t stream) {
  constexpr int64_t V = Elem<T>::kVec;
  const int64_t chunks = (a.K + V - 1) / V;
  if (chunks <= 8) return dispatch_variant<T, 4>(a, v, stream);
  if (chunks <= 256) return dispatch_variant<T, 32>(a, v, stream);
  if (chunks <= 2048) return dispatch_variant<T, 256>(a, v, stream);
  return dispatch_variant<T, 1024>(a, v, stream);
}

#undef TGTFAST_HD

}  // namespace

cudaError_t divergence_fwd(const DivergenceArgs& args, cudaStream_t stream) {
  const int64_t N = args.rows, K = args.classes;
  if (N < 0 || K < 0 || K > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if (args.divergence < 0 || args.divergence >= kNumDivergences) return cudaErrorInvalidValue;
  for (const double scale : {args.student_scale, args.teacher_scale}) {
    if (!(scale > 0.0) || !std::isfinite(scale)) return cudaErrorInvalidValue;
  }
  KernelArgs a;
  a.student = args.student;
  a.teacher = args.teacher;
  a.valid = args.valid;
  a.loss = args.loss;
  a.grad_student = args.grad_student;
  a.grad_teacher = args.grad_teacher;
  a.rows = N;
  a.K = static_cast<int>(K);
  Variant v = Variant::kForwardKL;
  if (!plan(args, a, v)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  if (args.loss == nullptr) return cudaErrorInvalidValue;
  if (K == 0) return cudaMemsetAsync(args.loss, 0, static_cast<size_t>(N) * sizeof(float), stream);  // empty sums
  if (args.student == nullptr || args.teacher == nullptr) return cudaErrorInvalidValue;

  uintptr_t mis = 0;  // bits where a pointer's address differs from the student's
  const void* others[3] = {a.teacher, a.grad_student, a.grad_teacher};
  for (const void* p : others) {
    if (p != nullptr) mis |= reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(a.student);
  }
  a.vec = (mis & 15u) == 0;

  switch (args.dtype) {
    case DType::kFloat32: return dispatch_type<float>(a, v, stream);
    case DType::kFloat16: return dispatch_type<__half>(a, v, stream);
    case DType::kBFloat16: return dispatch_type<__nv_bfloat16>(a, v, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tgtfast
