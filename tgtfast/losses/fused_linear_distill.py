"""Every divergence of :func:`tgtfast.distill_loss` straight from hidden states and output projections, with
hard-label cross-entropy mixing: :func:`fused_linear_distill_loss` runs the fused ``divergence`` op on chunks of
logits it computes itself (tgtfast/losses/chunked.py), never materialising ``[N, V]``."""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
from torch import nn

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.dispatch import Backend, select
from tgtfast.losses import divergence as D
from tgtfast.losses.chunked import launch, prepare
from tgtfast.losses.sparse import SparseTeacher, check_divergence, sparse_rows
from tgtfast.ops import divergence as _op
from tgtfast.ops._autodiff import check_no_tangent

__all__ = ["fused_linear_distill_loss", "FusedLinearDistillLoss"]


def _divergence_chunk(chosen: Backend, div: D.Divergence, a_s: float, a_t: float, multiplier: float, s, t, valid,
                      need_grad, grad_scale):
    """Per-row divergence of one chunk (times `multiplier`) and, if need_grad, the gradient of grad_scale * rows
    wrt the chunk's student logits."""
    if chosen is not Backend.REFERENCE:
        rows, grad, _ = _op.impl(chosen)(s, t, valid, div.code, div.param_a, div.param_b, a_s, a_t, need_grad, False,
                                         grad_scale * multiplier)
        rows = rows.clamp_min(0)  # against float32 cancellation; NaN stays NaN
        return (rows * multiplier if multiplier != 1.0 else rows), (grad if need_grad else None)
    if valid is not None:
        s, t = reference.mask_rows(s, t, valid, True)
    with torch.enable_grad():
        s_leaf = s.detach().requires_grad_(need_grad)
        rows = reference.divergence_rows(s_leaf * a_s, t * a_t, div.name, param_a=div.param_a, param_b=div.param_b)
        rows = rows * multiplier
        if valid is not None:
            rows = torch.where(valid, rows, rows.new_zeros(()))
        grad = torch.autograd.grad(rows.sum() * grad_scale, s_leaf)[0] if need_grad else None
    return rows.detach().clamp_min(0), grad


def _sparse_chunk(backend, div: D.Divergence, a_s: float, temperature: float, multiplier: float, s,
                  t: SparseTeacher, valid, need_grad, grad_scale):
    """Per-row divergence of one chunk of student logits against the chunk's rows of a sparse teacher (times
    `multiplier`) and, if need_grad, the gradient of grad_scale * rows wrt the chunk's logits."""
    with torch.enable_grad():
        s_leaf = s.detach().requires_grad_(need_grad)
        rows = sparse_rows(s_leaf, t, div, a_s, temperature, valid, backend, "tgtfast.fused_linear_distill_loss",
                           check=False, grad_scale=grad_scale * multiplier)  # checked once for every chunk
        rows = rows * multiplier if multiplier != 1.0 else rows
        grad = torch.autograd.grad(rows.sum() * grad_scale, s_leaf)[0] if need_grad else None
    return rows.detach().clamp_min(0), grad


def _transform(scale_s, cap_s, scale_t, cap_t, s: torch.Tensor, t: torch.Tensor):
    """The models' logit scale and soft-capping on a chunk, in place; returns d(student logits)/d(projection logits)
    (a number, a tensor for soft-capping, or None)."""
    chain = None
    if scale_s is not None:
        s.mul_(scale_s)
        chain = scale_s
    if cap_s is not None:
        th = s.div_(cap_s).tanh_()
        chain_t = torch.mul(th, th).neg_().add_(1.0)
        if chain is not None:
            chain_t.mul_(chain)
        chain = chain_t
        th.mul_(cap_s)
    if scale_t is not None:
        t.mul_(scale_t)
    if cap_t is not None:
        t.div_(cap_t).tanh_().mul_(cap_t)
    return chain


