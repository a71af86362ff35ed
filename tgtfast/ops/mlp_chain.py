"""The ``mlp_chain`` op: the fully fused perturb -> decode -> label chain for MLP teachers (docs/design.md,
"TGT step").

When the decoder and the labeler of a TGT teacher are plain MLPs, the whole chain

    x_new = decoder(z + sigma * noise(seed, offset))          soft = softmax(labeler(x_new) / temperature)

runs as a fused kernel chain that draws the noise in place (the counter-based generator of
:func:`tgtfast.reference.latent_noise`); no noise tensor and no logits tensor is materialised.

* CPU (C++): blocks of 64 rows in parallel; the block's hidden activations stay in two per-thread buffers that
  live in cache, and only ``x_new`` and ``soft`` are written to memory. On AVX2 processors the GEMMs are the
  package's own kernel on weights copied once per call into its panel layout (elsewhere ``at::mm_out``).
* GPU (CUDA and Triton): one launch per layer, each a tiled GEMM with bias and activation fused in its epilogue,
  the noise fused into the first layer's input loads and the softmax into the last layer (or a row kernel);
  the float32 hidden activations of a chunk of at most 16384 rows pass through global memory (L2) between
  launches.

Everything about registering the op lives here: the C++/CUDA ops ``tgtfast::mlp_chain_fwd`` / ``mlp_chain_bwd``
(schemas in csrc/ops.cpp, kernels in csrc/mlp_chain/ and csrc/cuda/mlp_chain_cuda*), their fake kernels, the
Triton chain (kernels/mlp_chain.py, imported the first time the Triton backend is chosen), the autograd function
:class:`MlpChain` and the dispatcher entry ``"perturb_decode_label_mlp"``. The teacher is parsed into layers by
:mod:`tgtfast.tgt.teacher` and the public entry point is :func:`tgtfast.tgt.perturb_decode_label`.

Gradients. The backward pass recomputes the chain from the perturbed latent (``[B, d]``) block by block, so its
extra memory is one block of hidden activations, never ``[B, hidden]``: on the CPU in C++
(``tgtfast::mlp_chain_bwd``, blocks of 64 rows in parallel); on the GPU with the CUDA backend in CUDA (the same
op: per chunk of rows the layer kernels again, keeping each layer's pre-activation, then a softmax-backward row
kernel and one tiled GEMM ``dx = (dy * act'(pre)) W`` per layer, at most 2**25 floats per chunk); with the Triton
backend the same scheme in Triton (kernels/mlp_chain_bwd.py, at most 2**24 floats per chunk). Any
other backend recomputes with torch ops on chunks of about 2**20 hidden values (:func:`_chunked_backward`). For float32 on the CPU the forward also keeps its two outputs (which the caller holds anyway) for
the backward, which then skips recomputing the decoder's last layer (when its activation is the identity, ReLU,
sigmoid or tanh, whose derivative follows from the output) and the labeler's last layer (when it has no
activation): modifying ``x_new`` or the soft labels in place before ``backward`` is then an autograd error.
The teacher is frozen: the weights and biases are constants of the op and never receive a gradient. If one of
them requires grad while grad mode is on, a ``UserWarning`` says so once and the weights are still treated as
constants (``.grad`` stays ``None``); to train a teacher through this chain, call the modules eagerly instead.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from tgtfast import _ext, reference
from tgtfast.dispatch import Backend, register_op
from tgtfast.ops._autodiff import check_no_double_backward

__all__ = ["OP", "FWD", "BWD", "MlpChain", "MLP_DTYPES"]

OP = "perturb_decode_label_mlp"
MLP_DTYPES = (torch.float32, torch.bfloat16)  # what the chain takes for z (z is [B, d])
# Activation name -> kernel code: the position in the one table, tgtfast.reference.ACTIVATIONS.
ACTIVATIONS = {name: code for code, name in enumerate(reference.ACTIVATIONS)}
Layer = Tuple[Tensor, object, str]

FWD: Dict[str, Callable] = {}  # backend name -> forward with the mlp_chain_fwd schema
BWD: Dict[str, Callable] = {}  # backend name -> backward with the mlp_chain_bwd schema (others: _chunked_backward)


def _load_triton() -> None:
    if "triton" in FWD:
        return
    from tgtfast.kernels import mlp_chain as kernels, mlp_chain_bwd as bwd_kernels

    FWD["triton"] = kernels.mlp_chain_fwd
    BWD["triton"] = bwd_kernels.mlp_chain_bwd


_missing: Dict[Backend, str] = {}
if _ext.ext is not None and hasattr(torch.ops.tgtfast, "mlp_chain_fwd"):

    @torch.library.register_fake("tgtfast::mlp_chain_fwd")
    def _mlp_chain_fwd_fake(z, weights, biases, activations, num_decoder_layers, sigma, seed, offset,
                            temperature, need_perturbed):
        x_new = z.new_empty((z.shape[0], weights[num_decoder_layers - 1].shape[0]))
        soft = z.new_empty((z.shape[0], weights[-1].shape[0]))
        pert = z.new_empty(z.shape, dtype=torch.float32) if need_perturbed else z.new_empty((0,))
        return x_new, soft, pert

    FWD["cpp"] = FWD["cuda"] = torch.ops.tgtfast.mlp_chain_fwd.default
    if hasattr(torch.ops.tgtfast, "mlp_chain_bwd"):

        @torch.library.register_fake("tgtfast::mlp_chain_bwd")
        def _mlp_chain_bwd_fake(perturbed, weights, biases, activations, num_decoder_layers, temperature, grad_x,
                                grad_soft, x_new=None, soft=None):
            return torch.empty_like(perturbed)

        BWD["cpp"] = torch.ops.tgtfast.mlp_chain_bwd.default
        if torch._C._dispatch_has_kernel_for_dispatch_key("tgtfast::mlp_chain_bwd", "CUDA"):
            BWD["cuda"] = torch.ops.tgtfast.mlp_chain_bwd.default
    if _ext.built_with_cuda() and not torch._C._dispatch_has_kernel_for_dispatch_key("tgtfast::mlp_chain_fwd", "CUDA"):
        _missing[Backend.CUDA] = "the extension has no CUDA kernel for this op"
else:
    _missing[Backend.CPP] = _missing[Backend.CUDA] = "the compiled extension has no mlp_chain_fwd op"

register_op(OP, missing=_missing, dtypes={b: MLP_DTYPES for b in Backend if b is not Backend.AUTO},
            loaders={Backend.TRITON: _load_triton})

# Rows recomputed at once in backward: about this many floats of hidden activations per chunk.
_BACKWARD_CHUNK_FLOATS = 1 << 20


def _layers_f32(layers: Sequence[Layer]):
    return [(w.detach().to(torch.float32).contiguous(),
             None if b is None else b.detach().to(torch.float32).contiguous(), a) for w, b, a in layers]


def _chain(zp: Tensor, dec: Sequence[Layer], lab: Sequence[Layer], temperature: float) -> Tuple[Tensor, Tensor]:
    x = reference.mlp_forward(zp, dec)
    return x, torch.softmax(reference.mlp_forward(x, lab) / temperature, dim=-1)


def _chunked_backward(pert, dec, lab, temperature, g_x, g_soft):
    """Gradient to the perturbed latent with torch ops, recomputing the chain chunk by chunk."""
    widest = max(w.shape[0] for w, _, _ in list(dec) + list(lab))
    chunk = max(1, _BACKWARD_CHUNK_FLOATS // widest)
    grad = torch.empty_like(pert)
    for start in range(0, pert.shape[0], chunk):
        rows = slice(start, start + chunk)
        zc = pert[rows].detach().requires_grad_(True)
        with torch.enable_grad():
            x, soft = _chain(zc, dec, lab, temperature)
        outs, grads = [], []
        for out, g in ((x, g_x), (soft, g_soft)):
            if g is not None:
                outs.append(out)
                grads.append(g[rows])
        (grad[rows],) = torch.autograd.grad(outs, zc, grads)
    return grad


class MlpChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, backend, dec, lab, sigma, seed, offset, temperature):
        layers = list(dec) + list(lab)
        weights = [w for w, _, _ in layers]
        biases = [b for _, b, _ in layers]
        acts = [ACTIVATIONS[a] for _, _, a in layers]
        signed_seed = seed - (1 << 64) if seed >= (1 << 63) else seed
        need = bool(ctx.needs_input_grad[0])
        x_new, soft, pert = FWD[backend](z, weights, biases, acts, len(dec), float(sigma), signed_seed, int(offset),
                                          float(temperature), need)
        ctx.dec, ctx.lab, ctx.temperature, ctx.z_dtype, ctx.backend = dec, lab, temperature, z.dtype, backend
        # the C++ CPU backward takes the float32 outputs too and skips recomputing the layers that made them
        ctx.with_outputs = need and backend == "cpp" and z.dtype == torch.float32
        if ctx.with_outputs:
            ctx.save_for_backward(pert, x_new, soft)
        elif need:
            ctx.save_for_backward(pert)
        ctx.set_materialize_grads(False)
        return x_new, soft

    @staticmethod
    def backward(ctx, g_x, g_soft):
        if g_x is None and g_soft is None:
            return (None,) * 8
        check_no_double_backward("tgtfast.perturb_decode_label")
        pert, *outputs = ctx.saved_tensors
        g_x, g_soft = (None if g is None else g.to(torch.float32).contiguous() for g in (g_x, g_soft))
        bwd = BWD.get(ctx.backend)
        if bwd is not None:
            layers = list(ctx.dec) + list(ctx.lab)
            x_new, soft = outputs if outputs else (None, None)
            grad = bwd(pert, [w for w, _, _ in layers], [b for _, b, _ in layers],
                       [ACTIVATIONS[a] for _, _, a in layers], len(ctx.dec), float(ctx.temperature), g_x, g_soft,
                       x_new, soft)
        else:
            grad = _chunked_backward(pert, ctx.dec, ctx.lab, ctx.temperature, g_x, g_soft)
        return grad.to(ctx.z_dtype), None, None, None, None, None, None, None
