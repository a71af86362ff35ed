// Torch-facing launcher of the CUDA MLP chain (mlp_chain_cuda.cu): argument checks, buffers, the current stream,
// and the CUDA registrations of tgtfast::mlp_chain_fwd and mlp_chain_bwd (schemas in csrc/ops.cpp). The forward
// processes the batch in chunks of kChunkRows rows so that the float32 hidden activations between two layers never
// take more than kChunkRows x (widest layer) floats, whatever B is; the backward in chunks of kBwdChunkFloats.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "mlp_chain_cuda.h"

namespace tgtfast {
namespace {

constexpr int64_t kChunkRows = 16384;
constexpr int64_t kBwdChunkFloats = int64_t{1} << 25;  // the backward's recomputed activations: 128 MiB per chunk

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mlp_chain (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// Layer l of a chunk of `rows` rows: input `in` ([rows, in_w] of in_dtype), output y ([rows, out] float32).
cuda::MlpLayerArgs layer_args(at::TensorList weights, const std::vector<const float*>& bias_ptr,
                              at::IntArrayRef activations, int64_t l, const void* in, cuda::MlpChainDType in_dtype,
                              int64_t in_w, float* y, int64_t rows) {
  cuda::MlpLayerArgs a;
  a.x = in;
  a.x_dtype = in_dtype;
  a.w = weights[l].data_ptr<float>();
  a.bias = bias_ptr[l];
  a.y = y;
  a.rows = rows;
  a.in = in_w;
  a.outs = weights[l].size(0);
  a.act = static_cast<int>(activations[l]);
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_chain_fwd_cuda(
    const at::Tensor& z, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    at::IntArrayRef activations, int64_t num_decoder_layers, double sigma, int64_t seed, int64_t offset,
    double temperature, bool need_perturbed) {
  TORCH_CHECK(z.is_cuda(), "mlp_chain_fwd (CUDA): z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, "mlp_chain_fwd (CUDA): z must be 2-D [B, d], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16,
              "mlp_chain_fwd (CUDA): z must be float32 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "mlp_chain_fwd (CUDA): z must be contiguous");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(activations.size()) == L,
              "mlp_chain_fwd (CUDA): weights, biases and activations must have the same length");
  TORCH_CHECK(num_decoder_layers >= 1 && num_decoder_layers < L,
              "mlp_chain_fwd (CUDA): need at least one decoder and one labeler layer, got ", num_decoder_layers,
              " decoder layers of ", L);
  TORCH_CHECK(temperature > 0, "mlp_chain_fwd (CUDA): temperature must be > 0, got ", temperature);
  TORCH_CHECK(offset >= 0, "mlp_chain_fwd (CUDA): offset must be >= 0, got ", offset);
  const int64_t B = z.size(0), d = z.size(1);
  std::vector<const float*> bias_ptr(L, nullptr);
  int64_t width = d, widest = d;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.device() == z.device() && w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(),
                "mlp_chain_fwd (CUDA): weight ", l, " must be a contiguous 2-D float32 tensor on ", z.device());
    TORCH_CHECK(w.size(1) == width, "mlp_chain_fwd (CUDA): weight ", l, " takes ", w.size(1),
                " inputs, the previous layer gives ", width);
    width = w.size(0);
    widest = std::max(widest, width);
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value()) {
      TORCH_CHECK(b->device() == z.device() && b->dim() == 1 && b->size(0) == width &&
                      b->scalar_type() == at::kFloat && b->is_contiguous(),
                  "mlp_chain_fwd (CUDA): bias ", l, " must be a contiguous float32 vector of ", width, " on ",
                  z.device());
      bias_ptr[l] = b->data_ptr<float>();
    }
    TORCH_CHECK(activations[l] >= 0 && activations[l] < cuda::kMlpNumActs,
                "mlp_chain_fwd (CUDA): unknown activation code ", activations[l]);
  }
  const c10::cuda::CUDAGuard device_guard(z.device());
  const auto dtype = z.scalar_type() == at::kBFloat16 ? cuda::MlpChainDType::kBFloat16 : cuda::MlpChainDType::kFloat32;
  auto x_new = at::empty({B, weights[num_decoder_layers - 1].size(0)}, z.options());
  auto soft = at::empty({B, width}, z.options());
  auto perturbed = need_perturbed ? at::empty({B, d}, z.options().dtype(at::kFloat)) : at::empty({0}, z.options());
  if (B == 0) return {x_new, soft, perturbed};

