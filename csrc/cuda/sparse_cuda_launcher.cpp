// Torch-facing launcher of the CUDA kernels of the sparse ops (sparse_cuda.cu): argument checks, output allocation,
// the current stream, and the CUDA registration of tgtfast::sparse_coarse_fwd and sparse_coarse_bwd (schemas in
// csrc/ops.cpp). Compiled only when torch has CUDA (setup.py adds csrc/cuda/*.cpp to the CUDAExtension).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "sparse_cuda.h"

namespace tgtfast {
namespace {

// Checks what both ops take (student, indices, valid, scale) and fills those fields of the kernel arguments.
cuda::SparseCoarseArgs sparse_args(const char* op, const at::Tensor& student, const at::Tensor& indices,
                                   const std::optional<at::Tensor>& valid, double scale) {
  TORCH_CHECK(student.is_cuda(), op, " (CUDA): student must be a CUDA tensor, got ", student.device());
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), op,
              " (CUDA): student must be a contiguous [N, V] tensor, got ", student.sizes());
  cuda::SparseCoarseArgs args;
  switch (student.scalar_type()) {
    case at::kFloat: args.dtype = cuda::DType::kFloat32; break;
    case at::kHalf: args.dtype = cuda::DType::kFloat16; break;
    case at::kBFloat16: args.dtype = cuda::DType::kBFloat16; break;
    default:
      TORCH_CHECK(false, op, " (CUDA): student must be float32, float16 or bfloat16, got ", student.scalar_type());
  }
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(V <= (int64_t{1} << 30), op, " (CUDA): at most 2^30 classes, got ", V);
  TORCH_CHECK(indices.device() == student.device(), op, " (CUDA): indices must be on ", student.device(),
              " like student, got ", indices.device());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == N &&
                  indices.size(1) <= V && indices.is_contiguous(),
              op, " (CUDA): indices must be a contiguous int64 tensor [", N, ", k] with k <= ", V, ", got ",
              indices.scalar_type(), " ", indices.sizes());
  TORCH_CHECK(std::isfinite(scale), op, " (CUDA): scale must be finite, got ", scale);
  if (valid.has_value()) {
    const at::Tensor& v = *valid;
    TORCH_CHECK(v.device() == student.device(), op, " (CUDA): valid must be on ", student.device(),
                " like student, got ", v.device());
    TORCH_CHECK(v.scalar_type() == at::kBool && v.dim() == 1 && v.size(0) == N && v.is_contiguous(), op,
                " (CUDA): valid must be a contiguous bool tensor of shape [", N, "], got ", v.scalar_type(), " ",
                v.sizes());
    args.valid = v.data_ptr<bool>();
  }
  args.student = student.data_ptr();
  args.indices = indices.numel() > 0 ? indices.data_ptr<int64_t>() : nullptr;
  args.rows = N;
  args.classes = V;
  args.kept = indices.size(1);
  args.scale = scale;
  return args;
}

// A float32 [N, k + 1] tensor on the student's device (coarse, grad_coarse).
void check_coarse(const char* op, const char* name, const at::Tensor& t, const cuda::SparseCoarseArgs& args,
                  const at::Tensor& student) {
  TORCH_CHECK(t.device() == student.device() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.size(0) == args.rows && t.size(1) == args.kept + 1 && t.is_contiguous(),
              op, " (CUDA): ", name, " must be a contiguous float32 tensor [", args.rows, ", ", args.kept + 1, "] on ",
              student.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void launch(const char* op, cudaError_t (*kernel)(const cuda::SparseCoarseArgs&, cudaStream_t),
            const cuda::SparseCoarseArgs& args, const at::Tensor& student) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  const cudaError_t err = kernel(args, stream);
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor sparse_coarse_fwd_cuda(const at::Tensor& student, const at::Tensor& indices,
                                  const std::optional<at::Tensor>& valid, double scale) {
  constexpr const char* op = "sparse_coarse_fwd";
  cuda::SparseCoarseArgs args = sparse_args(op, student, indices, valid, scale);
  const c10::cuda::CUDAGuard device_guard(student.device());
  auto coarse = at::empty({args.rows, args.kept + 1}, student.options().dtype(at::kFloat));
  if (args.rows == 0) return coarse;
  args.coarse = coarse.data_ptr<float>();
  launch(op, cuda::sparse_coarse_fwd, args, student);
  return coarse;
}

at::Tensor sparse_coarse_bwd_cuda(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& coarse,
                                  const at::Tensor& grad_coarse, const std::optional<at::Tensor>& valid,
                                  double scale) {
  constexpr const char* op = "sparse_coarse_bwd";
  cuda::SparseCoarseArgs args = sparse_args(op, student, indices, valid, scale);
  check_coarse(op, "coarse", coarse, args, student);
  check_coarse(op, "grad_coarse", grad_coarse, args, student);
  const c10::cuda::CUDAGuard device_guard(student.device());
  auto grad = at::empty_like(student);
  if (args.rows == 0 || args.classes == 0) return grad;
  args.coarse = const_cast<float*>(coarse.data_ptr<float>());  // read only by the backward
  args.grad_coarse = grad_coarse.data_ptr<float>();
  args.grad_student = grad.data_ptr();
  launch(op, cuda::sparse_coarse_bwd, args, student);
  return grad;
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) {
  m.impl("sparse_coarse_fwd", &tgtfast::sparse_coarse_fwd_cuda);
  m.impl("sparse_coarse_bwd", &tgtfast::sparse_coarse_bwd_cuda);
}
