// The counter-based normal noise every tgtfast backend draws (CPU C++, CUDA; kernels/noise.py mirrors it
// for Triton and tgtfast/reference.py:latent_noise is the eager specification).
//
// Element i of a noise tensor drawn with (seed, offset) -- i the row-major flat index -- is
//
//   j = offset + i,  g = j / 4,  r = j % 4
//   (x0, x1, x2, x3) = Philox4x32-10(counter = (lo32(g), hi32(g), 0, 0), key = (lo32(seed), hi32(seed)))
//   (a, b) = (x0, x1) if r < 2 else (x2, x3)
//   u1 = ((a >> 8) + 0.5) * 2^-24                      (in (0, 1): log(u1) is finite)
//   u2 = ((b >> 8) + 0.5) * 2^-24
//   n  = sqrt(-2 log u1) * (cos(2 pi u2) if r is even else sin(2 pi u2))     (Box-Muller)
//
// computed in float32. So one Philox call gives four consecutive normals, any element can be drawn
// independently of the others, and a tensor drawn at offset `o` continues the stream of one drawn at 0.
// Torch-free and usable from host and device code.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TGTFAST_HD __host__ __device__ __forceinline__
#else
#define TGTFAST_HD inline
#endif

namespace tgtfast {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

struct U4 {
  uint32_t x0, x1, x2, x3;
};

TGTFAST_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC 2011; the Random123 / cuRAND / Triton constants).
TGTFAST_HD U4 philox4x32_10(U4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c.x0, hi0, lo0);
    mulhilo(kMul1, c.x2, hi1, lo1);
    c = U4{hi1 ^ c.x1 ^ k0, lo1, hi0 ^ c.x3 ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// The four raw words for group g = (offset + i) / 4.
TGTFAST_HD U4 group_words(uint64_t seed, uint64_t group) {
  return philox4x32_10(U4{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u},
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

TGTFAST_HD float to_open_unit(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

// The normal for stream index j = offset + i.
TGTFAST_HD float normal_at(uint64_t seed, uint64_t j) {
  const U4 w = group_words(seed, j >> 2);
  const unsigned r = static_cast<unsigned>(j & 3u);
  const uint32_t a = r < 2 ? w.x0 : w.x2;
  const uint32_t b = r < 2 ? w.x1 : w.x3;
  const float radius = sqrtf(-2.0f * logf(to_open_unit(a)));
  const float theta = 6.283185307179586f * to_open_unit(b);
  return radius * ((r & 1u) ? sinf(theta) : cosf(theta));
}

}  // namespace philox
}  // namespace tgtfast
