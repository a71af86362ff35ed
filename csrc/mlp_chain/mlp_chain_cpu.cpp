// Torch-facing launcher of the fused MLP perturb -> decode -> label chain on the CPU (tgtfast::mlp_chain_fwd).
//
// The batch is cut into blocks of kBlockRows rows, processed in parallel. For one block: the perturbed latent
// z + sigma * noise (noise drawn in place, csrc/common/philox.h), then every layer as a [rows, in] x [in, out] GEMM on
// the block followed by bias + activation while the block is still in cache, the decoder's output written
// to x_new, and the labeler's logits turned into the tempered softmax in place. The block's hidden
// activations live in two per-thread buffers of kBlockRows x (widest layer) floats that are reused for every
// block: nothing of size [B, hidden] is allocated. The GEMMs run single-threaded inside at::parallel_for: with
// AVX2 the package's own kernel (isa.gemm) on weights copied into its panel layout once per call, so that no
// block pays for repacking a weight or for a dispatcher call; elsewhere at::mm_out.
// Threads take blocks from a shared counter rather than a fixed half each, so that a thread slowed down by
// another process on its core does not hold the others up.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_buffers.h"
#include "mlp_chain_cpu_kernel.h"
#include "cpu_isa.h"  // cpu_has_avx2

namespace tgtfast {
namespace {

// Rows per block: 64 keeps a block's widest activations (64 x 1024 floats = 256 KiB) within L2 next to the
// weights' working set. TGTFAST_MLP_BLOCK_ROWS (read once) overrides it for tuning.
int64_t block_rows() {
  static const int64_t rows = [] {
    const char* env = std::getenv("TGTFAST_MLP_BLOCK_ROWS");
    const long v = env != nullptr ? std::strtol(env, nullptr, 10) : 0;
    return v >= 1 && v <= 4096 ? static_cast<int64_t>(v) : int64_t{64};
  }();
  return rows;
}

// The layers' weights copied once per call into the panels of isa.gemm (csrc/mlp_chain/mlp_chain_cpu_kernel.h), as B = W^T
// (forward: [rows, in] x W^T) or, with `transposed`, as B = W (backward: [rows, out] x W). Panels are copied in
// parallel; layers with `used[l]` false (when given) are left out. Empty (storage undefined) where the
// instruction set has no GEMM kernel: the launchers then use at::mm_out.
struct PackedWeights {
  at::Tensor storage;
  std::vector<const float*> ptr;
};

PackedWeights pack_weights(const cpu::MlpChainIsa& isa, at::TensorList weights, int64_t layers, bool transposed,
                           const std::vector<bool>& used = {}) {
  PackedWeights out;
  if (isa.gemm == nullptr) return out;
  std::vector<int64_t> off(layers + 1, 0), first_panel(layers + 1, 0);
  for (int64_t l = 0; l < layers; ++l) {
    const bool keep = used.empty() || used[l];
    const int64_t rows_w = weights[l].size(0), cols_w = weights[l].size(1);
    const int64_t n = !keep ? 0 : transposed ? cols_w : rows_w, k = transposed ? rows_w : cols_w;
    off[l + 1] = off[l] + (cpu::packed_b_size(n, k) + 15) / 16 * 16;  // 64-byte aligned panels
    first_panel[l + 1] = first_panel[l] + (n + cpu::kGemmPanel - 1) / cpu::kGemmPanel;
  }
  out.storage = at::empty({std::max<int64_t>(off[layers], 1)}, weights[0].options());
  float* base = out.storage.data_ptr<float>();
  for (int64_t l = 0; l < layers; ++l) out.ptr.push_back(base + off[l]);
  at::parallel_for(0, first_panel[layers], 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t p0 = std::max(begin, first_panel[l]), p1 = std::min(end, first_panel[l + 1]);
      if (p0 >= p1) continue;
      const float* w = weights[l].data_ptr<float>();
      const int64_t rows_w = weights[l].size(0), cols_w = weights[l].size(1);
      if (transposed) {
        isa.pack_b(w, cols_w, rows_w, 1, cols_w, base + off[l], p0 - first_panel[l], p1 - first_panel[l]);
      } else {
        isa.pack_b(w, rows_w, cols_w, cols_w, 1, base + off[l], p0 - first_panel[l], p1 - first_panel[l]);
      }
    }
  });
  return out;
}

