"""Liger-Kernel's chunked fused-linear JSD loss on tgtfast's fused kernels: change

.. code-block:: python

    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from liger_kernel.chunked_loss.functional import liger_fused_linear_jsd

into

.. code-block:: python

    from tgtfast.integrations.liger import LigerFusedLinearJSDLoss   # = FusedLinearJSDLoss
    from tgtfast.integrations.liger import liger_fused_linear_jsd

The same constructor, forward arguments, value and gradients (liger-kernel 0.8.5), computed by
:func:`tgtfast.fused_linear_distill_loss` (divergence ``"jsd"``, ``kd_weight = weight_soft_loss``,
``ce_weight = weight_hard_loss``, ``reduction="batchmean"``). liger-kernel itself is not needed.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from tgtfast import validation as V
from tgtfast.losses.divergence import resolve

__all__ = ["FusedLinearJSDLoss", "LigerFusedLinearJSDLoss", "liger_fused_linear_jsd"]

Result = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size,
           return_soft_hard_loss) -> None:
    """Liger's options, checked (Liger itself checks only ``temperature != 0``)."""
    V.real("weight_hard_loss", weight_hard_loss, low=0.0)
    V.real("weight_soft_loss", weight_soft_loss, low=0.0)
    resolve("jsd", beta=beta)
    V.integer("ignore_index", ignore_index)
    V.temperature(temperature)
    V.boolean("compiled", compiled)
    V.integer("chunk_size", chunk_size, low=1)
    V.boolean("return_soft_hard_loss", return_soft_hard_loss)


def liger_fused_linear_jsd(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    true_labels: torch.Tensor,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    weight_hard_loss: float = 0.5,
    weight_soft_loss: float = 0.5,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compiled: bool = True,
    chunk_size: int = 1024,
    return_soft_hard_loss: bool = False,
) -> Result:
    r"""Liger's ``liger_fused_linear_jsd`` (``LigerFusedLinearJSDFunction.apply``), the same positional order:
    ``weight_hard_loss * CE + weight_soft_loss * JSD`` from hidden states, logits never materialised.

    With ``s = student_input @ student_weight.T + student_bias`` and ``t`` likewise for the teacher (no gradient):
    ``CE`` is the cross-entropy of ``s`` (temperature 1) against ``true_labels``, ``JSD`` the generalised JSD of
    ``softmax(s / T)`` and ``softmax(t / T)`` per row (``beta``: TRL's and Liger's, ``0`` forward KL, ``1`` reverse
    KL; no ``T**2``); both are summed over the rows whose label is not ``ignore_index`` and divided by their
    number (at least 1).

    Args:
        student_input: ``[N, H_s]`` (or ``[B, L, H_s]``); student_weight ``[V, H_s]``.
        teacher_input: ``[N, H_t]``; teacher_weight ``[V_t, H_t]``. A teacher with more classes
            (``V_t > V``) is compared, as Liger does, with the student's logits padded by zeros to ``V_t`` (the
            cross-entropy stays over the student's ``V`` classes; this costs a second pass over the student).
        true_labels: ``[N]`` integer labels.
        student_bias, teacher_bias: optional ``[V]`` / ``[V_t]`` biases.
        weight_hard_loss, weight_soft_loss: the weights (``>= 0``) of the two terms.
        beta: in ``[0, 1]``.
        ignore_index: the label of rows left out of both terms.
        temperature: ``T > 0`` of the JSD term.
        compiled: accepted for Liger's signature and ignored (the kernels are compiled already; under an outer
            ``torch.compile`` the call is a graph break).
        chunk_size: rows per chunk (memory ``O(chunk_size x V)``); the value does not depend on it.
        return_soft_hard_loss: also return the two terms, unweighted and detached: ``(loss, soft, hard)``.

    Returns:
        The 0-dim loss (float32, float64 for float64 inputs), or ``(loss, soft, hard)``. Gradients reach
        ``student_input``, ``student_weight`` and ``student_bias``.

    Differences from Liger (besides rounding): half-precision inputs are computed with float32 logits and
    accumulation (Liger computes the JSD in the input dtype); float64 inputs give a float64 loss (Liger: float32);
    negative weights, ``T <= 0``, ``beta`` outside ``[0, 1]`` and a teacher with fewer classes than the student
    raise ``ValueError`` (Liger: accepted, or a shape error deep inside).
    """
    from tgtfast.losses.fused_linear_distill import fused_linear_distill_loss

    _check(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size,
           return_soft_hard_loss)
    for name, w in (("student_weight", student_weight), ("teacher_weight", teacher_weight)):
        V.tensor(name, w, dims=(2,))
    vs, vt = student_weight.shape[0], teacher_weight.shape[0]
    if vt < vs:
        raise ValueError(f"teacher_weight has V = {vt} rows but student_weight has {vs}: Liger pads the student's "
                         f"logits up to the teacher's vocabulary, never the teacher's")
    kw = dict(beta=float(beta), temperature=temperature, target=true_labels, ignore_index=ignore_index,
              reduction="batchmean", chunk_size=chunk_size)
    # Liger computes the cross-entropy over the student's own classes also when it only reports it: where the soft
    # term does not give it (a padded student, or weight_hard_loss == 0), a second pass does.
    separate_hard = vt > vs or (return_soft_hard_loss and weight_hard_loss == 0)
    s_weight, s_bias = _pad_zero(student_weight, student_bias, vt)
    loss, soft, hard = fused_linear_distill_loss(
        student_input, s_weight, teacher_input, teacher_weight, "jsd", student_bias=s_bias,
        teacher_bias=teacher_bias, kd_weight=weight_soft_loss, ce_weight=0.0 if separate_hard else weight_hard_loss,
        return_parts=True, **kw)
    if separate_hard:
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight_hard_loss != 0):
            hard_loss, _, hard = fused_linear_distill_loss(
                student_input, student_weight, student_input.detach(), student_weight.detach(), "jsd",
                student_bias=student_bias, teacher_bias=None if student_bias is None else student_bias.detach(),
                kd_weight=0.0, ce_weight=1.0, return_parts=True, **kw)
        if weight_hard_loss != 0:
            loss = loss + weight_hard_loss * hard_loss
    return (loss, soft, hard) if return_soft_hard_loss else loss


