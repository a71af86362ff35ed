"""PTLoss straight from hidden states: :func:`fused_linear_ptloss` runs the fused PTLoss op on chunks of logits it
computes itself (tgtfast/losses/chunked.py: the projections, the cross-entropy term, the gradients), so memory is
``O(chunk x V)`` plus the gradients, never ``O(N x V)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.dispatch import Backend, select
from tgtfast.losses.chunked import default_chunk_size, launch, prepare
from tgtfast.losses.functional import _REDUCTIONS, CoeffsLike, _as_coeffs
from tgtfast.losses.modules import coeffs_buffer
from tgtfast.ops import ptloss as _ptloss_op
from tgtfast.ops._autodiff import check_no_tangent

__all__ = ["fused_linear_ptloss", "FusedLinearPTLoss", "default_chunk_size"]


def _ptloss_chunk(chosen: Backend, s, t, valid, need_grad, grad_scale, *, eta, temperature):
    """Per-row PTLoss of one chunk of logits and (if need_grad) the gradient of grad_scale * rows wrt s."""
    if chosen is not Backend.REFERENCE:
        rows, grad, _ = _ptloss_op.impl(chosen)(
            s, t, eta, valid, temperature, 0.0, True, need_grad, False, grad_scale)
        return rows, (grad if need_grad else None)
    if valid is not None:
        s, t = reference.mask_rows(s, t, valid, True)
    with torch.enable_grad():
        s_leaf = s.detach().requires_grad_(need_grad)
        rows = reference.ptloss_rows(s_leaf, t, eta, temperature=temperature)
        if valid is not None:
            rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
        grad = torch.autograd.grad(rows.sum() * grad_scale, s_leaf)[0] if need_grad else None
    return rows.detach(), grad


def fused_linear_ptloss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    coeffs: CoeffsLike = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""PTLoss between two output projections, computed from hidden states without materialising the logits.

    Equal to ``kd_weight * ptloss(s, t, coeffs) + ce_weight * cross_entropy(s, target)`` with
    ``s = student_hidden @ student_weight.T + student_bias`` and ``t`` likewise for the teacher
    (:func:`tgtfast.reference.fused_linear_ptloss` is the specification), but computed over chunks of rows:
    memory is ``O(chunk_size x V)`` instead of ``O(N x V)``. The gradients wrt the student's hidden states,
    weight and bias are computed during the forward pass (so a forward without backward costs as much as
    both); the teacher gets no gradient.

    Args:
        student_hidden: ``[N, H]`` or ``[B, L, H]`` student hidden states.
        student_weight: ``[V, H]`` student output projection, as ``nn.Linear`` stores it, same dtype as
            ``student_hidden``.
        teacher_hidden: ``[N, H_t]`` or ``[B, L, H_t]`` (same leading shape) teacher hidden states.
        teacher_weight: ``[V, H_t]`` teacher output projection, same dtype as ``teacher_hidden``.
        coeffs: PTLoss coefficients ``[M]`` or ``[M, V]``; ``None`` is plain KL distillation.
        student_bias, teacher_bias: optional ``[V]`` biases.
        temperature: ``T > 0`` dividing both logits in the PTLoss term (not in the cross-entropy term). Not
            multiplied by ``T**2``, as in :func:`tgtfast.ptloss`.
        target: optional integer labels of the leading shape: rows equal to ``ignore_index`` are left out of
            both terms; required when ``ce_weight != 0`` (the labels of the cross-entropy term).
        ignore_index: label of rows to leave out.
        reduction: ``"batchmean"`` / ``"mean"`` (sum over rows that are not ignored divided by their number,
            0 if none), ``"sum"``, or ``"none"`` (per-row losses of the leading shape; the gradients are then
            computed by a second sweep in backward, with the per-row incoming gradient).
        kd_weight: weight of the PTLoss term (default 1).
        ce_weight: weight of the hard-label cross-entropy term on the student logits at temperature 1
            (default 0: no cross-entropy). Distillation recipes for language models commonly use
            ``kd_weight = 1 - ce_weight``.
        chunk_size: rows per chunk; ``None`` picks :func:`default_chunk_size` ``(V)`` (about 64 MiB of float32
            logits per buffer; three such buffers are alive at once).
        backend: backend of the fused PTLoss op on each chunk (``None``/``"auto"``, ``"cpp"``, ``"triton"``,
            ``"cuda"``, ``"reference"``, see :func:`tgtfast.backends`). The matrix products always run through
            torch (MKL / cuBLAS).

    Returns:
        The reduced loss (0-dim; float32, float64 for float64 inputs), or per-row losses for ``"none"``.

    Logits, loss and gradients are accumulated in float32 for float16/bfloat16 inputs (the logits are never
    rounded to the input dtype); the hidden-state and weight gradients are returned in their inputs' dtypes.

    Under ``torch.compile`` the call is a graph break: it runs eagerly (its work is matrix products and the
    fused kernels already), the code around it is compiled.
    """
    args = prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                   target=target, ignore_index=ignore_index, reduction=reduction, kd_weight=kd_weight,
                   ce_weight=ce_weight, chunk_size=chunk_size)
    check_no_tangent("tgtfast.fused_linear_ptloss", student_hidden, student_weight, student_bias,
                     way_out="tgtfast.reference.fused_linear_ptloss materialises the logits and is differentiable")
    temperature = V.temperature(temperature, args.acc)
    eta = _as_coeffs(coeffs, args.v, args.device, args.acc)
    chosen = select(backend, args.device, args.acc, op="fused_linear_ptloss",
                    orders=eta.shape[0] if eta.numel() else 0)
    kd_chunk = functools.partial(_ptloss_chunk, chosen, eta=eta, temperature=temperature)
    return launch(args, kd_chunk)


class FusedLinearPTLoss(nn.Module):
    """:func:`fused_linear_ptloss` as a module:
    ``FusedLinearPTLoss(coeffs)(student_hidden, student_weight, teacher_hidden, teacher_weight, target=...)``.

    ``coeffs`` (``[M]`` or ``[M, V]``; ``None`` for plain KL) is a buffer, so it moves with ``.to(device)`` and is
    saved in the ``state_dict``. Other arguments as in :func:`fused_linear_ptloss`.
    """

    coeffs: torch.Tensor

    def __init__(
        self,
        coeffs: CoeffsLike = None,
        *,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        kd_weight: float = 1.0,
        ce_weight: float = 0.0,
        chunk_size: Optional[int] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.temperature = V.temperature(temperature)
        self.kd_weight = V.real("kd_weight", kd_weight, low=0.0)
        self.ce_weight = V.real("ce_weight", ce_weight, low=0.0)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.backend = backend
        self.register_buffer("coeffs", coeffs_buffer(coeffs, "V"))

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        *,
        student_bias: Optional[torch.Tensor] = None,
        teacher_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return fused_linear_ptloss(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            self.coeffs if self.coeffs.numel() else None, student_bias=student_bias, teacher_bias=teacher_bias,
            temperature=self.temperature, target=target, ignore_index=self.ignore_index, reduction=self.reduction,
            kd_weight=self.kd_weight, ce_weight=self.ce_weight, chunk_size=self.chunk_size, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"orders={self.coeffs.shape[0] if self.coeffs.numel() else 0}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, kd_weight={self.kd_weight}, ce_weight={self.ce_weight}, "
                f"chunk_size={self.chunk_size}")

