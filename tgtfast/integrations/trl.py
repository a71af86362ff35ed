"""TRL's generalised JSD loss on tgtfast's fused kernels: change

.. code-block:: python

    from trl.experimental.gkd import GKDTrainer
    loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.5, temperature=0.9)

into

.. code-block:: python

    from tgtfast.integrations.trl import generalized_jsd_loss
    loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.5, temperature=0.9)

or keep a GKD trainer and swap its loss: ``class FastGKD(GKDTrainer): generalized_jsd_loss =
staticmethod(generalized_jsd_loss)``. trl itself is not needed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.losses.divergence import distill_loss, resolve

__all__ = ["generalized_jsd_loss"]

_IGNORE = -100  # TRL's label of positions left out of the loss
_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Union[int, float, torch.Tensor, None] = None,
) -> torch.Tensor:
    r"""TRL's ``GKDTrainer.generalized_jsd_loss`` (trl 1.16, ``trl.experimental.gkd``): the same arguments, value
    and gradients (wrt both logits), computed by :func:`tgtfast.distill_loss`'s fused ``"jsd"``.

    Per element, with ``q = softmax(student_logits / T)``, ``p = softmax(teacher_logits / T)`` and the mixture
    ``m = beta p + (1 - beta) q``: ``beta p log(p / m) + (1 - beta) q log(q / m)``; ``beta = 0`` is forward KL
    ``p log(p / q)`` and ``beta = 1`` reverse KL ``q log(q / p)`` (TRL's endpoints; tgtfast's ``beta`` is TRL's).
    No ``T**2`` factor.

    Args:
        student_logits: ``[B, L, V]`` (or ``[N, V]``) floating logits.
        teacher_logits: the teacher's logits, the same shape.
        labels: optional integer labels of the leading shape; positions equal to ``-100`` are left out.
        beta: in ``[0, 1]``.
        temperature: ``T > 0`` dividing both logits.
        reduction: as TRL reduces its ``[B, L, V]`` elementwise losses (positions with label ``-100`` removed):

            * ``"batchmean"``: the sum divided by the positions not ignored with ``labels`` (at least 1), by
              ``student_logits.shape[0]`` (the batch size ``B``, not ``B * L``) without;
            * ``"sum"``: the sum;
            * ``"mean"``: the mean over elements, i.e. the sum divided by ``positions * V``;
            * ``"none"``: the elements themselves, ``[B, L, V]`` without labels and ``[positions kept, V]`` with
              them (not fused: computed with torch ops, elementwise).
        num_items_in_batch: when given, the result is the sum divided by it, whatever ``reduction`` says (the
            loss tokens of the whole optimiser step, for gradient accumulation).

    Returns:
        A 0-dim loss (float32 for float32 / half-precision logits, float64 for float64), or the elements for
        ``"none"`` (in the logits' dtype).

    Differences from TRL (besides rounding): half-precision logits are reduced in float32 and the loss is
    float32; ``"mean"`` with every position ignored is 0 (TRL: NaN, the mean of nothing); a ``-inf`` teacher logit
    contributes 0 where TRL's ``0 * inf`` gives NaN; bad arguments (an unknown reduction, which TRL treats as
    ``"none"``, ``beta`` outside ``[0, 1]``, shapes that differ) raise ``ValueError`` / ``TypeError``.
    """
    V.logits_pair(student_logits, teacher_logits)
    if labels is not None:
        V.target(labels, student_logits.shape[:-1], "student_logits'", "student_logits", student_logits.device,
                 name="labels")
    V.choice("reduction", reduction, _REDUCTIONS)
    resolve("jsd", beta=beta)  # beta in [0, 1]
    beta = float(beta)
    call = dict(beta=beta, temperature=temperature, target=labels, ignore_index=_IGNORE)
    if num_items_in_batch is not None:
        return distill_loss(student_logits, teacher_logits, "jsd", reduction="mean",
                            num_items_in_batch=num_items_in_batch, **call)
    if reduction == "none":
        return _elements(student_logits, teacher_logits, labels, beta, temperature)
    if reduction == "sum" or (reduction == "batchmean" and labels is not None):
        return distill_loss(student_logits, teacher_logits, "jsd", reduction=reduction, **call)
    if reduction == "batchmean":  # TRL divides by the first dimension of the logits
        count = max(student_logits.shape[0], 1)
    else:  # "mean": over the elements of the positions kept
        vocab = student_logits.shape[-1]
        count = (labels != _IGNORE).sum() * vocab if labels is not None else max(student_logits.numel(), 1)
    return distill_loss(student_logits, teacher_logits, "jsd", reduction="mean", num_items_in_batch=count, **call)


def _elements(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
              beta: float, temperature: float) -> torch.Tensor:
    """TRL's ``reduction="none"``: the JSD's elements ``[..., V]`` of the positions kept, in the logits' dtype
    (computed in float32, float64 for float64 logits)."""
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    temperature = V.temperature(temperature, dtype)
    if labels is not None:
        keep = labels != _IGNORE
        student_logits, teacher_logits = student_logits[keep], teacher_logits[keep]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lq = torch.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    lp = torch.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    p, q = lp.exp(), lq.exp()
    if beta == 0.0:
        terms = reference._xlog(p, lp, lq)
    elif beta == 1.0:
        terms = reference._xlog(q, lq, lp)
    else:
        lm = reference._log_mix(beta, lp, lq)
        terms = beta * reference._xlog(p, lp, lm) + (1.0 - beta) * reference._xlog(q, lq, lm)
    return terms.to(dtype)
