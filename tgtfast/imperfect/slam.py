"""SLaM, Student-Label Mixing (Kontonis et al., NeurIPS 2023; docs/design.md, "Imperfect teachers").

A forward loss adjustment: the student's prediction ``f(x)`` is passed through the teacher's noise model before
it meets the teacher's soft label ``y_s(x)``:

    ``mix(f; alpha, k) = alpha f + (1 - alpha) (1 - f) * top(y_s; k) / (k - 1)``

where ``top(y_s; k)`` is the 0/1 indicator of the teacher's ``k`` most probable classes, ``alpha = alpha(x)`` the
probability that the teacher's label is right and ``k = k(x)`` the size of the set where the true class lies
when it is not (both from :class:`tgtfast.imperfect.TeacherReliability`). The loss per row is the cross-entropy
``-sum_j y_s[j] log mix_j``. In the model where the teacher's label is the true one with probability ``alpha`` and
otherwise uniform over the other top-k classes, ``mix(e_y)`` is exactly the distribution of the teacher's label,
so the expected loss is minimised at the true label distribution (when ``alpha > 1 / k``).
``normalize=False`` drops the ``1 / (k - 1)``, the variant the paper's Remark B.1 reports using in its experiments.

This is eager torch over ``[N, V]`` (a few elementwise passes and one top-k); it is not a fused kernel and not on
the fused divergence hot path: meant for classification heads with small ``V`` (the demo's) or for the rows a
trainer selects.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from tgtfast import validation as V
from tgtfast.imperfect.reliability import TeacherReliability

__all__ = ["slam_loss", "slam_mix", "SLaMLoss"]

_REDUCTIONS = ("mean", "sum", "none")


def _per_row(name: str, value, rows: int, device, dtype, *, integer: bool) -> torch.Tensor:
    """A number or a ``[rows]`` tensor (or the logits' leading shape), as a ``[rows, 1]`` column."""
    if isinstance(value, torch.Tensor):
        if integer and (value.is_floating_point() or value.dtype == torch.bool):
            raise TypeError(f"{name} must be an int or an integer tensor, got {value.dtype}")
        if not integer and not value.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating tensor, got {value.dtype}")
        if value.dim() and value.numel() != rows:
            raise ValueError(f"{name} must be a number or hold one value per row ({rows}), got shape "
                             f"{tuple(value.shape)}")
        V.same_device(name, value, "student_logits", device)
        col = value.detach().reshape(-1, 1).expand(rows, 1)
    else:
        col = torch.full((rows, 1), V.integer(name, value) if integer else V.real(name, value), device=device,
                         dtype=torch.int64 if integer else torch.float64)
    return col.to(torch.int64 if integer else dtype)


def _checked(student_logits, teacher_logits, alpha, k, normalize):
    V.logits_pair(student_logits, teacher_logits)
    classes = student_logits.shape[-1]
    rows = student_logits.numel() // max(classes, 1)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    a = _per_row("alpha", alpha, rows, student_logits.device, dtype, integer=False)
    kk = _per_row("k", k, rows, student_logits.device, dtype, integer=True)
    if rows:
        if bool(torch.isnan(a).any()) or bool(((a < 0) | (a > 1)).any()):
            raise ValueError("alpha must be in [0, 1] (the probability that the teacher's label is right)")
        low = 2 if normalize else 1
        if bool(((kk < low) | (kk > classes)).any()):
            raise ValueError(f"k must be in [{low}, {classes}] (the classes in the teacher's top-k; "
                             f"{'k >= 2 with normalize=True' if normalize else 'k >= 1'}), got "
                             f"{int(kk.min())}..{int(kk.max())}")
    return a, kk, dtype


def _top_mask(teacher_probs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` boolean: the ``k[i]`` most probable classes of each row."""
    kmax = int(k.max()) if k.numel() else 1
    idx = teacher_probs.topk(kmax, dim=-1).indices
    keep = torch.arange(kmax, device=k.device).unsqueeze(0) < k
    return torch.zeros_like(teacher_probs, dtype=torch.bool).scatter_(-1, idx, keep)


def slam_mix(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: Union[float, torch.Tensor],
             k: Union[int, torch.Tensor], *, temperature: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """``log mix(f; alpha, k)`` per class, ``[..., V]`` (see the module docstring): the log of what the student's
    prediction becomes under the teacher's noise model. Differentiable in ``student_logits``."""
    log_mix, _ = _log_mix_and_target(student_logits, teacher_logits, alpha, k, temperature, normalize)
    return log_mix.reshape(student_logits.shape)


def _log_mix_and_target(student_logits, teacher_logits, alpha, k, temperature, normalize):
    a, kk, dtype = _checked(student_logits, teacher_logits, alpha, k, V.boolean("normalize", normalize))
    temperature = V.temperature(temperature, dtype)
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes).to(dtype)
    t = teacher_logits.detach().reshape(-1, classes).to(dtype)
    if bool(torch.isnan(t).any()) or bool((t == float("inf")).any()):
        raise ValueError("teacher_logits must not contain NaN or +inf")
    log_f = torch.log_softmax(s / temperature, dim=-1)
    y = torch.softmax(t / temperature, dim=-1)
    top = _top_mask(y, kk)
    c = (1 - a) / (kk - 1).clamp_min(1).to(dtype) if normalize else 1 - a  # [N, 1]
    tiny = torch.finfo(dtype).tiny
    f = log_f.exp()
    mixed = torch.log((a * f + c * (1 - f)).clamp_min(tiny))
    # Outside the top-k (or with c = 0) mix = alpha f: in log space, exact where f underflows.
    plain = torch.log(a.clamp_min(tiny)) + log_f
    return torch.where(top & (c > 0), mixed, plain), y


def slam_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: Union[float, torch.Tensor],
    k: Union[int, torch.Tensor],
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """SLaM's loss: ``-sum_j y_s[j] log mix(f; alpha, k)_j`` per row, ``f = softmax(student_logits / T)``,
    ``y_s = softmax(teacher_logits / T)`` (the teacher gets no gradient).

    Args:
        student_logits, teacher_logits: ``[N, V]`` or ``[..., V]``, the same shape.
        alpha: ``alpha(x)`` in ``[0, 1]``: a number or one per row (``TeacherReliability.accuracy``).
        k: ``k(x)``: an int or one per row (``TeacherReliability.k``), in ``[2, V]`` (``[1, V]`` with
            ``normalize=False``).
        temperature: ``T > 0`` of both softmaxes.
        normalize: divide the mixing term by ``k - 1`` (the paper's definition; ``False``: its Remark B.1 variant).
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"`` (the leading shape).

    ``alpha = 0`` outside the top-k would make ``log mix`` ``-inf``; it is computed with ``alpha`` floored at the
    dtype's smallest normal number there (a large finite loss, the gradient unchanged: ``log alpha`` is a constant).
    """
    V.choice("reduction", reduction, _REDUCTIONS)
    log_mix, y = _log_mix_and_target(student_logits, teacher_logits, alpha, k, temperature, normalize)
    rows = -torch.where(y > 0, y * log_mix, torch.zeros((), dtype=log_mix.dtype, device=log_mix.device)).sum(-1)
    if reduction == "none":
        return rows.reshape(student_logits.shape[:-1])
    return rows.sum() if reduction == "sum" else rows.mean()


class SLaMLoss(nn.Module):
    """SLaM as a module: ``SLaMLoss(reliability, temperature=1.0)`` reads ``alpha(x)`` and ``k(x)`` from the
    reliability estimate at each call, ``loss_fn(student_logits, teacher_logits)``; or pass ``alpha=`` / ``k=``
    to the call (then ``reliability`` may be None)."""

    def __init__(self, reliability: Optional[TeacherReliability] = None, *, temperature: float = 1.0,
                 normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        if reliability is not None and not isinstance(reliability, TeacherReliability):
            raise TypeError(f"reliability must be a TeacherReliability or None, got {type(reliability).__name__}")
        self.reliability = reliability
        self.temperature = V.temperature(temperature)
        self.normalize = V.boolean("normalize", normalize)
        self.reduction = V.choice("reduction", reduction, _REDUCTIONS)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                alpha: Union[float, torch.Tensor, None] = None, k: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        if (alpha is None or k is None) and self.reliability is None:
            raise ValueError("SLaMLoss without a reliability estimate needs alpha=... and k=... at the call")
        if alpha is None:
            alpha = self.reliability.accuracy(teacher_logits).to(student_logits.device)
        if k is None:
            k = self.reliability.k(teacher_logits).to(student_logits.device)
        return slam_loss(student_logits, teacher_logits, alpha, k, temperature=self.temperature,
                         normalize=self.normalize, reduction=self.reduction)