@torch.compiler.disable
def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden,
    teacher_weight: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    *,
    beta: Optional[float] = None,
    alpha: Optional[float] = None,
    lam: Optional[float] = None,
    t: Optional[float] = None,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch: Union[int, float, torch.Tensor, None] = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    t2_scaling: bool = False,
    logit_scale: D.Pair = None,
    logit_softcap: D.Pair = None,
    vocab_mismatch: Optional[str] = None,
    return_parts: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""``kd_weight * distill_loss(s, t, divergence) + ce_weight * cross_entropy(s, target)`` from hidden states,
    with ``s = student_hidden @ student_weight.T + student_bias`` and ``t`` likewise for the (detached) teacher,
    computed over chunks of rows: memory is ``O(chunk_size x V)``, never ``O(N x V)``.
    :func:`tgtfast.reference.fused_linear_distill_loss` is the specification.

    The gradients wrt the student's hidden states, weight and bias are computed during the forward pass (a forward
    without backward costs as much as both); the teacher gets no gradient.

    Args:
        student_hidden: ``[N, H]`` or ``[B, L, H]`` (float32, bfloat16, float16; bf16 hidden states give float32
            logits and accumulation: the logits are never rounded to bf16).
        student_weight: ``[V, H]``, as ``nn.Linear`` stores it. teacher_hidden / teacher_weight likewise
            (``[.., H_t]``, ``[V_t, H_t]``).
        divergence, beta, alpha, lam, t, temperature, t2_scaling: as in :func:`tgtfast.distill_loss`.
        student_bias, teacher_bias: optional ``[V]`` biases.
        target: integer labels of the leading shape; rows equal to ``ignore_index`` are left out of both terms.
            Required when ``ce_weight != 0``.
        reduction, num_items_in_batch: as in :func:`tgtfast.distill_loss`; the same count divides both terms.
        kd_weight, ce_weight: weights of the divergence (soft) and cross-entropy (hard) terms; the cross-entropy
            is at temperature 1 on the model's logits (after scale and soft-capping).
        logit_scale, logit_softcap: the models' logit transforms (a number or a ``(student, teacher)`` pair), applied
            to each chunk of logits as the models apply them, in both terms.
        vocab_mismatch: ``"slice"`` or ``"pad"`` when the two projections have different numbers of rows (see
            :func:`tgtfast.distill_loss`); ``"pad"`` copies the smaller projection once with extra rows.
        return_parts: also return the soft and hard terms, reduced and unweighted, detached (for logging):
            ``(loss, soft, hard)``.
        chunk_size: rows per chunk (default: about 64 MiB of float32 logits per buffer).
        backend: backend of the fused divergence op on each chunk (see :func:`tgtfast.backends`); the matrix
            products always run through torch (MKL / cuBLAS).

    A :class:`tgtfast.SparseTeacher` (cached top-k log-probabilities, leading shape of the hidden states) may take
    the place of ``teacher_hidden`` and ``teacher_weight``: ``fused_linear_distill_loss(h, W, SparseTeacher(...),
    divergence="jsd")`` (see :func:`tgtfast.distill_loss`; the teacher's part of ``logit_scale`` and
    ``logit_softcap`` does not apply to it).

    Under ``torch.compile`` the call is a graph break. Forward-mode AD and double backward raise a clear error.
    """
    sparse = teacher_hidden if isinstance(teacher_hidden, SparseTeacher) else None
    if sparse is not None and isinstance(teacher_weight, str):  # fused_linear_distill_loss(h, W, sparse, "jsd")
        divergence, teacher_weight = teacher_weight, None
    div = D.resolve(divergence, beta=beta, alpha=alpha, lam=lam, t=t)
    D.check_reduction(reduction, num_items_in_batch)
    V.boolean("t2_scaling", t2_scaling)
    V.boolean("return_parts", return_parts)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = float(num_items_in_batch)
    args = prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                   target=target, ignore_index=ignore_index, reduction=reduction, kd_weight=kd_weight,
                   ce_weight=ce_weight, chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
                   vocab_mismatch=vocab_mismatch)
    check_no_tangent("tgtfast.fused_linear_distill_loss", student_hidden, student_weight, student_bias,
                     way_out="tgtfast.reference.fused_linear_distill_loss materialises the logits and is differentiable")
    temperature = V.temperature(temperature, args.acc)
    scale_s, scale_t = D._pair("logit_scale", logit_scale)
    cap_s, cap_t = D._pair("logit_softcap", logit_softcap)
    # A logit scale folds into the kernel's scale unless the chunk must hold the model's logits (soft-capping
    # follows it, or the cross-entropy term reads them).
    fold_s = cap_s is None and args.ce_weight == 0
    fold_t = cap_t is None or sparse is not None
    if sparse is not None:
        scale_t = cap_t = None
    a_s = (scale_s if fold_s and scale_s is not None else 1.0) / temperature
    a_t = (scale_t if fold_t and scale_t is not None else 1.0) / temperature
    transform = None
    if not (fold_s or (scale_s is None and cap_s is None)) or not (fold_t or (scale_t is None and cap_t is None)):
        transform = functools.partial(_transform, None if fold_s else scale_s, cap_s, None if fold_t else scale_t,
                                      cap_t)
    multiplier = temperature**2 if t2_scaling else 1.0
    if sparse is not None:
        if sparse.device != args.device:
            raise ValueError(f"the sparse teacher is on {sparse.device} but student_hidden is on {args.device}")
        sparse.check(args.v, args.valid)
        check_divergence(div.name, div.param_a, div.param_b, sparse.tail)
        kd_chunk = functools.partial(_sparse_chunk, backend, div, a_s, temperature, multiplier)
        return launch(args, kd_chunk, transform=transform, parts=return_parts)
    chosen = select(backend, args.device, args.acc, op="fused_linear_divergence")
    kd_chunk = functools.partial(_divergence_chunk, chosen, div, a_s, a_t, multiplier)
    return launch(args, kd_chunk, transform=transform, parts=return_parts)


class FusedLinearDistillLoss(nn.Module):
    """:func:`fused_linear_distill_loss` as a module:
    ``FusedLinearDistillLoss("jsd", beta=0.5, ce_weight=0.5)(student_hidden, student_weight, teacher_hidden,
    teacher_weight, target)``. Arguments as in :func:`fused_linear_distill_loss`."""

    def __init__(self, divergence: str = "forward_kl", *, beta: Optional[float] = None, alpha: Optional[float] = None,
                 lam: Optional[float] = None, t: Optional[float] = None, temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "batchmean", kd_weight: float = 1.0,
                 ce_weight: float = 0.0, t2_scaling: bool = False, logit_scale: D.Pair = None,
                 logit_softcap: D.Pair = None, vocab_mismatch: Optional[str] = None, return_parts: bool = False,
                 chunk_size: Optional[int] = None, backend: Optional[str] = None) -> None:
        super().__init__()
        self.params = {k: v for k, v in dict(beta=beta, alpha=alpha, lam=lam, t=t).items() if v is not None}
        D.resolve(divergence, **self.params)
        D.check_reduction(reduction, None)
        V.real("kd_weight", kd_weight, low=0.0)
        V.real("ce_weight", ce_weight, low=0.0)
        D._pair("logit_scale", logit_scale)
        D._pair("logit_softcap", logit_softcap)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.divergence = divergence
        self.kwargs = dict(temperature=V.temperature(temperature), ignore_index=ignore_index, reduction=reduction,
                           kd_weight=float(kd_weight), ce_weight=float(ce_weight), t2_scaling=t2_scaling,
                           logit_scale=logit_scale, logit_softcap=logit_softcap, vocab_mismatch=vocab_mismatch,
                           return_parts=return_parts, chunk_size=chunk_size, backend=backend)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
                num_items_in_batch=None):
        return fused_linear_distill_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, self.divergence, target=target,
            student_bias=student_bias, teacher_bias=teacher_bias, num_items_in_batch=num_items_in_batch,
            **self.params, **self.kwargs)

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self.params.items())
        return (f"divergence={self.divergence!r}{params}, kd_weight={self.kwargs['kd_weight']}, "
                f"ce_weight={self.kwargs['ce_weight']}, temperature={self.kwargs['temperature']}")