  const int64_t chunk = std::min(B, kChunkRows);
  auto buf_a = at::empty({chunk * widest}, z.options().dtype(at::kFloat));
  auto buf_b = at::empty({chunk * widest}, z.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const int64_t K = width;
  for (int64_t row0 = 0; row0 < B; row0 += chunk) {
    const int64_t rows = std::min(chunk, B - row0);
    const void* in = static_cast<const char*>(z.data_ptr()) + row0 * d * z.element_size();
    cuda::MlpChainDType in_dtype = dtype;
    float* bufs[2] = {buf_a.data_ptr<float>(), buf_b.data_ptr<float>()};
    int64_t in_w = d;
    for (int64_t l = 0; l < L; ++l) {
      cuda::MlpLayerArgs a = layer_args(weights, bias_ptr, activations, l, in, in_dtype, in_w, bufs[l % 2], rows);
      if (l == num_decoder_layers - 1) {
        a.out = static_cast<char*>(x_new.data_ptr()) + row0 * a.outs * x_new.element_size();
        a.out_dtype = dtype;
      }
      if (l == 0) {
        a.noise = true;
        a.sigma = static_cast<float>(sigma);
        a.seed = static_cast<uint64_t>(seed);
        a.noise_base = static_cast<uint64_t>(offset) + static_cast<uint64_t>(row0 * d);
        a.perturbed = need_perturbed ? perturbed.data_ptr<float>() + row0 * d : nullptr;
      }
      check_cuda(cuda::mlp_linear(a, stream), "layer launch");
      in = a.y;
      in_dtype = cuda::MlpChainDType::kFloat32;
      in_w = a.outs;
    }
    void* soft_rows = static_cast<char*>(soft.data_ptr()) + row0 * K * soft.element_size();
    check_cuda(cuda::mlp_softmax(static_cast<const float*>(in), soft_rows, dtype, rows, K,
                                 static_cast<float>(1.0 / temperature), stream),
               "softmax launch");
  }
  return {x_new, soft, perturbed};
}

// True if `t` is given; it must then be a contiguous float32 [rows, cols] tensor on `device`.
bool given_rows(const std::optional<at::Tensor>& t, const char* name, int64_t rows, int64_t cols,
                const at::Device& device) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->sizes() == at::IntArrayRef({rows, cols}),
              "mlp_chain_bwd (CUDA): ", name, " must be a contiguous float32 [", rows, ", ", cols, "] tensor on ",
              device);
  return true;
}

