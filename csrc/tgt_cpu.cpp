// Torch-facing launchers of the CPU TGT kernels (tgt_cpu_kernel.h): checks, allocation, and parallelism.
// Schemas in ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "tgt_cpu_kernel.h"

namespace tgtfast {
namespace {

cpu::DType to_kernel_dtype(at::ScalarType t, const char* op, const char* arg) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kDouble: return cpu::DType::kFloat64;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kFloat16;
    default: TORCH_CHECK(false, op, ": ", arg, " must be float32, float64, bfloat16 or float16, got ", t);
  }
  return cpu::DType::kFloat32;  // unreachable
}

// Elements per parallel task: enough work (a Philox call and a log + sincos per two elements) to amortise
// the task, few enough that small latents still use every thread.
constexpr int64_t kNoiseGrain = 4096;

void check_stream(int64_t offset, int64_t numel, const char* op) {
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  TORCH_CHECK(offset <= INT64_MAX - numel, op, ": offset + numel must be < 2^63, got offset ", offset,
              " and ", numel, " elements");
}

void run_perturb(const cpu::PerturbArgs& args) {
  at::parallel_for(0, args.numel, kNoiseGrain,
                   [&](int64_t begin, int64_t end) { cpu::perturb_range(args, begin, end); });
}

at::Tensor perturb_cpu(const at::Tensor& z, double sigma, int64_t seed, int64_t offset) {
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, "perturb: sigma must be finite and >= 0, got ", sigma);
  check_stream(offset, z.numel(), "perturb");
  const auto dtype = to_kernel_dtype(z.scalar_type(), "perturb", "z");
  const at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty_like(zc, at::MemoryFormat::Contiguous);
  cpu::PerturbArgs args;
  args.z = zc.data_ptr();
  args.out = out.data_ptr();
  args.dtype = dtype;
  args.numel = zc.numel();
  args.sigma = sigma;
  args.seed = static_cast<uint64_t>(seed);  // the schema's int64 carries the seed's 64 bits
  args.offset = static_cast<uint64_t>(offset);
  run_perturb(args);
  return out;
}

void latent_noise_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.is_contiguous(), "latent_noise_: out must be contiguous");
  check_stream(offset, out.numel(), "latent_noise_");
  cpu::PerturbArgs args;
  args.z = nullptr;
  args.out = out.data_ptr();
  args.dtype = to_kernel_dtype(out.scalar_type(), "latent_noise_", "out");
  args.numel = out.numel();
  args.sigma = 1.0;
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  run_perturb(args);
}

at::Tensor temperature_softmax_cpu(const at::Tensor& logits, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "temperature_softmax: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(logits.dim() >= 1, "temperature_softmax: logits must have at least one dimension");
  const auto dtype = to_kernel_dtype(logits.scalar_type(), "temperature_softmax", "logits");
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
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { cpu::softmax_rows(args, begin, end); });
  return y;
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) {
  m.impl("perturb", &tgtfast::perturb_cpu);
  m.impl("latent_noise_", &tgtfast::latent_noise_cpu);
  m.impl("temperature_softmax", &tgtfast::temperature_softmax_cpu);
}
