// Torch-facing launcher of the CPU temperature softmax (softmax_cpu_kernel.h): checks, allocation, and parallelism
// over rows. Schema in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_dtype.h"
#include "softmax_cpu_kernel.h"

namespace tgtfast {
namespace {

at::Tensor temperature_softmax_cpu(const at::Tensor& logits, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "temperature_softmax: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(logits.dim() >= 1, "temperature_softmax: logits must have at least one dimension");
  const auto dtype = cpu::to_kernel_dtype(logits.scalar_type(), "temperature_softmax", "logits");
  const at::Tensor x = logits.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t K = x.size(-1);
  const int64_t rows = K == 0 ? 0 : x.numel() / K;
  if (rows == 0) return y;
  cpu::SoftmaxArgs args;
  args.x = x.data_ptr();
  args.y = y.data_ptr();
  args.dtype = dtype;
  args.rows = rows;
  args.cols = K;
  args.inv_temperature = 1.0 / temperature;
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  const auto fn = cpu::cpu_has_avx2() ? &cpu::softmax_rows_avx2 : &cpu::softmax_rows_base;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return y;
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) { m.impl("temperature_softmax", &tgtfast::temperature_softmax_cpu); }
