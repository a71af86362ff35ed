"""
Triton kernels of the MLP perturb -> decode -> label chain
===========================================================

``mlp_chain_fwd`` computes, for latent codes ``z [B, d]`` and an MLP given layer by layer,

    x_new = decoder(z + sigma * noise(seed, offset))        soft = softmax(labeler(x_new) / temperature)

The common teacher shape, a 2-layer decoder ``d -> H1 -> X`` and a 2-layer labeler ``X -> H2 -> K`` (any
activations, biases optional) with ``d``, ``H1`` and ``H2`` at most ``FUSED_MAX_WIDTH`` after padding to a power of
two (``X`` and ``K`` of any size), runs as ONE kernel, ``_chain_kernel``: each program takes a block of rows,
draws the noise for its ``z`` tile, keeps ``h1`` in registers, computes ``x_new`` in chunks of columns (each
chunk written once in the output dtype and at once multiplied into the labeler's first layer, so ``x_new`` is
never read back), keeps ``h2`` in registers and writes the tempered softmax, over the classes in one go when they
fit one tile and otherwise with an online max/sum pass followed by a pass that recomputes each logit chunk from
``h2``. Only ``x_new``, the soft labels (and the perturbed latents when asked) reach global memory.
``chain_path`` tells which path a chain takes; ``launch_counts`` counts the calls of each.

Every other chain (other depths, a hidden width above ``FUSED_MAX_WIDTH``, or one-kernel tiles beyond the
shared-memory budget, e.g. ``d`` and ``H1`` both in 129-256) runs
with one launch per layer: a tiled ``tl.dot`` GEMM whose epilogue adds the bias and applies the activation
in registers. The first layer draws the noise while it loads its input tile (Philox4x32-10 and Box-Muller of
``csrc/philox.h``, through ``kernels/noise.py:normal_at``), so no noise tensor exists; the decoder's last layer also writes ``x_new`` in the output dtype; the labeler's last layer
applies the tempered softmax in its epilogue when a program's tile spans all ``K`` classes (``K <= 512``),
otherwise a row-softmax kernel follows. Between layers the float32 activations of a chunk of rows go through
global memory (mostly L2 for the chunk sizes used) on this per-layer path.

The backward (the gradient to the perturbed latent) is in kernels/mlp_chain_bwd.py; it reuses ``_linear`` and
``_activate`` from here.

Float32 dots use ``input_precision="tf32x3"`` on the GPU (float32 accuracy from tensor cores); bfloat16 inputs
are read as float32. Activation codes are the positions in ``tgtfast.reference.ACTIVATIONS``
(``tgtfast/ops/mlp_chain.py``).

Block sizes are fixed per shape (``linear_config``, ``fused_launch_config``) so that every configuration fits
the shared memory of an A100 (163 KiB per block; H100/H200 allow 227 KiB) and ptxas spills little or nothing;
a chain whose one-kernel tiles would not fit takes the per-layer path. Launches run under the device guard of
``z``'s device (``kernels/noise.py:launch_guard``).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .noise import launch_guard, normal_at

# Rows processed per pass of the whole chain: bounds the float32 hidden buffers to _CHUNK x (widest layer).
_CHUNK_ROWS = 16384
# Widest labeler output whose softmax the last layer's epilogue applies (one [16, N] tile per program). A
# 1024-wide tile spills ~600-700 bytes per thread with 8 warps (the tf32x3 dot holds three copies of its operands)
# and ~200-300 with 16, and takes 132 KiB of shared memory with three stages (Triton 3.6 and 3.9; ~193 KiB under
# 3.8, beyond an A100): wider rows take the row kernel.
_SOFTMAX_FUSED_MAX = 512

# Shared memory a kernel may use: the per-block opt-in limit of sm_80 (A100: 163 KiB), the smallest of the GPUs
# the package targets (sm_90: 227 KiB). The configurations below are chosen to fit it on every target;
# tests/test_triton_compile.py compiles each of them ahead of time for sm_80 and sm_90 and checks.
SMEM_LIMITS = {80: 163 * 1024, 90: 227 * 1024}
SMEM_BUDGET = min(SMEM_LIMITS.values())


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
        # While every logit so far is -inf, exp(m - m_new) would be exp(-inf + inf) = NaN: shift by 0 instead.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(u - m_ref), axis=0)
        m = m_new
    for c0 in range(0, N, BLOCK):
        ok = c0 + cols < N
        u = tl.load(x_ptr + row * N + c0 + cols, mask=ok, other=float("-inf")) * inv_t
        tl.store(out_ptr + row * N + c0 + cols, _to_dtype(tl.exp(u - m) / s, out_ptr.dtype.element_ty), mask=ok)


# Columns per step of the row softmax that follows a labeler wider than _SOFTMAX_FUSED_MAX.
_ROW_SOFTMAX_BLOCK = 1024

# Widths held whole in registers by the fused chain kernel (d, H1 and H2 after padding to a power of two >= 16).
FUSED_MAX_WIDTH = 256

# Launches per path since import: {"fused": n, "per_layer": n} (one count per mlp_chain_fwd call that launches).
launch_counts = {"fused": 0, "per_layer": 0}


@triton.jit
def _logits_chunk(h2, w4_ptr, b4_ptr, rk, k_ok, rh2, h2_ok, H2, ACT4: tl.constexpr, HAS_B4: tl.constexpr,
                  PRECISION: tl.constexpr):
    """act4(h2 W4[rk]^T + b4[rk]) for the classes ``rk`` (masked by ``k_ok``): one chunk of the labeler's logits."""
    wt4 = tl.load(w4_ptr + rk.to(tl.int64)[None, :] * H2 + rh2[:, None], mask=k_ok[None, :] & h2_ok[:, None],
                  other=0.0)
    lg = tl.dot(h2, wt4, input_precision=PRECISION)
    if HAS_B4:
        lg += tl.load(b4_ptr + rk, mask=k_ok, other=0.0)[None, :]
    return _activate(lg, ACT4)


