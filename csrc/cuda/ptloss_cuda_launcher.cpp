// Torch-facing launcher of the CUDA PTLoss kernel (ptloss_cuda.cu): argument checks, output allocation,
// the current stream, and the CUDA registration of tgtfast::ptloss_fwd (schema in csrc/ops.cpp).
// Compiled only when torch has CUDA (setup.py adds csrc/cuda/*.cpp to the CUDAExtension).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "ptloss_cuda.h"

namespace tgtfast {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "ptloss (CUDA): student dtype must be float32, float16 or bfloat16, got ", t);
  }
  return cuda::DType::kFloat32;  // unreachable
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ptloss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& valid, double temperature, double label_smoothing, bool teacher_is_logits,
    bool need_grad_student, bool need_grad_teacher, double grad_scale) {
  TORCH_CHECK(student.is_cuda(), "ptloss (CUDA): student must be a CUDA tensor, got ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), "ptloss (CUDA): teacher must be on ", student.device(),
              " like student, got ", teacher.device());
  TORCH_CHECK(coeffs.device() == student.device(), "ptloss (CUDA): coeffs must be on ", student.device(),
              " like student, got ", coeffs.device());
  TORCH_CHECK(student.dim() == 2, "ptloss (CUDA): student must be 2-D [N, K], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "ptloss (CUDA): teacher shape ", teacher.sizes(),
              " does not match student shape ", student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "ptloss (CUDA): teacher dtype ",
              teacher.scalar_type(), " does not match student dtype ", student.scalar_type());
  TORCH_CHECK(student.is_contiguous(), "ptloss (CUDA): student must be contiguous");
  TORCH_CHECK(teacher.is_contiguous(), "ptloss (CUDA): teacher must be contiguous");
  const cuda::DType dtype = to_kernel_dtype(student.scalar_type());
  const int64_t N = student.size(0), K = student.size(1);
  TORCH_CHECK(K > 0 || N == 0, "ptloss (CUDA): the class dimension must not be empty");
  TORCH_CHECK(K <= (int64_t{1} << 30), "ptloss (CUDA): at most 2^30 classes, got ", K);
  TORCH_CHECK(coeffs.dim() == 1 || (coeffs.dim() == 2 && coeffs.size(1) == K),
              "ptloss (CUDA): coeffs must be [M] or [M, K] with K = ", K, ", got ", coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat, "ptloss (CUDA): coeffs must be float32, got ",
              coeffs.scalar_type());
  TORCH_CHECK(coeffs.is_contiguous(), "ptloss (CUDA): coeffs must be contiguous");
  TORCH_CHECK(coeffs.size(0) <= cuda::kMaxOrders, "ptloss (CUDA): coeffs may have at most ", cuda::kMaxOrders,
              " orders M, got ", coeffs.size(0));
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "ptloss (CUDA): temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing < 1, "ptloss (CUDA): label_smoothing must be in [0, 1), got ",
              label_smoothing);
  const bool* valid_ptr = nullptr;
  if (valid.has_value()) {
    const at::Tensor& v = *valid;
    TORCH_CHECK(v.device() == student.device(), "ptloss (CUDA): valid must be on ", student.device(),
                " like student, got ", v.device());
    TORCH_CHECK(v.scalar_type() == at::kBool && v.dim() == 1 && v.size(0) == N && v.is_contiguous(),
                "ptloss (CUDA): valid must be a contiguous bool tensor of shape [", N, "], got ", v.scalar_type(),
                " ", v.sizes());
    valid_ptr = v.data_ptr<bool>();
  }

  const c10::cuda::CUDAGuard device_guard(student.device());
  auto loss = at::empty({N}, student.options().dtype(at::kFloat));
  auto grad_s = need_grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  auto grad_t = need_grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (N == 0) return {loss, grad_s, grad_t};

  cuda::PTLossArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.dtype = dtype;
  args.coeffs = coeffs.numel() > 0 ? coeffs.data_ptr<float>() : nullptr;
  args.coeffs_per_class = coeffs.dim() == 2;
  args.orders = coeffs.size(0);
  args.valid = valid_ptr;
  args.loss = loss.data_ptr<float>();
  args.grad_student = need_grad_student ? grad_s.data_ptr() : nullptr;
  args.grad_teacher = need_grad_teacher ? grad_t.data_ptr() : nullptr;
  args.rows = N;
  args.classes = K;
  args.inv_temperature = 1.0 / temperature;
  args.label_smoothing = label_smoothing;
  args.teacher_is_logits = teacher_is_logits;
  args.grad_scale = grad_scale;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  const cudaError_t err = cuda::ptloss_fwd(args, stream);
  TORCH_CHECK(err == cudaSuccess, "ptloss (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) { m.impl("ptloss_fwd", &tgtfast::ptloss_fwd_cuda); }
