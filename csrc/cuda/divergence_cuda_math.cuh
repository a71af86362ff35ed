// Per-element math of the CUDA divergence kernel (csrc/cuda/divergence_cuda.cu): what each divergence contributes at
// one class (f, dq = q df/dq, dp = p df/dp), as a functor per divergence and AB limit form, host and device so that it
// can be checked on a machine without a GPU. docs/design.md, "Divergences", has the math. Included by
// divergence_cuda.cu inside its anonymous namespace only; it defines TGTFAST_HD, which that file undefines at its end.
#pragma once

#define TGTFAST_HD __host__ __device__ __forceinline__

constexpr double kLog2e = 1.4426950408889634;  // log2(e)
constexpr float kLog2eF = static_cast<float>(kLog2e);
constexpr float kLn2F = 0.693147180559945309f;  // log(2)
constexpr int kSubBlock = 256;                  // block size of the sub-warp / warp-per-row kernels

// ------------------------------------------------------------------------------------------------
// Per-element math (host and device, so that it can be checked on a machine without a GPU).

struct KernelArgs {
  const void* student;
  const void* teacher;
  const bool* valid;
  float* loss;
  void* grad_student;
  void* grad_teacher;
  int64_t rows;
  int K;
  float as, at;          // scales of the student and teacher values (TAID: at = 1, the mixed logits are scaled)
  float k2s, k2t;        // log2(e) * as, log2(e) * at
  float mix_s, mix_t;    // TAID: the mixed logit is mix_t t + mix_s s, mix_s = (1 - t) a_s, mix_t = t a_t
  float gs_scale;        // grad_scale a_s
  float gt_scale;        // grad_scale a_t (TAID: times t)
  float c[8];            // the divergence's constants (see each functor)
  int held;              // 16-byte chunks of each input staged in shared memory per row
  bool vec;              // all row pointers share their address modulo 16: 16-byte chunks after a common head
};

// Per-row constants of sweeps 2 and 3: maxima and log sums of exponentials of the student and teacher values.
struct RowStats {
  float ms, ln_ss, mt, ln_st;
};

struct Probs {
  float q, lq, p, lp;
};

// What a divergence contributes at one class: f, dq = q df/dq, dp = p df/dp.
struct Terms {
  float f, dq, dp;
};

// exp and log through the hardware's exp2 and log2 (a few ulp more than expf and logf for large arguments, and
// far fewer registers: the block-per-row kernels have 64).
TGTFAST_HD float exp_(float x) { return exp2f(x * kLog2eF); }
TGTFAST_HD float log_(float x) { return log2f(x) * kLn2F; }

// The teacher's value at one class: its logit, or (TAID) the mixed logit, already scaled.
template <bool kTaid>
TGTFAST_HD float teacher_value(float s, float t, const KernelArgs& a) {
  if constexpr (kTaid) {
    return fmaf(a.mix_t, t, a.mix_s * s);
  } else {
    return t;
  }
}

template <bool kTaid>
TGTFAST_HD Probs probs(float s, float t, const KernelArgs& a, const RowStats& r) {
  Probs e;
  const float ds = s - r.ms;
  e.lq = fmaf(ds, a.as, -r.ln_ss);
  e.q = exp_(e.lq);
  const float dt = teacher_value<kTaid>(s, t, a) - r.mt;
  e.lp = fmaf(dt, a.at, -r.ln_st);
  e.p = exp_(e.lp);
  return e;
}

// x (log x - log y), 0 where x = 0 whatever y.
TGTFAST_HD float xlog(float x, float lx, float ly) { return x == 0.f ? 0.f : x * (lx - ly); }

// sgn with sgn(0) = 0 that keeps NaN (so that a NaN row stays NaN in the total variation's gradients).
TGTFAST_HD float sgn(float d) { return d > 0.f ? 1.f : (d < 0.f ? -1.f : d); }

// Several divergences are one formula applied to (x, y) = (p, q) or, mirrored, (q, p).
struct Side {
  float x, lx, y, ly;
};
template <bool kSwap>
TGTFAST_HD Side side(const Probs& e) {
  return kSwap ? Side{e.q, e.lq, e.p, e.lp} : Side{e.p, e.lp, e.q, e.lq};
}
template <bool kSwap>
TGTFAST_HD Terms terms(float f, float dx, float dy) {
  return kSwap ? Terms{f, dx, dy} : Terms{f, dy, dx};
}

struct Plain {
  static constexpr bool kTaid = false;            // teacher distribution softmax(a_t t)
  static constexpr bool kSumDqIsMinusOne = false;  // sum_j dq_j = -1 whatever the row
};

// forward_kl (x = p): p (lp - lq); reverse_kl (x = q): q (lq - lp). dx = f, dy = -x.
template <bool kSwap>
struct KL : Plain {
  static constexpr bool kSumDqIsMinusOne = !kSwap;  // forward KL: dq = -p
  static TGTFAST_HD Terms eval(const float*, const Probs& e) {
    const Side v = side<kSwap>(e);
    const float f = xlog(v.x, v.lx, v.ly);
    return terms<kSwap>(f, f, -v.x);
  }
};

// taid: forward KL to r = softmax((1 - t) stopgrad(u_s) + t u_t) (the t of dL/dt is in gt_scale).
struct TAID : KL<false> {
  static constexpr bool kTaid = true;
};

