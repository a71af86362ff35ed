// Torch-facing launchers of the CPU sparse-teacher kernels: checks, allocation, and parallelism over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu_dtype.h"
#include "cpu_buffers.h"
#include "divergence/divergence_cpu_kernel.h"
#include "sparse_cpu_kernel.h"

namespace tgtfast {
namespace {

cpu::SparseCoarseArgs common_args(const char* op, const at::Tensor& student, const at::Tensor& indices,
                                  const std::optional<at::Tensor>& valid, double scale) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), op, ": student must be a contiguous [N, V] tensor, got ",
              student.sizes());
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == student.size(0) && indices.scalar_type() == at::kLong &&
                  indices.is_contiguous(),
              op, ": indices must be a contiguous int64 [N, k] tensor with N = ", student.size(0), ", got ",
              indices.sizes(), " ", indices.scalar_type());
  TORCH_CHECK(indices.size(1) <= student.size(1), op, ": k = ", indices.size(1), " exceeds V = ", student.size(1));
  TORCH_CHECK(scale > 0, op, ": scale must be > 0, got ", scale);
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->dim() == 1 && valid->size(0) == student.size(0) &&
                    valid->is_contiguous(),
                op, ": valid must be a contiguous bool tensor of shape [", student.size(0), "]");
  }
  cpu::SparseCoarseArgs args;
  args.student = student.data_ptr();
  args.dtype = cpu::to_kernel_dtype(student.scalar_type(), op, "student");
  args.indices = indices.data_ptr<int64_t>();
  args.valid = valid.has_value() ? valid->data_ptr<bool>() : nullptr;
  args.rows = student.size(0);
  args.classes = student.size(1);
  args.kept = indices.size(1);
  args.scale = scale;
  return args;
}

