"""
Triton backward of the MLP perturb -> decode -> label chain
============================================================

``mlp_chain_bwd`` is the gradient to the perturbed latent, with the contract of ``torch.ops.tgtfast.mlp_chain_bwd``
(csrc/ops.cpp), used by the Triton backend (tgtfast/ops/mlp_chain.py). Per chunk of rows:

1. the layers again through the forward's ``_linear`` with the identity, keeping each pre-activation, and
   ``_act_kernel`` applying the activation for the next layer's input;
2. the gradient of the labeler's logits from the soft labels' by ``_softmax_bwd_kernel`` (soft recomputed);
3. per layer, downwards, ``dx = (dy * act'(pre)) W`` by ``_linear_bwd_kernel``, whose operand loads apply the
   derivative and add x_new's gradient at the decoder's last layer.

The forward kernels are in kernels/mlp_chain.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .mlp_chain import _ROW_SOFTMAX_BLOCK, _activate, _interpret, _linear
from .noise import launch_guard

# Floats of recomputed activations per chunk of the backward (pre-activations of every layer, two gradients).
_BWD_CHUNK_FLOATS = 1 << 24
_ELEMENTWISE_BLOCK = 1024


@triton.jit
def _activate_grad(x, ACT: tl.constexpr):
    """act'(x) from the pre-activation x (csrc/cuda/mlp_chain_cuda.cu, the CPU kernels and autograd alike)."""
    if ACT == 1:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 3:
        t = 2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * (x + 0.044715 * x * x * x))) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    elif ACT == 4:
        sg = tl.sigmoid(x)
        d = sg * (1.0 + x * (1.0 - sg))
    elif ACT == 5:
        t = 2.0 * tl.sigmoid(2.0 * x) - 1.0
        d = 1.0 - t * t
    elif ACT == 6:
        sg = tl.sigmoid(x)
        d = sg * (1.0 - sg)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _act_kernel(x_ptr, y_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(x), elementwise over n float32 values."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(y_ptr + offs, _activate(tl.load(x_ptr + offs, mask=ok, other=0.0), ACT), mask=ok)


@triton.jit
def _tempered_logits(ptr, ok, inv_t, ACT: tl.constexpr):
    """act(pre) * inv_t of one chunk of a row (``-inf`` where ``ok`` is false)."""
    return tl.where(ok, _activate(tl.load(ptr, mask=ok, other=0.0), ACT) * inv_t, float("-inf"))


@triton.jit
def _softmax_bwd_kernel(pre_ptr, g_ptr, out_ptr, N, inv_t, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program: p = softmax(act(pre) * inv_t) (recomputed), out = p * (g - <g, p>) * inv_t."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for c0 in range(0, N, BLOCK):
        ok = c0 + cols < N
        u = _tempered_logits(pre_ptr + row * N + c0 + cols, ok, inv_t, ACT)
        m_new = tl.maximum(m, tl.max(u, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a first chunk of -inf: no exp(-inf + inf)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(u - m_ref), axis=0)
        m = m_new
    dot = tl.zeros((), tl.float32)
    for c0 in range(0, N, BLOCK):
        ok = c0 + cols < N
        u = _tempered_logits(pre_ptr + row * N + c0 + cols, ok, inv_t, ACT)
        p = tl.exp(u - m) / s
        dot += tl.sum(tl.where(ok, p * tl.load(g_ptr + row * N + c0 + cols, mask=ok, other=0.0), 0.0), axis=0)
    for c0 in range(0, N, BLOCK):
        ok = c0 + cols < N
        u = _tempered_logits(pre_ptr + row * N + c0 + cols, ok, inv_t, ACT)
        p = tl.exp(u - m) / s
        g = tl.load(g_ptr + row * N + c0 + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * N + c0 + cols, p * (g - dot) * inv_t, mask=ok)


@triton.jit
def _linear_bwd_kernel(
    g_ptr, gx_ptr, pre_ptr, w_ptr, dx_ptr, M, N, K,
    ACT: tl.constexpr, HAS_G: tl.constexpr, HAS_GX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[m, k] = sum_n (g[m, n] + gx[m, n]) act'(pre[m, n]) w[n, k] for a [BLOCK_M, BLOCK_K] tile of dx [M, K]; g,
    gx and pre are [M, N] float32 (g or gx absent: 0), w is [N, K] float32."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        nn = n0 + rn
        n_ok = nn < N
        a_mask = m_ok[:, None] & n_ok[None, :]
        a_idx = rm.to(tl.int64)[:, None] * N + nn[None, :]
        dy = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_G:
            dy += tl.load(g_ptr + a_idx, mask=a_mask, other=0.0)
        if HAS_GX:
            dy += tl.load(gx_ptr + a_idx, mask=a_mask, other=0.0)
        if ACT != 0:
            dy = tl.where(a_mask, dy * _activate_grad(tl.load(pre_ptr + a_idx, mask=a_mask, other=0.0), ACT), 0.0)
        w = tl.load(w_ptr + nn.to(tl.int64)[:, None] * K + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    tl.store(dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], acc, mask=m_ok[:, None] & k_ok[None, :])


def linear_bwd_config(M: int, N: int, K: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of ``_linear_bwd_kernel`` for dx [M, K] from a layer of N
    outputs: the forward's 64 x 64 tiles, 16-deep steps (tests/test_triton_compile.py checks memory and spills)."""
    block_m = 64 if M >= 64 else max(16, triton.next_power_of_2(M))
    block_k = 64 if K >= 64 else max(16, triton.next_power_of_2(K))
    return block_m, 16, block_k, 4, 3


def mlp_chain_bwd(
    perturbed: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
    activations: Sequence[int], num_decoder_layers: int, temperature: float, grad_x: Optional[torch.Tensor],
    grad_soft: Optional[torch.Tensor], x_new: Optional[torch.Tensor] = None, soft: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Same contract as ``torch.ops.tgtfast.mlp_chain_bwd`` (csrc/ops.cpp): the gradient to the perturbed latent
    [B, d] float32, recomputed chunk by chunk from it; ``x_new`` and ``soft`` (the CPU kernel's shortcuts) unused."""
    B, d = perturbed.shape
    grad = torch.zeros((B, d), device=perturbed.device, dtype=torch.float32)
    if B == 0 or (grad_x is None and grad_soft is None):
        return grad
    layers = len(weights) if grad_soft is not None else num_decoder_layers
    widths = [w.shape[0] for w in weights[:layers]]
    chunk = max(1, min(B, _BWD_CHUNK_FLOATS // (sum(widths) + 2 * max(widths + [d]))))
    precision = "ieee" if _interpret() else "tf32x3"
    with launch_guard(perturbed):
        for row0 in range(0, B, chunk):
            rows = slice(row0, min(B, row0 + chunk))
            h, pres = perturbed[rows], []
            for l in range(layers):  # the forward again, keeping the pre-activations
                pre = _linear(h, weights[l], biases[l], 0, None)
                pres.append(pre)
                if activations[l] != 0 and l < layers - 1:
                    h = torch.empty_like(pre)
                    n = pre.numel()
                    _act_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](pre, h, n, ACT=int(activations[l]),
                                                                       BLOCK=_ELEMENTWISE_BLOCK)
                else:
                    h = pre
            g = None
            if grad_soft is not None:
                g = torch.empty_like(pres[-1])
                _softmax_bwd_kernel[(g.shape[0],)](pres[-1], grad_soft[rows], g, g.shape[1], 1.0 / temperature,
                                                   ACT=int(activations[-1]), BLOCK=_ROW_SOFTMAX_BLOCK)
            for l in range(layers - 1, -1, -1):
                gx = grad_x[rows] if grad_x is not None and l == num_decoder_layers - 1 else None
                m, n = pres[l].shape
                k = weights[l].shape[1]
                dx = grad[rows] if l == 0 else torch.empty((m, k), device=grad.device, dtype=torch.float32)
                bm, bn, bk, nw, ns = linear_bwd_config(m, n, k)
                _linear_bwd_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
                    g if g is not None else pres[l], gx if gx is not None else pres[l], pres[l], weights[l], dx,
                    m, n, k, ACT=int(activations[l]), HAS_G=g is not None, HAS_GX=gx is not None,
                    PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
                g = dx
    return grad
