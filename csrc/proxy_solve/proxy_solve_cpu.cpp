// The batched Proxy Teacher solve on the CPU: every (candidate, row) pair of the grid in one parallel loop over
// csrc/proxy_solve/proxy_solve_kernel.h, optionally reduced straight to the two sums of the Eq. 21 deviation per candidate so that
// the [C, N, K] grid of proxy teachers is never stored. Schemas in csrc/ops.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "proxy_solve_kernel.h"

namespace {

void check_inputs(const at::Tensor& p, const at::Tensor& eta) {
  TORCH_CHECK(p.device().is_cpu() && eta.device().is_cpu(), "proxy_solve: CPU tensors expected");
  TORCH_CHECK(p.scalar_type() == at::kDouble && eta.scalar_type() == at::kDouble,
              "proxy_solve: float64 tensors expected, got ", p.scalar_type(), " and ", eta.scalar_type());
  TORCH_CHECK(p.dim() == 2, "proxy_solve: teacher_probs must be [N, K], got ", p.sizes());
  TORCH_CHECK(eta.dim() == 3 && eta.size(2) == p.size(1), "proxy_solve: coeffs must be [C, M, K] with K = ",
              p.size(1), ", got ", eta.sizes());
}

// (q [C, N, K], residual [C, N]) for every candidate c and row n.
std::tuple<at::Tensor, at::Tensor> proxy_solve_cpu(const at::Tensor& p_in, const at::Tensor& eta_in,
                                                   int64_t max_iter, double tol) {
  check_inputs(p_in, eta_in);
  const at::Tensor p = p_in.contiguous(), eta = eta_in.contiguous();
  const int64_t n = p.size(0), k = p.size(1), c = eta.size(0), m = eta.size(1);
  at::Tensor q = at::empty({c, n, k}, p.options());
  at::Tensor res = at::empty({c, n}, p.options());
  const double* pp = p.data_ptr<double>();
  const double* ep = eta.data_ptr<double>();
  double* qp = q.data_ptr<double>();
  double* rp = res.data_ptr<double>();
  at::parallel_for(0, c * n, 64, [&](int64_t begin, int64_t end) {
    std::vector<int> idx(k);
    std::vector<double> scratch(tgtfast::proxy::workspace_doubles(static_cast<int>(k), static_cast<int>(m)));
    tgtfast::proxy::Workspace ws{idx.data(), scratch.data()};
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ci = i / n, ni = i % n;
      rp[i] = tgtfast::proxy::solve_row(pp + ni * k, ep + ci * m * k, static_cast<int>(k), static_cast<int>(m),
                                        static_cast<int>(max_iter), tol, qp + i * k, ws);
    }
  });
  return {q, res};
}

// Per candidate: (sum_n ||q_n - y_n||_2, sum_n q_n^T log q_n, worst stationarity residual), q never stored.
// Rows are summed in fixed chunks and the chunks in order, so the result does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> proxy_deviation_sums_cpu(const at::Tensor& p_in,
                                                                         const at::Tensor& eta_in,
                                                                         const at::Tensor& labels_in,
                                                                         int64_t max_iter, double tol) {
  check_inputs(p_in, eta_in);
  TORCH_CHECK(labels_in.device().is_cpu() && labels_in.scalar_type() == at::kLong && labels_in.dim() == 1 &&
                  labels_in.size(0) == p_in.size(0),
              "proxy_deviation_sums: labels must be an int64 CPU tensor of shape [N]");
  const at::Tensor p = p_in.contiguous(), eta = eta_in.contiguous(), labels = labels_in.contiguous();
  const int64_t n = p.size(0), k = p.size(1), c = eta.size(0), m = eta.size(1);
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::Tensor part = at::zeros({c, std::max<int64_t>(chunks, 1), 3}, p.options());
  const double* pp = p.data_ptr<double>();
  const double* ep = eta.data_ptr<double>();
  const int64_t* lp = labels.data_ptr<int64_t>();
  double* out = part.data_ptr<double>();
  at::parallel_for(0, c * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int> idx(k);
    std::vector<double> scratch(tgtfast::proxy::workspace_doubles(static_cast<int>(k), static_cast<int>(m)));
    tgtfast::proxy::Workspace ws{idx.data(), scratch.data()};
    std::vector<double> q(k);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t ci = w / chunks, r0 = (w % chunks) * kChunk, r1 = std::min(n, r0 + kChunk);
      const double* eta_c = ep + ci * m * k;
      bool zero = true;  // coeffs = 0: the proxy teacher is the teacher itself
      for (int64_t i = 0; i < m * k && zero; ++i) zero = eta_c[i] == 0.0;
      double s1 = 0.0, s2 = 0.0, worst = 0.0;
      for (int64_t ni = r0; ni < r1; ++ni) {
        const double* prow = pp + ni * k;
        if (zero) {
          std::copy(prow, prow + k, q.begin());
        } else {
          const double r = tgtfast::proxy::solve_row(prow, eta_c, static_cast<int>(k), static_cast<int>(m),
                                                     static_cast<int>(max_iter), tol, q.data(), ws);
          worst = std::max(worst, r);
        }
        double sq = 0.0, negent = 0.0;
        for (int64_t j = 0; j < k; ++j) {
          const double d = q[j] - (j == lp[ni] ? 1.0 : 0.0);
          sq += d * d;
          if (q[j] > 0) negent += q[j] * std::log(q[j]);
        }
        s1 += std::sqrt(sq);
        s2 += negent;
      }
      double* o = out + w * 3;
      o[0] = s1;
      o[1] = s2;
      o[2] = worst;
    }
  });
  at::Tensor sums = part.narrow(2, 0, 2).sum(1);  // [C, 2], chunks added in order
  at::Tensor worst = std::get<0>(part.select(2, 2).max(1));
  return {sums.select(1, 0).contiguous(), sums.select(1, 1).contiguous(), worst};
}

}  // namespace

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) {
  m.impl("proxy_solve", &proxy_solve_cpu);
  m.impl("proxy_deviation_sums", &proxy_deviation_sums_cpu);
}