int64_t grain(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

at::Tensor sparse_coarse_fwd_cpu(const at::Tensor& student, const at::Tensor& indices,
                                 const std::optional<at::Tensor>& valid, double scale) {
  auto args = common_args("sparse_coarse_fwd", student, indices, valid, scale);
  const auto acc = args.dtype == cpu::DType::kFloat64 ? at::kDouble : at::kFloat;
  auto out = at::empty({args.rows, args.kept + 1}, student.options().dtype(acc));
  if (args.rows == 0) return out;
  args.out = out.data_ptr();
  const auto fn = cpu::cpu_has_avx2() ? &cpu::sparse_coarse_fwd_avx2 : &cpu::sparse_coarse_fwd_base;
  at::parallel_for(0, args.rows, grain(args.classes), [&](int64_t b, int64_t e) { fn(args, b, e); });
  return out;
}

at::Tensor sparse_coarse_bwd_cpu(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& coarse,
                                 const at::Tensor& grad_coarse, const std::optional<at::Tensor>& valid,
                                 double scale) {
  auto args = common_args("sparse_coarse_bwd", student, indices, valid, scale);
  const auto acc = args.dtype == cpu::DType::kFloat64 ? at::kDouble : at::kFloat;
  for (const auto* t : {&coarse, &grad_coarse}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == args.rows && t->size(1) == args.kept + 1 && t->scalar_type() == acc &&
                    t->is_contiguous(),
                "sparse_coarse_bwd: coarse and grad_coarse must be contiguous ", acc, " [", args.rows, ", ",
                args.kept + 1, "] tensors, got ", t->sizes(), " ", t->scalar_type());
  }
  auto out = empty_output_like(student);
  if (args.rows == 0) return out;
  args.coarse = coarse.data_ptr();
  args.grad_coarse = grad_coarse.data_ptr();
  args.out = out.data_ptr();
  const auto fn = cpu::cpu_has_avx2() ? &cpu::sparse_coarse_bwd_avx2 : &cpu::sparse_coarse_bwd_base;
  at::parallel_for(0, args.rows, grain(args.classes), [&](int64_t b, int64_t e) { fn(args, b, e); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_divergence_fwd_cpu(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& teacher,
    const std::optional<at::Tensor>& valid, bool tail, double slack, int64_t divergence, double param_a,
    double param_b, double scale, double teacher_scale, bool need_grad, double grad_scale) {
  cpu::SparseDivergenceArgs args;
  args.coarse = common_args("sparse_divergence_fwd", student, indices, valid, scale);
  TORCH_CHECK(teacher.sizes() == indices.sizes() && teacher.scalar_type() == at::kDouble && teacher.is_contiguous(),
              "sparse_divergence_fwd: teacher must be a contiguous float64 tensor of the indices' shape ",
              indices.sizes(), ", got ", teacher.sizes(), " ", teacher.scalar_type());
  TORCH_CHECK(divergence >= 0 && divergence < cpu::kNumDivergences, "sparse_divergence_fwd: unknown divergence code ",
              divergence);
  TORCH_CHECK(std::isfinite(param_a) && std::isfinite(param_b) && std::isfinite(grad_scale) && slack >= 0 &&
                  teacher_scale > 0 && std::isfinite(teacher_scale),
              "sparse_divergence_fwd: parameters and scales must be finite (teacher_scale > 0, slack >= 0)");
  TORCH_CHECK(args.coarse.kept > 0, "sparse_divergence_fwd: the teacher needs k >= 1 classes per row");
  const auto acc = args.coarse.dtype == cpu::DType::kFloat64 ? at::kDouble : at::kFloat;
  const int64_t N = args.coarse.rows;
  auto loss = at::empty({N}, student.options().dtype(acc));
  auto grad = need_grad ? empty_output_like(student) : at::empty({0}, student.options());
  auto status = at::empty({N}, student.options().dtype(at::kChar));
  if (N == 0) return {loss, grad, status};
  args.teacher = teacher.data_ptr<double>();
  args.tail = tail;
  args.slack = slack;
  args.teacher_scale = teacher_scale;
  args.divergence = static_cast<int>(divergence);
  args.param_a = param_a;
  args.param_b = param_b;
  args.grad_scale = grad_scale;
  args.loss = loss.data_ptr();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.status = status.data_ptr<int8_t>();
  const auto fn = cpu::cpu_has_avx2() ? &cpu::sparse_divergence_rows_avx2 : &cpu::sparse_divergence_rows_base;
  at::parallel_for(0, N, grain(args.coarse.classes), [&](int64_t b, int64_t e) { fn(args, b, e); });
  return {loss, grad, status};
}

std::tuple<at::Tensor, at::Tensor> sparse_topk_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& rows,
                                                   int64_t k, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.stride(0) == logits.size(1),
              "sparse_topk: logits must be a contiguous [N, V] tensor, got ", logits.sizes());
  TORCH_CHECK(k >= 1 && k <= logits.size(1), "sparse_topk: k must be in [1, V = ", logits.size(1), "], got ", k);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "sparse_topk: temperature must be > 0, got ",
              temperature);
  cpu::SparseTopkArgs args;
  args.rows_count = logits.size(0);
  if (rows.has_value()) {
    TORCH_CHECK(rows->dim() == 1 && rows->scalar_type() == at::kLong && rows->is_contiguous(),
                "sparse_topk: rows must be a contiguous int64 vector");
    args.rows_count = rows->size(0);
    if (args.rows_count > 0) {
      const auto lo = rows->min().item<int64_t>(), hi = rows->max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < logits.size(0), "sparse_topk: rows must be in [0, ", logits.size(0), "), got ",
                  lo, " .. ", hi);
    }
    args.rows = rows->data_ptr<int64_t>();
  }
  auto values = at::empty({args.rows_count, k}, logits.options().dtype(at::kFloat));
  auto indices = at::empty({args.rows_count, k}, logits.options().dtype(at::kLong));
  if (args.rows_count == 0) return {values, indices};
  args.logits = logits.data_ptr();
  args.dtype = cpu::to_kernel_dtype(logits.scalar_type(), "sparse_topk", "logits");
  args.classes = logits.size(1);
  args.kept = k;
  args.inv_temperature = 1.0 / temperature;
  args.values = values.data_ptr<float>();
  args.indices = indices.data_ptr<int64_t>();
  const auto fn = cpu::cpu_has_avx2() ? &cpu::sparse_topk_rows_avx2 : &cpu::sparse_topk_rows_base;
  at::parallel_for(0, args.rows_count, grain(args.classes), [&](int64_t b, int64_t e) { fn(args, b, e); });
  return {values, indices};
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) {
  m.impl("sparse_coarse_fwd", &tgtfast::sparse_coarse_fwd_cpu);
  m.impl("sparse_coarse_bwd", &tgtfast::sparse_coarse_bwd_cpu);
  m.impl("sparse_divergence_fwd", &tgtfast::sparse_divergence_fwd_cpu);
  m.impl("sparse_topk", &tgtfast::sparse_topk_cpu);
}
