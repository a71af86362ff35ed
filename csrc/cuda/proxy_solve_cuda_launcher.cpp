// Torch-facing launcher of the CUDA Proxy Teacher solve (proxy_solve_cuda.cu): checks, outputs, scratch, the current
// stream, and the CUDA registrations of tgtfast::proxy_solve / tgtfast::proxy_deviation_sums (schemas in
// csrc/proxy_solve/proxy_solve_cpu.cpp). Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "proxy_solve_cuda.h"

namespace tgtfast {
namespace {

void check(const at::Tensor& p, const at::Tensor& eta) {
  TORCH_CHECK(p.is_cuda() && eta.device() == p.device(), "proxy_solve (CUDA): tensors on one CUDA device expected");
  TORCH_CHECK(p.scalar_type() == at::kDouble && eta.scalar_type() == at::kDouble,
              "proxy_solve (CUDA): float64 tensors expected");
  TORCH_CHECK(p.dim() == 2 && eta.dim() == 3 && eta.size(2) == p.size(1),
              "proxy_solve (CUDA): teacher_probs [N, K] and coeffs [C, M, K] expected, got ", p.sizes(), " and ",
              eta.sizes());
}

cuda::ProxySolveArgs make_args(const at::Tensor& p, const at::Tensor& eta, int64_t max_iter, double tol,
                          at::Tensor& residual, at::Tensor& scratch_d, at::Tensor& scratch_i) {
  cuda::ProxySolveArgs a;
  a.teacher = p.data_ptr<double>();
  a.coeffs = eta.data_ptr<double>();
  a.rows = p.size(0);
  a.classes = p.size(1);
  a.candidates = eta.size(0);
  a.orders = eta.size(1);
  a.max_iter = static_cast<int>(max_iter);
  a.tol = tol;
  residual = at::empty({a.candidates, a.rows}, p.options());
  a.residual = residual.data_ptr<double>();
  const int64_t threads = cuda::proxy_solve_threads(a.candidates * a.rows, a.classes, a.orders);
  scratch_d = at::empty({std::max<int64_t>(threads, 1), a.classes * (21 + a.orders)}, p.options());
  scratch_i = at::empty({std::max<int64_t>(threads, 1), a.classes}, p.options().dtype(at::kInt));
  a.scratch_doubles = scratch_d.data_ptr<double>();
  a.scratch_ints = scratch_i.data_ptr<int>();
  return a;
}

void launch(const cuda::ProxySolveArgs& a) {
  const cudaError_t err = cuda::proxy_solve(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "proxy_solve (CUDA): ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> proxy_solve_cuda(const at::Tensor& p_in, const at::Tensor& eta_in,
                                                    int64_t max_iter, double tol) {
  check(p_in, eta_in);
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), eta = eta_in.contiguous();
  at::Tensor residual, sd, si;
  cuda::ProxySolveArgs a = make_args(p, eta, max_iter, tol, residual, sd, si);
  at::Tensor q = at::empty({a.candidates, a.rows, a.classes}, p.options());
  a.proxy = q.data_ptr<double>();
  launch(a);
  return {q, residual};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_deviation_sums_cuda(const at::Tensor& p_in,
                                                                          const at::Tensor& eta_in,
                                                                          const at::Tensor& labels_in,
                                                                          int64_t max_iter, double tol) {
  check(p_in, eta_in);
  TORCH_CHECK(labels_in.device() == p_in.device() && labels_in.scalar_type() == at::kLong && labels_in.dim() == 1 &&
                  labels_in.size(0) == p_in.size(0),
              "proxy_deviation_sums (CUDA): labels must be an int64 tensor [N] on the device of teacher_probs");
  const c10::cuda::CUDAGuard guard(p_in.device());
  const at::Tensor p = p_in.contiguous(), eta = eta_in.contiguous(), labels = labels_in.contiguous();
  at::Tensor residual, sd, si;
  cuda::ProxySolveArgs a = make_args(p, eta, max_iter, tol, residual, sd, si);
  at::Tensor terms = at::empty({a.candidates, a.rows, 2}, p.options());
  a.labels = labels.data_ptr<int64_t>();
  a.pair_terms = terms.data_ptr<double>();
  launch(a);
  at::Tensor sums = terms.sum(1);  // [C, 2]
  at::Tensor worst = a.rows > 0 ? std::get<0>(residual.max(1)) : at::zeros({a.candidates}, p.options());
  return {sums.select(1, 0).contiguous(), sums.select(1, 1).contiguous(), worst};
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) {
  m.impl("proxy_solve", &tgtfast::proxy_solve_cuda);
  m.impl("proxy_deviation_sums", &tgtfast::proxy_deviation_sums_cuda);
}
