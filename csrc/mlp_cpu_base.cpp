// The CPU MLP row-block kernels built for the compiler's baseline instruction set, and the latent noise.
#define TGTFAST_MLP_ISA mlp_isa_base
#include "mlp_cpu_kernel.inc"

#include "philox.h"

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

void perturb_block(const MlpIsa& isa, float* out, const float* z, const uint16_t* z_bf16, int64_t row0, int64_t rows,
                   int64_t cols, float sigma, uint64_t seed, uint64_t offset) {
  constexpr int64_t kChunk = 256;
  float u1[kChunk], u2[kChunk], zf[kChunk];
  uint8_t odd[kChunk];
  const int64_t n = rows * cols;
  const uint64_t first = offset + static_cast<uint64_t>(row0 * cols);
  philox::U4 w{0, 0, 0, 0};
  uint64_t group = ~uint64_t{0};
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t m = std::min(kChunk, n - i0);
    for (int64_t t = 0; t < m; ++t) {
      const int64_t i = i0 + t;
      const uint64_t j = first + static_cast<uint64_t>(i);
      if ((j >> 2) != group) {
        group = j >> 2;
        w = philox::group_words(seed, group);
      }
      const unsigned r = static_cast<unsigned>(j & 3u);
      u1[t] = philox::to_open_unit(r < 2 ? w.x0 : w.x2);
      u2[t] = philox::to_open_unit(r < 2 ? w.x1 : w.x3);
      odd[t] = static_cast<uint8_t>(r & 1u);
      zf[t] = z ? z[i] : bits_to_float(static_cast<uint32_t>(z_bf16[i]) << 16);
    }
    isa.box_muller(out + i0, u1, u2, zf, odd, m, sigma);
  }
}

}  // namespace cpu
}  // namespace tgtfast
