"""
Triton kernels of the MLP perturb -> decode -> label chain
===========================================================

``mlp_chain_fwd`` computes, for latent codes ``z [B, d]`` and an MLP given layer by layer,

    x_new = decoder(z + sigma * noise(seed, offset))        soft = softmax(labeler(x_new) / temperature)

with one launch per layer: a tiled ``tl.dot`` GEMM whose epilogue adds the bias and applies the activation
in registers. The first layer draws the noise while it loads its input tile (Philox4x32-10 and Box-Muller of
``csrc/philox.h``, through ``kernels/noise.py:normal_at``), so no noise tensor exists; the decoder's last layer also writes ``x_new`` in the output dtype; the labeler's last layer
applies the tempered softmax in its epilogue when a program's tile spans all ``K`` classes (``K <= 1024``),
otherwise a row-softmax kernel follows. Between layers the float32 activations of a chunk of rows go through
global memory (mostly L2 for the chunk sizes used), so this is the per-layer fused variant, not one kernel
that keeps every hidden layer on chip.

Float32 dots use ``input_precision="tf32x3"`` on the GPU (float32 accuracy from tensor cores); bfloat16 inputs
are read as float32. Activation codes are those of ``tgtfast/_mlp.py`` (``ACTIVATIONS``).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .noise import normal_at

# Rows processed per pass of the whole chain: bounds the float32 hidden buffers to _CHUNK x (widest layer).
_CHUNK_ROWS = 16384
_SOFTMAX_FUSED_MAX = 1024


@triton.jit
def _normal(seed, j):
    """The normal of stream index ``j`` (int64 tensor) under ``seed`` (csrc/philox.h): the package's one Triton
    noise function (libdevice log/sin/cos on the GPU, so ``-2 log u1`` never rounds below zero)."""
    return normal_at(seed, j)


@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    """float32 -> dtype with round-to-nearest-even (explicit for bfloat16: the interpreter truncates)."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where(x != x, x, r)
    return x.to(dtype)


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == 1:
        x = tl.where(x > 0.0, x, tl.where(x != x, x, 0.0))
    elif ACT == 2:
        x = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)  # 0.5 x (1 + tanh u) = x sigmoid(2u)
    elif ACT == 4:
        x = x * tl.sigmoid(x)
    elif ACT == 5:
        x = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    elif ACT == 6:
        x = tl.sigmoid(x)
    return x


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, out_ptr, pert_ptr,
    M, N, K,
    sigma, seed, noise_base, inv_t,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, NOISE: tl.constexpr, WRITE_PERT: tl.constexpr,
    WRITE_OUT: tl.constexpr, SOFTMAX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n] = act(sum_k x[m, k] w[n, k] + b[n]) for a [BLOCK_M, BLOCK_N] tile; x is [M, K] contiguous, w is
    [N, K] float32. NOISE: x <- x + sigma * normal(seed, noise_base + m K + k) (and stored to pert_ptr by
    the first column of programs when WRITE_PERT). WRITE_OUT: also store y in out_ptr's dtype. SOFTMAX: the tile
    spans all N columns; y <- softmax(y * inv_t) per row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        a_idx = rm.to(tl.int64)[:, None] * K + kk[None, :]
        a = tl.load(x_ptr + a_idx, mask=a_mask, other=0.0).to(tl.float32)
        if NOISE:
            j = noise_base + a_idx
            a = tl.where(a_mask, a + sigma * _normal(seed, j), 0.0)
            if WRITE_PERT:
                if pid_n == 0:
                    tl.store(pert_ptr + a_idx, a, mask=a_mask)
        w = tl.load(w_ptr + rn.to(tl.int64)[None, :] * K + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    acc = _activate(acc, ACT)
    if SOFTMAX:
        u = tl.where(n_ok[None, :], acc * inv_t, float("-inf"))
        e = tl.exp(u - tl.max(u, axis=1)[:, None])
        acc = e / tl.sum(e, axis=1)[:, None]
    y_idx = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + y_idx, acc, mask=mask)
    if WRITE_OUT:
        tl.store(out_ptr + y_idx, _to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, N, inv_t, BLOCK: tl.constexpr):
    """out[row] = softmax(x[row] * inv_t) for one row per program (two sweeps of BLOCK columns)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for c0 in range(0, N, BLOCK):
        u = tl.load(x_ptr + row * N + c0 + cols, mask=c0 + cols < N, other=float("-inf")) * inv_t
        m_new = tl.maximum(m, tl.max(u, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
        m = m_new
    for c0 in range(0, N, BLOCK):
        ok = c0 + cols < N
        u = tl.load(x_ptr + row * N + c0 + cols, mask=ok, other=float("-inf")) * inv_t
        tl.store(out_ptr + row * N + c0 + cols, _to_dtype(tl.exp(u - m) / s, out_ptr.dtype.element_ty), mask=ok)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _linear(x, w, b, act, out_dtype_buf, *, noise=None, pert=None, softmax_t=None, row0=0):
    """One launch: returns the float32 [M, N] result (and writes out_dtype_buf if given)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=torch.float32)
    fuse_softmax = softmax_t is not None
    if fuse_softmax:
        block_n = max(16, triton.next_power_of_2(N))
        block_m = 16
    else:
        block_n = 64 if N >= 64 else max(16, triton.next_power_of_2(N))
        block_m = 64 if M >= 64 else max(16, triton.next_power_of_2(M))
    block_k = 32 if K >= 32 and block_n <= 256 else 16
    sigma, seed, offset = noise if noise is not None else (0.0, 0, 0)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    precision = "ieee" if _interpret() else "tf32x3"
    _linear_kernel[grid](
        x, w, b if b is not None else w, y, out_dtype_buf if out_dtype_buf is not None else y,
        pert if pert is not None else y,
        M, N, K, float(sigma), seed, int(offset) + row0 * K, 1.0 / softmax_t if fuse_softmax else 1.0,
        ACT=int(act), HAS_BIAS=b is not None, NOISE=noise is not None, WRITE_PERT=pert is not None,
        WRITE_OUT=out_dtype_buf is not None, SOFTMAX=fuse_softmax, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if fuse_softmax and block_n >= 512 else 4,
    )
    return y


