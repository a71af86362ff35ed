// Branch-free float exp/log that GCC and Clang vectorise inside `#pragma omp simd` loops.
//
// Why not std::exp: libm's expf is a call per element and blocks vectorisation; `-ffast-math` would
// vectorise it but also assume away the NaN/inf that PTLoss must propagate. These are the Cephes
// polynomials (max error about 2 ulp on the ranges used here) written with selects instead of branches,
// so NaN in gives NaN out, exp(-inf) = 0 and log(0) = -inf.
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

// exp(xc) = 2^n exp(r) for xc in [-87.3, 88.7] and n = round(xc / ln 2): Cody-Waite reduction r = xc - n ln 2 in
// two steps, then the Cephes polynomial for exp(r).
static inline float exp_reduced(float xc, float n) {
  float r = madd(n, -0.693359375f, xc);
  r = madd(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  p = madd(p, r * r, r) + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return p * scale;
}

// exp(x) for float. Inputs below -87.3 give 0 (the result would be denormal), above 88.7 give inf.
static inline float fast_exp(float x) {
  const float hi = 88.72283905206835f, lo = -87.33654475055310f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;  // NaN compares false twice and stays NaN
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|x| < 2^22)
  float y = exp_reduced(xc, n);
  y = x < lo ? 0.0f : y;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// exp(x) for float x <= 0, the shifted logits of a softmax: fewer instructions than fast_exp. Inputs
// below -87.3 give 0, NaN gives NaN; positive inputs are not allowed (they would overflow the exponent).
static inline float fast_exp_nonpos(float x) {
  const float lo = -87.33654475055310f;
  const float xc = lo > x ? lo : x;  // vmaxps(lo, x): NaN passes through
#if defined(__SSE4_1__) || defined(__aarch64__) || defined(TGTFAST_CPU_SSE41)
  const float n = std::nearbyint(xc * 1.44269504088896341f);  // one rounding instruction
#else
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // no vector round before SSE4.1
#endif
  const float y = exp_reduced(xc, n);
  return x < lo ? 0.0f : y;  // NaN compares false and keeps y (NaN)
}

// log(x) for float: log(0) = -inf, log(x < 0) = NaN, log(inf) = inf, NaN stays NaN.
// Denormal inputs are treated as 0 (never reached by probabilities that sum to 1 in a meaningful way).
static inline float fast_log(float x) {
  const uint32_t u = float_to_bits(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xff) - 126;
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
  y = x < 1.17549435e-38f ? -inf : y;  // 0 and denormals
  y = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : y;
  y = x == inf ? inf : y;
  y = x != x ? x : y;
  return y;
}

static inline double fast_exp(double x) { return std::exp(x); }
static inline double fast_exp_nonpos(double x) { return std::exp(x); }
static inline double fast_log(double x) { return std::log(x); }

}  // namespace cpu
}  // namespace tgtfast
