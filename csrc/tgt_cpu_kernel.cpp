// CPU kernels of the TGT perturbation and temperature softmax (interface and contract in tgt_cpu_kernel.h).
//
// Noise. Element i of the stream is normal_at(seed, offset + i) of csrc/philox.h. One Philox call gives the
// four normals of a group j / 4 and each Box-Muller pair (x0, x1) / (x2, x3) gives two of them (cos for the
// even index, sin for the odd one) from one log and one sincos. The range is walked in chunks: first the
// Philox words of every group the chunk touches (integer arithmetic in a `#pragma omp simd` loop, which the
// compiler vectorises), then the transform pair by pair, then the element-wise combine with z in the
// data type. The numbers are those of normal_at to the last bit of libm's logf / sinf / cosf.
#include "tgt_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_math.h"
#include "philox.h"

namespace tgtfast {
namespace cpu {
namespace {

inline float bf16_to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return f != f ? static_cast<uint16_t>((u >> 16) | 0x40u) : static_cast<uint16_t>(rounded);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {                                                          // zero / subnormal
    const float mag = static_cast<float>(man) * 5.9604644775390625e-8f;    // man * 2^-24
    return sign ? -mag : mag;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (a != a) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a < 6.103515625e-05f) {  // subnormal half: round a * 2^24 to nearest even integer
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t au = float_to_bits(a);
  const uint32_t rounded = au + 0xfffu + ((au >> 13) & 1u);
  return static_cast<uint16_t>(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu));
}

constexpr int64_t kChunk = 512;               // elements per chunk (a multiple of 4)
constexpr int64_t kGroups = kChunk / 4 + 1;   // groups a chunk can touch when it does not start on a group

// noise[0, n) = normal_at(seed, j0 + i) for i in [0, n), n <= kChunk.
void fill_normals(uint64_t seed, uint64_t j0, int64_t n, float* __restrict noise) {
  const uint64_t g0 = j0 >> 2;
  const int64_t groups = static_cast<int64_t>(((j0 + static_cast<uint64_t>(n) - 1) >> 2) - g0) + 1;
  uint32_t w0[kGroups], w1[kGroups], w2[kGroups], w3[kGroups];
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma omp simd
  for (int64_t k = 0; k < groups; ++k) {
    const uint64_t g = g0 + static_cast<uint64_t>(k);
    const philox::U4 w =
        philox::philox4x32_10(philox::U4{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u}, k0, k1);
    w0[k] = w.x0;
    w1[k] = w.x1;
    w2[k] = w.x2;
    w3[k] = w.x3;
  }
  // Box-Muller pair by pair: pair p covers stream indices 2p and 2p + 1.
  const uint64_t jend = j0 + static_cast<uint64_t>(n);
  for (uint64_t p = j0 >> 1; 2 * p < jend; ++p) {
    const int64_t k = static_cast<int64_t>((p >> 1) - g0);
    const bool second = (p & 1u) != 0;
    const uint32_t a = second ? w2[k] : w0[k];
    const uint32_t b = second ? w3[k] : w1[k];
    const float radius = std::sqrt(-2.0f * std::log(philox::to_open_unit(a)));
    const float theta = 6.283185307179586f * philox::to_open_unit(b);
    const uint64_t je = 2 * p, jo = 2 * p + 1;
    if (je >= j0) noise[je - j0] = radius * std::cos(theta);
    if (jo < jend) noise[jo - j0] = radius * std::sin(theta);
  }
}

template <typename Load, typename Store>
void combine(const PerturbArgs& args, int64_t begin, int64_t end, Load load, Store store) {
  float noise[kChunk];
  const float sigma = static_cast<float>(args.sigma);
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t n = std::min(kChunk, end - c);
    fill_normals(args.seed, args.offset + static_cast<uint64_t>(c), n, noise);
    if (args.z != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(c + i, madd(sigma, noise[i], load(c + i)));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(c + i, sigma * noise[i]);
    }
  }
}

// Row softmax of x * inv_t in the accumulation type A, through the scratch row `buf` (already holding x as A).
template <typename A>
void softmax_row(A* __restrict buf, int64_t K, A inv_t) {
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t j = 0; j < K; ++j) mx = buf[j] > mx ? buf[j] : mx;  // NaN never wins; it reaches the sum below
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < K; ++j) {
    const A e = fast_exp((buf[j] - mx) * inv_t);
    buf[j] = e;
    sum += e;
  }
  const A inv_sum = A(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) buf[j] *= inv_sum;
}

}  // namespace