def _pad_zero(weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int):
    """The projection extended to ``rows`` outputs whose logits are 0 (zero weight rows and bias), as Liger pads a
    student whose vocabulary is smaller than the teacher's; autograd drops the added rows' gradients."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros((extra, weight.shape[1]))])
    bias = None if bias is None else torch.cat([bias, bias.new_zeros((extra,))])
    return weight, bias


class FusedLinearJSDLoss(nn.Module):
    """Liger's ``LigerFusedLinearJSDLoss``: the same constructor (parameter names and defaults of liger-kernel
    0.8.5) and forward, computed by :func:`liger_fused_linear_jsd` (see it for the math and the differences)::

        loss_fn = FusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0)
        loss = loss_fn(student_hidden, student_lm_head.weight, teacher_hidden, teacher_lm_head.weight, labels)

    ``compiled`` is accepted and ignored. The options are attributes, as in Liger.
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
    ) -> None:
        super().__init__()
        _check(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size,
               return_soft_hard_loss)
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.beta = beta
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.Tensor,
        student_bias: Optional[torch.Tensor] = None,
        teacher_bias: Optional[torch.Tensor] = None,
    ) -> Result:
        """The loss (or ``(loss, soft, hard)`` with ``return_soft_hard_loss``) of hidden states and projections."""
        return liger_fused_linear_jsd(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            self.weight_hard_loss, self.weight_soft_loss, self.beta, self.ignore_index, self.temperature,
            self.compiled, self.chunk_size, self.return_soft_hard_loss)

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, temperature={self.temperature}, "
                f"chunk_size={self.chunk_size}")


LigerFusedLinearJSDLoss = FusedLinearJSDLoss
