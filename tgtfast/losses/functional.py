"""Functional distillation losses: validation, reshaping, the backend call, and the reduction."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.dispatch import Backend, select
from tgtfast.ops import ptloss as _ptloss_op
from tgtfast.ops._autodiff import check_no_tangent

__all__ = ["ptloss", "kd_loss", "focal_kd_loss"]

_REDUCTIONS = ("none", "sum", "mean", "batchmean")
CoeffsLike = Union[torch.Tensor, Sequence[float], Sequence[Sequence[float]], None]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_logits_pair(student_logits: object, teacher: object) -> None:
    """Student logits ``[..., K]`` (at least 2-D, K > 0) and a teacher of the same shape and device, both floating."""
    V.tensor("student_logits", student_logits, floating=True)
    V.tensor("teacher", teacher, floating=True)
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [N, K] or [B, L, K], got shape {tuple(student_logits.shape)}")
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher shape {tuple(teacher.shape)} does not match student_logits shape {tuple(student_logits.shape)}"
        )
    V.same_device("teacher", teacher, "student_logits", student_logits.device)
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits has an empty class dimension (K = 0)")


def _as_coeffs(coeffs: CoeffsLike, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Validate `coeffs` ([M] or [M, K]) and return it contiguous in the kernels' accumulation dtype."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if coeffs is None:
        return torch.zeros((0,), dtype=acc, device=device)
    if not isinstance(coeffs, torch.Tensor):
        try:
            coeffs = torch.as_tensor(coeffs, dtype=acc)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"coeffs must be a tensor or a (nested) sequence of numbers: {exc}") from None
        coeffs = coeffs.to(device)
    if not coeffs.is_floating_point():  # an integer tensor here is most likely class labels given positionally
        raise TypeError(f"coeffs must be a floating tensor, got {coeffs.dtype} (class labels go in target=...)")
    if coeffs.device != device:
        raise ValueError(f"coeffs is on {coeffs.device} but student_logits is on {device}")
    if coeffs.dim() not in (1, 2):
        raise ValueError(f"coeffs must have shape [M] or [M, K], got {tuple(coeffs.shape)}")
    if coeffs.dim() == 2 and coeffs.shape[1] != k:
        raise ValueError(f"coeffs has K = {coeffs.shape[1]} classes but the logits have K = {k}")
    if not _is_compiling() and coeffs.numel() and not bool(torch.isfinite(coeffs).all()):
        raise ValueError("coeffs must be finite")
    return coeffs.detach().to(acc).contiguous()


def _check_teacher_probs(teacher: torch.Tensor, valid: Optional[torch.Tensor]) -> None:
    """Rows of probabilities that are not ignored: finite, non-negative, summing to 1 (ignored rows may hold
    anything, padding included)."""
    V.probabilities("teacher", teacher, what=" probabilities (teacher_is_logits=False)", rows=valid)


def ptloss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    coeffs: CoeffsLike = None,
    *,
    temperature: float = 1.0,
    teacher_is_logits: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""PTLoss, the perturbed KL distillation loss (Zhang et al., "Do not blindly imitate the teacher").

    Per row, with ``q = softmax(student_logits / T)`` and ``p = softmax(teacher / T)`` (or ``teacher`` itself
    when ``teacher_is_logits=False``), optionally smoothed ``p <- (1 - label_smoothing) p + label_smoothing / K``:

    .. math:: L = \sum_j p_j (\log p_j - \log q_j) + \sum_j p_j \sum_{m=1}^{M} \eta_{m,j} (1 - q_j)^m

    The first sum is ``KL(p || q)``: ``coeffs=None`` is plain knowledge distillation. The loss and both
    gradients are computed in one fused pass by the selected backend.

    Args:
        student_logits: ``[N, K]`` or ``[B, L, K]`` (any leading shape) floating logits of the student.
        teacher: same shape; teacher logits, or probabilities when ``teacher_is_logits=False``. It gets a
            gradient when it requires one (gradient-based Teacher Guided Training backpropagates through it).
        coeffs: perturbation coefficients ``eta``: ``[M]`` (shared by all classes) or ``[M, K]`` (per class),
            a tensor or nested sequence; ``None`` for plain KL. For ``K = 2`` the paper's binary
            ``(epsilon_m, gamma_m)`` is ``coeffs[m - 1] = (epsilon_m, gamma_m)``.
        temperature: ``T > 0``, divides both logits. The loss is **not** multiplied by ``T**2``; multiply by
            it yourself for Hinton's convention (gradients that keep their scale as ``T`` changes).
        teacher_is_logits: whether ``teacher`` holds logits (default) or probabilities (validated: non-negative,
            rows summing to 1).
        label_smoothing: ``delta`` in ``[0, 1)``, mixes the teacher distribution with the uniform one.
        reduction: ``"none"`` (per-row losses, shape of the leading dims, ignored rows are 0), ``"sum"``, or
            ``"batchmean"`` / ``"mean"`` (both: the sum divided by the number of rows that are not ignored,
            0 when all are ignored). For ``[B, L, K]`` inputs this is the per-token mean, unlike
            ``torch.nn.functional.kl_div(..., reduction="batchmean")`` which divides by ``B``.
        ignore_index: rows whose ``target`` equals it are left out (loss 0, no gradient).
        target: optional integer tensor of the leading shape (``[N]`` or ``[B, L]``) used only for masking.
        backend: ``None`` / ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"``
            (see :func:`tgtfast.backends`).

    Returns:
        The reduced loss (0-dim, float32; float64 for float64 inputs), or per-row losses for ``"none"``.

    Non-finite logits behave alike on every backend: a teacher logit of ``-inf`` is a class the teacher gives no
    mass (the row stays finite), as is a student ``-inf`` where the teacher gives no mass; NaN or ``+inf`` in a
    row, or a student row of all ``-inf``, make that row's loss and gradients NaN (they are not masked). Rows that
    are ignored stay 0 whatever their values.
    """
    _check_logits_pair(student_logits, teacher)
    k = student_logits.shape[-1]
    dtype = torch.promote_types(student_logits.dtype, teacher.dtype)
    temperature = V.temperature(temperature, dtype)
    label_smoothing = V.real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    V.choice("reduction", reduction, _REDUCTIONS)
    V.boolean("teacher_is_logits", teacher_is_logits)
    lead = student_logits.shape[:-1]
    valid = None
    if target is not None:
        V.target(target, lead, "the logits'", "student_logits", student_logits.device)
        valid = (target != ignore_index).reshape(-1)

    s = student_logits.to(dtype).reshape(-1, k)
    if not teacher_is_logits:  # judged in the dtype they were given in (bf16 rows sum to 1 only to bf16 accuracy)
        _check_teacher_probs(teacher.reshape(-1, k), valid)
    t = teacher.to(dtype).reshape(-1, k)
    eta = _as_coeffs(coeffs, k, s.device, dtype)

    chosen = select(backend, s.device, dtype, op="ptloss", orders=eta.shape[0] if eta.numel() else 0)
    if chosen is Backend.REFERENCE:
        if valid is not None:  # ignored rows must not leak NaN/inf into the gradient
            s, t = reference.mask_rows(s, t, valid, teacher_is_logits)
        s, t = s.to(eta.dtype), t.to(eta.dtype)  # half precision accumulates in float32, as the kernels do
        rows = reference.ptloss_rows(
            s, t, eta, temperature=temperature, teacher_is_logits=teacher_is_logits, label_smoothing=label_smoothing
        )
        rows = rows.to(eta.dtype)
        if eta.numel() == 0:  # plain KL is >= 0 in value, as on the fused backends below
            rows = _clamp_value_min0(rows)
        out = reference.reduce_rows(rows, valid, reduction)
    else:
        check_no_tangent("tgtfast.ptloss", student_logits, teacher)
        grad_on = torch.is_grad_enabled()
        weight = _row_weight(reduction, s.shape[0], valid)  # None: the row count stays on the device
        rows, _, _ = _ptloss_op.impl(chosen)(
            s.contiguous(),
            t.contiguous(),
            eta,
            None if valid is None else valid.contiguous(),
            temperature,
            label_smoothing,
            teacher_is_logits,
            grad_on and s.requires_grad,
            grad_on and t.requires_grad,
            1.0 if weight is None else weight,
        )
        if eta.numel() == 0:  # plain KL is >= 0; float32 cancellation at low temperatures can dip below it
            rows = _clamp_value_min0(rows)
        # The kernels already zero ignored rows, so no masking here (it would also defeat the
        # copy-free backward of the fused op, see tgtfast/ops/ptloss.py).
        out = reference.reduce_rows(rows, None, "sum" if reduction in ("mean", "batchmean") else reduction)
        if reduction in ("mean", "batchmean"):
            out = out / valid.sum().clamp(min=1).to(out.dtype) if weight is None else out * weight
    return out.reshape(lead) if reduction == "none" else out


