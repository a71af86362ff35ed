"""
Temperature softmax
===================

``y = softmax(x / T)`` over the last dimension of a ``[rows, K]`` tensor, one program per row, accumulated in
float32 (float64 for float64 input) and written in the input's dtype. A row that fits in one tile
(``K <= 4096``) is read once; a longer row is walked twice (an online max / sum of exponentials, then the
write), the second read mostly served by L2. This is the labelling step of Teacher Guided Training when the
labeler is not an MLP the fused chain can take (``tgtfast.perturb_decode_label``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .noise import launch_guard

_MAX_TILE = 4096


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, K, inv_t, ACC: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * K
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < K
        u = tl.load(x_ptr + base + cols, mask=mask, other=-float("inf")).to(ACC) * inv_t
        m = tl.max(u, 0)
        e = tl.where(mask, tl.exp(u - m), 0.0)
        tl.store(y_ptr + base + cols, (e / tl.sum(e, 0)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full((), -float("inf"), ACC)
        s = tl.zeros((), ACC)
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            u = tl.load(x_ptr + base + k0 + cols, mask=mask, other=-float("inf")).to(ACC) * inv_t
            m_new = tl.maximum(m, tl.max(u, 0))
            # While every logit so far is -inf, exp(m - m_new) would be exp(-inf + inf) = NaN: shift by 0 instead.
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.where(mask, tl.exp(u - m_ref), 0.0), 0)
            m = m_new
        inv_s = 1.0 / s
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            u = tl.load(x_ptr + base + k0 + cols, mask=mask, other=-float("inf")).to(ACC) * inv_t
            tl.store(y_ptr + base + k0 + cols, (tl.exp(u - m) * inv_s).to(y_ptr.dtype.element_ty), mask=mask)


def softmax_block(k: int) -> int:
    """Columns per tile of ``_softmax_kernel`` for rows of ``k`` elements."""
    return min(triton.next_power_of_2(k), _MAX_TILE)


def softmax_num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8


def temperature_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension (the ``tgtfast::temperature_softmax`` op)."""
    x = logits.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    k = x.shape[-1] if x.dim() > 0 else 0
    rows = x.numel() // k if k > 0 else 0
    if rows == 0:
        return y
    block = softmax_block(k)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    with launch_guard(x):
        torch.library.wrap_triton(_softmax_kernel)[(rows,)](
            x, y, k, 1.0 / float(temperature), ACC=acc, BLOCK=block, SINGLE=k <= block,
            num_warps=softmax_num_warps(block),
        )
    return y
