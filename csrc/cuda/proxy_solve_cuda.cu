// One (candidate, row) pair per thread, grid-stride, each thread with its own slice of the scratch buffers.
#include "proxy_solve_cuda.h"
#include "proxy_solve/proxy_solve_kernel.h"

namespace tgtfast {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kScratchBudget = int64_t{256} << 20;  // bytes of scratch a launch may use

__global__ void proxy_solve_kernel(ProxySolveArgs a, int64_t threads) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= threads) return;
  const int k = static_cast<int>(a.classes), m = static_cast<int>(a.orders);
  const int64_t slot = proxy::workspace_doubles(k, m) + k;  // the solver's workspace, then q
  double* mine = a.scratch_doubles + tid * slot;
  proxy::Workspace ws{a.scratch_ints + tid * k, mine};
  const int64_t pairs = a.candidates * a.rows;
  for (int64_t i = tid; i < pairs; i += threads) {
    const int64_t c = i / a.rows, n = i % a.rows;
    const double* p = a.teacher + n * k;
    const double* eta = a.coeffs + c * m * k;
    double* q = a.proxy != nullptr ? a.proxy + i * k : mine + proxy::workspace_doubles(k, m);
    bool zero = true;  // coeffs = 0: the teacher itself
    for (int j = 0; j < m * k && zero; ++j) zero = eta[j] == 0.0;
    double res = 0.0;
    if (zero) {
      for (int j = 0; j < k; ++j) q[j] = p[j];
    } else {
      res = proxy::solve_row(p, eta, k, m, a.max_iter, a.tol, q, ws);
    }
    a.residual[i] = res;
    if (a.pair_terms != nullptr) {
      const int64_t y = a.labels[n];
      double sq = 0.0, negent = 0.0;
      for (int j = 0; j < k; ++j) {
        const double d = q[j] - (j == y ? 1.0 : 0.0);
        sq += d * d;
        if (q[j] > 0) negent += q[j] * log(q[j]);
      }
      a.pair_terms[2 * i] = sqrt(sq);
      a.pair_terms[2 * i + 1] = negent;
    }
  }
}

}  // namespace

int64_t proxy_solve_threads(int64_t pairs, int64_t classes, int64_t orders) {
  const int64_t per = (proxy::workspace_doubles(static_cast<int>(classes), static_cast<int>(orders)) + classes) * 8 +
                      classes * 4;
  int64_t cap = kScratchBudget / (per > 0 ? per : 1);
  cap = cap < kThreads ? kThreads : cap;
  return pairs < cap ? pairs : cap;
}

cudaError_t proxy_solve(const ProxySolveArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.classes < 1 || a.candidates < 0 || a.orders < 0 || a.teacher == nullptr ||
      a.residual == nullptr || (a.proxy == nullptr && a.pair_terms == nullptr) ||
      (a.pair_terms != nullptr && a.labels == nullptr) || a.scratch_doubles == nullptr ||
      a.scratch_ints == nullptr || a.classes > (int64_t{1} << 20) || a.orders > 64)
    return cudaErrorInvalidValue;
  const int64_t pairs = a.candidates * a.rows;
  if (pairs == 0) return cudaSuccess;
  const int64_t threads = proxy_solve_threads(pairs, a.classes, a.orders);
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  proxy_solve_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, threads);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tgtfast
