// Torch-facing launcher of the CUDA divergence kernel (divergence_cuda.cu): argument checks, output allocation, the
// current stream, and the CUDA registration of tgtfast::divergence_fwd (schema in csrc/ops.cpp).
// Compiled only when torch has CUDA (setup.py adds csrc/cuda/*.cpp to the CUDAExtension).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "divergence_cuda.h"

namespace tgtfast {
namespace {

// The divergences' names in code order (tgtfast.reference.DIVERGENCES), for messages.
constexpr const char* kNames[cuda::kNumDivergences] = {
    "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "symmetric_kl", "ab_divergence", "taid"};

void check_params(int64_t divergence, double a, double b) {
  using D = cuda::Divergence;
  const auto code = static_cast<D>(divergence);
  if (code == D::kABDivergence) {
    TORCH_CHECK(std::isfinite(a) && std::isfinite(b), "divergence (CUDA): ab_divergence needs finite param_a (alpha) "
                "and param_b (beta), got ", a, " and ", b);
  } else if (code == D::kJSD || code == D::kSkewKL || code == D::kSkewReverseKL || code == D::kSymmetricKL ||
             code == D::kTAID) {
    TORCH_CHECK(a >= 0 && a <= 1, "divergence (CUDA): ", kNames[divergence], " needs param_a in [0, 1], got ", a);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& valid, int64_t divergence,
    double param_a, double param_b, double student_scale, double teacher_scale, bool need_grad_student,
    bool need_grad_teacher, double grad_scale) {
  TORCH_CHECK(student.is_cuda(), "divergence (CUDA): student must be a CUDA tensor, got ", student.device());
  TORCH_CHECK(teacher.device() == student.device(), "divergence (CUDA): teacher must be on ", student.device(),
              " like student, got ", teacher.device());
  TORCH_CHECK(student.dim() == 2, "divergence (CUDA): student must be 2-D [N, K], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "divergence (CUDA): teacher shape ", teacher.sizes(),
              " does not match student shape ", student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "divergence (CUDA): teacher dtype ",
              teacher.scalar_type(), " does not match student dtype ", student.scalar_type());
  TORCH_CHECK(student.is_contiguous(), "divergence (CUDA): student must be contiguous");
  TORCH_CHECK(teacher.is_contiguous(), "divergence (CUDA): teacher must be contiguous");
  const at::ScalarType st = student.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "divergence (CUDA): student dtype must be float32, float16 or bfloat16, got ", st);
  const cuda::DType dtype =
      st == at::kFloat ? cuda::DType::kFloat32 : (st == at::kHalf ? cuda::DType::kFloat16 : cuda::DType::kBFloat16);
  const int64_t N = student.size(0), K = student.size(1);
  TORCH_CHECK(K > 0 || N == 0, "divergence (CUDA): the class dimension must not be empty");
  TORCH_CHECK(K <= (int64_t{1} << 30), "divergence (CUDA): at most 2^30 classes, got ", K);
  TORCH_CHECK(divergence >= 0 && divergence < cuda::kNumDivergences,
              "divergence (CUDA): divergence must be a code in [0, ", cuda::kNumDivergences,
              ") (an index into tgtfast.reference.DIVERGENCES), got ", divergence);
  check_params(divergence, param_a, param_b);
  TORCH_CHECK(student_scale > 0 && std::isfinite(student_scale),
              "divergence (CUDA): student_scale must be finite and > 0, got ", student_scale);
  TORCH_CHECK(teacher_scale > 0 && std::isfinite(teacher_scale),
              "divergence (CUDA): teacher_scale must be finite and > 0, got ", teacher_scale);
  const bool* valid_ptr = nullptr;
  if (valid.has_value()) {
    const at::Tensor& v = *valid;
    TORCH_CHECK(v.device() == student.device(), "divergence (CUDA): valid must be on ", student.device(),
                " like student, got ", v.device());
    TORCH_CHECK(v.scalar_type() == at::kBool && v.dim() == 1 && v.size(0) == N && v.is_contiguous(),
                "divergence (CUDA): valid must be a contiguous bool tensor of shape [", N, "], got ", v.scalar_type(),
                " ", v.sizes());
    valid_ptr = v.data_ptr<bool>();
  }

  const c10::cuda::CUDAGuard device_guard(student.device());
  auto loss = at::empty({N}, student.options().dtype(at::kFloat));
  auto grad_s = need_grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  auto grad_t = need_grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (N == 0) return {loss, grad_s, grad_t};

  cuda::DivergenceArgs args;
  args.student = student.data_ptr();
  args.teacher = teacher.data_ptr();
  args.dtype = dtype;
  args.valid = valid_ptr;
  args.loss = loss.data_ptr<float>();
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

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.device().index()).stream();
  const cudaError_t err = cuda::divergence_fwd(args, stream);
  TORCH_CHECK(err == cudaSuccess, "divergence (CUDA): kernel launch failed: ", cudaGetErrorString(err));
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) { m.impl("divergence_fwd", &tgtfast::divergence_fwd_cuda); }
