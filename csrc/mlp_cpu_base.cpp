// The CPU MLP row-block kernels built for the compiler's baseline instruction set, and the latent noise.
#define TGTFAST_MLP_ISA mlp_isa_base
#include "mlp_cpu_kernel.inc"

#include "philox.h"

namespace tgtfast {
namespace cpu {

void perturb_block(float* out, const float* z, const uint16_t* z_bf16, int64_t row0, int64_t rows, int64_t cols,
                   float sigma, uint64_t seed, uint64_t offset) {
  const int64_t n = rows * cols;
  const uint64_t first = offset + static_cast<uint64_t>(row0 * cols);
  int64_t i = 0;
  while (i < n) {
    const uint64_t j = first + static_cast<uint64_t>(i);
    const philox::U4 w = philox::group_words(seed, j >> 2);
    const float pair[2][2] = {{philox::to_open_unit(w.x0), philox::to_open_unit(w.x1)},
                              {philox::to_open_unit(w.x2), philox::to_open_unit(w.x3)}};
    for (unsigned r = static_cast<unsigned>(j & 3u); r < 4 && i < n; ++r, ++i) {
      const float* p = pair[r >> 1];
      const float radius = sqrtf(-2.0f * logf(p[0]));
      const float theta = 6.283185307179586f * p[1];
      const float noise = radius * ((r & 1u) ? sinf(theta) : cosf(theta));
      const float zi = z ? z[i] : bits_to_float(static_cast<uint32_t>(z_bf16[i]) << 16);
      out[i] = zi + sigma * noise;
    }
  }
}

}  // namespace cpu
}  // namespace tgtfast
