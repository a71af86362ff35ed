// Torch-facing launcher of the CPU divergence kernel (divergence_cpu_kernel.h): checks, allocation, and parallelism
// over rows. Schema in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "cpu_buffers.h"
#include "cpu_dtype.h"
#include "divergence_cpu_kernel.h"

namespace tgtfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& valid, int64_t divergence,
    double param_a, double param_b, double student_scale, double teacher_scale, bool need_grad_student,
    bool need_grad_teacher, double grad_scale) {
  TORCH_CHECK(student.dim() == 2, "divergence: student must be 2-D [N, K], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "divergence: teacher shape ", teacher.sizes(),
              " does not match student shape ", student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "divergence: teacher dtype ", teacher.scalar_type(),
              " does not match student dtype ", student.scalar_type());
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(),
              "divergence: student and teacher must be contiguous");
  TORCH_CHECK(divergence >= 0 && divergence < cpu::kNumDivergences, "divergence: unknown divergence code ",
              divergence, " (expected 0 .. ", cpu::kNumDivergences - 1, ")");
  TORCH_CHECK(std::isfinite(param_a) && std::isfinite(param_b), "divergence: parameters must be finite, got ",
              param_a, ", ", param_b);
  TORCH_CHECK(std::isfinite(student_scale) && std::isfinite(teacher_scale) && std::isfinite(grad_scale),
              "divergence: scales must be finite, got ", student_scale, ", ", teacher_scale, ", ", grad_scale);
  const auto dtype = cpu::to_kernel_dtype(student.scalar_type(), "divergence", "student");
  const auto acc = dtype == cpu::DType::kFloat64 ? at::kDouble : at::kFloat;
  const int64_t N = student.size(0), K = student.size(1);
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 1 && valid->size(0) == N &&
                    valid->is_contiguous() && valid->device().is_cpu(),
                "divergence: valid must be a contiguous CPU bool tensor of shape [", N, "]");
  }
  TORCH_CHECK(K > 0 || N == 0, "divergence: the class dimension must not be empty");

  auto loss = at::empty({N}, student.options().dtype(acc));
  auto grad_s = need_grad_student ? empty_output_like(student) : at::empty({0}, student.options());
  auto grad_t = need_grad_teacher ? empty_output_like(teacher) : at::empty({0}, teacher.options());
  if (N == 0) return {loss, grad_s, grad_t};

  cpu::DivergenceArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.dtype = dtype;
  args.valid = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  args.loss = loss.data_ptr();
  args.grad_student = need_grad_student ? grad_s.data_ptr() : nullptr;
  args.grad_teacher = need_grad_teacher ? grad_t.data_ptr() : nullptr;
  args.rows = N;
  args.classes = K;
  args.divergence = static_cast<int>(divergence);
  args.param_a = param_a;
  args.param_b = param_b;
  args.student_scale = student_scale;
  args.teacher_scale = teacher_scale;
  args.grad_scale = grad_scale;

  const auto rows_fn = cpu::cpu_has_avx2() ? &cpu::divergence_rows_avx2 : &cpu::divergence_rows_base;
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { rows_fn(args, begin, end); });
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) { m.impl("divergence_fwd", &tgtfast::divergence_fwd_cpu); }
