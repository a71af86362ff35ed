"""
A dense student coarse-grained to a sparse (top-k) teacher
==========================================================

A sparse teacher keeps ``k`` classes per row (``indices [N, k]``) and one tail bucket for the rest. The student
seen through it is, per row ``n`` (``u = scale * s``, the student logits ``s [N, V]`` times their scale; math:
docs/design.md, "Sparse teachers")::

    coarse[n, j] = u[n, indices[n, j]]                                  j < k
    coarse[n, k] = log sum_{i not in indices[n]} exp(u[n, i])           (-inf when nothing is left)

and the gradient of ``sum_j grad_coarse[n, j] coarse[n, j]`` with respect to ``s``::

    grad[n, i] = scale grad_coarse[n, j]                                i = indices[n, j]
    grad[n, i] = scale grad_coarse[n, k] exp(u[n, i] - coarse[n, k])     i not kept

(0 where ``coarse[n, k] = -inf`` or ``grad_coarse[n, k] = 0``)

Only these two ops touch ``[N, V]``; the divergence between the coarse student and the teacher then runs on
``[N, k + 1]``.

The tail by masking, never by subtraction
-----------------------------------------
The tail could be computed as ``log(sum_all exp(u) - sum_kept exp(u))``, but when the kept classes hold almost all
of the student's mass (a confident student whose top classes the teacher kept) the difference cancels: float32
sums carry an error of a few ``eps * sum_all``, so a tail of ``1e-3`` of the mass would be off by ``~1e-4``
relative and a tail of ``1e-7`` by 100%, and one more than ``2^-126`` below the maximum underflows to nothing. So the kernel never subtracts: it marks the kept classes in a bitmap
(``[N, ceil(V / 32)]`` int32, one bit per class, ``1/16`` of a bfloat16 row) and the tail is an online
log-sum-exp over the classes whose bit is clear, exact to float32 rounding whatever the split of the mass.

Forward: two launches.

1. ``_bitmap_kernel``, over the ``N k`` (row, kept class) pairs, sets the kept bits with ``atomic_or`` (two kept
   classes can share a word). The separate launch orders the bit sets before their reads without any in-kernel
   synchronisation.
2. ``_coarse_kernel``: one program per ``BLOCK_N`` rows (``BLOCK_N > 1`` only for short rows) walks the row in
   chunks of ``BLOCK_W`` bitmap words, the tile ``[BLOCK_N, BLOCK_W, 32]`` (one read of the row), folding the
   classes whose bit is clear into an online (max, sum-exp). Then it gathers ``u`` at the kept classes, after the
   walk, so that those scattered reads find the row in L2, and writes ``coarse[n, :k]`` and the tail.

The bitmap is written (a memset and ``N k`` bit sets) and read once: an eighth of a byte per class against the
``sizeof(dtype)`` bytes of the row itself; the indices are read twice (bits, then the gather).

Backward: two launches, ``_bwd_dense_kernel`` writes ``scale grad_coarse[n, k] exp(u - tail)`` over the whole row
(one read, one write; zeros without reading where the tail is -inf or its gradient is 0), then
``_scatter_kernel``, over the ``N k`` pairs, overwrites the kept classes with ``scale grad_coarse[n, j]``; the
launch order makes the kept values win.

Numerics
--------
* The online step rescales the running sum by ``exp(m_old - m_new)``, with the maximum taken as 0 while it is
  -inf (a chunk of only -inf or kept classes keeps the sum 0, not NaN). All -inf (or nothing left, ``k = V``)
  gives a tail of -inf.
* NaN anywhere in a row makes the whole coarse row NaN (as the C++ kernels do): a NaN among the rest enters the
  sum-exp, a NaN among the gathered kept logits makes the tail NaN, and a NaN tail spreads to the kept entries.
  This is stricter than ``tgtfast.reference.coarse_logits``, which keeps a NaN in its own entry (and out of the
  tail).
* ``+inf`` among the rest gives a tail of ``+inf`` (the reference's ``logsumexp``), unless the row has a NaN; it is
  left out of the running maximum so that it cannot turn the sum into ``inf - inf``.
* Accumulation is float32 (float64 for float64 inputs; ``scale`` reaches the kernels as float32).
* Rows with ``valid[n] == False`` are not read (student, indices) and get zeros, forward and backward.

Only ``tl.load/store``, ``tl.atomic_or``, ``tl.exp``, ``tl.log``, ``tl.maximum``, ``tl.max``, ``tl.sum``,
``tl.where`` and integer shifts are used; the kernels compile with Triton 3.6 to 3.9. The launchers call them
through ``torch.library.wrap_triton`` so that tgtfast/ops/sparse.py can register them with
``torch.library.triton_op``; they do not register anything themselves.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .noise import launch_guard

__all__ = ["sparse_coarse_fwd", "sparse_coarse_bwd", "launch_config", "kept_block", "PAIR_BLOCK"]

_MAX_BLOCK_K = 4096  # longest row chunk per step (classes)
_TILE = 2048  # elements per program when several short rows share one
_MAX_BLOCK_N = 64
PAIR_BLOCK = 1024  # (row, kept class) pairs per program of the gather / scatter kernels
_PAIR_WARPS = 4


def kept_block(n_kept: int, block_n: int) -> int:
    """``BLOCK_J``: kept classes per step of the forward's gather, all of them up to 2048 (``_TILE`` per program
    with ``BLOCK_N`` rows)."""
    return min(triton.next_power_of_2(max(n_kept, 1)), max(16, _TILE // block_n))


def launch_config(n_classes: int, words: bool) -> Tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for rows of ``n_classes`` (no autotuning, nothing depends on ``N``).

    ``BLOCK_K`` covers the row up to 4096 classes (longer rows are walked in chunks of 4096), a multiple of 32
    (whole bitmap words) for the forward (``words``); short rows are packed ``BLOCK_N`` (at most 64) to a program
    so that a program holds about 2048 elements; one warp per 256 elements of the tile, between 1 and 16."""
    block_k = min(triton.next_power_of_2(max(n_classes, 1)), _MAX_BLOCK_K)
    if words:
        block_k = max(block_k, 32)
    block_n = max(1, min(_TILE // block_k, _MAX_BLOCK_N))
    num_warps = max(1, min(16, (block_n * block_k) // 256))
    return block_n, block_k, num_warps


# ----------------------------------------------------------------------------------- (row, kept class) pairs
@triton.jit
def _pairs(indices_ptr, valid_ptr, total, KEPT, HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ``BLOCK`` pairs of the flattened ``[N, KEPT]``: ``(row, offset of the pair in [N, KEPT + 1],
    kept class, in a valid row)``; the class is only loaded (0 elsewhere) for the latter."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    row = offs // KEPT
    if HAS_VALID:
        live = live & (tl.load(valid_ptr + row, mask=live, other=0) != 0)
    idx = tl.load(indices_ptr + offs, mask=live, other=0)
    return row, offs + row, idx, live


@triton.jit
def _bitmap_kernel(indices_ptr, valid_ptr, bitmap_ptr, total, KEPT, W, HAS_VALID: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Set the kept classes' bits of the valid rows (two kept classes can share a word)."""
    row, _, idx, live = _pairs(indices_ptr, valid_ptr, total, KEPT, HAS_VALID, BLOCK)
    bit = tl.full([BLOCK], 1, tl.int32) << (idx & 31).to(tl.int32)
    tl.atomic_or(bitmap_ptr + row * W + (idx >> 5), bit, mask=live, sem="relaxed")


@triton.jit
def _scatter_kernel(indices_ptr, valid_ptr, grad_coarse_ptr, grad_ptr, total, KEPT, V, scale,
                    HAS_VALID: tl.constexpr, BLOCK: tl.constexpr):
    """``grad[n, indices[n, j]] = scale grad_coarse[n, j]`` in valid rows (after the dense part is written)."""
    row, out, idx, live = _pairs(indices_ptr, valid_ptr, total, KEPT, HAS_VALID, BLOCK)
    g = tl.load(grad_coarse_ptr + out, mask=live, other=0.0) * scale
    tl.store(grad_ptr + row * V + idx, g.to(grad_ptr.dtype.element_ty), mask=live)


# ------------------------------------------------------------------------------------------------ rows
@triton.jit
def _rows(valid_ptr, N, HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows: ``(rows, in range, valid, in range and valid)``, each ``[BLOCK_N]``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_VALID:
        rvalid = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
    else:
        rvalid = rmask
    return rows, rmask, rvalid, rmask & rvalid


@triton.jit
def _tail_chunk(student_ptr, bitmap_ptr, rows, rload, w0, V, W, scale, m, s, pinf,
                BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    """Fold the classes ``[32 w0, 32 (w0 + BLOCK_W))`` whose bit is clear into the online ``(max m, sum-exp s)``
    of each row; ``pinf`` (a tile, reduced once after the walk) marks the ``+inf`` among them (kept out of ``m``)."""
    w = w0 + tl.arange(0, BLOCK_W)
    words = tl.load(bitmap_ptr + rows.to(tl.int64)[:, None] * W + w[None, :],
                    mask=rload[:, None] & (w < W)[None, :], other=0)
    bits = tl.arange(0, 32)[None, None, :]
    cols = w[None, :, None] * 32 + bits
    cmask = cols < V
    x = tl.load(student_ptr + rows.to(tl.int64)[:, None, None] * V + cols, mask=rload[:, None, None] & cmask,
                other=0.0)
    u = x.to(ACC) * scale
    rest = cmask & (((words[:, :, None] >> bits) & 1) == 0)
    pinf = pinf | (rest & (u == float("inf"))).to(tl.int8)
    u = tl.where(rest & (u != float("inf")), u, float("-inf"))  # NaN stays
    m_new = tl.maximum(m, tl.max(tl.max(u, axis=2), axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.sum(tl.exp(u - m_ref[:, None, None]), axis=2), axis=1)
    return m_new, s, pinf


@triton.jit
def _kept_chunk(student_ptr, indices_ptr, rows, rload, j0, V, KEPT, scale, BLOCK_J: tl.constexpr,
                ACC: tl.constexpr):
    """``u`` at the kept classes ``[j0, j0 + BLOCK_J)`` of each row, its offsets in ``coarse`` and the mask of the
    kept classes that exist."""
    j = j0 + tl.arange(0, BLOCK_J)
    jmask = (j < KEPT)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    idx = tl.load(indices_ptr + rows64 * KEPT + j[None, :], mask=rload[:, None] & jmask, other=0)
    x = tl.load(student_ptr + rows64 * V + idx, mask=rload[:, None] & jmask, other=0.0)
    return x.to(ACC) * scale, rows64 * (KEPT + 1) + j[None, :], jmask


@triton.jit
def _coarse_kernel(student_ptr, indices_ptr, bitmap_ptr, valid_ptr, coarse_ptr, N, V, W, KEPT, scale,
                   HAS_VALID: tl.constexpr, SINGLE_TILE: tl.constexpr, SINGLE_KEPT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr):
    """A row's coarse logits (0 in ignored rows): the log-sum-exp of its classes whose bit is clear, then ``u`` at
    its kept classes, gathered after the walk (from the L2 copy of the row the walk just read); a NaN among either
    makes them all NaN. ``SINGLE_TILE``: ``W <= BLOCK_W``, ``SINGLE_KEPT``: ``KEPT <= BLOCK_J`` (one chunk, no
    loop)."""
    ACC = coarse_ptr.dtype.element_ty
    rows, rmask, rvalid, rload = _rows(valid_ptr, N, HAS_VALID, BLOCK_N)
    m = tl.zeros([BLOCK_N], dtype=ACC) + float("-inf")
    s = tl.zeros([BLOCK_N], dtype=ACC)
    pinf = tl.zeros([BLOCK_N, BLOCK_W, 32], dtype=tl.int8)
    if SINGLE_TILE:
        m, s, pinf = _tail_chunk(student_ptr, bitmap_ptr, rows, rload, 0, V, W, scale, m, s, pinf, BLOCK_W, ACC)
    else:
        for w0 in range(0, W, BLOCK_W):
            m, s, pinf = _tail_chunk(student_ptr, bitmap_ptr, rows, rload, w0, V, W, scale, m, s, pinf,
                                     BLOCK_W, ACC)
    tail = tl.where(m == float("-inf"), 0.0, m) + tl.log(s)  # log 0 = -inf: nothing left
    tail = tl.where((tl.max(tl.max(pinf, axis=2), axis=1) > 0) & (s == s), float("inf"), tail)
    store = rmask[:, None]
    if SINGLE_KEPT:
        u, out, jmask = _kept_chunk(student_ptr, indices_ptr, rows, rload, 0, V, KEPT, scale, BLOCK_J, ACC)
        tail = tl.where(tl.max((u != u).to(tl.int32), axis=1) > 0, float("nan"), tail)
        bad = (tail != tail)[:, None]
        tl.store(coarse_ptr + out, tl.where(rvalid[:, None], tl.where(bad, tail[:, None], u), 0.0),
                 mask=store & jmask)
    else:
        for j0 in range(0, KEPT, BLOCK_J):
            u, out, jmask = _kept_chunk(student_ptr, indices_ptr, rows, rload, j0, V, KEPT, scale, BLOCK_J, ACC)
            tail = tl.where(tl.max((u != u).to(tl.int32), axis=1) > 0, float("nan"), tail)
            tl.store(coarse_ptr + out, tl.where(rvalid[:, None], u, 0.0), mask=store & jmask)
        bad = (tail != tail)[:, None]
        for j0 in range(0, KEPT, BLOCK_J):  # a NaN found late: the whole row
            j = j0 + tl.arange(0, BLOCK_J)[None, :]
            tl.store(coarse_ptr + rows.to(tl.int64)[:, None] * (KEPT + 1) + j, tail[:, None],
                     mask=store & bad & (j < KEPT))
    tl.store(coarse_ptr + rows.to(tl.int64) * (KEPT + 1) + KEPT, tl.where(rvalid, tail, 0.0), mask=rmask)


@triton.jit
def _bwd_chunk(student_ptr, grad_ptr, rows, rmask, rload, dead, tail, factor, k0, V, scale,
               BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Write ``factor exp(u - tail)`` (0 where ``dead``) over the classes ``[k0, k0 + BLOCK_K)``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    cmask = (cols < V)[None, :]
    offs = rows.to(tl.int64)[:, None] * V + cols[None, :]
    u = tl.load(student_ptr + offs, mask=(rload & ~dead)[:, None] & cmask, other=0.0).to(ACC) * scale
    g = tl.where(dead[:, None], 0.0, factor[:, None] * tl.exp(u - tail[:, None]))
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=rmask[:, None] & cmask)


@triton.jit
def _bwd_dense_kernel(student_ptr, coarse_ptr, grad_coarse_ptr, valid_ptr, grad_ptr, N, V, KEPT, scale,
                      HAS_VALID: tl.constexpr, SINGLE_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The tail's gradient over whole rows (zeros in ignored rows and where the tail is -inf); the kept classes
    are overwritten by ``_scatter_kernel``."""
    ACC = grad_coarse_ptr.dtype.element_ty
    rows, rmask, rvalid, rload = _rows(valid_ptr, N, HAS_VALID, BLOCK_N)
    at = rows.to(tl.int64) * (KEPT + 1) + KEPT
    tail = tl.load(coarse_ptr + at, mask=rload, other=float("-inf")).to(ACC)
    factor = tl.load(grad_coarse_ptr + at, mask=rload, other=0.0).to(ACC) * scale
    dead = (tail == float("-inf")) | (factor == 0.0)  # no tail or no gradient into it; ignored rows too
    tail = tl.where(dead, 0.0, tail)
    if SINGLE_TILE:
        _bwd_chunk(student_ptr, grad_ptr, rows, rmask, rload, dead, tail, factor, 0, V, scale, BLOCK_K, ACC)
    else:
        for k0 in range(0, V, BLOCK_K):
            _bwd_chunk(student_ptr, grad_ptr, rows, rmask, rload, dead, tail, factor, k0, V, scale, BLOCK_K, ACC)


# ------------------------------------------------------------------------------------------------ launchers
def _valid_arg(valid: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    return valid.view(torch.uint8) if valid is not None else dummy  # a dummy pointer is never read


def _pair_grid(total: int):
    return (triton.cdiv(total, PAIR_BLOCK),)


def sparse_coarse_fwd(student: torch.Tensor, indices: torch.Tensor, valid: Optional[torch.Tensor],
                      scale: float) -> torch.Tensor:
    """The student's coarse logits on a sparse teacher's classes (the ``sparse_coarse_fwd`` op contract).

    Args:
        student: ``[N, V]`` logits (float32, float16, bfloat16; float64 computes in float64), contiguous.
        indices: ``[N, k]`` int64 kept classes, contiguous, in ``[0, V)`` and distinct within a row (not checked
            here), ``0 <= k <= V``.
        valid: optional bool ``[N]``; rows with ``False`` are 0 and not read.
        scale: ``u = scale * student``.

    Returns:
        ``coarse [N, k + 1]`` float32 (float64 for float64 inputs): ``u`` at the indices, then the log-sum-exp of
        ``u`` over the other classes.
    """
    n_rows, n_classes = student.shape
    n_kept = indices.shape[1]
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    coarse = torch.empty((n_rows, n_kept + 1), dtype=acc_dtype, device=student.device)
    if n_rows == 0:
        return coarse
    if n_classes == 0:  # k = 0 and an empty tail
        coarse.fill_(float("-inf"))
        return coarse if valid is None else coarse.masked_fill_(~valid[:, None], 0.0)

    n_words = triton.cdiv(n_classes, 32)
    bitmap = torch.zeros((n_rows, n_words), dtype=torch.int32, device=student.device)
    valid_arg = _valid_arg(valid, student)
    block_n, block_k, num_warps = launch_config(n_classes, words=True)
    block_w = block_k // 32
    block_j = kept_block(n_kept, block_n)
    with launch_guard(student):
        if n_kept > 0:
            total = n_rows * n_kept
            torch.library.wrap_triton(_bitmap_kernel)[_pair_grid(total)](
                indices, valid_arg, bitmap, total, n_kept, n_words,
                HAS_VALID=valid is not None, BLOCK=PAIR_BLOCK, num_warps=_PAIR_WARPS)
        torch.library.wrap_triton(_coarse_kernel)[(triton.cdiv(n_rows, block_n),)](
            student, indices, bitmap, valid_arg, coarse, n_rows, n_classes, n_words, n_kept, float(scale),
            HAS_VALID=valid is not None, SINGLE_TILE=n_words <= block_w, SINGLE_KEPT=n_kept <= block_j,
            BLOCK_N=block_n, BLOCK_W=block_w, BLOCK_J=block_j, num_warps=num_warps)
    return coarse


def sparse_coarse_bwd(student: torch.Tensor, indices: torch.Tensor, coarse: torch.Tensor, grad_coarse: torch.Tensor,
                      valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Gradient of :func:`sparse_coarse_fwd` (the ``sparse_coarse_bwd`` op contract).

    Args:
        student, indices, valid, scale: as for :func:`sparse_coarse_fwd`.
        coarse: its output ``[N, k + 1]`` (only the tail column is read), contiguous.
        grad_coarse: ``[N, k + 1]`` gradient of the output, same dtype, contiguous.

    Returns:
        ``grad_student [N, V]`` in the student's dtype: ``scale grad_coarse[n, j]`` at ``indices[n, j]``,
        ``scale grad_coarse[n, k] exp(u - coarse[n, k])`` elsewhere (0 where the tail is -inf or its gradient is
        0), 0 in ignored rows.
    """
    n_rows, n_classes = student.shape
    n_kept = indices.shape[1]
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    if n_rows == 0 or n_classes == 0:
        return grad
    valid_arg = _valid_arg(valid, student)
    block_n, block_k, num_warps = launch_config(n_classes, words=False)
    with launch_guard(student):
        torch.library.wrap_triton(_bwd_dense_kernel)[(triton.cdiv(n_rows, block_n),)](
            student, coarse, grad_coarse, valid_arg, grad, n_rows, n_classes, n_kept, float(scale),
            HAS_VALID=valid is not None, SINGLE_TILE=n_classes <= block_k, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=num_warps)
        if n_kept > 0:
            total = n_rows * n_kept
            torch.library.wrap_triton(_scatter_kernel)[_pair_grid(total)](
                indices, valid_arg, grad_coarse, grad, total, n_kept, n_classes, float(scale),
                HAS_VALID=valid is not None, BLOCK=PAIR_BLOCK, num_warps=_PAIR_WARPS)
    return grad