// jsd: c = (beta, 1 - beta), m = beta p + (1 - beta) q; dp = beta p (lp - lm), dq = (1 - beta) q (lq - lm),
// f = dp + dq.
struct JSD : Plain {
  static TGTFAST_HD Terms eval(const float* c, const Probs& e) {
    const float lm = log_(fmaf(c[0], e.p, c[1] * e.q));
    const float dp = c[0] * xlog(e.p, e.lp, lm);
    const float dq = c[1] * xlog(e.q, e.lq, lm);
    return Terms{dp + dq, dq, dp};
  }
};

// skew_kl (x = p) and skew_reverse_kl (x = q): c = (alpha, 1 - alpha), m = alpha x + (1 - alpha) y, f = x (lx - lm);
// with r = x / m: dx = f - alpha x r, dy = -(1 - alpha) y r.
template <bool kSwap>
struct Skew : Plain {
  static TGTFAST_HD Terms eval(const float* c, const Probs& e) {
    const Side v = side<kSwap>(e);
    const float m = fmaf(c[0], v.x, c[1] * v.y);
    const float f = xlog(v.x, v.lx, log_(m));
    const float r = v.x == 0.f ? 0.f : v.x / m;
    return terms<kSwap>(f, fmaf(-c[0] * v.x, r, f), -c[1] * v.y * r);
  }
};

// tvd: |p - q| / 2; dq = -q sgn(p - q) / 2, dp = p sgn(p - q) / 2.
struct TVD : Plain {
  static TGTFAST_HD Terms eval(const float*, const Probs& e) {
    const float d = e.p - e.q;
    const float h = 0.5f * sgn(d);
    return Terms{0.5f * fabsf(d), -h * e.q, h * e.p};
  }
};

// symmetric_kl: c = (1 - lam, lam); f = (1 - lam) KL(p, q) + lam KL(q, p) (lam in (0, 1); the ends are plain KL).
struct SymmetricKL : Plain {
  static TGTFAST_HD Terms eval(const float* c, const Probs& e) {
    const float fwd = xlog(e.p, e.lp, e.lq);
    const float rev = xlog(e.q, e.lq, e.lp);
    return Terms{fmaf(c[0], fwd, c[1] * rev), fmaf(-c[0], e.p, c[1] * rev), fmaf(c[0], fwd, -c[1] * e.q)};
  }
};

// ab_divergence, alpha, beta and s = alpha + beta all nonzero: c = (alpha, beta, s, 1 / (beta s), 1 / (alpha s),
// 1 / (alpha beta), 1 / alpha, 1 / beta); f = p^s / (beta s) + q^s / (alpha s) - p^alpha q^beta / (alpha beta),
// dq = (q^s - p^alpha q^beta) / alpha, dp = (p^s - p^alpha q^beta) / beta.
struct ABGeneral : Plain {
  static TGTFAST_HD Terms eval(const float* c, const Probs& e) {
    const float pq = exp_(fmaf(c[0], e.lp, c[1] * e.lq));
    const float ps = exp_(c[2] * e.lp);
    const float qs = exp_(c[2] * e.lq);
    return Terms{fmaf(c[3], ps, fmaf(c[4], qs, -c[5] * pq)), (qs - pq) * c[6], (ps - pq) * c[7]};
  }
};

// ab_divergence with one parameter 0: beta = 0 (x = p, g = alpha) or alpha = 0 (x = q, g = beta); c = (g, 1 / g,
// 1 / g^2); f = (g x^g (lx - ly) - x^g + y^g) / g^2, dx = x^g (lx - ly), dy = (y^g - x^g) / g.
template <bool kSwap>
struct ABOneSided : Plain {
  static TGTFAST_HD Terms eval(const float* c, const Probs& e) {
    const Side v = side<kSwap>(e);
    const float xg = exp_(c[0] * v.lx);
    const float yg = exp_(c[0] * v.ly);
    const float dx = xlog(xg, v.lx, v.ly);
    return terms<kSwap>(fmaf(c[0], dx, yg - xg) * c[2], dx, (yg - xg) * c[1]);
  }
};

// ab_divergence with alpha = -beta != 0: c = (alpha, 1 / alpha, 1 / alpha^2); with d = lp - lq,
// f = (expm1(alpha d) - alpha d) / alpha^2, dp = expm1(alpha d) / alpha = -dq.
struct ABOpposite : Plain {
  static TGTFAST_HD Terms eval(const float* c, const Probs& e) {
    const float ad = c[0] * (e.lp - e.lq);
    const float em1 = expm1f(ad);
    const float dp = em1 * c[1];
    return Terms{(em1 - ad) * c[2], -dp, dp};
  }
};

// ab_divergence with alpha = beta = 0: f = (lp - lq)^2 / 2, dp = lp - lq = -dq.
struct ABZero : Plain {
  static TGTFAST_HD Terms eval(const float*, const Probs& e) {
    const float d = e.lp - e.lq;
    return Terms{0.5f * d * d, -d, d};
  }
};

// The kernel instances: the divergences, and the AB-divergence's limit forms, each its own functor.
enum class Variant : int {
  kForwardKL,
  kReverseKL,
  kJSD,
  kSkewKL,
  kSkewReverseKL,
  kTVD,
  kSymmetricKL,
  kABGeneral,
  kABBetaZero,
  kABAlphaZero,
  kABOpposite,
  kABZero,
  kTAID,
};
