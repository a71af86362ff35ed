// Branch-free float exp, log, tanh, sigmoid and sin/cos that GCC and Clang vectorise inside `#pragma omp simd` loops.
//
// Why not std::exp: libm's expf is a call per element and blocks vectorisation; `-ffast-math` would vectorise it
// but also assume away the NaN/inf that PTLoss must propagate. These are the Cephes polynomials written with
// selects instead of branches. Contract of each helper, checked over every float32 exponent (all subnormals,
// 0, -0, +-inf, NaN, +-FLT_MAX, +-FLT_MIN) by tests/test_cpu_math.py through tgtfast._C._math_eval, for the
// AVX2+FMA and the baseline build:
//
//   fast_exp(x)         within 2 ulp wherever exp(x) >= FLT_MIN. Results below FLT_MIN (x < -87.34) are flushed
//                       to 0 (an absolute error < FLT_MIN; subnormal outputs would slow the vector loops down),
//                       x >= 88.7228 (exp(x) > FLT_MAX) gives +inf. exp(-inf) = 0, exp(+inf) = inf, NaN -> NaN.
//   fast_exp_nonpos(x)  fast_exp for x <= 0 in fewer instructions (-0 gives 1). x > 0 is outside its contract.
//   fast_log(x)         within 2 ulp (absolute 2^-24 near x = 1) for every x > 0, subnormals included (they are
//                       scaled by 2^25 first: p log p of a subnormal probability is a tiny number, never -inf).
//                       log(+-0) = -inf, log(x < 0) = NaN (also -inf), log(+inf) = +inf, NaN -> NaN.
//   fast_tanh(x)        within 3 ulp: Cephes' odd polynomial for |x| < 0.625 (so tiny and subnormal x give x
//                       itself, sign of zero kept), (1 - e) / (1 + e) with e = exp(-2|x|) above. +-inf -> +-1.
//   fast_sigmoid(x)     within 3 ulp wherever the result is >= FLT_MIN; below that (x < -87.34) 0, like fast_exp.
//                       sigmoid(-inf) = 0, sigmoid(+inf) = 1, NaN -> NaN.
//   fast_sincos(t)      sin and cos within 2e-7 absolute for |t| <= 8192 (the noise uses t in [0, 2 pi]): three-constant
//                       reduction by pi/2. Outside that range the reduction loses accuracy (not used there).
//                       +-inf and NaN give NaN, subnormal t gives (t, 1).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tgtfast {
namespace cpu {

// Everything here has internal linkage: this header is compiled once per instruction set, and the
// linker must never merge an AVX2 copy into the baseline build. Without hardware FMA, std::fma is a
// slow library call, so fall back to a multiply and an add there.
#if defined(__FMA__)
static inline float madd(float a, float b, float c) { return std::fma(a, b, c); }
#else
static inline float madd(float a, float b, float c) { return a * b + c; }
#endif

// __builtin_bit_cast rather than memcpy: memcpy through a temporary stops GCC from vectorising the loops.
static inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
static inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// exp(r) for r = xc - n ln 2 (Cody-Waite reduction in two steps), the Cephes polynomial; n = round(xc / ln 2).
static inline float exp_poly(float xc, float n) {
  float r = madd(n, -0.693359375f, xc);
  r = madd(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  return madd(p, r * r, r) + 1.0f;
}

// 2^n as a float for an integral n in [-126, 127].
static inline float pow2i(float n) { return bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23); }

// Bounds of fast_exp: exp(lo) = FLT_MIN (below it results would be subnormal: flushed to 0); hi is the first
// float above log(FLT_MAX) (exp(hi) rounds to +inf).
constexpr float kExpLo = -87.33654475055310f;
constexpr float kExpHi = 88.72283935546875f;

// exp(x) for float.
static inline float fast_exp(float x) {
  float xc = x > kExpHi ? kExpHi : x;
  xc = xc < kExpLo ? kExpLo : xc;  // NaN compares false twice and stays NaN
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|x| < 2^22)
  // n is in [-126, 128]; 2^128 is not a float, so n = 128 scales by 2^127 and then by 2 (p 2^127 stays finite).
  const float y127 = exp_poly(xc, n) * pow2i(n > 127.0f ? 127.0f : n);
  float y = n > 127.0f ? y127 * 2.0f : y127;
  y = x < kExpLo ? 0.0f : y;
  y = x >= kExpHi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// exp(x) for float x <= 0, the shifted logits of a softmax: fewer instructions than fast_exp. Inputs
// below -87.34 give 0, NaN gives NaN; positive inputs are not allowed (they would overflow the exponent).
static inline float fast_exp_nonpos(float x) {
  const float xc = kExpLo > x ? kExpLo : x;  // vmaxps(lo, x): NaN passes through
#if defined(__SSE4_1__) || defined(__aarch64__) || defined(TGTFAST_CPU_SSE41)
  const float n = std::nearbyint(xc * 1.44269504088896341f);  // one rounding instruction
#else
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // no vector round before SSE4.1
#endif
  const float y = exp_poly(xc, n) * pow2i(n);  // n <= 0: no overflow handling to pay for
  return x < kExpLo ? 0.0f : y;  // NaN compares false and keeps y (NaN)
}

// log(x) for float; special values and subnormals as in the table above.
static inline float fast_log(float x) {
  const float min_normal = std::numeric_limits<float>::min();
  const bool sub = x < min_normal;  // subnormals (and 0, negatives: replaced below) are scaled by 2^25
  const float xs = sub ? x * 33554432.0f : x;
  const uint32_t u = float_to_bits(xs);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - (sub ? 151 : 126);
  float m = bits_to_float((u & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = madd(p, m, -1.1514610310e-1f);
  p = madd(p, m, 1.1676998740e-1f);
  p = madd(p, m, -1.2420140846e-1f);
  p = madd(p, m, 1.4249322787e-1f);
  p = madd(p, m, -1.6668057665e-1f);
  p = madd(p, m, 2.0000714765e-1f);
  p = madd(p, m, -2.4999993993e-1f);
  p = madd(p, m, 3.3333331174e-1f);
  float y = p * m * z;
  const float fe = static_cast<float>(e);
  y = madd(fe, -2.12194440e-4f, y);
  y = madd(-0.5f, z, y);
  y = m + y;
  y = madd(fe, 0.693359375f, y);
  const float inf = std::numeric_limits<float>::infinity();
  y = x == 0.0f ? -inf : y;  // +0 and -0
  y = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : y;
  y = x == inf ? inf : y;
  y = x != x ? x : y;
  return y;
}

// tanh(x): see the table above.
static inline float fast_tanh(float x) {
  const float ax = std::fabs(x);
  const float t = fast_exp_nonpos(-2.0f * ax);
  const float big = (1.0f - t) / (1.0f + t);
  const float z = ax < 0.625f ? ax * ax : 0.0f;  // keeps z finite in the lane that is not used
  float p = -5.70498872745e-3f;
  p = madd(p, z, 2.06390887954e-2f);
  p = madd(p, z, -5.37397155531e-2f);
  p = madd(p, z, 1.33314422036e-1f);
  p = madd(p, z, -3.33332819422e-1f);
  const float small = madd(p * z, ax, ax);
  const float r = ax < 0.625f ? small : big;  // NaN: big is NaN
  return std::copysign(r, x);
}

// sigmoid(x) through one exp of -|x| (never positive, so the cheaper exponential): 1 / (1 + e) for x >= 0 and
// e / (1 + e) below, which also keeps the relative accuracy of small results. NaN stays NaN.
static inline float fast_sigmoid(float x) {
  const float e = fast_exp_nonpos(-std::fabs(x));
  const float s = 1.0f / (1.0f + e);
  return x >= 0.0f ? s : e * s;
}

// sin and cos of theta: reduction by the nearest multiple q of pi/2 (pi/2 split in three constants, q * each
// exact for |q| < 2^13), Cephes minimax polynomials on [-pi/4, pi/4], then the quadrant's swap and signs.
static inline void fast_sincos(float theta, float& sin_out, float& cos_out) {
  const float q = (theta * 0.636619772367581343f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = madd(-q, 1.5703125f, theta);
  r = madd(-q, 4.837512969970703125e-4f, r);
  r = madd(-q, 7.54978995489188216e-8f, r);
  const float z = r * r;
  const float s = madd(madd(madd(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f), z * r, r);
  const float c = madd(madd(madd(2.443315711809948e-5f, z, -1.388731625493765e-3f), z, 4.166664568298827e-2f),
                       z * z, madd(-0.5f, z, 1.0f));
  // q = +-inf or NaN (theta +-inf or NaN) makes r, s and c NaN: any quadrant will do, but the conversion must not
  // see a value outside int.
  const int quadrant = static_cast<int>(std::fabs(q) < 16777216.0f ? q : 0.0f) & 3;
  const float sv = (quadrant & 1) ? c : s;
  const float cv = (quadrant & 1) ? s : c;
  sin_out = (quadrant & 2) ? -sv : sv;
  cos_out = ((quadrant + 1) & 2) ? -cv : cv;
}

static inline double fast_exp(double x) { return std::exp(x); }
static inline double fast_exp_nonpos(double x) { return std::exp(x); }
static inline double fast_log(double x) { return std::log(x); }

}  // namespace cpu
}  // namespace tgtfast