uint16_t to_bf16_bits(float f) {
  const auto b = c10::BFloat16(f);  // round to nearest even, NaN kept
  return b.x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_chain_fwd_cpu(
    const at::Tensor& z, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    at::IntArrayRef activations, int64_t num_decoder_layers, double sigma, int64_t seed, int64_t offset,
    double temperature, bool need_perturbed) {
  TORCH_CHECK(z.dim() == 2, "mlp_chain_fwd: z must be 2-D [B, d], got ", z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kBFloat16,
              "mlp_chain_fwd: z must be float32 or bfloat16, got ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "mlp_chain_fwd: z must be contiguous");
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(activations.size()) == L,
              "mlp_chain_fwd: weights, biases and activations must have the same length");
  TORCH_CHECK(num_decoder_layers >= 1 && num_decoder_layers < L,
              "mlp_chain_fwd: need at least one decoder and one labeler layer, got ", num_decoder_layers,
              " decoder layers of ", L);
  TORCH_CHECK(temperature > 0, "mlp_chain_fwd: temperature must be > 0, got ", temperature);
  TORCH_CHECK(offset >= 0, "mlp_chain_fwd: offset must be >= 0, got ", offset);
  const int64_t B = z.size(0), d = z.size(1);
  std::vector<const float*> bias_ptr(L, nullptr);
  std::vector<at::Tensor> bias_keep(L);
  int64_t width = d, widest = d;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu(),
                "mlp_chain_fwd: weight ", l, " must be a contiguous 2-D float32 CPU tensor");
    TORCH_CHECK(w.size(1) == width, "mlp_chain_fwd: weight ", l, " takes ", w.size(1), " inputs, the previous layer gives ",
                width);
    width = w.size(0);
    widest = std::max(widest, width);
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value()) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == width && b->scalar_type() == at::kFloat && b->is_contiguous(),
                  "mlp_chain_fwd: bias ", l, " must be a contiguous float32 vector of ", width);
      bias_keep[l] = *b;
      bias_ptr[l] = b->data_ptr<float>();
    }
    TORCH_CHECK(activations[l] >= 0 && activations[l] < cpu::kNumActs, "mlp_chain_fwd: unknown activation code ",
                activations[l]);
  }
  const int64_t x_width = weights[num_decoder_layers - 1].size(0);
  const bool bf16 = z.scalar_type() == at::kBFloat16;
  // From the block cache of cpu_buffers.h: a TGT loop asks for the same two shapes every step.
  auto x_new = empty_output({B, x_width}, z.options());
  auto soft = empty_output({B, width}, z.options());
  auto perturbed = need_perturbed ? at::empty({B, d}, z.options().dtype(at::kFloat)) : at::empty({0}, z.options());
  if (B == 0) return {x_new, soft, perturbed};

  const cpu::MlpChainIsa isa = cpu::cpu_has_avx2() ? cpu::mlp_chain_isa_avx2() : cpu::mlp_chain_isa_base();
  const PackedWeights packed = pack_weights(isa, weights, L, /*transposed=*/false);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const int64_t kBlockRows = block_rows();
  const int64_t blocks = (B + kBlockRows - 1) / kBlockRows;
  const auto fopts = z.options().dtype(at::kFloat);

  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> buf_a(static_cast<size_t>(kBlockRows * widest)), buf_b(buf_a.size());
    for (int64_t blk = next_block++; blk < blocks; blk = next_block++) {
      const int64_t row0 = blk * kBlockRows, rows = std::min(kBlockRows, B - row0);
      float* const bufs[2] = {buf_a.data(), buf_b.data()};
      float* in = bufs[0];
      cpu::perturb_block(isa, in, bf16 ? nullptr : z.data_ptr<float>() + row0 * d,
                         bf16 ? reinterpret_cast<const uint16_t*>(z.data_ptr<at::BFloat16>()) + row0 * d : nullptr,
                         row0, rows, d, static_cast<float>(sigma), useed, static_cast<uint64_t>(offset));
      if (need_perturbed) std::memcpy(perturbed.data_ptr<float>() + row0 * d, in, sizeof(float) * rows * d);
      int64_t in_w = d;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t out_w = weights[l].size(0);
        const bool last = l == L - 1, decoded = l == num_decoder_layers - 1;
        // float32 outputs are computed in place in the result; bfloat16 ones in a buffer, then rounded. A layer
        // never writes the buffer it reads (its input may also be the x_new rows, which are no buffer).
        float* out = in == bufs[0] ? bufs[1] : bufs[0];
        if (!bf16 && decoded) out = x_new.data_ptr<float>() + row0 * out_w;
        if (!bf16 && last) out = soft.data_ptr<float>() + row0 * out_w;
        if (isa.gemm != nullptr) {
          isa.gemm(in, in_w, packed.ptr[l], rows, out_w, in_w, out, out_w);
        } else {
          auto out_t = at::from_blob(out, {rows, out_w}, fopts);
          at::mm_out(out_t, at::from_blob(in, {rows, in_w}, fopts), weights[l].t());
        }
        isa.bias_act(out, rows, out_w, out_w, bias_ptr[l], static_cast<cpu::Act>(activations[l]));
        if (last) isa.softmax(out, rows, out_w, out_w, inv_t);
        if (bf16 && (decoded || last)) {
          uint16_t* dst = reinterpret_cast<uint16_t*>((decoded ? x_new : soft).data_ptr<at::BFloat16>()) + row0 * out_w;
          for (int64_t i = 0; i < rows * out_w; ++i) dst[i] = to_bf16_bits(out[i]);
        }
        in = out;
        in_w = out_w;
      }
    }
  });
  return {x_new, soft, perturbed};
}

