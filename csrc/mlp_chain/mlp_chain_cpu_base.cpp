// The CPU MLP row-block kernels built for the compiler's baseline instruction set, and the latent noise.
#define TGTFAST_MLP_CHAIN_ISA mlp_chain_isa_base
#include "mlp_chain_cpu_kernel.inc"

namespace tgtfast {
namespace cpu {

void pack_b(const float* w, int64_t n, int64_t k, int64_t stride_n, int64_t stride_k, float* dst, int64_t p_begin,
            int64_t p_end) {
  for (int64_t p = p_begin; p < p_end; ++p) {
    float* panel = dst + p * k * kGemmPanel;
    const int64_t j0 = p * kGemmPanel, cols = std::min(kGemmPanel, n - j0);
    const float* src = w + j0 * stride_n;
    for (int64_t i = 0; i < k; ++i) {
      float* out = panel + i * kGemmPanel;
      for (int64_t c = 0; c < cols; ++c) out[c] = src[c * stride_n + i * stride_k];
      for (int64_t c = cols; c < kGemmPanel; ++c) out[c] = 0.0f;
    }
  }
}

void perturb_block(const MlpChainIsa& isa, float* out, const float* z, const uint16_t* z_bf16, int64_t row0, int64_t rows,
                   int64_t cols, float sigma, uint64_t seed, uint64_t offset) {
  float zf[kNoiseChunk];
  const int64_t n = rows * cols;
  const uint64_t first = offset + static_cast<uint64_t>(row0 * cols);
  for (int64_t i0 = 0; i0 < n; i0 += kNoiseChunk) {
    const int64_t m = std::min(kNoiseChunk, n - i0);
    if (z == nullptr) {
      for (int64_t t = 0; t < m; ++t) zf[t] = bits_to_float(static_cast<uint32_t>(z_bf16[i0 + t]) << 16);
    }
    const float* zc = z != nullptr ? z + i0 : zf;
    isa.perturb_chunk(out + i0, zc, m, seed, first + static_cast<uint64_t>(i0), sigma);
  }
}

}  // namespace cpu
}  // namespace tgtfast