void perturb_range(const PerturbArgs& args, int64_t begin, int64_t end) {
  if (begin >= end) return;
  switch (args.dtype) {
    case DType::kFloat32: {
      const float* z = static_cast<const float*>(args.z);
      float* out = static_cast<float*>(args.out);
      combine(args, begin, end, [z](int64_t i) { return z[i]; }, [out](int64_t i, float v) { out[i] = v; });
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* z = static_cast<const uint16_t*>(args.z);
      uint16_t* out = static_cast<uint16_t*>(args.out);
      combine(args, begin, end, [z](int64_t i) { return bf16_to_float(z[i]); },
              [out](int64_t i, float v) { out[i] = float_to_bf16(v); });
      break;
    }
    case DType::kFloat16: {
      const uint16_t* z = static_cast<const uint16_t*>(args.z);
      uint16_t* out = static_cast<uint16_t*>(args.out);
      combine(args, begin, end, [z](int64_t i) { return half_to_float(z[i]); },
              [out](int64_t i, float v) { out[i] = float_to_half(v); });
      break;
    }
    case DType::kFloat64: {  // the sum in float64 keeps z's precision; the noise is the float32 stream
      const double* z = static_cast<const double*>(args.z);
      double* out = static_cast<double*>(args.out);
      float noise[kChunk];
      for (int64_t c = begin; c < end; c += kChunk) {
        const int64_t n = std::min(kChunk, end - c);
        fill_normals(args.seed, args.offset + static_cast<uint64_t>(c), n, noise);
        for (int64_t i = 0; i < n; ++i) {
          const double v = args.sigma * static_cast<double>(noise[i]);
          out[c + i] = z != nullptr ? z[c + i] + v : v;
        }
      }
      break;
    }
  }
}

void softmax_rows(const SoftmaxArgs& args, int64_t begin, int64_t end) {
  const int64_t K = args.cols;
  if (begin >= end || K == 0) return;
  if (args.dtype == DType::kFloat64) {
    const double* x = static_cast<const double*>(args.x);
    double* y = static_cast<double*>(args.y);
    for (int64_t r = begin; r < end; ++r) {
      double* row = y + r * K;
      std::memcpy(row, x + r * K, sizeof(double) * K);
      softmax_row<double>(row, K, args.inv_temperature);
    }
    return;
  }
  if (args.dtype == DType::kFloat32) {
    const float* x = static_cast<const float*>(args.x);
    float* y = static_cast<float*>(args.y);
    for (int64_t r = begin; r < end; ++r) {
      float* row = y + r * K;
      std::memcpy(row, x + r * K, sizeof(float) * K);
      softmax_row<float>(row, K, static_cast<float>(args.inv_temperature));
    }
    return;
  }
  const bool bf16 = args.dtype == DType::kBFloat16;
  const uint16_t* x = static_cast<const uint16_t*>(args.x);
  uint16_t* y = static_cast<uint16_t*>(args.y);
  float* buf = new float[K];
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* xr = x + r * K;
    uint16_t* yr = y + r * K;
    for (int64_t j = 0; j < K; ++j) buf[j] = bf16 ? bf16_to_float(xr[j]) : half_to_float(xr[j]);
    softmax_row<float>(buf, K, static_cast<float>(args.inv_temperature));
    for (int64_t j = 0; j < K; ++j) yr[j] = bf16 ? float_to_bf16(buf[j]) : float_to_half(buf[j]);
  }
  delete[] buf;
}

}  // namespace cpu
}  // namespace tgtfast
