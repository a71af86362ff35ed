// The extension module: every op schema (TORCH_LIBRARY) and the pybind11 module that loads them and
// answers capability queries. Backends register implementations (TORCH_LIBRARY_IMPL) in their own files:
// csrc/<stem>/<stem>_cpu.cpp for CPU, csrc/cuda/<stem>_cuda_launcher.cpp for CUDA.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_buffers.h"
#include "cpu_isa.h"
#include "cpu_math_eval.h"

// Every op schema of the library, one comment per schema naming its stem: the CPU and CUDA implementations of stem
// <stem> are csrc/<stem>/<stem>_cpu.cpp and csrc/cuda/<stem>_cuda_launcher.cpp, the math in docs/design.md.
TORCH_LIBRARY(tgtfast, m) {
  // [ptloss] Per-row PTLoss and its gradients in one pass; math: docs/design.md, section "PTLoss".
  // Returns (loss [N], grad_student [N, K] or [0], grad_teacher [N, K] or [0]); the gradients are those of
  // grad_scale * loss[n] (the weight the caller's reduction gives each row).
  m.def(
      "ptloss_fwd(Tensor student, Tensor teacher, Tensor coeffs, Tensor? valid, float temperature, "
      "float label_smoothing, bool teacher_is_logits, bool need_grad_student, bool need_grad_teacher, "
      "float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // [divergence] Per-row divergence between p = softmax(teacher * teacher_scale) and q = softmax(student *
  // student_scale) and its gradients in one pass; math: docs/design.md, section "Divergences". `divergence` is the
  // index in tgtfast.reference.DIVERGENCES; param_a / param_b its parameters (jsd: beta; skew_kl and
  // skew_reverse_kl: alpha; symmetric_kl: lam; ab_divergence: alpha, beta; taid: t). The scales are
  // logit_scale / temperature. Returns (loss [N], grad_student [N, K] or [0], grad_teacher [N, K] or [0]), the
  // gradients of grad_scale * loss[n] wrt the unscaled logits; rows where valid is false are 0.
  m.def(
      "divergence_fwd(Tensor student, Tensor teacher, Tensor? valid, int divergence, float param_a, "
      "float param_b, float student_scale, float teacher_scale, bool need_grad_student, bool need_grad_teacher, "
      "float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // [sparse] The student's logits coarse-grained to a sparse teacher's kept classes plus one tail bucket; math:
  // docs/design.md, section "Sparse teachers". student [N, V], indices [N, k] int64 (in range, distinct per row),
  // u = student * scale: returns coarse [N, k + 1] (float32; float64 for float64): u at the indices, then
  // log sum_{i not kept} exp(u_i) (-inf when nothing is left). Rows where valid is false are 0 and not read.
  m.def("sparse_coarse_fwd(Tensor student, Tensor indices, Tensor? valid, float scale) -> Tensor");
  // [sparse] Gradient of sparse_coarse_fwd: grad_student [N, V] (student's dtype) = scale * grad_coarse[n, j] at
  // indices[n, j], and scale * grad_coarse[n, k] * exp(u_i - coarse[n, k]) elsewhere (0 where the tail is
  // -inf); rows where valid is false are 0.
  m.def("sparse_coarse_bwd(Tensor student, Tensor indices, Tensor coarse, Tensor grad_coarse, Tensor? valid, "
        "float scale) -> Tensor");
  // [sparse] The whole divergence from a sparse teacher in one pass over the student (CPU): per row, the teacher's
  // checks (status [N] int8: 0 ok, 1 index out of range, 2 repeated index, 3 NaN log-probability, 4 one above
  // `slack`, 5 kept mass above 1 + slack * k with a tail), sparse_coarse_fwd, the divergence (code and parameters as
  // divergence_fwd) between the coarse student and the teacher's coarse log-probabilities (teacher [N, k] float64
  // log-probabilities, clamped at 0, then log(1 - kept mass) when `tail`, all times teacher_scale, normalised) and
  // the gradient of grad_scale * loss[n] wrt the student. Returns (loss [N], grad_student [N, V] or [0], status);
  // rows where valid is false or the status is not 0 have loss 0 and gradient 0.
  m.def("sparse_divergence_fwd(Tensor student, Tensor indices, Tensor teacher, Tensor? valid, bool tail, "
        "float slack, int divergence, float param_a, float param_b, float scale, float teacher_scale, "
        "bool need_grad, float grad_scale=1.0) -> (Tensor, Tensor, Tensor)");
  // [sparse] The teacher cache's reduction: the k largest entries of log_softmax(logits[rows] / temperature) per row
  // (all rows when rows is None), values float32 most probable first and their int64 class ids; a row with NaN,
  // +inf or no finite logit gets NaN values. CPU only (elsewhere torch.topk of torch.log_softmax).
  m.def("sparse_topk(Tensor logits, Tensor? rows, int k, float temperature) -> (Tensor, Tensor)");
  // [noise] TGT latent perturbation z + sigma * noise(seed, offset); math: docs/design.md, section "Noise".
  // The noise (csrc/common/philox.h) is never stored. The seed's 64 bits travel as a (two's complement) int;
  // offset >= 0 is the stream index of element 0.
  m.def("perturb(Tensor z, float sigma, int seed, int offset) -> Tensor");
  // [noise] Fills `out` with the noise stream of (seed, offset); math: docs/design.md, section "Noise".
  m.def("latent_noise_(Tensor(a!) out, int seed, int offset) -> ()");
  // [softmax] softmax(logits / temperature) over the last dimension; math: docs/design.md, section "TGT step".
  m.def("temperature_softmax(Tensor logits, float temperature) -> Tensor");
  // [mlp_chain] Fused perturb -> decode -> label MLP chain; math: docs/design.md, section "TGT step".
  // x_new = decoder(z + sigma * noise(seed, offset)) (layers [0, num_decoder_layers)), soft =
  // softmax(labeler(x_new) / temperature). Weights are float32 [out, in]; activation codes as tgtfast/_mlp.py
  // ACTIVATIONS. Returns (x_new, soft, perturbed latent [B, d] float32 or [0]).
  m.def(
      "mlp_chain_fwd(Tensor z, Tensor[] weights, Tensor?[] biases, int[] activations, int num_decoder_layers, "
      "float sigma, int seed, int offset, float temperature, bool need_perturbed) -> (Tensor, Tensor, Tensor)");
  // [mlp_chain] Gradient of mlp_chain_fwd to the latent; math: docs/design.md, section "TGT step".
  // Recomputed from the perturbed latent: grad_x [B, d_x] and grad_soft [B, K] (float32, either may be absent)
  // -> grad [B, d] float32. The forward's float32 outputs x_new and soft, when given, spare recomputing the
  // layers whose results they are (see csrc/mlp_chain/mlp_chain_cpu.cpp).
  m.def(
      "mlp_chain_bwd(Tensor perturbed, Tensor[] weights, Tensor?[] biases, int[] activations, "
      "int num_decoder_layers, float temperature, Tensor? grad_x, Tensor? grad_soft, Tensor? x_new=None, "
      "Tensor? soft=None) -> Tensor");
  // [proxy_solve] Proxy Teacher of every candidate and row; math: docs/design.md, section "Proxy Teacher".
  // coeffs [C, M, K], teacher_probs [N, K] with rows summing to 1, float64: (q [C, N, K], stationarity
  // residual [C, N]; 0 for K <= 2, where the solve is global).
  m.def("proxy_solve(Tensor teacher_probs, Tensor coeffs, int max_iter, float tol) -> (Tensor, Tensor)");
  // [proxy_solve] The same solve reduced to the Eq. 21 sums; math: docs/design.md, section "Proxy Teacher".
  // (sum_n ||q_n - y_n||, sum_n q_n log q_n, worst residual), each [C]. Candidates whose coefficients are all 0
  // use the teacher itself.
  m.def("proxy_deviation_sums(Tensor teacher_probs, Tensor coeffs, Tensor labels, int max_iter, float tol) "
        "-> (Tensor, Tensor, Tensor)");
}

namespace {

bool built_with_cuda() {
#ifdef TGTFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() { return tgtfast::cpu::cpu_has_avx2() ? "avx2" : "baseline"; }

// Test-only: helper `name` of csrc/common/cpu_math.h applied to every element of the float32 tensor x, in the
// AVX2+FMA build ("avx2", refused where the processor lacks it) or the baseline build ("baseline").
at::Tensor math_eval(const std::string& name, const at::Tensor& x, const std::string& isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "_math_eval: x must be a float32 CPU tensor");
  TORCH_CHECK(isa == "avx2" || isa == "baseline", "_math_eval: isa must be 'avx2' or 'baseline', got ", isa);
  TORCH_CHECK(isa != "avx2" || tgtfast::cpu::cpu_has_avx2(), "_math_eval: this processor has no AVX2+FMA");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const auto fn = isa == "avx2" ? &tgtfast::cpu::math_eval_avx2 : &tgtfast::cpu::math_eval_base;
  TORCH_CHECK(fn(name.c_str(), xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel()),
              "_math_eval: unknown helper '", name, "'");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tgtfast compiled kernels (ops are registered under torch.ops.tgtfast)";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled into this build.");
  m.def("release_cached_buffers", &tgtfast::release_cached_buffers,
        "Frees the cached CPU output blocks (csrc/common/cpu_buffers.cpp); returns the bytes released.");
  m.def("cached_buffer_bytes", &tgtfast::cached_buffer_bytes, "Bytes held by cached CPU output blocks.");
  m.def("cpu_isa", &cpu_isa, "Instruction set the CPU kernels use on this processor: 'avx2' or 'baseline'.");
  m.def("_math_eval", &math_eval, pybind11::arg("name"), pybind11::arg("x"), pybind11::arg("isa") = "baseline",
        "Test only: a csrc/common/cpu_math.h helper (exp, exp_nonpos, log, tanh, sigmoid, sin, cos) applied to "
        "every element of a float32 CPU tensor, in the 'avx2' or 'baseline' build.");
}
