// Row-block pieces of the fused MLP perturb -> decode -> label chain on the CPU: plain C++ on raw float
// pointers, no torch headers. Everything that touches a row block -- noise and perturbation, the GEMM of a layer
// (AVX2 build; the launcher, mlp_chain_cpu.cpp, falls back to at::mm_out elsewhere), bias + activation, the tempered
// softmax -- is here, compiled once per instruction set (mlp_chain_cpu_avx2.cpp, mlp_chain_cpu_base.cpp) like the PTLoss
// kernel.
#pragma once

#include <cstdint>

namespace tgtfast {
namespace cpu {

// Activation codes shared with tgtfast/_mlp.py (ACTIVATIONS) and the CUDA / Triton kernels.
enum class Act : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,      // exact: x * Phi(x) with erf
  kGeluTanh = 3,  // tanh approximation (nn.GELU(approximate="tanh"))
  kSilu = 4,
  kTanh = 5,
  kSigmoid = 6,
};
constexpr int64_t kNumActs = 7;

// Elements per call of MlpChainIsa::perturb_chunk.
constexpr int64_t kNoiseChunk = 256;

struct MlpChainIsa {
  // y[r, c] = act(y[r, c] + bias[c]) for r < rows, c < cols; row stride ld; bias may be null.
  void (*bias_act)(float* y, int64_t rows, int64_t cols, int64_t ld, const float* bias, Act act);
  // In place, per row: y <- softmax(y * inv_temperature).
  void (*softmax)(float* y, int64_t rows, int64_t cols, int64_t ld, float inv_temperature);
  // g[r, c] *= act'(pre[r, c]) where post = act(pre); all [rows, cols] with row stride cols.
  void (*act_grad)(float* g, const float* pre, const float* post, int64_t rows, int64_t cols, Act act);
  // Backward of soft = softmax(logits * inv_temperature), given soft: out = soft * (g - sum(g * soft)) *
  // inv_temperature; all [rows, cols] with row stride cols; `out` may be `soft`, not `g`.
  void (*softmax_grad)(float* out, const float* soft, const float* g, int64_t rows, int64_t cols,
                       float inv_temperature);
  // out[i] = z[i] + sigma * normal(seed, first + i) for i < n <= kNoiseChunk (the Philox normals of csrc/common/philox.h)
  void (*perturb_chunk)(float* out, const float* z, int64_t n, uint64_t seed, uint64_t first, float sigma);
  // c[r, j] = sum_i a[r, i] * w[j, i] for r < rows, j < n, i < k: a row block [rows, k] (row stride lda) times the
  // transpose of a Linear weight w [n, k] that pack_b copied into b_packed; c has row stride ldc and may not
  // alias a. Each row's result depends on that row alone (not on `rows` or the row's place in the block).
  // Null where the instruction set has no GEMM kernel (the baseline build): the launcher uses at::mm_out.
  void (*gemm)(const float* a, int64_t lda, const float* b_packed, int64_t rows, int64_t n, int64_t k, float* c,
               int64_t ldc);
  // pack_b below, faster on this instruction set; null with gemm.
  void (*pack_b)(const float* w, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, float* dst,
                 int64_t p_begin, int64_t p_end);
};

// Columns per panel of a packed weight.
constexpr int64_t kGemmPanel = 16;

// Floats of the packed copy of a [n, k] weight: the columns of w^T rounded up to whole panels.
inline int64_t packed_b_size(int64_t n, int64_t k) { return (n + kGemmPanel - 1) / kGemmPanel * kGemmPanel * k; }

// Copies the [n, k] matrix w (element (j, i) at w[j * stride_n + i * stride_k]; a Linear weight [n, k] has strides
// (k, 1), its transpose (1, n)) into panels p = 0, 1, ... of kGemmPanel of its rows, each stored k-major:
// dst[(p * k + i) * kGemmPanel + c] = w(p * kGemmPanel + c, i), zero past row n. Panels [p_begin, p_end) only.
void pack_b(const float* w, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, float* dst, int64_t p_begin,
            int64_t p_end);

MlpChainIsa mlp_chain_isa_avx2();
MlpChainIsa mlp_chain_isa_base();

// out[r, c] = z[r, c] + sigma * normal(seed, offset + (row0 + r) * cols + c) for a block of `rows` rows of the
// [*, cols] latent (csrc/common/philox.h). `z` is float32 (z_bf16 == nullptr) or bfloat16 bits (z == nullptr).
// In chunks of kNoiseChunk elements through isa.perturb_chunk.
void perturb_block(const MlpChainIsa& isa, float* out, const float* z, const uint16_t* z_bf16, int64_t row0, int64_t rows,
                   int64_t cols, float sigma, uint64_t seed, uint64_t offset);

}  // namespace cpu
}  // namespace tgtfast