def mlp_chain_fwd(
    z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
    activations: Sequence[int], num_decoder_layers: int, sigma: float, seed: int, offset: int,
    temperature: float, need_perturbed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.tgtfast.mlp_chain_fwd`` (see csrc/ops.cpp); ``seed`` may be given signed
    (two's complement of the 64-bit key). Weights and biases are contiguous float32 on z's device."""
    B, d = z.shape
    L = len(weights)
    seed = seed % (1 << 64)
    seed = seed - (1 << 64) if seed >= (1 << 63) else seed  # normal_at takes the 64-bit key as a signed int
    z = z.contiguous()
    x_new = torch.empty((B, weights[num_decoder_layers - 1].shape[0]), device=z.device, dtype=z.dtype)
    soft = torch.empty((B, weights[-1].shape[0]), device=z.device, dtype=z.dtype)
    pert = torch.empty((B, d), device=z.device, dtype=torch.float32) if need_perturbed else z.new_empty((0,))
    K = weights[-1].shape[0]
    for row0 in range(0, B, _CHUNK_ROWS):
        rows = slice(row0, min(B, row0 + _CHUNK_ROWS))
        h = z[rows]
        for l in range(L):
            last = l == L - 1
            fuse = last and K <= _SOFTMAX_FUSED_MAX
            out = x_new[rows] if l == num_decoder_layers - 1 else (soft[rows] if fuse else None)
            h = _linear(
                h, weights[l], biases[l], activations[l], out,
                noise=(sigma, seed, offset) if l == 0 else None,
                pert=pert[rows] if (l == 0 and need_perturbed) else None,
                softmax_t=temperature if fuse else None, row0=row0,
            )
            if last and not fuse:
                n = h.shape[0]
                if n:
                    _softmax_kernel[(n,)](h, soft[rows], K, 1.0 / temperature, BLOCK=1024)
    return x_new, soft, pert
