"""Argument checks of the Proxy Teacher's public functions (shared checks from :mod:`tgtfast.validation`, plus
the two layouts only this op has: labels in ``[0, K)`` and the coefficient shapes ``[M]``, ``[M, K]``,
``[C, M]``, ``[C, M, K]``)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from tgtfast import validation

F64 = torch.float64
SIMPLEX_TOL = 1e-4


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """A tensor, or an array-like of numbers turned into one."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or array-like of numbers: {exc}") from None


def probs(p: Any, name: str) -> torch.Tensor:
    """A ``[N, K]`` probability tensor (any float dtype, grad kept): finite, non-negative, rows summing to 1
    within 1e-4."""
    p = as_tensor(p, name)
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of probabilities, got {p.dtype}")
    if p.dim() != 2:
        raise ValueError(f"{name} must have shape [N, K], got {tuple(p.shape)}")
    if p.shape[1] < 1:
        raise ValueError(f"{name} must have at least one class, got shape {tuple(p.shape)}")
    validation.probabilities(name, p, tol=SIMPLEX_TOL, what=" (rows of probabilities on the simplex)")
    return p


def logits(t: torch.Tensor, name: str) -> torch.Tensor:
    """A finite ``[N, K]`` floating tensor."""
    validation.tensor(name, t, floating=True)
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [N, K], got {tuple(t.shape)}")
    if t.numel() and not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} logits must be finite")
    return t


def labels(value: Any, n: int, k: int, name: str = "labels") -> torch.Tensor:
    """``[N]`` integer class indices in ``[0, K)``, returned as int64."""
    value = as_tensor(value, name)
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must be an integer tensor of class indices, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(value.shape)}")
    if value.shape[0] != n:
        raise ValueError(f"{name} has N = {value.shape[0]} rows but the teacher has N = {n}")
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= k):
        raise ValueError(
            f"{name} must be class indices in [0, {k}); found values in [{int(value.min())}, {int(value.max())}]"
        )
    return value.long()


def coeffs(value: Any, k: int, batched: Optional[bool]) -> Tuple[torch.Tensor, bool]:
    """-> (eta ``[C, M, K]`` (grad kept, any float dtype), whether the input had a candidate dimension)."""
    if value is None:
        value = torch.zeros(0)
    eta = as_tensor(value, "coeffs")
    if not (eta.is_floating_point() or eta.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"coeffs must be a real tensor, got {eta.dtype}")
    if not eta.is_floating_point():
        eta = eta.to(F64)
    d = eta.dim()
    if d == 3 or (d == 2 and batched):
        is_batched = True
    elif d == 2 and batched is None:
        is_batched = eta.shape[1] != k  # [M, K] when the last dim is K (pass batched=True for [C, M] with M == K)
    elif d in (1, 2):
        is_batched = False
    else:
        raise ValueError(f"coeffs must have shape [M], [M, K], [C, M] or [C, M, K], got {tuple(eta.shape)}")
    if d == 1 and batched:
        raise ValueError(f"coeffs of shape {tuple(eta.shape)} has no candidate dimension but batched=True")
    if d == 3 and batched is False:
        raise ValueError(f"coeffs of shape {tuple(eta.shape)} is a candidate batch but batched=False")
    if is_batched:
        if d == 2:
            eta = eta[:, :, None].expand(-1, -1, k)
        elif eta.shape[2] != k:
            raise ValueError(f"coeffs has shape {tuple(eta.shape)}: last dimension must be K = {k}")
    else:
        if d == 2 and eta.shape[1] != k:
            raise ValueError(f"coeffs has shape {tuple(eta.shape)}: [M, K] needs K = {k}")
        eta = (eta[:, None].expand(-1, k) if d == 1 else eta)[None]
    if eta.numel() and not bool(torch.isfinite(eta.detach()).all()):
        raise ValueError("coeffs must be finite")
    return eta, is_batched
