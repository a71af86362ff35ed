"""
Fused PTLoss: loss and gradients in one kernel
==============================================

This kernel computes, for every row of a batch of ``N`` rows with ``K`` classes, the perturbed
distillation loss of docs/design.md, "PTLoss"::

    L = sum_j p_j (log p_j - log q_j) + sum_j p_j h_j,      h_j = sum_{m=1..M} eta[m, j] (1 - q_j)^m

with ``q = softmax(s / T)`` (student logits ``s``), ``p0 = softmax(t / T)`` (teacher logits) or
``p0 = t`` (teacher probabilities) and ``p = (1 - delta) p0 + delta / K`` (label smoothing), and in the
same launch the gradients with respect to both inputs::

    dL/ds_k = [(q_k - p_k) + q_k (a_k - sum_j a_j q_j)] / T,          a_j = -p_j h'_j
    dL/dt_k = (1 - delta) p0_k (g_k - sum_j p0_j g_j) / T              (teacher logits)
    dL/dp0_k = (1 - delta) (g_k + 1)                                   (teacher probabilities)

where ``g_j = log p_j - log q_j + h_j`` and ``h'_j = sum_m m eta[m, j] (1 - q_j)^(m-1)``. The coefficients
``eta`` are ``[M]`` (shared by all classes) or ``[M, K]`` (per class); ``M = 0`` is plain KL. ``h`` and
``h'`` are evaluated together by Horner's rule.

Why fused?
----------
Written with PyTorch ops (``tgtfast.reference.ptloss_rows``) the loss materialises ``log_softmax``,
``softmax``, ``1 - q``, one power per order ``m`` and their products: a dozen or more tensors of size
``[N, K]`` written and read back, ``O(M)`` of them kept alive by autograd for a backward pass that
reads and writes as many again (8.2 GB peak measured at ``N = 4096, K = 32000, M = 5``).
The gradient of a loss is a function of the two inputs and a few per-row scalars, so this kernel
computes it during the forward pass (as Liger-Kernel does for cross-entropy): the op reads ``student``
and ``teacher`` once from memory and writes the gradient(s) once, plus ``N`` floats of loss. That is
``2 N K`` element reads and ``N K`` (or ``2 N K``) element writes, the minimum for an op that returns
``[N, K]`` gradients, against several times that for the eager forward and backward.

How a program walks a row
-------------------------
One program owns ``BLOCK_N`` rows (``BLOCK_N > 1`` only when ``K`` is small, so that short rows still
fill a tile) and walks ``K`` in ``BLOCK_K`` chunks, accumulating in float32 (float64 for float64
inputs):

1. an online (max, sum-exp) for the student and, for a logits teacher, the teacher (the running sum is
   rescaled by ``exp(m_old - m_new)`` whenever the maximum grows);
2. the loss and the row sums that the gradients need: ``sum_j a_j q_j`` and ``sum_j p0_j g_j``
   (and ``sum_j p_j`` for a probability teacher, see below);
3. the gradients, written in the dtype of the inputs.

When the row fits in one chunk (``K <= BLOCK_K``, i.e. ``K <= 4096``) the tile is loaded once and the
three passes run on registers: exactly one read of the inputs. Longer rows are walked three times;
passes 2 and 3 read the row again, which for a row of 32000 float32 logits and its teacher (256 KB)
is mostly served by L2, so the HBM traffic stays close to the single read counted above.

Numerics
--------
* ``log q_j = (u_j - max u) - log S`` and ``log p0_j`` likewise, so logits of +-1e4 give finite
  results; ``1 - q_j = (S - e_j) / S`` with ``e_j = exp(u_j - max u)`` has an absolute error of a few
  ulp also when ``q_j`` is close to 1.
* ``p_j (log p_j - log q_j)`` is taken as 0 where ``p_j == 0`` (the ``xlogy`` convention); likewise
  ``p0_j g_j`` in the teacher gradient.
* NaN in a row reaches that row's loss: it enters the row's sum-exp or its KL sum, and the ``p_j == 0``
  guard is false for NaN. Rows with ``valid[n] == False`` are not read at all and get loss 0 and zero
  gradients, even if their inputs are NaN.
* For a probability teacher without smoothing, ``dL/dp0_k`` is ``-inf`` where ``p0_k == 0``: the formula
  above taken literally (``log 0``), the one-sided derivative of ``p log p`` at 0.
* The student gradient above assumes ``sum_j p_j = 1``. Given probabilities need not sum to 1 exactly
  (a bfloat16 row of probabilities is off by up to ~1e-3), so for a probability teacher the kernel also
  sums ``P = sum_j p_j`` in pass 2 and uses ``q_k P - p_k`` in place of ``q_k - p_k``: the exact
  derivative of ``L`` as written (the reference's autograd), identical to the formula when ``P = 1``.
  A softmax teacher uses ``q_k - p_k``.

Only ``tl.load/store``, ``tl.exp``, ``tl.log``, ``tl.maximum``, ``tl.max``, ``tl.sum``, ``tl.where`` and
``tl.static_range`` are used; the kernel compiles with Triton 3.6 and 3.9. The launcher calls the kernel
through ``torch.library.wrap_triton`` so that it can be registered with ``torch.library.triton_op`` and
traced by ``torch.compile``; it does not register anything itself.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .noise import launch_guard

__all__ = ["ptloss_fwd", "launch_config"]

_MAX_BLOCK_K = 4096  # longest row chunk held in registers
_TILE = 2048  # elements per program when several short rows share one
_MAX_BLOCK_N = 64


def launch_config(n_rows: int, n_classes: int) -> Tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for a ``[n_rows, n_classes]`` problem (no autotuning).

    ``BLOCK_K`` covers the row up to 4096 classes (longer rows are walked in chunks of 4096);
    short rows are packed ``BLOCK_N`` (at most 64) to a program so that a program has about 2048
    elements; one warp per 256 elements of the tile, between 1 and 16 (16 elements per thread at
    most, to keep the ~10 per-element values of the single-tile path in registers).
    The choice does not depend on ``n_rows`` (kept as an argument for the interface), so a
    compiled graph with a dynamic batch size does not specialise on it.
    """
    del n_rows
    block_k = min(triton.next_power_of_2(max(n_classes, 1)), _MAX_BLOCK_K)
    block_n = max(1, min(_TILE // block_k, _MAX_BLOCK_N))
    num_warps = max(1, min(16, (block_n * block_k) // 256))
    return block_n, block_k, num_warps


@triton.jit
def _load_tile(s_ptr, t_ptr, offs, mask, cmask, inv_temp, TEACHER_LOGITS: tl.constexpr, ACC: tl.constexpr):
    """Scaled student logits ``u = s / T`` (-inf past the row end) and the teacher tile
    (``v = t / T`` with -inf past the row end, or the probabilities with 0 there)."""
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.where(cmask, s * inv_temp, float("-inf"))
    if TEACHER_LOGITS:
        v = tl.where(cmask, t * inv_temp, float("-inf"))
    else:
        v = t
    return u, v


@triton.jit
def _online_max_sumexp(x, m, s):
    """One step of the online softmax: fold the tile ``x [BLOCK_N, BLOCK_K]`` into the running
    maximum ``m`` and sum ``s = sum exp(x - m)`` (both ``[BLOCK_N]``)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    # A row whose elements so far are all -inf keeps s = 0 instead of exp(-inf - -inf) = NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _finish_stats(m, s):
    """``(max, S, 1 / S, log S)`` as ``[BLOCK_N, 1]`` columns (max replaced by 0 when it is -inf)."""
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    return m_ref[:, None], s[:, None], 1.0 / s[:, None], tl.log(s)[:, None]


@triton.jit
def _log(x, ACC: tl.constexpr):
    """``log x`` that stays right for float32 subnormal ``x`` (a teacher probability or ``delta / K`` below
    2^-126): on the GPU ``tl.log`` goes through libdevice built with flush-to-zero, where ``log(subnormal)`` is
    ``-inf`` and ``p log p`` would become ``-inf``. A subnormal is ``m 2^-149`` with its integer bits ``m``, so its
    log is ``log(float(m)) - 149 log 2`` (conversions are never flushed)."""
    if ACC == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        sub = (bits > 0) & (bits < 0x00800000)
        return tl.where(sub, tl.log(bits.to(tl.float32)) - 103.27892990343184, tl.log(x))
    else:
        return tl.log(x)


@triton.jit
def _tile_terms(u, v, eta_ptr, cols, cmask, K,
                mu_s, sum_s, inv_s, log_s, mu_t, inv_t, log_t,
                keep, smooth_add, log_smooth,
                M: tl.constexpr, PER_CLASS: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
                SMOOTH: tl.constexpr, ACC: tl.constexpr):
    """Per-element quantities of one tile: ``q, log q, p0, p, log p, h, h'``.

    ``h`` and ``h'`` are evaluated in one Horner sweep over ``x = 1 - q``:
    ``h = x (eta_1 + x (eta_2 + ... + x eta_M))`` and ``h' = eta_1 + x (2 eta_2 + ... + x M eta_M)``.
    When ``M == 0`` they are returned as 0 and the callers skip them (constexpr)."""
    z = u - mu_s
    e = tl.exp(z)
    q = e * inv_s
    log_q = z - log_s
    if TEACHER_LOGITS:
        zt = v - mu_t
        p0 = tl.exp(zt) * inv_t
        log_p0 = zt - log_t  # finite even where p0 underflows to 0
    else:
        p0 = v
        if not SMOOTH:
            log_p0 = _log(p0, ACC)
    if SMOOTH:
        p = p0 * keep + smooth_add
        # p = 0 with delta > 0 where p0 = 0 and delta / K is below float32 range: log p is log(delta / K), not -inf
        log_p = tl.where(p == 0.0, log_smooth, _log(p, ACC))
    else:
        p = p0
        log_p = log_p0
    h = q * 0.0  # placeholders when M == 0: the callers never use them then (dead code once compiled)
    dh = h
    if M > 0:
        x = (sum_s - e) * inv_s  # 1 - q without cancellation in q
        x = tl.where(x < 0.0, 0.0, x)  # rounding can leave -ulp; NaN stays NaN
        if PER_CLASS:
            eta = tl.load(eta_ptr + (M - 1) * K + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        else:
            eta = tl.load(eta_ptr + (M - 1)).to(ACC)
        ph = eta
        pd = eta * M
        for i in tl.static_range(1, M):
            # order m = M - i, from M - 1 down to 1
            if PER_CLASS:
                eta = tl.load(eta_ptr + (M - i - 1) * K + cols, mask=cmask, other=0.0).to(ACC)[None, :]
            else:
                eta = tl.load(eta_ptr + (M - i - 1)).to(ACC)
            ph = ph * x + eta
            pd = pd * x + eta * (M - i)
        h = ph * x
        dh = pd
    return q, log_q, p0, p, log_p, h, dh


@triton.jit
def _store_grads(grad_s_ptr, grad_t_ptr, offs, smask, rkeep, q, log_q, p0, p, log_p, h, dh,
                 sum_p, sum_aq, sum_pg, inv_temp, keep, grad_scale,
                 M: tl.constexpr, TEACHER_LOGITS: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr):
    """Write one tile of dL/ds and dL/dt (scaled by ``grad_scale``) from its terms and the row sums."""
    if NEED_GS:
        if TEACHER_LOGITS:
            gs = q - p
        else:  # d/du of -sum_j p_j log q_j when sum_j p_j != 1
            gs = q * sum_p[:, None] - p
        if M > 0:
            gs += q * (-p * dh - sum_aq[:, None])
        gs = tl.where(rkeep, gs * (inv_temp * grad_scale), 0.0)
        tl.store(grad_s_ptr + offs, gs.to(grad_s_ptr.dtype.element_ty), mask=smask)
    if NEED_GT:
        g = log_p - log_q
        if M > 0:
            g += h
        if TEACHER_LOGITS:
            gt = tl.where(p0 == 0.0, 0.0, p0 * (g - sum_pg[:, None]) * (keep * inv_temp * grad_scale))
        else:
            gt = (g + 1.0) * (keep * grad_scale)
        gt = tl.where(rkeep, gt, 0.0)
        tl.store(grad_t_ptr + offs, gt.to(grad_t_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _ptloss_kernel(
    student_ptr, teacher_ptr, coeffs_ptr, valid_ptr,
    loss_ptr, grad_s_ptr, grad_t_ptr,
    N, K,
    inv_temp, keep, smooth_add, log_smooth, grad_scale,
    M: tl.constexpr,
    PER_CLASS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,
    SMOOTH: tl.constexpr,
    NEED_GS: tl.constexpr,
    NEED_GT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per ``BLOCK_N`` rows. ``keep = 1 - delta``, ``smooth_add = delta / K`` (``log_smooth`` its log),
    ``SINGLE_TILE`` means ``K <= BLOCK_K`` (the row is loaded once and kept in registers)."""
    ACC = loss_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_VALID:
        rvalid = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
    else:
        rvalid = rmask
    rload = (rmask & rvalid)[:, None]  # invalid rows are never read
    rkeep = rvalid[:, None]
    rstore = rmask[:, None]
    row_off = rows.to(tl.int64)[:, None] * K
    cols0 = tl.arange(0, BLOCK_K)

    zero_row = tl.zeros([BLOCK_N], dtype=ACC)
    m_s = zero_row + float("-inf")
    s_s = zero_row
    m_t = zero_row + float("-inf")
    s_t = zero_row
    loss = zero_row
    sum_aq = zero_row  # sum_j a_j q_j
    sum_pg = zero_row  # sum_j p0_j g_j
    sum_p = zero_row  # sum_j p_j of a probability teacher (1 is not assumed)

    if SINGLE_TILE:
        cmask = (cols0 < K)[None, :]
        mask = rload & cmask
        offs = row_off + cols0[None, :]
        u, v = _load_tile(student_ptr, teacher_ptr, offs, mask, cmask, inv_temp, TEACHER_LOGITS, ACC)
        # pass 1: softmax statistics
        m_s, s_s = _online_max_sumexp(u, m_s, s_s)
        if TEACHER_LOGITS:
            m_t, s_t = _online_max_sumexp(v, m_t, s_t)
        mu_s, sum_s, inv_s, log_s = _finish_stats(m_s, s_s)
        mu_t, _, inv_t, log_t = _finish_stats(m_t, s_t)
        q, log_q, p0, p, log_p, h, dh = _tile_terms(
            u, v, coeffs_ptr, cols0, cols0 < K, K, mu_s, sum_s, inv_s, log_s, mu_t, inv_t, log_t,
            keep, smooth_add, log_smooth, M, PER_CLASS, TEACHER_LOGITS, SMOOTH, ACC)
        # pass 2: loss and row sums
        term = tl.where(p == 0.0, 0.0, p * (log_p - log_q))
        if M > 0:
            term += p * h
        loss = tl.sum(tl.where(cmask, term, 0.0), axis=1)
        g = log_p - log_q
        if M > 0:
            g += h
        if NEED_GS:
            if M > 0:
                a = -p * dh
                sum_aq = tl.sum(tl.where(cmask, a * q, 0.0), axis=1)
            if not TEACHER_LOGITS:
                sum_p = tl.sum(tl.where(cmask, p, 0.0), axis=1)
        if NEED_GT:
            if TEACHER_LOGITS:
                sum_pg = tl.sum(tl.where(cmask & (p0 != 0.0), p0 * g, 0.0), axis=1)
        # pass 3: gradients
        _store_grads(grad_s_ptr, grad_t_ptr, offs, rstore & cmask, rkeep, q, log_q, p0, p, log_p, h, dh,
                     sum_p, sum_aq, sum_pg, inv_temp, keep, grad_scale, M, TEACHER_LOGITS, NEED_GS, NEED_GT)
    else:
        # pass 1: online softmax statistics
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = (cols < K)[None, :]
            offs = row_off + cols[None, :]
            u, v = _load_tile(student_ptr, teacher_ptr, offs, rload & cmask, cmask, inv_temp,
                              TEACHER_LOGITS, ACC)
            m_s, s_s = _online_max_sumexp(u, m_s, s_s)
            if TEACHER_LOGITS:
                m_t, s_t = _online_max_sumexp(v, m_t, s_t)
        mu_s, sum_s, inv_s, log_s = _finish_stats(m_s, s_s)
        mu_t, _, inv_t, log_t = _finish_stats(m_t, s_t)
        # pass 2: loss and row sums
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = (cols < K)[None, :]
            offs = row_off + cols[None, :]
            u, v = _load_tile(student_ptr, teacher_ptr, offs, rload & cmask, cmask, inv_temp,
                              TEACHER_LOGITS, ACC)
            q, log_q, p0, p, log_p, h, dh = _tile_terms(
                u, v, coeffs_ptr, cols, cols < K, K, mu_s, sum_s, inv_s, log_s, mu_t, inv_t, log_t,
                keep, smooth_add, log_smooth, M, PER_CLASS, TEACHER_LOGITS, SMOOTH, ACC)
            term = tl.where(p == 0.0, 0.0, p * (log_p - log_q))
            if M > 0:
                term += p * h
            loss += tl.sum(tl.where(cmask, term, 0.0), axis=1)
            if NEED_GS:
                if M > 0:
                    sum_aq += tl.sum(tl.where(cmask, -p * dh * q, 0.0), axis=1)
                if not TEACHER_LOGITS:
                    sum_p += tl.sum(tl.where(cmask, p, 0.0), axis=1)
            if NEED_GT:
                if TEACHER_LOGITS:
                    g = log_p - log_q
                    if M > 0:
                        g += h
                    sum_pg += tl.sum(tl.where(cmask & (p0 != 0.0), p0 * g, 0.0), axis=1)
        # pass 3: gradients
        if NEED_GS or NEED_GT:
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                cmask = (cols < K)[None, :]
                offs = row_off + cols[None, :]
                u, v = _load_tile(student_ptr, teacher_ptr, offs, rload & cmask, cmask, inv_temp,
                                  TEACHER_LOGITS, ACC)
                q, log_q, p0, p, log_p, h, dh = _tile_terms(
                    u, v, coeffs_ptr, cols, cols < K, K, mu_s, sum_s, inv_s, log_s, mu_t, inv_t, log_t,
                    keep, smooth_add, log_smooth, M, PER_CLASS, TEACHER_LOGITS, SMOOTH, ACC)
                _store_grads(grad_s_ptr, grad_t_ptr, offs, rstore & cmask, rkeep, q, log_q, p0, p, log_p, h, dh,
                             sum_p, sum_aq, sum_pg, inv_temp, keep, grad_scale, M, TEACHER_LOGITS, NEED_GS, NEED_GT)

    tl.store(loss_ptr + rows, tl.where(rvalid, loss, 0.0), mask=rmask)


def ptloss_fwd(student: torch.Tensor, teacher: torch.Tensor, coeffs: torch.Tensor, valid: Optional[torch.Tensor],
               temperature: float, label_smoothing: float, teacher_is_logits: bool,
               need_grad_student: bool, need_grad_teacher: bool,
               grad_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row PTLoss and its gradients in one launch (the ``ptloss_fwd`` op contract).

    Args:
        student: ``[N, K]`` student logits (float32, float16, bfloat16; float64 computes in float64),
            contiguous.
        teacher: ``[N, K]`` teacher logits (``teacher_is_logits``) or probabilities, same dtype, contiguous.
        coeffs: ``[M]`` (shared) or ``[M, K]`` (per class) PTLoss coefficients, contiguous; ``M`` may be 0.
        valid: optional bool ``[N]``; rows with ``False`` get loss 0 and zero gradients.
        temperature: ``T > 0``.
        label_smoothing: ``delta`` in ``[0, 1)``.
        teacher_is_logits: whether ``teacher`` holds logits (softmax ``t / T``) or probabilities.
        need_grad_student, need_grad_teacher: which gradients to compute.
        grad_scale: the gradients are those of ``grad_scale * loss[n]`` (the caller's reduction weight).

    Returns:
        ``(loss, grad_student, grad_teacher)``: ``loss [N]`` float32 (float64 for float64 inputs), not
        reduced nor scaled by ``T^2``; ``grad_student [N, K]`` = dL_n/ds_n (``1/T`` included) in the
        student's dtype, or an empty ``[0]`` tensor when not needed; ``grad_teacher`` likewise.
    """
    n_rows, n_classes = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(n_rows, dtype=acc_dtype, device=student.device)
    grad_s = torch.empty_like(student) if need_grad_student else student.new_empty(0)
    grad_t = torch.empty_like(teacher) if need_grad_teacher else teacher.new_empty(0)
    if n_rows == 0:
        return loss, grad_s, grad_t
    if n_classes == 0:  # an empty sum: nothing to launch
        loss.zero_()
        return loss, grad_s, grad_t

    n_orders = coeffs.shape[0] if coeffs.numel() > 0 else 0
    per_class = coeffs.dim() == 2
    block_n, block_k, num_warps = launch_config(n_rows, n_classes)
    grid = (triton.cdiv(n_rows, block_n),)
    with launch_guard(student):
        torch.library.wrap_triton(_ptloss_kernel)[grid](
            student, teacher,
            coeffs if n_orders > 0 else student,  # dummy pointer (never read when M == 0)
            valid.view(torch.uint8) if valid is not None else student,  # dummy pointer (never read)
            loss, grad_s, grad_t,
            n_rows, n_classes,
            1.0 / float(temperature), 1.0 - float(label_smoothing), float(label_smoothing) / n_classes,
            math.log(float(label_smoothing) / n_classes) if float(label_smoothing) > 0.0 else 0.0,
            float(grad_scale),
            M=n_orders,
            PER_CLASS=per_class,
            HAS_VALID=valid is not None,
            TEACHER_LOGITS=bool(teacher_is_logits),
            SMOOTH=float(label_smoothing) > 0.0,
            NEED_GS=bool(need_grad_student),
            NEED_GT=bool(need_grad_teacher),
            SINGLE_TILE=n_classes <= block_k,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
    return loss, grad_s, grad_t