// Whether act'(pre) can be computed from post = act(pre) alone (cpu::MlpChainIsa::act_grad reads pre only for these
// as the sign of pre, which post keeps).
bool grad_from_output(cpu::Act act) {
  return act == cpu::Act::kIdentity || act == cpu::Act::kRelu || act == cpu::Act::kSigmoid || act == cpu::Act::kTanh;
}

// True if `t` is given; it must then be a contiguous float32 [rows, cols] tensor.
bool given_rows(const std::optional<at::Tensor>& t, const char* name, int64_t rows, int64_t cols) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == at::IntArrayRef({rows, cols}),
              "mlp_chain_bwd: ", name, " must be a contiguous float32 [", rows, ", ", cols, "] tensor");
  return true;
}

// Gradient to the perturbed latent. Per block of rows: the forward again, keeping the block's pre- and
// post-activations of every layer in per-thread buffers, then back through the layers with dA_l = dPre_l W_l
// and dPre_l = dA_{l+1} * act_l'. With no gradient for the soft labels the labeler is skipped. With AVX2 both
// GEMMs run on weights packed once per call (W^T for the forward, W for the backward).
// The forward's outputs spare two GEMMs when given (float32): x_new is the decoder's last layer (recomputed
// only when its activation's derivative needs the pre-activation: GELU, SiLU), and soft gives the softmax
// backward directly when the labeler's last activation is the identity (its logits are then not needed).
at::Tensor mlp_chain_bwd_cpu(const at::Tensor& perturbed, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef activations,
                             int64_t num_decoder_layers, double temperature, const std::optional<at::Tensor>& grad_x,
                             const std::optional<at::Tensor>& grad_soft, const std::optional<at::Tensor>& x_new,
                             const std::optional<at::Tensor>& soft) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(perturbed.dim() == 2 && perturbed.scalar_type() == at::kFloat && perturbed.is_contiguous(),
              "mlp_chain_bwd: perturbed must be a contiguous float32 [B, d] tensor");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(activations.size()) == L &&
                  num_decoder_layers >= 1 && num_decoder_layers < L,
              "mlp_chain_bwd: inconsistent layer lists");
  TORCH_CHECK(temperature > 0, "mlp_chain_bwd: temperature must be > 0");
  const int64_t B = perturbed.size(0), d = perturbed.size(1);
  std::vector<const float*> bias_ptr(L, nullptr);
  std::vector<int64_t> off(L + 1, 0);  // offsets of each layer's [rows, out] in the per-thread activation buffers
  int64_t width = d, widest = d;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(1) == width,
                "mlp_chain_bwd: weight ", l, " must be a contiguous float32 [out, ", width, "] tensor");
    TORCH_CHECK(activations[l] >= 0 && activations[l] < cpu::kNumActs, "mlp_chain_bwd: unknown activation code ",
                activations[l]);
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value()) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0) && b->scalar_type() == at::kFloat && b->is_contiguous(),
                  "mlp_chain_bwd: bias ", l, " must be a contiguous float32 vector of ", w.size(0));
      bias_ptr[l] = b->data_ptr<float>();
    }
    width = w.size(0);
    widest = std::max(widest, width);
    off[l + 1] = off[l] + width;
  }
  const int64_t x_width = weights[num_decoder_layers - 1].size(0);
  const bool has_gx = given_rows(grad_x, "grad_x", B, x_width);
  const bool has_gs = given_rows(grad_soft, "grad_soft", B, width);
  const int64_t last_dec = num_decoder_layers - 1;
  const bool reuse_x = grad_from_output(static_cast<cpu::Act>(activations[last_dec])) &&
                       given_rows(x_new, "x_new", B, x_width);
  const bool reuse_soft = has_gs && static_cast<cpu::Act>(activations[L - 1]) == cpu::Act::kIdentity &&
                          given_rows(soft, "soft", B, width);
  auto grad_z = at::zeros({B, d}, perturbed.options());
  if (B == 0 || (!has_gx && !has_gs)) return grad_z;

  const int64_t layers = has_gs ? L : num_decoder_layers;  // layers that take part in the gradient
  const cpu::MlpChainIsa isa = cpu::cpu_has_avx2() ? cpu::mlp_chain_isa_avx2() : cpu::mlp_chain_isa_base();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t kBlockRows = block_rows();
  const int64_t blocks = (B + kBlockRows - 1) / kBlockRows;
  const auto fopts = perturbed.options();
  std::vector<bool> recomputed(layers, true);  // the layers the forward pass below runs again
  if (reuse_x) recomputed[last_dec] = false;
  if (reuse_soft) recomputed[L - 1] = false;
  const PackedWeights packed = pack_weights(isa, weights, layers, /*transposed=*/false, recomputed);
  const PackedWeights packed_t = pack_weights(isa, weights, layers, /*transposed=*/true);

  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> pre(static_cast<size_t>(kBlockRows * off[layers])), post(pre.size());
    std::vector<float> g_a(static_cast<size_t>(kBlockRows * widest)), g_b(g_a.size());
    std::vector<const float*> pre_of(layers), post_of(layers);  // each layer's block, in a buffer or an output
    for (int64_t blk = next_block++; blk < blocks; blk = next_block++) {
      const int64_t row0 = blk * kBlockRows, rows = std::min(kBlockRows, B - row0);
      const float* in = perturbed.data_ptr<float>() + row0 * d;
      int64_t in_w = d;
      for (int64_t l = 0; l < layers; ++l) {
        const int64_t out_w = weights[l].size(0);
        if (l == last_dec && reuse_x) {  // post = x_new; the sign of pre is that of post
          in = pre_of[l] = post_of[l] = x_new->data_ptr<float>() + row0 * out_w;
          in_w = out_w;
          continue;
        }
        if (l == L - 1 && reuse_soft) break;  // the top layer's backward needs only soft
        float* p = pre.data() + kBlockRows * off[l];
        float* q = post.data() + kBlockRows * off[l];
        pre_of[l] = p;
        post_of[l] = q;
        if (isa.gemm != nullptr) {
          isa.gemm(in, in_w, packed.ptr[l], rows, out_w, in_w, p, out_w);
        } else {
          auto p_t = at::from_blob(p, {rows, out_w}, fopts);
          at::mm_out(p_t, at::from_blob(const_cast<float*>(in), {rows, in_w}, fopts), weights[l].t());
        }
        if (bias_ptr[l] != nullptr) isa.bias_act(p, rows, out_w, out_w, bias_ptr[l], cpu::Act::kIdentity);
        std::copy(p, p + rows * out_w, q);
        isa.bias_act(q, rows, out_w, out_w, nullptr, static_cast<cpu::Act>(activations[l]));
        in = q;
        in_w = out_w;
      }
      // gradient with respect to the output of layer `l`, walking down
      float* g = g_a.data();
      float* spare = g_b.data();
      int64_t l = layers - 1;
      const int64_t top_w = weights[l].size(0);
      if (has_gs) {
        const float* s = reuse_soft ? soft->data_ptr<float>() + row0 * top_w : g;
        if (!reuse_soft) {  // the softmax of the recomputed logits, in g
          std::copy(post_of[l], post_of[l] + rows * top_w, g);
          isa.softmax(g, rows, top_w, top_w, inv_t);
        }
        isa.softmax_grad(g, s, grad_soft->data_ptr<float>() + row0 * top_w, rows, top_w, inv_t);
      } else {
        std::fill(g, g + rows * top_w, 0.0f);
      }
      for (; l >= 0; --l) {
        const int64_t out_w = weights[l].size(0), in_w_l = weights[l].size(1);
        if (has_gx && l == num_decoder_layers - 1) {
          const float* gx = grad_x->data_ptr<float>() + row0 * out_w;
          for (int64_t i = 0; i < rows * out_w; ++i) g[i] += gx[i];
        }
        if (l < L - 1 || !reuse_soft) {  // the identity of a reused top layer needs nothing
          isa.act_grad(g, pre_of[l], post_of[l], rows, out_w, static_cast<cpu::Act>(activations[l]));
        }
        float* dst = l == 0 ? grad_z.data_ptr<float>() + row0 * d : spare;
        if (isa.gemm != nullptr) {
          isa.gemm(g, out_w, packed_t.ptr[l], rows, in_w_l, out_w, dst, in_w_l);
        } else {
          auto dst_t = at::from_blob(dst, {rows, in_w_l}, fopts);
          at::mm_out(dst_t, at::from_blob(g, {rows, out_w}, fopts), weights[l]);
        }
        std::swap(g, spare);
      }
    }
  });
  return grad_z;
}

}  // namespace
}  // namespace tgtfast

TORCH_LIBRARY_IMPL(tgtfast, CPU, m) {
  m.impl("mlp_chain_fwd", &tgtfast::mlp_chain_fwd_cpu);
  m.impl("mlp_chain_bwd", &tgtfast::mlp_chain_bwd_cpu);
}
