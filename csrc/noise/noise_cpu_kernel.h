// The latent noise on the CPU (TGT's counter-based perturbation, schemas perturb and latent_noise_). Plain C++
// on raw pointers, no torch headers; the torch-facing launcher is noise_cpu.cpp. The body (noise_cpu_kernel.inc)
// is compiled for AVX2+FMA and for the baseline instruction set; the launcher picks one with cpu_has_avx2().
//
//   perturb:  out[i] = z[i] + sigma * n(seed, offset + i)      (z may be null: out[i] = sigma * n(...))
//
// n(seed, j) is tgtfast::philox::normal_at (csrc/common/philox.h) in float32, within a few ulps (vectorised log and
// sin/cos in place of libm's). The arithmetic is float32
// for float32/bfloat16/float16 data and float64 for float64 data (the noise itself is float32).
#pragma once

#include <cstdint>

#include "cpu_isa.h"  // DType, cpu_has_avx2

namespace tgtfast {
namespace cpu {

struct PerturbArgs {
  const void* z = nullptr;  // [numel] of `dtype`, contiguous, or null (noise only)
  void* out = nullptr;      // [numel] of `dtype`, contiguous
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
  double sigma = 1.0;
  uint64_t seed = 0;
  uint64_t offset = 0;      // stream index of element 0
};

// Writes out[begin, end). Thread-safe for disjoint ranges; the result does not depend on how the range is cut.
void perturb_range_avx2(const PerturbArgs& args, int64_t begin, int64_t end);
void perturb_range_base(const PerturbArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
