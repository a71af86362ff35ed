// TGT kernels on the CPU: the counter-based latent perturbation and the temperature softmax. Plain C++ on
// raw pointers, no torch headers; the torch-facing launcher is tgt_cpu.cpp.
//
//   perturb:  out[i] = z[i] + sigma * n(seed, offset + i)      (z may be null: out[i] = sigma * n(...))
//   softmax:  y[r, :] = softmax(x[r, :] * inv_temperature)
//
// n(seed, j) is tgtfast::philox::normal_at (csrc/philox.h), computed in float32. The arithmetic is float32
// for float32/bfloat16/float16 data and float64 for float64 data (the noise itself is float32).
#pragma once

#include <cstdint>

#include "ptloss_cpu_kernel.h"  // DType

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
void perturb_range(const PerturbArgs& args, int64_t begin, int64_t end);

struct SoftmaxArgs {
  const void* x = nullptr;  // [rows, cols] of `dtype`, contiguous
  void* y = nullptr;        // [rows, cols] of `dtype`, contiguous
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  double inv_temperature = 1.0;
};

// Writes rows [begin, end). Thread-safe for disjoint row ranges.
void softmax_rows(const SoftmaxArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
