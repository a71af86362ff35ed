"""Weighted distillation with unlabeled examples (Iliopoulos et al., NeurIPS 2022; docs/design.md, "Imperfect
teachers").

Each unlabelled example's distillation loss is multiplied by a debiasing weight computed from the teacher's
reliability (:class:`tgtfast.imperfect.TeacherReliability`), with no hyper-parameter: ``w(x) = alpha(x)``, the
estimated probability that the teacher's label at ``x`` is the true one. For a hard label ``y_t(x)``,
``E[1{y_t(x) = y(x)} | x] = alpha(x)``, so ``w(x) l(f(x), y_t(x))`` is an unbiased estimate of the loss on the
examples the teacher labels correctly, the part of the true risk that the teacher's label carries; unweighted
distillation gives the wrong labels the full weight instead. The loss goes through
:func:`tgtfast.distill_loss`'s ``weight`` argument (one fused pass, any divergence and backend).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tgtfast import validation as V
from tgtfast.imperfect.reliability import TeacherReliability
from tgtfast.losses import divergence as D
from tgtfast.losses.divergence_modules import DistillLoss

__all__ = ["debiasing_weights", "weighted_distill_loss", "WeightedDistillLoss"]


def _reliability(reliability) -> TeacherReliability:
    if not isinstance(reliability, TeacherReliability):
        raise TypeError(f"reliability must be a TeacherReliability (TeacherReliability.fit(...)), got "
                        f"{type(reliability).__name__}")
    return reliability


def debiasing_weights(teacher_logits: torch.Tensor, reliability: TeacherReliability, *,
                      normalize: bool = False) -> torch.Tensor:
    """Per-example weights ``w(x) = alpha(x)`` from the teacher's logits (the logits' leading shape, float32, no
    gradient). ``normalize=True`` divides by their mean over the rows given (a mean weight of 1 keeps the loss's
    scale, hence the learning rate's meaning; the relative weights are the same)."""
    w = _reliability(reliability).accuracy(teacher_logits)
    if V.boolean("normalize", normalize):
        w = w / w.mean().clamp_min(torch.finfo(w.dtype).tiny)
    return w


def weighted_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          reliability: TeacherReliability, divergence: str = "forward_kl", *,
                          normalize: bool = False, **kwargs) -> torch.Tensor:
    """:func:`tgtfast.distill_loss` with each row weighted by :func:`debiasing_weights` of the teacher's logits;
    ``kwargs`` are distill_loss's (``temperature``, ``target``, ``reduction``, ``num_items_in_batch``, ...)."""
    if "weight" in kwargs:
        raise TypeError("weighted_distill_loss computes the weights itself; call tgtfast.distill_loss(weight=...) "
                        "for weights of your own")
    w = debiasing_weights(teacher_logits, reliability, normalize=normalize)
    return D.distill_loss(student_logits, teacher_logits, divergence, weight=w.to(student_logits.device), **kwargs)


class WeightedDistillLoss(nn.Module):
    """Weighted distillation as a module: ``WeightedDistillLoss(reliability, "forward_kl", temperature=2.0)``,
    called as ``loss_fn(student_logits, teacher_logits, target=None, *, num_items_in_batch=None)``. The
    reliability estimate is held, not a parameter (fit it once on the labelled split)."""

    def __init__(self, reliability: TeacherReliability, divergence: str = "forward_kl", *,
                 normalize: bool = False, **kwargs) -> None:
        super().__init__()
        self.reliability = _reliability(reliability)
        self.normalize = V.boolean("normalize", normalize)
        self.loss = DistillLoss(divergence, **kwargs)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, *, num_items_in_batch=None) -> torch.Tensor:
        w = debiasing_weights(teacher_logits, self.reliability, normalize=self.normalize)
        return self.loss(student_logits, teacher_logits, target, num_items_in_batch=num_items_in_batch,
                         weight=w.to(student_logits.device))

