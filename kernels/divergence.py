"""
Fused distillation divergences: loss and gradients in one kernel
================================================================

This kernel computes, for every row of a batch of ``N`` rows with ``K`` classes, one of the divergences of
docs/design.md, "Divergences", between ``p = softmax(u_t)`` and ``q = softmax(u_s)`` (``u_s = a_s s``,
``u_t = a_t t``: the logits times their scales ``logit_scale / T``)::

    L = sum_j f(p_j, q_j)

and in the same launch the gradients with respect to both raw logits::

    dL/ds_k = a_s (dq_k - q_k sum_j dq_j),      dL/dt_k = a_t (dp_k - p_k sum_j dp_j)

with the per-class factors ``dq_j = q_j df/dq_j`` and ``dp_j = p_j df/dp_j`` of the design table. The divergence
(its code is the index in ``tgtfast.reference.DIVERGENCES``) and, for the AB-divergence, which of its limit forms
applies are compile-time constants: each variant compiles to straight-line code without branches on them.
TAID replaces ``p`` by ``r = softmax((1 - t) u_s + t u_t)`` (no gradient to the student through ``r``; the
teacher gradient carries the factor ``t``).

Why fused?
----------
Written with PyTorch ops (``tgtfast.reference.divergence_rows``) a divergence materialises two log-softmaxes,
their exponentials, a log-mixture for JSD and the skew divergences, powers for the AB-divergence and their
products: a dozen tensors of size ``[N, K]`` written, read back, and kept alive for a backward pass that reads
and writes as many again. Every gradient above is a function of the two input rows and four per-row scalars
(the two maxima and sums of exponentials, then ``sum_j dq_j`` and ``sum_j dp_j``), so this kernel computes it
during the forward pass: ``2 N K`` element reads and one write per requested gradient, plus ``N`` floats of loss.

How a program walks a row
-------------------------
As in kernels/ptloss.py: one program owns ``BLOCK_N`` rows (``BLOCK_N > 1`` only when ``K`` is small) and walks
``K`` in ``BLOCK_K`` chunks, accumulating in float32 (float64 for float64 inputs):

1. an online (max, sum-exp) of ``u_s`` and of ``u_t`` (of the TAID mixture for ``taid``);
2. the loss and the row sums ``sum_j dq_j`` and ``sum_j dp_j`` (the latter only for requested gradients);
3. the gradients, written in the dtype of the inputs.

When the row fits in one chunk (``K <= BLOCK_K``, i.e. ``K <= 4096``) the tile is loaded once and the three
passes run on registers; ``exp(u - max u)`` serves both the sum and ``q``, so forward KL costs two exponentials
per element pair (JSD and the skew divergences one exponential, one log and one division more). Longer rows are
read three times (twice without gradients), the second and third reads mostly served by L2, and their
exponentials are computed again in passes 2 and 3.

Numerics
--------
* ``log q_j = (u_j - max u) - log S`` and ``log p_j`` likewise, never ``log(exp(.))``: logits of +-1e4 give
  finite results, and ``p_j`` that underflow keep an exact ``log p_j``.
* ``x (log x - log y)`` is 0 where ``x == 0`` whatever ``y`` (``0 log 0 = 0``). The log of a mixture
  ``m = w_p p + w_q q`` is ``logaddexp(log p + log w_p, log q + log w_q)``, from one exponential that also gives
  the shares ``w_p p / m`` and ``w_q q / m``: the skew divergences' ``p q / m`` and ``p^2 / m`` are ``p`` times a
  share, bounded and 0 where ``p`` is 0, and no ``exp`` can overflow.
* The endpoints of a parameter range are compiled as the divergence they equal (JSD at beta 0 or 1, skew
  divergences at alpha = 0, symmetric KL at lam 0 or 1: forward or reverse KL), so a zero weight never meets an
  infinite term (``0 * inf``): symmetric KL with ``lam = 0`` stays finite where the teacher has ``-inf``.
  TAID mixes the logits with the same care: ``0 * (-inf)`` is taken as 0 (``t = 0``: ``r = q``; ``t = 1``:
  ``r = p``), ``0 * NaN`` and ``0 * inf`` stay NaN.
* The AB-divergence's form (general, ``beta = 0``, ``alpha = 0``, ``alpha = -beta``, both 0) is chosen on the
  host by exact comparisons in double precision, as the reference does; powers are ``exp(alpha log p)``.
* NaN or ``+inf`` in a row reaches that row's loss and both gradients: it makes the row's sum-exp (or the log
  mixture) NaN, every guard above lets NaN through, and the sign of ``p - q`` (TVD) is NaN for NaN. A student row
  of all ``-inf`` has ``S = 0`` and NaN ``log q``. Rows with ``valid[n] == False`` are not read at all and get loss
  0 and zero gradients, even if their inputs are NaN.
* Rows are clamped at 0 in value (NaN passes), their gradients untouched.

Only ``tl.load/store``, ``tl.exp``, ``tl.log``, ``tl.abs``, ``tl.maximum``, ``tl.max``, ``tl.sum``, ``tl.where``
are used; the kernel compiles with Triton 3.6 to 3.9. The launcher calls the kernel through
``torch.library.wrap_triton`` so that tgtfast/ops/divergence.py can register it with ``torch.library.triton_op``;
it does not register anything itself.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .noise import launch_guard
from .ptloss import _finish_stats, _online_max_sumexp

__all__ = ["divergence_fwd", "launch_config", "kernel_params", "NAMES"]

# The codes of tgtfast.reference.DIVERGENCES (divergence_fwd's `divergence`); tests check the two agree.
NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "symmetric_kl", "ab_divergence",
         "taid")
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)
SYMMETRIC_KL = tl.constexpr(6)
AB_DIVERGENCE = tl.constexpr(7)
TAID = tl.constexpr(8)
# AB_CASE: the form of the AB-divergence (alpha, beta both non-zero and alpha + beta != 0; beta = 0; alpha = 0;
# alpha = -beta != 0; alpha = beta = 0)
AB_GENERAL = tl.constexpr(0)
AB_BETA_ZERO = tl.constexpr(1)
AB_ALPHA_ZERO = tl.constexpr(2)
AB_OPPOSITE = tl.constexpr(3)
AB_BOTH_ZERO = tl.constexpr(4)

_MAX_BLOCK_K = 4096  # longest row chunk held in registers
_TILE = 2048  # elements per program when several short rows share one
_MAX_BLOCK_N = 64


def launch_config(n_classes: int) -> Tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)`` for rows of ``n_classes`` (no autotuning, nothing depends on ``N``).

    ``BLOCK_K`` covers the row up to 4096 classes (longer rows are walked in chunks of 4096); short rows are
    packed ``BLOCK_N`` (at most 64) to a program so that a program holds about 2048 elements; one warp per 256
    elements of the tile, between 1 and 16 (at most 8 elements per thread in the 4096-wide chunk, so that the
    per-element values of the single-tile path, ``q, p, dq, dp`` and the temporaries of the heaviest divergence,
    stay in registers)."""
    block_k = min(triton.next_power_of_2(max(n_classes, 1)), _MAX_BLOCK_K)
    block_n = max(1, min(_TILE // block_k, _MAX_BLOCK_N))
    num_warps = max(1, min(16, (block_n * block_k) // 256))
    return block_n, block_k, num_warps


class KernelParams(NamedTuple):
    """What the kernel is compiled for (``code``, ``ab_case``) and its scalar weights (see :func:`kernel_params`)."""

    code: int
    ab_case: int
    w_p: float
    w_q: float
    log_w_p: float
    log_w_q: float
    ab_sum: float


def _log(w: float) -> float:
    return math.log(w) if w > 0 else -math.inf


# parameter values at which a divergence is plain forward or reverse KL: compiled as that
_KL_ENDPOINTS = {("jsd", 0.0): "forward_kl", ("jsd", 1.0): "reverse_kl", ("skew_kl", 0.0): "forward_kl",
                 ("skew_reverse_kl", 0.0): "reverse_kl", ("symmetric_kl", 0.0): "forward_kl",
                 ("symmetric_kl", 1.0): "reverse_kl"}


def kernel_params(divergence: int, param_a: float, param_b: float) -> KernelParams:
    """The kernel's compile-time choice and scalars for ``divergence`` (an index into :data:`NAMES`).

    ``w_p, w_q`` are, by divergence: the weights of the mixture ``m = w_p p + w_q q`` (jsd: ``(beta, 1 - beta)``;
    skew_kl: ``(alpha, 1 - alpha)``; skew_reverse_kl: ``(1 - alpha, alpha)``), with their logs in ``log_w_p,
    log_w_q``; the term weights of symmetric_kl, ``(1 - lam, lam)``; TAID's logit weights ``(t, 1 - t)``; the
    AB-divergence's ``(alpha, beta)``, with ``ab_sum = alpha + beta``. Parameters at the end of their range where
    the divergence is forward or reverse KL select that code instead."""
    a, b = float(param_a), float(param_b)
    code = int(divergence)
    if not 0 <= code < len(NAMES):
        raise ValueError(f"unknown divergence code {divergence}; expected 0..{len(NAMES) - 1} ({NAMES})")
    name = NAMES[code]
    if (name, a) in _KL_ENDPOINTS:
        return KernelParams(NAMES.index(_KL_ENDPOINTS[name, a]), 0, 0.0, 0.0, 0.0, 0.0, 0.0)
    if name == "ab_divergence":
        if a != 0.0 and b != 0.0 and a + b != 0.0:  # exact comparisons in double, as the reference
            case = AB_GENERAL
        elif b == 0.0:
            case = AB_BETA_ZERO if a != 0.0 else AB_BOTH_ZERO
        else:
            case = AB_ALPHA_ZERO if a == 0.0 else AB_OPPOSITE
        return KernelParams(code, case.value, a, b, 0.0, 0.0, a + b)
    if name in ("jsd", "skew_kl", "taid"):
        w_p, w_q = a, 1.0 - a
    elif name in ("skew_reverse_kl", "symmetric_kl"):
        w_p, w_q = 1.0 - a, a
    else:  # forward_kl, reverse_kl, tvd
        w_p = w_q = 0.0
    return KernelParams(code, 0, w_p, w_q, _log(w_p), _log(w_q), 0.0)


# ------------------------------------------------------------------------------------------- per-element math
@triton.jit
def _xlog(x, log_x, log_y):
    """``x (log x - log y)``, 0 where ``x == 0`` whatever ``log y`` (NaN ``x`` stays NaN)."""
    return tl.where(x == 0.0, 0.0, x * (log_x - log_y))


@triton.jit
def _log_mix(a, b):
    """``log m`` for ``m = exp a + exp b`` and the shares ``exp a / m``, ``exp b / m``, from one exponential:
    ``-inf`` and shares 0 when both are ``-inf``; NaN when either is NaN (whatever ``tl.maximum`` does with it)."""
    d = a - b
    e = tl.exp(-tl.abs(d))  # the smaller share over the larger
    big = 1.0 / (1.0 + e)
    absent = (a == float("-inf")) & (b == float("-inf"))
    log_m = tl.where(absent, float("-inf"), tl.maximum(a, b) + tl.log(1.0 + e))
    share_a = tl.where(absent, 0.0, tl.where(d >= 0.0, big, e * big))
    share_b = tl.where(absent, 0.0, tl.where(d >= 0.0, e * big, big))
    return log_m, share_a, share_b


@triton.jit
def _kl(x, log_x, log_y):
    """``f = x (log x - log y)`` and its factors ``(x df/dx, y df/dy)`` (less the multiple ``x`` of ``x``)."""
    f = _xlog(x, log_x, log_y)
    return f, f, -x


@triton.jit
def _skew(x, log_x, log_y, log_w_x, log_w_y):
    """``f = x (log x - log m)``, ``m = w_x x + w_y y``, and ``(x df/dx, y df/dy)``:
    ``x (log x - log m) - x (w_x x / m)`` and ``-x (w_y y / m)``."""
    log_m, share_x, share_y = _log_mix(log_x + log_w_x, log_y + log_w_y)
    f = _xlog(x, log_x, log_m)
    return f, f - x * share_x, -x * share_y


@triton.jit
def _ab_one_zero(log_x, log_y, a):
    """The AB-divergence with the exponent of ``y`` at 0 (``x = p``: beta = 0; ``x = q``, ``a = beta``:
    alpha = 0): ``f = (a x^a (log x - log y) - x^a + y^a) / a^2`` and ``(x^a (log x - log y), (y^a - x^a) / a)``."""
    xa = tl.exp(a * log_x)
    ya = tl.exp(a * log_y)
    g = _xlog(xa, log_x, log_y)
    return (a * g - xa + ya) / (a * a), g, (ya - xa) / a


@triton.jit
def _terms(z_s, e_s, inv_s, log_s, z_t, e_t, inv_t, log_t, w_p, w_q, log_w_p, log_w_q, ab_sum,
           DIV: tl.constexpr, AB_CASE: tl.constexpr):
    """Per-element ``q, p, f, dq, dp`` of one tile from the shifted logits ``z = u - max u`` and ``e = exp z`` of
    the student and the teacher (or TAID's mixture) and the row sums ``S`` (``1 / S``, ``log S``)."""
    q = e_s * inv_s
    log_q = z_s - log_s
    p = e_t * inv_t
    log_p = z_t - log_t
    if DIV == FORWARD_KL or DIV == TAID:  # TAID: forward KL from its target r
        f, dp, dq = _kl(p, log_p, log_q)
    elif DIV == REVERSE_KL:
        f, dq, dp = _kl(q, log_q, log_p)
    elif DIV == JSD:
        log_m, _, _ = _log_mix(log_p + log_w_p, log_q + log_w_q)
        dp = w_p * _xlog(p, log_p, log_m)
        dq = w_q * _xlog(q, log_q, log_m)
        f = dp + dq
    elif DIV == SKEW_KL:
        f, dp, dq = _skew(p, log_p, log_q, log_w_p, log_w_q)
    elif DIV == SKEW_REVERSE_KL:
        f, dq, dp = _skew(q, log_q, log_p, log_w_q, log_w_p)
    elif DIV == TVD:
        d = p - q
        half_sign = tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, d))  # d itself at 0 (and NaN)
        f = 0.5 * tl.abs(d)
        dq = -q * half_sign
        dp = p * half_sign
    elif DIV == SYMMETRIC_KL:
        kl_f = _xlog(p, log_p, log_q)
        kl_r = _xlog(q, log_q, log_p)
        f = w_p * kl_f + w_q * kl_r
        dq = w_q * kl_r - w_p * p
        dp = w_p * kl_f - w_q * q
    else:  # AB_DIVERGENCE, alpha = w_p, beta = w_q
        if AB_CASE == AB_GENERAL:
            pq = tl.exp(w_p * log_p + w_q * log_q)
            ps = tl.exp(ab_sum * log_p)
            qs = tl.exp(ab_sum * log_q)
            f = (pq - (w_p / ab_sum) * ps - (w_q / ab_sum) * qs) * (-1.0 / (w_p * w_q))
            dq = (qs - pq) / w_p
            dp = (ps - pq) / w_q
        elif AB_CASE == AB_BETA_ZERO:
            f, dp, dq = _ab_one_zero(log_p, log_q, w_p)
        elif AB_CASE == AB_ALPHA_ZERO:
            f, dq, dp = _ab_one_zero(log_q, log_p, w_q)
        elif AB_CASE == AB_OPPOSITE:
            r = tl.exp(w_p * (log_p - log_q))
            f = (w_p * (log_q - log_p) + r - 1.0) / (w_p * w_p)
            dq = (1.0 - r) / w_p
            dp = -dq
        else:  # AB_BOTH_ZERO
            dp = log_p - log_q
            dq = -dp
            f = 0.5 * dp * dp
    return q, p, f, dq, dp


# ------------------------------------------------------------------------------------------- tiles and rows
@triton.jit
def _scaled(x, c):
    """``c x`` with ``0 * (-inf) = 0`` (a zero weight on an absent class); ``0 * NaN`` and ``0 * inf`` stay NaN."""
    return tl.where((c == 0.0) & (x == float("-inf")), 0.0, c * x)


@triton.jit
def _load_tile(s_ptr, t_ptr, offs, mask, cmask, s_scale, t_scale, w_p, w_q, DIV: tl.constexpr,
               ACC: tl.constexpr):
    """Scaled logits ``u = a_s s`` and ``v = a_t t`` (TAID: ``v = w_q u + w_p a_t t``), ``-inf`` past the row end."""
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.where(cmask, s * s_scale, float("-inf"))
    v = tl.where(cmask, t * t_scale, float("-inf"))
    if DIV == TAID:
        v = _scaled(u, w_q) + _scaled(v, w_p)
    return u, v


@triton.jit
def _tile_softmax(x):
    """Softmax pieces of rows held whole in one tile: ``z = x - max x`` (the max taken as 0 when it is -inf),
    ``e = exp z``, ``1 / S`` and ``log S`` (``S = sum e``, ``[BLOCK_N, 1]``); ``e`` serves the sum and ``q``."""
    m = tl.max(x, axis=1)
    z = x - tl.where(m == float("-inf"), 0.0, m)[:, None]
    e = tl.exp(z)
    s = tl.sum(e, axis=1)[:, None]
    return z, e, 1.0 / s, tl.log(s)


@triton.jit
def _chunk_terms(s_ptr, t_ptr, offs, mask, cmask, s_scale, t_scale, w_p, w_q, log_w_p, log_w_q, ab_sum,
                 mu_s, inv_s, log_s, mu_t, inv_t, log_t, DIV: tl.constexpr, AB_CASE: tl.constexpr, ACC: tl.constexpr):
    """Load one chunk of a long row and return its ``q, p, f, dq, dp`` from the finished row statistics."""
    u, v = _load_tile(s_ptr, t_ptr, offs, mask, cmask, s_scale, t_scale, w_p, w_q, DIV, ACC)
    z_s = u - mu_s
    z_t = v - mu_t
    return _terms(z_s, tl.exp(z_s), inv_s, log_s, z_t, tl.exp(z_t), inv_t, log_t, w_p, w_q, log_w_p, log_w_q, ab_sum,
                  DIV, AB_CASE)


@triton.jit
def _store_grads(grad_s_ptr, grad_t_ptr, offs, smask, rkeep, q, p, dq, dp, sum_dq, sum_dp, gs_factor, gt_factor,
                 NEED_GS: tl.constexpr, NEED_GT: tl.constexpr):
    """Write one tile of both gradients: ``factor (d_k - x_k sum_j d_j)``, 0 in ignored rows."""
    if NEED_GS:
        gs = tl.where(rkeep, (dq - q * sum_dq[:, None]) * gs_factor, 0.0)
        tl.store(grad_s_ptr + offs, gs.to(grad_s_ptr.dtype.element_ty), mask=smask)
    if NEED_GT:
        gt = tl.where(rkeep, (dp - p * sum_dp[:, None]) * gt_factor, 0.0)
        tl.store(grad_t_ptr + offs, gt.to(grad_t_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _divergence_kernel(
    student_ptr, teacher_ptr, valid_ptr,
    loss_ptr, grad_s_ptr, grad_t_ptr,
    N, K,
    s_scale, t_scale, w_p, w_q, log_w_p, log_w_q, ab_sum, gs_factor, gt_factor,
    DIV: tl.constexpr,
    AB_CASE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    NEED_GS: tl.constexpr,
    NEED_GT: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per ``BLOCK_N`` rows; ``SINGLE_TILE`` means ``K <= BLOCK_K`` (the row is loaded once and kept in
    registers). ``gs_factor = grad_scale a_s`` and ``gt_factor = grad_scale a_t`` (times ``t`` for TAID)."""
    ACC = loss_ptr.dtype.element_ty  # float32, or float64 for float64 inputs
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    if HAS_VALID:
        rvalid = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
    else:
        rvalid = rmask
    rload = (rmask & rvalid)[:, None]  # ignored rows are never read
    rkeep = rvalid[:, None]
    rstore = rmask[:, None]
    row_off = rows.to(tl.int64)[:, None] * K
    cols0 = tl.arange(0, BLOCK_K)

    zero_row = tl.zeros([BLOCK_N], dtype=ACC)
    loss = zero_row
    sum_dq = zero_row
    sum_dp = zero_row

    if SINGLE_TILE:
        cmask = (cols0 < K)[None, :]
        offs = row_off + cols0[None, :]
        u, v = _load_tile(student_ptr, teacher_ptr, offs, rload & cmask, cmask, s_scale, t_scale, w_p, w_q, DIV, ACC)
        # pass 1: softmax statistics
        z_s, e_s, inv_s, log_s = _tile_softmax(u)
        z_t, e_t, inv_t, log_t = _tile_softmax(v)
        # pass 2: loss and row sums
        q, p, f, dq, dp = _terms(z_s, e_s, inv_s, log_s, z_t, e_t, inv_t, log_t, w_p, w_q, log_w_p, log_w_q, ab_sum,
                                 DIV, AB_CASE)
        loss = tl.sum(tl.where(cmask, f, 0.0), axis=1)
        if NEED_GS:
            sum_dq = tl.sum(tl.where(cmask, dq, 0.0), axis=1)
        if NEED_GT:
            sum_dp = tl.sum(tl.where(cmask, dp, 0.0), axis=1)
        # pass 3: gradients
        _store_grads(grad_s_ptr, grad_t_ptr, offs, rstore & cmask, rkeep, q, p, dq, dp, sum_dq, sum_dp,
                     gs_factor, gt_factor, NEED_GS, NEED_GT)
    else:
        # pass 1: online softmax statistics
        m_s = zero_row + float("-inf")
        s_s = zero_row
        m_t = zero_row + float("-inf")
        s_t = zero_row
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = (cols < K)[None, :]
            u, v = _load_tile(student_ptr, teacher_ptr, row_off + cols[None, :], rload & cmask, cmask,
                              s_scale, t_scale, w_p, w_q, DIV, ACC)
            m_s, s_s = _online_max_sumexp(u, m_s, s_s)
            m_t, s_t = _online_max_sumexp(v, m_t, s_t)
        mu_s, _, inv_s, log_s = _finish_stats(m_s, s_s)
        mu_t, _, inv_t, log_t = _finish_stats(m_t, s_t)
        # pass 2: loss and row sums
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + cols0
            cmask = (cols < K)[None, :]
            q, p, f, dq, dp = _chunk_terms(student_ptr, teacher_ptr, row_off + cols[None, :], rload & cmask, cmask,
                                           s_scale, t_scale, w_p, w_q, log_w_p, log_w_q, ab_sum,
                                           mu_s, inv_s, log_s, mu_t, inv_t, log_t, DIV, AB_CASE, ACC)
            loss += tl.sum(tl.where(cmask, f, 0.0), axis=1)
            if NEED_GS:
                sum_dq += tl.sum(tl.where(cmask, dq, 0.0), axis=1)
            if NEED_GT:
                sum_dp += tl.sum(tl.where(cmask, dp, 0.0), axis=1)
        # pass 3: gradients
        if NEED_GS or NEED_GT:
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + cols0
                cmask = (cols < K)[None, :]
                offs = row_off + cols[None, :]
                q, p, f, dq, dp = _chunk_terms(student_ptr, teacher_ptr, offs, rload & cmask, cmask,
                                               s_scale, t_scale, w_p, w_q, log_w_p, log_w_q, ab_sum,
                                               mu_s, inv_s, log_s, mu_t, inv_t, log_t, DIV, AB_CASE, ACC)
                _store_grads(grad_s_ptr, grad_t_ptr, offs, rstore & cmask, rkeep, q, p, dq, dp, sum_dq, sum_dp,
                             gs_factor, gt_factor, NEED_GS, NEED_GT)

    loss = tl.where(loss < 0.0, 0.0, loss)  # float32 cancellation; NaN stays NaN
    tl.store(loss_ptr + rows, tl.where(rvalid, loss, 0.0), mask=rmask)


def divergence_fwd(student: torch.Tensor, teacher: torch.Tensor, valid: Optional[torch.Tensor], divergence: int,
                   param_a: float, param_b: float, student_scale: float, teacher_scale: float,
                   need_grad_student: bool, need_grad_teacher: bool,
                   grad_scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row divergence and its gradients in one launch (the ``divergence_fwd`` op contract).

    Args:
        student: ``[N, K]`` student logits (float32, float16, bfloat16; float64 computes in float64), contiguous.
        teacher: ``[N, K]`` teacher logits, same dtype, contiguous.
        valid: optional bool ``[N]``; rows with ``False`` get loss 0 and zero gradients and are not read.
        divergence: the index in ``tgtfast.reference.DIVERGENCES`` (:data:`NAMES`).
        param_a, param_b: the divergence's parameters (jsd: beta; skew_kl, skew_reverse_kl: alpha; symmetric_kl:
            lam; ab_divergence: alpha, beta; taid: t); unused ones are ignored.
        student_scale, teacher_scale: ``a_s, a_t > 0`` (``logit_scale / T``): ``q = softmax(a_s s)``,
            ``p = softmax(a_t t)``.
        need_grad_student, need_grad_teacher: which gradients to compute.
        grad_scale: the gradients are those of ``grad_scale * loss[n]`` (the caller's reduction weight).

    Returns:
        ``(loss, grad_student, grad_teacher)``: ``loss [N]`` float32 (float64 for float64 inputs);
        ``grad_student [N, K]`` = ``grad_scale dL_n/ds_n`` (``a_s`` included) in the student's dtype, or an empty
        ``[0]`` tensor when not needed; ``grad_teacher`` likewise.
    """
    n_rows, n_classes = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(n_rows, dtype=acc_dtype, device=student.device)
    grad_s = torch.empty_like(student) if need_grad_student else student.new_empty(0)
    grad_t = torch.empty_like(teacher) if need_grad_teacher else teacher.new_empty(0)
    kp = kernel_params(divergence, param_a, param_b)
    if n_rows == 0:
        return loss, grad_s, grad_t
    if n_classes == 0:  # an empty sum: nothing to launch
        loss.zero_()
        return loss, grad_s, grad_t

    t_factor = float(teacher_scale) * (kp.w_p if kp.code == TAID.value else 1.0)  # TAID: r depends on t u_t
    block_n, block_k, num_warps = launch_config(n_classes)
    grid = (triton.cdiv(n_rows, block_n),)
    with launch_guard(student):
        torch.library.wrap_triton(_divergence_kernel)[grid](
            student, teacher,
            valid.view(torch.uint8) if valid is not None else student,  # dummy pointer (never read)
            loss, grad_s, grad_t,
            n_rows, n_classes,
            float(student_scale), float(teacher_scale), kp.w_p, kp.w_q, kp.log_w_p, kp.log_w_q, kp.ab_sum,
            float(grad_scale) * float(student_scale), float(grad_scale) * t_factor,
            DIV=kp.code,
            AB_CASE=kp.ab_case,
            HAS_VALID=valid is not None,
            NEED_GS=bool(need_grad_student),
            NEED_GT=bool(need_grad_teacher),
            SINGLE_TILE=n_classes <= block_k,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=num_warps,
        )
    return loss, grad_s, grad_t