// Gradient to the perturbed latent. Per chunk of rows: the forward again (the layer kernel with noise off, on the
// saved perturbed latent), keeping every layer's pre-activation; then the softmax backward (when grad_soft is
// given) and, layer by layer downwards, dx = (dy * act'(pre)) W, x_new's gradient joining at the decoder's last
// layer. With no grad_soft the labeler is skipped. x_new and soft (the CPU kernel's shortcuts) are not used.
// Memory: a chunk of rows x (sum of the layers' widths + 2 x the widest) floats, at most kBwdChunkFloats.
at::Tensor mlp_chain_bwd_cuda(const at::Tensor& perturbed, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                              int64_t num_decoder_layers, double temperature,
                              const std::optional<at::Tensor>& grad_x, const std::optional<at::Tensor>& grad_soft,
                              const std::optional<at::Tensor>& /*x_new*/, const std::optional<at::Tensor>& /*soft*/) {
  TORCH_CHECK(perturbed.is_cuda() && perturbed.dim() == 2 && perturbed.scalar_type() == at::kFloat &&
                  perturbed.is_contiguous(),
              "mlp_chain_bwd (CUDA): perturbed must be a contiguous float32 [B, d] CUDA tensor");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(activations.size()) == L &&
                  num_decoder_layers >= 1 && num_decoder_layers < L,
              "mlp_chain_bwd (CUDA): inconsistent layer lists");
  TORCH_CHECK(temperature > 0, "mlp_chain_bwd (CUDA): temperature must be > 0, got ", temperature);
  const int64_t B = perturbed.size(0), d = perturbed.size(1);
  const at::Device device = perturbed.device();
  std::vector<const float*> bias_ptr(L, nullptr);
  std::vector<int64_t> off(L + 1, 0);  // each layer's column offset in the [rows, sum of widths] pre-activations
  int64_t width = d;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.device() == device && w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() &&
                    w.size(1) == width,
                "mlp_chain_bwd (CUDA): weight ", l, " must be a contiguous float32 [out, ", width, "] tensor on ",
                device);
    TORCH_CHECK(activations[l] >= 0 && activations[l] < cuda::kMlpNumActs,
                "mlp_chain_bwd (CUDA): unknown activation code ", activations[l]);
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value()) {
      TORCH_CHECK(b->device() == device && b->dim() == 1 && b->size(0) == w.size(0) &&
                      b->scalar_type() == at::kFloat && b->is_contiguous(),
                  "mlp_chain_bwd (CUDA): bias ", l, " must be a contiguous float32 vector of ", w.size(0), " on ",
                  device);
      bias_ptr[l] = b->data_ptr<float>();
    }
    width = w.size(0);
    off[l + 1] = off[l] + width;
  }
  const int64_t last_dec = num_decoder_layers - 1;
  const int64_t x_width = weights[last_dec].size(0);
  const bool has_gx = given_rows(grad_x, "grad_x", B, x_width, device);
  const bool has_gs = given_rows(grad_soft, "grad_soft", B, width, device);
  auto grad_z = at::zeros({B, d}, perturbed.options());
  if (B == 0 || (!has_gx && !has_gs)) return grad_z;

  const c10::cuda::CUDAGuard device_guard(device);
  const int64_t layers = has_gs ? L : num_decoder_layers;  // the layers that take part in the gradient
  int64_t widest = d;
  for (int64_t l = 0; l < layers; ++l) widest = std::max(widest, weights[l].size(0));
  const int64_t per_row = off[layers] + 2 * widest;
  const int64_t chunk = std::max<int64_t>(1, std::min(B, kBwdChunkFloats / per_row));
  auto pre = at::empty({chunk * off[layers]}, perturbed.options());
  auto buf_a = at::empty({chunk * widest}, perturbed.options());
  auto buf_b = at::empty({chunk * widest}, perturbed.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const float inv_t = static_cast<float>(1.0 / temperature);
  for (int64_t row0 = 0; row0 < B; row0 += chunk) {
    const int64_t rows = std::min(chunk, B - row0);
    float* bufs[2] = {buf_a.data_ptr<float>(), buf_b.data_ptr<float>()};
    std::vector<float*> pre_of(layers);
    const void* in = perturbed.data_ptr<float>() + row0 * d;
    int64_t in_w = d;
    for (int64_t l = 0; l < layers; ++l) {  // the forward again, keeping the pre-activations
      cuda::MlpLayerArgs a = layer_args(weights, bias_ptr, activations, l, in, cuda::MlpChainDType::kFloat32, in_w,
                                        bufs[l % 2], rows);
      a.pre = pre_of[l] = pre.data_ptr<float>() + rows * off[l];
      check_cuda(cuda::mlp_linear(a, stream), "backward: layer recomputation");
      in = a.y;
      in_w = a.outs;
    }
    float* g = bufs[0];  // the gradient to the current layer's output (post-activation)
    float* spare = bufs[1];
    if (has_gs) {
      check_cuda(cuda::mlp_softmax_bwd(pre_of[L - 1], static_cast<int>(activations[L - 1]),
                                       grad_soft->data_ptr<float>() + row0 * width, g, rows, width, inv_t, stream),
                 "backward: softmax");
    }
    for (int64_t l = layers - 1; l >= 0; --l) {
      cuda::MlpLayerBwdArgs a;
      a.g = (l == layers - 1 && !has_gs) ? nullptr : g;
      a.g_extra = (has_gx && l == last_dec) ? grad_x->data_ptr<float>() + row0 * x_width : nullptr;
      a.pre = pre_of[l];
      a.w = weights[l].data_ptr<float>();
      a.dx = l == 0 ? grad_z.data_ptr<float>() + row0 * d : spare;
      a.rows = rows;
      a.in = weights[l].size(1);
      a.outs = weights[l].size(0);
      a.act = static_cast<int>(activations[l]);
      check_cuda(cuda::mlp_linear_bwd(a, stream), "backward: layer");
      std::swap(g, spare);
    }
  }
  return grad_z;
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) {
  m.impl("mlp_chain_fwd", &tgtfast::mlp_chain_fwd_cuda);
  m.impl("mlp_chain_bwd", &tgtfast::mlp_chain_bwd_cuda);
}
