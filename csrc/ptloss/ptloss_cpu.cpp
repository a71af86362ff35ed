// Torch-facing launcher of the CPU PTLoss kernel: checks, allocation, and parallelism over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_dtype.h"
#include "cpu_buffers.h"
#include "ptloss_cpu_kernel.h"

namespace tgtfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ptloss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& valid, double temperature, double label_smoothing, bool teacher_is_logits,
    bool need_grad_student, bool need_grad_teacher, double grad_scale) {
  TORCH_CHECK(student.dim() == 2, "ptloss: student must be 2-D [N, K], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "ptloss: teacher shape ", teacher.sizes(),
              " does not match student shape ", student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "ptloss: teacher dtype ", teacher.scalar_type(),
              " does not match student dtype ", student.scalar_type());
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "ptloss: student and teacher must be contiguous");
  const auto dtype = cpu::to_kernel_dtype(student.scalar_type(), "ptloss", "student");
  const auto acc = dtype == cpu::DType::kFloat64 ? at::kDouble : at::kFloat;
  const int64_t N = student.size(0), K = student.size(1);
  TORCH_CHECK(coeffs.dim() == 1 || (coeffs.dim() == 2 && coeffs.size(1) == K),
              "ptloss: coeffs must be [M] or [M, K] with K = ", K, ", got ", coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == acc && coeffs.is_contiguous(), "ptloss: coeffs must be contiguous ",
              acc, ", got ", coeffs.scalar_type());
  TORCH_CHECK(temperature > 0, "ptloss: temperature must be > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing < 1, "ptloss: label_smoothing must be in [0, 1), got ",
              label_smoothing);
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 1 && valid->size(0) == N &&
                    valid->is_contiguous(),
                "ptloss: valid must be a contiguous bool tensor of shape [", N, "]");
  }
  TORCH_CHECK(K > 0 || N == 0, "ptloss: the class dimension must not be empty");

  auto loss = at::empty({N}, student.options().dtype(acc));
  auto grad_s = need_grad_student ? empty_output_like(student) : at::empty({0}, student.options());
  auto grad_t = need_grad_teacher ? empty_output_like(teacher) : at::empty({0}, teacher.options());
  if (N == 0) return {loss, grad_s, grad_t};

  cpu::PTLossArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.dtype = dtype;
  args.coeffs = coeffs.data_ptr();
  args.coeffs_per_class = coeffs.dim() == 2;
  args.orders = coeffs.size(0);
  args.valid = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  args.loss = loss.data_ptr();
  args.grad_student = need_grad_student ? grad_s.data_ptr() : nullptr;
  args.grad_teacher = need_grad_teacher ? grad_t.data_ptr() : nullptr;
  args.rows = N;
  args.classes = K;
  args.inv_temperature = 1.0 / temperature;
  args.label_smoothing = label_smoothing;
  args.teacher_is_logits = teacher_is_logits;
  args.grad_scale = grad_scale;

  const auto rows_fn = cpu::cpu_has_avx2() ? &cpu::ptloss_rows_avx2 : &cpu::ptloss_rows_base;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { rows_fn(args, begin, end); });
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) { m.impl("ptloss_fwd", &tgtfast::ptloss_fwd_cpu); }
