// Torch-facing launcher of the CUDA MLP chain (mlp_chain_cuda.cu): argument checks, buffers, the current stream,
// and the CUDA registration of tgtfast::mlp_chain_fwd (schema in csrc/ops.cpp). The batch is processed in
// chunks of kChunkRows rows so that the float32 hidden activations between two layers never take more than
// kChunkRows x (widest layer) floats, whatever B is.
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

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mlp_chain_fwd (CUDA): ", what, " failed: ", cudaGetErrorString(err));
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
      cuda::MlpLayerArgs a;
      a.x = in;
      a.x_dtype = in_dtype;
      a.w = weights[l].data_ptr<float>();
      a.bias = bias_ptr[l];
      a.y = bufs[l % 2];
      a.rows = rows;
      a.in = in_w;
      a.outs = weights[l].size(0);
      a.act = static_cast<int>(activations[l]);
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

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CUDA, m) { m.impl("mlp_chain_fwd", &tgtfast::mlp_chain_fwd_cuda); }
