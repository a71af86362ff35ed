// Kernels of the MLP perturb -> decode -> label chain on the GPU: plain CUDA on raw pointers and a stream, no
// torch headers (the torch-facing launcher is mlp_chain_cuda_launcher.cpp). One launch per layer: a shared-memory
// tiled GEMM y = x W^T whose epilogue adds the bias and applies the activation; the first layer draws the
// latent noise (csrc/common/philox.h) while it loads its input tile, the decoder's last layer also writes x_new in
// the output dtype, and a row-softmax kernel turns the labeler's logits into the tempered soft labels. The backward
// (mlp_chain_bwd) runs the same layer kernel again keeping each layer's pre-activation, then a softmax-backward row
// kernel and, per layer, a tiled GEMM dx = (dy * act'(pre)) W whose operand loads apply the derivative.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace tgtfast {
namespace cuda {

enum class MlpChainDType : int { kFloat32 = 0, kBFloat16 = 1 };

// Activation codes: identity 0, relu 1, gelu (erf) 2, gelu_tanh 3, silu 4, tanh 5, sigmoid 6
// (tgtfast/_mlp.py ACTIVATIONS).
constexpr int kMlpNumActs = 7;

struct MlpLayerArgs {
  const void* x = nullptr;     // [rows, in] contiguous, of x_dtype
  MlpChainDType x_dtype = MlpChainDType::kFloat32;
  const float* w = nullptr;    // [out, in] contiguous
  const float* bias = nullptr; // [out] or null
  float* y = nullptr;          // [rows, out] float32
  void* out = nullptr;         // [rows, out] of out_dtype, or null: a second copy of y (x_new)
  MlpChainDType out_dtype = MlpChainDType::kFloat32;
  int64_t rows = 0, in = 0, outs = 0;
  int act = 0;
  // Noise on the input: x[r, k] + sigma * normal(seed, noise_base + r * in + k); perturbed (float32 [rows, in])
  // receives the perturbed input when not null.
  bool noise = false;
  float sigma = 0.0f;
  uint64_t seed = 0;
  uint64_t noise_base = 0;
  float* perturbed = nullptr;
  // [rows, out] float32, or null: receives the pre-activation x W^T + b as well (the backward's recomputation)
  float* pre = nullptr;
};

// The backward of one layer y = act(x W^T + b): dx [rows, in] = (dy * act'(pre)) W, with dy = g (+ g_extra), a
// tiled GEMM whose operand loads apply the activation's derivative.
struct MlpLayerBwdArgs {
  const float* g = nullptr;        // [rows, outs]: gradient to the layer's output, or null (zero)
  const float* g_extra = nullptr;  // [rows, outs] or null: a second gradient to the output, added to g (x_new's)
  const float* pre = nullptr;      // [rows, outs]: the pre-activation
  const float* w = nullptr;        // [outs, in] contiguous
  float* dx = nullptr;             // [rows, in]: gradient to the layer's input
  int64_t rows = 0, in = 0, outs = 0;
  int act = 0;
};

// Enqueue one layer. cudaErrorInvalidValue for bad arguments (nothing launched), else the launch status.
cudaError_t mlp_linear(const MlpLayerArgs& args, cudaStream_t stream);

// out[r] = softmax(x[r] * inv_temperature) for x float32 [rows, cols]; out of out_dtype.
cudaError_t mlp_softmax(const float* x, void* out, MlpChainDType out_dtype, int64_t rows, int64_t cols,
                        float inv_temperature, cudaStream_t stream);

// Enqueue the backward of one layer. cudaErrorInvalidValue for bad arguments (nothing launched).
cudaError_t mlp_linear_bwd(const MlpLayerBwdArgs& args, cudaStream_t stream);

// The gradient to the labeler's output act(pre) of soft = softmax(act(pre) * inv_temperature), for pre float32
// [rows, cols] and the incoming gradient g_soft float32 [rows, cols]: out = soft * (g_soft - <g_soft, soft>) *
// inv_temperature, float32 (soft recomputed, never stored).
cudaError_t mlp_softmax_bwd(const float* pre, int act, const float* g_soft, float* out, int64_t rows, int64_t cols,
                            float inv_temperature, cudaStream_t stream);

}  // namespace cuda
}  // namespace tgtfast
