// The batched Proxy Teacher solve on the GPU: one (candidate, row) pair per CUDA thread, running the same
// per-row solver as the CPU (csrc/proxy_solve/proxy_solve_kernel.h). Plain CUDA on raw pointers and a stream, no torch headers;
// the torch-facing launcher is proxy_solve_cuda_launcher.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tgtfast {
namespace cuda {

struct ProxySolveArgs {
  const double* teacher = nullptr;  // [rows, classes], rows sum to 1
  const double* coeffs = nullptr;   // [candidates, orders, classes]
  const int64_t* labels = nullptr;  // [rows] or null; with labels, per-pair deviation terms are written
  double* proxy = nullptr;          // [candidates, rows, classes] or null (then `pair_terms` must be given)
  double* residual = nullptr;       // [candidates, rows]
  double* pair_terms = nullptr;     // [candidates, rows, 2]: ||q - y||_2 and q^T log q (with labels), or null
  int64_t rows = 0, classes = 0, candidates = 0, orders = 0;
  int max_iter = 100;
  double tol = 1e-10;
  // per-thread scratch: scratch_doubles [threads, classes * (21 + orders)] and scratch_ints [threads, classes],
  // threads = the number of threads the launch uses (proxy_solve_threads)
  double* scratch_doubles = nullptr;
  int* scratch_ints = nullptr;
};

// How many threads (and scratch slots) a launch for this problem uses.
int64_t proxy_solve_threads(int64_t pairs, int64_t classes, int64_t orders);

// Enqueues the solve on `stream`. Returns cudaErrorInvalidValue for bad arguments, else the launch status.
cudaError_t proxy_solve(const ProxySolveArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