@triton.jit
def _chain_kernel(
    z_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, w4_ptr, b4_ptr, x_ptr, soft_ptr, pert_ptr,
    M, D, H1, X, H2, K,
    sigma, seed, noise_base, inv_t,
    ACT1: tl.constexpr, ACT2: tl.constexpr, ACT3: tl.constexpr, ACT4: tl.constexpr,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_B3: tl.constexpr, HAS_B4: tl.constexpr,
    WRITE_PERT: tl.constexpr, ONE_PASS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The whole chain for BLOCK_M rows: zp = z + sigma * noise; h1 = act1(zp W1^T + b1);
    x = act2(h1 W2^T + b2) (stored in x_ptr's dtype, BLOCK_X columns at a time, each chunk also accumulated into
    the labeler's first layer); h2 = act3(x W3^T + b3); soft = softmax(act4(h2 W4^T + b4) * inv_t), BLOCK_K
    classes at a time (ONE_PASS when K <= BLOCK_K, else an online max/sum pass and a pass that recomputes the
    logits). W_l are float32 [out, in] contiguous; D <= BLOCK_D, H1 <= BLOCK_H1, H2 <= BLOCK_H2."""
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = rm < M
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    rh1 = tl.arange(0, BLOCK_H1)
    h1_ok = rh1 < H1
    rh2 = tl.arange(0, BLOCK_H2)
    h2_ok = rh2 < H2

    # 1. perturbed latent tile
    z_mask = m_ok[:, None] & d_ok[None, :]
    z_idx = rm[:, None] * D + rd[None, :]
    zp = tl.load(z_ptr + z_idx, mask=z_mask, other=0.0).to(tl.float32)
    zp = tl.where(z_mask, zp + sigma * _normal(seed, noise_base + z_idx), 0.0)
    if WRITE_PERT:
        tl.store(pert_ptr + z_idx, zp, mask=z_mask)

    # 2. decoder hidden layer, kept in registers
    wt1 = tl.load(w1_ptr + rh1[None, :] * D + rd[:, None], mask=h1_ok[None, :] & d_ok[:, None], other=0.0)
    h1 = tl.dot(zp, wt1, input_precision=PRECISION)
    if HAS_B1:
        h1 += tl.load(b1_ptr + rh1, mask=h1_ok, other=0.0)[None, :]
    h1 = tl.where(h1_ok[None, :], _activate(h1, ACT1), 0.0)

    # 3. decoder output chunk by chunk, folded into the labeler's hidden layer
    acc2 = tl.zeros((BLOCK_M, BLOCK_H2), dtype=tl.float32)
    for x0 in range(0, X, BLOCK_X):
        rx = x0 + tl.arange(0, BLOCK_X)
        x_ok = rx < X
        wt2 = tl.load(w2_ptr + rx.to(tl.int64)[None, :] * H1 + rh1[:, None], mask=x_ok[None, :] & h1_ok[:, None],
                    other=0.0)
        xc = tl.dot(h1, wt2, input_precision=PRECISION)
        if HAS_B2:
            xc += tl.load(b2_ptr + rx, mask=x_ok, other=0.0)[None, :]
        xc = tl.where(x_ok[None, :], _activate(xc, ACT2), 0.0)
        tl.store(x_ptr + rm[:, None] * X + rx[None, :], _to_dtype(xc, x_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & x_ok[None, :])
        wt3 = tl.load(w3_ptr + rh2.to(tl.int64)[None, :] * X + rx[:, None], mask=h2_ok[None, :] & x_ok[:, None],
                    other=0.0)
        acc2 = tl.dot(xc, wt3, acc2, input_precision=PRECISION)
    if HAS_B3:
        acc2 += tl.load(b3_ptr + rh2, mask=h2_ok, other=0.0)[None, :]
    h2 = tl.where(h2_ok[None, :], _activate(acc2, ACT3), 0.0)

    # 4. tempered softmax of the logits
    rk0 = tl.arange(0, BLOCK_K)
    if ONE_PASS:  # K <= BLOCK_K
        k_ok = rk0 < K
        lg = _logits_chunk(h2, w4_ptr, b4_ptr, rk0, k_ok, rh2, h2_ok, H2, ACT4, HAS_B4, PRECISION)
        u = tl.where(k_ok[None, :], lg * inv_t, float("-inf"))
        e = tl.exp(u - tl.max(u, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
        tl.store(soft_ptr + rm[:, None] * K + rk0[None, :], _to_dtype(p, soft_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s_i = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            lg = _logits_chunk(h2, w4_ptr, b4_ptr, rk, k_ok, rh2, h2_ok, H2, ACT4, HAS_B4, PRECISION)
            u = tl.where(k_ok[None, :], lg * inv_t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(u, axis=1))
            # While a row's logits so far are all -inf (a first chunk of -inf logits), exp(m_i - m_new) would be
            # exp(-inf + inf) = NaN: shift by 0 instead (kernels/softmax.py does the same).
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_i = s_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(u - m_ref[:, None]), axis=1)
            m_i = m_new
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + rk0
            k_ok = rk < K
            u = _logits_chunk(h2, w4_ptr, b4_ptr, rk, k_ok, rh2, h2_ok, H2, ACT4, HAS_B4, PRECISION) * inv_t
            p = tl.exp(u - m_i[:, None]) / s_i[:, None]
            tl.store(soft_ptr + rm[:, None] * K + rk[None, :], _to_dtype(p, soft_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & k_ok[None, :])


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _linear(x, w, b, act, out_dtype_buf, *, noise=None, pert=None, softmax_t=None, row0=0):
    """One launch: returns the float32 [M, N] result (and writes out_dtype_buf if given)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=torch.float32)
    fuse_softmax = softmax_t is not None
    block_m, block_n, block_k, num_warps, num_stages = linear_config(M, N, K, fuse_softmax)
    sigma, seed, offset = noise if noise is not None else (0.0, 0, 0)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    precision = "ieee" if _interpret() else "tf32x3"
    _linear_kernel[grid](
        x, w, b if b is not None else w, y, out_dtype_buf if out_dtype_buf is not None else y,
        pert if pert is not None else y,
        M, N, K, float(sigma), seed, int(offset) + row0 * K, 1.0 / softmax_t if fuse_softmax else 1.0,
        ACT=int(act), HAS_BIAS=b is not None, NOISE=noise is not None, WRITE_PERT=pert is not None,
        WRITE_OUT=out_dtype_buf is not None, SOFTMAX=fuse_softmax, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return y


def linear_config(M: int, N: int, K: int, fuse_softmax: bool) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of ``_linear_kernel`` for an [M, K] x [N, K]^T layer.

    With the fused softmax (``N <= _SOFTMAX_FUSED_MAX``) a program's tile spans all N columns: 16 rows, 4 warps
    up to 256 columns and 8 at 512, 16-deep K steps past 64 columns (32-deep ones make ptxas spill with the
    tf32x3 dot). Otherwise 64 x 64 tiles with 16-deep K steps. At most ~70 KiB of shared memory (3 stages) and no
    spills on sm_80 / sm_90 (tests/test_triton_compile.py)."""
    if fuse_softmax:
        block_n = max(16, triton.next_power_of_2(N))
        if block_n > _SOFTMAX_FUSED_MAX:
            raise ValueError(f"fused softmax over {N} columns: at most {_SOFTMAX_FUSED_MAX}")
        block_m = 16
        block_k = 32 if K >= 32 and block_n <= 64 else 16
        num_warps = 8 if block_n >= 512 else 4
    else:
        block_n = 64 if N >= 64 else max(16, triton.next_power_of_2(N))
        block_m = 64 if M >= 64 else max(16, triton.next_power_of_2(M))
        block_k = 16
        num_warps = 4
    return block_m, block_n, block_k, num_warps, 3


def _fused_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _fused_config(widest: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, num_warps, num_stages, BLOCK_X, BLOCK_K) of the fused chain for the widest padded width held in
    registers. Tiles of 128 or 256 columns take 16 rows, 16-column x chunks and no multi-buffering of the weight
    tiles. ``fused_launch_config`` completes it (class chunk, one or two softmax passes) and refuses the shapes
    whose tiles would not fit the shared-memory budget; tests/test_triton_compile.py measures every resulting
    configuration (at most 96 KiB of shared memory, spills of at most a few dozen bytes on sm_80 / sm_90)."""
    if widest >= 128:
        return 16, 8, 1, 16, 64
    return 32, 8, 2, 64, 128


def fused_smem_bytes(block_m: int, block_d: int, block_h1: int, block_h2: int, block_x: int, block_k: int,
                     num_stages: int) -> int:
    """Upper bound on the shared memory of ``_chain_kernel``: every float32 ``tl.dot`` operand tile staged at
    once (the weight tiles of the x loop ``num_stages`` times). Triton reuses shared memory between the
    phases, so the real figure is lower (tests/test_triton_compile.py measures it); the dominant term is the
    first layer's [BLOCK_D, BLOCK_H1] weight tile (256 KiB at 256 x 256, beyond any GPU)."""
    loop = block_h1 * block_x + block_x * block_h2 + block_m * block_x
    return 4 * (block_d * block_h1 + block_m * (block_d + block_h1 + block_h2) + max(1, num_stages) * loop
                + block_h2 * block_k)


def fused_launch_config(widths: Sequence[int]) -> Optional[dict]:
    """The constexpr blocks and launch options of ``_chain_kernel`` for a chain of layer ``widths``
    ``[d, H1, X, H2, K]``, or None when the one-kernel chain cannot take it: a padded width above
    ``FUSED_MAX_WIDTH``, or tiles whose shared memory (``fused_smem_bytes``) would exceed ``SMEM_BUDGET``."""
    d, h1, _, h2, k = widths
    block_d, block_h1, block_h2 = _fused_block(d), _fused_block(h1), _fused_block(h2)
    widest = max(block_d, block_h1, block_h2)
    if widest > FUSED_MAX_WIDTH:
        return None
    block_m, num_warps, num_stages, block_x, block_k = _fused_config(widest)
    # at least 32 classes per chunk: a [16, 16] logits tile over 8 warps makes ptxas spill ~7 KB per thread
    block_k = min(block_k, max(32, _fused_block(k)))
    if fused_smem_bytes(block_m, block_d, block_h1, block_h2, block_x, block_k, num_stages) > SMEM_BUDGET:
        return None
    # With a 256-wide h1 the one-pass softmax spills ~200-300 bytes per thread (ptxas, sm_80 / sm_90) where the
    # two-pass one, which recomputes the few logits, spills nothing.
    one_pass = k <= block_k and block_h1 < 256
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_H1=block_h1, BLOCK_H2=block_h2, BLOCK_X=block_x,
                BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=num_warps, num_stages=num_stages)


def chain_path(widths: Sequence[int], num_decoder_layers: int) -> str:
    """``"fused"`` when the chain given by its layer ``widths`` ``[d, H1, X, H2, K]`` (input width, then each
    layer's output width) is run by the one-kernel chain (a 2-layer decoder and a 2-layer labeler whose hidden
    widths and ``d`` fit ``FUSED_MAX_WIDTH`` after padding and whose tiles fit the shared-memory budget, see
    ``fused_launch_config``), else ``"per_layer"``."""
    if len(widths) != 5 or num_decoder_layers != 2:
        return "per_layer"
    return "fused" if fused_launch_config(widths) is not None else "per_layer"


def _chain_fused(z, weights, biases, activations, x_new, soft, pert, sigma, seed, offset, temperature):
    """One launch of ``_chain_kernel`` over all rows (z contiguous, weights float32 [out, in] contiguous)."""
    B, d = z.shape
    h1, x_w, h2, k = (w.shape[0] for w in weights)
    cfg = fused_launch_config([d, h1, x_w, h2, k])
    b = [bi if bi is not None else weights[0] for bi in biases]
    _chain_kernel[(triton.cdiv(B, cfg["BLOCK_M"]),)](
        z, weights[0], b[0], weights[1], b[1], weights[2], b[2], weights[3], b[3], x_new, soft,
        pert if pert is not None else x_new,
        B, d, h1, x_w, h2, k, float(sigma), seed, int(offset), 1.0 / temperature,
        ACT1=int(activations[0]), ACT2=int(activations[1]), ACT3=int(activations[2]), ACT4=int(activations[3]),
        HAS_B1=biases[0] is not None, HAS_B2=biases[1] is not None, HAS_B3=biases[2] is not None,
        HAS_B4=biases[3] is not None, WRITE_PERT=pert is not None,
        PRECISION="ieee" if _interpret() else "tf32x3", **cfg,
    )


def mlp_chain_fwd(
    z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
    activations: Sequence[int], num_decoder_layers: int, sigma: float, seed: int, offset: int,
    temperature: float, need_perturbed: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``torch.ops.tgtfast.mlp_chain_fwd`` (see csrc/ops.cpp); ``seed`` may be given signed
    (two's complement of the 64-bit key). Weights and biases are contiguous float32 on z's device."""
    B, d = z.shape
    seed = seed % (1 << 64)
    seed = seed - (1 << 64) if seed >= (1 << 63) else seed  # normal_at takes the 64-bit key as a signed int
    z = z.contiguous()
    x_new = torch.empty((B, weights[num_decoder_layers - 1].shape[0]), device=z.device, dtype=z.dtype)
    soft = torch.empty((B, weights[-1].shape[0]), device=z.device, dtype=z.dtype)
    pert = torch.empty((B, d), device=z.device, dtype=torch.float32) if need_perturbed else z.new_empty((0,))
    if B == 0:
        return x_new, soft, pert
    with launch_guard(z):
        _chain_launches(z, weights, biases, activations, num_decoder_layers, sigma, seed, offset, temperature,
                        need_perturbed, x_new, soft, pert)
    return x_new, soft, pert


def _chain_launches(z, weights, biases, activations, num_decoder_layers, sigma, seed, offset, temperature,
                    need_perturbed, x_new, soft, pert):
    B, d = z.shape
    L = len(weights)
    K = weights[-1].shape[0]
    if chain_path([d] + [w.shape[0] for w in weights], num_decoder_layers) == "fused":
        launch_counts["fused"] += 1
        _chain_fused(z, weights, biases, activations, x_new, soft, pert if need_perturbed else None,
                     sigma, seed, offset, temperature)
        return
    launch_counts["per_layer"] += 1
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
                    _softmax_kernel[(n,)](h, soft[rows], K, 1.0 / temperature, BLOCK=_ROW_SOFTMAX_BLOCK)