def _clamp_value_min0(rows: torch.Tensor) -> torch.Tensor:
    """``max(rows, 0)`` in value, with the gradient of ``rows`` unchanged (a constant correction): the fused op's
    incoming gradient stays the reduction's own, so its backward stays copy-free."""
    with torch.no_grad():  # -r where r < 0 and finite; 0 elsewhere (NaN and -inf rows stay as they are)
        fix = rows.detach().neg().clamp_min(0).nan_to_num(nan=0.0, posinf=0.0)
    return rows + fix


def _row_weight(reduction: str, rows: int, valid: Optional[torch.Tensor]) -> Optional[float]:
    """The gradient weight a reduction gives each row, or None when only the device knows it."""
    if reduction not in ("mean", "batchmean"):
        return 1.0
    if valid is None:
        return 1.0 / max(rows, 1)
    if valid.device.type == "cpu" and not _is_compiling():
        return 1.0 / max(int(valid.sum()), 1)
    return None


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_is_logits: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Knowledge distillation ``KL(p || softmax(s / T))`` (optionally label-smoothed): :func:`ptloss` with no
    perturbation, on the same fused kernels. Same arguments and conventions as :func:`ptloss`."""
    return ptloss(
        student_logits, teacher, None, temperature=temperature, teacher_is_logits=teacher_is_logits,
        label_smoothing=label_smoothing, reduction=reduction, ignore_index=ignore_index, target=target,
        backend=backend,
    )


def focal_kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    *,
    gamma: float = 2.0,
    temperature: float = 1.0,
    teacher_is_logits: bool = True,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Focal distillation ``sum_j p_j (1 - q_j)^gamma (-log q_j)`` (Lin et al.'s focal loss with soft targets),
    a baseline of the PTLoss paper. Not a polynomial in ``1 - q``, so it runs as eager PyTorch (it composes
    with ``torch.compile``). Arguments as in :func:`ptloss`; ``gamma >= 0``."""
    gamma = V.real("gamma", gamma, low=0.0)
    _check_logits_pair(student_logits, teacher)
    temperature = V.temperature(temperature, torch.promote_types(student_logits.dtype, teacher.dtype))
    V.choice("reduction", reduction, _REDUCTIONS)
    V.boolean("teacher_is_logits", teacher_is_logits)
    valid = None
    if target is not None:
        V.target(target, student_logits.shape[:-1], "the logits'", "student_logits", student_logits.device)
        valid = target != ignore_index
    s, t = student_logits.float(), teacher.float()
    if not teacher_is_logits:
        _check_teacher_probs(t.reshape(-1, t.shape[-1]), None if valid is None else valid.reshape(-1))
    if valid is not None:  # ignored rows (padding may hold NaN/inf) must not reach the gradient
        s, t = reference.mask_rows(s, t, valid, teacher_is_logits)
    log_q = torch.log_softmax(s / temperature, -1)
    p = torch.softmax(t / temperature, -1) if teacher_is_logits else t
    rows = (p * (-torch.expm1(log_q)).pow(gamma) * (-log_q)).sum(-1)
    return reference.reduce_rows(rows, valid, reduction)
