"""``nn.Module`` distillation losses on the fused kernels: PTLoss and the baselines of the PTLoss paper."""

from __future__ import annotations

import json
import os
from typing import Optional, Union

import torch
from torch import nn

from tgtfast import validation as V
from tgtfast.losses import functional as F

__all__ = ["PTLoss", "KDLoss", "LabelSmoothedKDLoss", "FocalKDLoss"]


def _coeffs_from_json(path: Union[str, os.PathLike]):
    """The ``"coeffs"`` entry of a JSON file written by ``tgtfast coeffs`` (or ``CoefficientSearchResult.save``)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ValueError(f"coeffs: {os.fspath(path)!r} cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ValueError(f"coeffs: {os.fspath(path)!r} is not JSON ({exc})") from None
    if not isinstance(data, dict) or "coeffs" not in data:
        raise ValueError(f"coeffs: {os.fspath(path)!r} has no \"coeffs\" entry (write it with `tgtfast coeffs --out`)")
    return data["coeffs"]


def coeffs_buffer(coeffs, classes: str = "K") -> torch.Tensor:
    """The module-owned copy of PTLoss coefficients: ``[M]`` or ``[M, <classes>]`` floats (empty for ``None``)."""
    if coeffs is None:
        return torch.zeros(0)
    eta = torch.as_tensor(coeffs, dtype=torch.float32) if not isinstance(coeffs, torch.Tensor) else coeffs
    if not eta.is_floating_point():
        eta = eta.float()
    if eta.dim() not in (1, 2):
        raise ValueError(f"coeffs must have shape [M] or [M, {classes}], got {tuple(eta.shape)}")
    return eta.detach().clone()


class _DistillLoss(nn.Module):
    def __init__(self, *, temperature: float, teacher_is_logits: bool, reduction: str, ignore_index: int,
                 backend: Optional[str]) -> None:
        super().__init__()
        V.temperature(temperature)
        if reduction not in F._REDUCTIONS:
            raise ValueError(f"reduction must be one of {F._REDUCTIONS}, got {reduction!r}")
        self.temperature = float(temperature)
        self.teacher_is_logits = teacher_is_logits
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_is_logits={self.teacher_is_logits}, "
                f"reduction={self.reduction!r}")


class PTLoss(_DistillLoss):
    """PTLoss as a module: ``loss = PTLoss(coeffs)(student_logits, teacher, target=None)``.

    ``coeffs`` (``[M]`` or ``[M, K]``; ``None`` for plain KL) is a buffer: it moves with ``.to(device)`` and is
    saved in the ``state_dict``. It may also be the path of a JSON file written by ``tgtfast coeffs``
    (``{"coeffs": [...]}``). Other arguments as in :func:`tgtfast.ptloss`.
    """

    coeffs: torch.Tensor

    def __init__(
        self,
        coeffs: Union[torch.Tensor, F.CoeffsLike, str, os.PathLike, None] = None,
        *,
        temperature: float = 1.0,
        teacher_is_logits: bool = True,
        label_smoothing: float = 0.0,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(temperature=temperature, teacher_is_logits=teacher_is_logits, reduction=reduction,
                         ignore_index=ignore_index, backend=backend)
        V.real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.label_smoothing = float(label_smoothing)
        if isinstance(coeffs, (str, os.PathLike)):
            coeffs = _coeffs_from_json(coeffs)
        self.register_buffer("coeffs", coeffs_buffer(coeffs, "K"))

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor,
                target: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.ptloss(
            student_logits, teacher, self.coeffs if self.coeffs.numel() else None, temperature=self.temperature,
            teacher_is_logits=self.teacher_is_logits, label_smoothing=self.label_smoothing,
            reduction=self.reduction, ignore_index=self.ignore_index, target=target, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"orders={self.coeffs.shape[0] if self.coeffs.numel() else 0}, " + super().extra_repr()


class KDLoss(PTLoss):
    """Hinton-style distillation ``KL(softmax(t / T) || softmax(s / T))`` on the fused kernels.

    Not multiplied by ``T**2`` (see :func:`tgtfast.ptloss`)."""

    def __init__(self, *, temperature: float = 1.0, teacher_is_logits: bool = True, reduction: str = "batchmean",
                 ignore_index: int = -100, backend: Optional[str] = None) -> None:
        super().__init__(None, temperature=temperature, teacher_is_logits=teacher_is_logits, reduction=reduction,
                         ignore_index=ignore_index, backend=backend)


class LabelSmoothedKDLoss(PTLoss):
    """KD against the smoothed teacher ``(1 - label_smoothing) p + label_smoothing / K`` (default 0.1)."""

    def __init__(self, label_smoothing: float = 0.1, *, temperature: float = 1.0, teacher_is_logits: bool = True,
                 reduction: str = "batchmean", ignore_index: int = -100, backend: Optional[str] = None) -> None:
        super().__init__(None, temperature=temperature, teacher_is_logits=teacher_is_logits,
                         label_smoothing=label_smoothing, reduction=reduction, ignore_index=ignore_index,
                         backend=backend)


class FocalKDLoss(_DistillLoss):
    """Focal distillation ``sum_j p_j (1 - q_j)^gamma (-log q_j)`` (see :func:`tgtfast.focal_kd_loss`)."""

    def __init__(self, gamma: float = 2.0, *, temperature: float = 1.0, teacher_is_logits: bool = True,
                 reduction: str = "batchmean", ignore_index: int = -100) -> None:
        super().__init__(temperature=temperature, teacher_is_logits=teacher_is_logits, reduction=reduction,
                         ignore_index=ignore_index, backend=None)
        self.gamma = V.real("gamma", gamma, low=0.0)

    def forward(self, student_logits: torch.Tensor, teacher: torch.Tensor,
                target: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.focal_kd_loss(student_logits, teacher, gamma=self.gamma, temperature=self.temperature,
                               teacher_is_logits=self.teacher_is_logits, reduction=self.reduction,
                               ignore_index=self.ignore_index, target=target)
