// Torch-facing launchers of the CPU latent noise kernel (noise_cpu_kernel.h) -- the perturb and latent_noise_ ops:
// checks, allocation, and parallelism. Schemas in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "cpu_dtype.h"
#include "noise_cpu_kernel.h"

namespace tgtfast {
namespace {

// Elements per parallel task: enough work (a Philox call and a log + sincos per two elements) to amortise
// the task, few enough that small latents still use every thread.
constexpr int64_t kNoiseGrain = 4096;

void check_stream(int64_t offset, int64_t numel, const char* op) {
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  TORCH_CHECK(offset <= INT64_MAX - numel, op, ": offset + numel must be < 2^63, got offset ", offset,
              " and ", numel, " elements");
}

void run_perturb(const cpu::PerturbArgs& args) {
  const auto fn = cpu::cpu_has_avx2() ? &cpu::perturb_range_avx2 : &cpu::perturb_range_base;
  at::parallel_for(0, args.numel, kNoiseGrain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

at::Tensor perturb_cpu(const at::Tensor& z, double sigma, int64_t seed, int64_t offset) {
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, "perturb: sigma must be finite and >= 0, got ", sigma);
  check_stream(offset, z.numel(), "perturb");
  const auto dtype = cpu::to_kernel_dtype(z.scalar_type(), "perturb", "z");
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
  args.dtype = cpu::to_kernel_dtype(out.scalar_type(), "latent_noise_", "out");
  args.numel = out.numel();
  args.sigma = 1.0;
  args.seed = static_cast<uint64_t>(seed);
  args.offset = static_cast<uint64_t>(offset);
  run_perturb(args);
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) {
  m.impl("perturb", &tgtfast::perturb_cpu);
  m.impl("latent_noise_", &tgtfast::latent_noise_cpu);
}
