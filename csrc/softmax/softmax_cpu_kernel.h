// The temperature softmax on the CPU (schema temperature_softmax). Plain C++ on raw pointers, no torch headers;
// the torch-facing launcher is softmax_cpu.cpp. The body (softmax_cpu_kernel.inc) is compiled for AVX2+FMA and
// for the baseline instruction set; the launcher picks one with cpu_has_avx2().
//
//   softmax:  y[r, :] = softmax(x[r, :] * inv_temperature)
//
// The arithmetic is float32 for float32/bfloat16/float16 data and float64 for float64 data.
#pragma once

#include <cstdint>

#include "cpu_isa.h"  // DType, cpu_has_avx2

namespace tgtfast {
namespace cpu {

struct SoftmaxArgs {
  const void* x = nullptr;  // [rows, cols] of `dtype`, contiguous
  void* y = nullptr;        // [rows, cols] of `dtype`, contiguous
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  double inv_temperature = 1.0;
};

// Writes rows [begin, end). Thread-safe for disjoint row ranges.
void softmax_rows_avx2(const SoftmaxArgs& args, int64_t begin, int64_t end);
void softmax_rows_base(const SoftmaxArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace tgtfast
