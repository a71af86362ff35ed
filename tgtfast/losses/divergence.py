"""The divergence menu of distillation, fused: :func:`distill_loss` from logits (docs/design.md, "Divergences").

This module holds what every entry point of the menu shares: the divergence names and their parameters
(:func:`resolve`), the logit transforms a model applies before its softmax (scale, soft-capping), the vocabulary
size check, and the reduction with a caller-given token count. The backend call goes through
:mod:`tgtfast.ops.divergence`; the modules are in :mod:`tgtfast.losses.divergence_modules`, the form from hidden
states in :mod:`tgtfast.losses.fused_linear`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.dispatch import Backend, select
from tgtfast.losses.sparse import SparseTeacher, sparse_rows
from tgtfast.ops import divergence as _op
from tgtfast.ops._autodiff import check_no_double_backward, check_no_tangent
from tgtfast.ops.ptloss import row_factor

__all__ = ["distill_loss", "DIVERGENCES", "resolve", "Divergence"]

DIVERGENCES = reference.DIVERGENCES
_REDUCTIONS = ("none", "sum", "mean", "batchmean")
# divergence -> its parameters in the kernels' order (param_a, param_b) and their defaults (None: required)
_PARAMS = {
    "forward_kl": (),
    "reverse_kl": (),
    "jsd": (("beta", 0.5),),  # TRL's GKD default
    "skew_kl": (("alpha", 0.1),),  # DistiLLM's default
    "skew_reverse_kl": (("alpha", 0.1),),
    "tvd": (),
    "symmetric_kl": (("lam", 0.5),),  # the weight of reverse KL (torchtune's sym_kd_ratio = 1 - lam weights forward KL)
    "ab_divergence": (("alpha", None), ("beta", None)),
    "taid": (("t", None),),
}
_UNIT = {("jsd", "beta"), ("skew_kl", "alpha"), ("skew_reverse_kl", "alpha"), ("symmetric_kl", "lam"), ("taid", "t")}
Pair = Union[float, Tuple[float, float], None]


class Divergence(NamedTuple):
    """A resolved divergence: its name, kernel code and parameters in the kernels' order."""

    name: str
    code: int
    param_a: float
    param_b: float


def resolve(divergence: str, **params: Optional[float]) -> Divergence:
    """Check `divergence` and its parameters (``beta``, ``alpha``, ``lam``, ``t``; ``None`` = not given) and return
    them in the kernels' order. A parameter of another divergence is an error, as is a missing required one. JSD's
    endpoints ``beta = 0`` / ``1`` become forward / reverse KL, as TRL and Liger define them."""
    if not isinstance(divergence, str) or divergence not in _PARAMS:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    own = dict(_PARAMS[divergence])
    for name, value in params.items():
        if value is not None and name not in own:
            takes = ", ".join(own) or "no parameters"
            raise ValueError(f"{name}={value!r} is not a parameter of divergence {divergence!r} (it takes {takes})")
    values = []
    for name, default in _PARAMS[divergence]:
        value = params.get(name)
        if value is None:
            if default is None:
                raise ValueError(f"divergence {divergence!r} needs {name}=...")
            value = default
        if (divergence, name) in _UNIT:
            values.append(V.real(name, value, low=0.0, high=1.0, high_inclusive=True))
        else:
            values.append(V.real(name, value))
    values += [0.0] * (2 - len(values))
    name = divergence
    if divergence == "jsd" and values[0] in (0.0, 1.0):
        name, values = ("forward_kl" if values[0] == 0.0 else "reverse_kl"), [0.0, 0.0]
    return Divergence(name, _op.CODES[name], values[0], values[1])


def _pair(name: str, value: Pair, low: float = 0.0) -> Tuple[Optional[float], Optional[float]]:
    """A number for both models or a ``(student, teacher)`` pair; each > low, or None."""
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a (student, teacher) pair, got {value!r}")
        return tuple(None if v is None else V.real(name, v, low=low, low_inclusive=False) for v in value)
    v = V.real(name, value, low=low, low_inclusive=False)
    return v, v


def model_logits(x: torch.Tensor, scale: Optional[float], softcap: Optional[float]) -> torch.Tensor:
    """The logits a model's softmax sees: ``x * scale`` (Cohere's ``logit_scale``), then ``cap * tanh(x / cap)``
    (Gemma's ``final_logit_softcapping``). Out of place; returns `x` itself when neither is set."""
    if scale is not None and scale != 1.0:
        x = x * scale
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return x


def match_vocab(student: torch.Tensor, teacher: torch.Tensor, vocab_mismatch: Optional[str],
                what: str = "logits") -> Tuple[torch.Tensor, torch.Tensor]:
    """Make the last dimensions agree: ``"slice"`` keeps the first ``min(Vs, Vt)`` columns of both, ``"pad"`` pads
    the smaller with ``-inf`` logits (classes it gives no probability); ``None`` requires equal sizes."""
    vs, vt = student.shape[-1], teacher.shape[-1]
    if vocab_mismatch is not None:
        V.choice("vocab_mismatch", vocab_mismatch, ("slice", "pad"))
    if vs == vt:
        return student, teacher
    if vocab_mismatch is None:
        raise ValueError(
            f"the student {what} have {vs} classes but the teacher's have {vt}: pass vocab_mismatch='slice' to keep "
            f"the first {min(vs, vt)} of both, or 'pad' to give the smaller -inf logits up to {max(vs, vt)}"
        )
    if vocab_mismatch == "slice":
        v = min(vs, vt)
        return student[..., :v], teacher[..., :v]
    pad = lambda x, v: torch.nn.functional.pad(x, (0, v - x.shape[-1]), value=-math.inf)  # noqa: E731
    v = max(vs, vt)
    return pad(student, v), pad(teacher, v)


def check_reduction(reduction: str, num_items_in_batch) -> None:
    V.choice("reduction", reduction, _REDUCTIONS)
    if num_items_in_batch is None:
        return
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"num_items_in_batch replaces the count of a mean: it needs reduction='mean' or "
                         f"'batchmean', got {reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
    else:
        V.real("num_items_in_batch", num_items_in_batch, low=0.0, low_inclusive=False)


def row_weight(reduction: str, rows: int, valid: Optional[torch.Tensor], num_items_in_batch) -> Optional[float]:
    """The weight a reduction gives each row, or None when only the device knows it (a count on the GPU)."""
    if reduction not in ("mean", "batchmean"):
        return 1.0
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.device.type != "cpu" or V.is_compiling():
                return None
            num_items_in_batch = float(num_items_in_batch)
        return 1.0 / max(float(num_items_in_batch), 1e-30)
    if valid is None:
        return 1.0 / max(rows, 1)
    if valid.device.type == "cpu" and not V.is_compiling():
        return 1.0 / max(int(valid.sum()), 1)
    return None


def reduce(rows: torch.Tensor, reduction: str, weight: Optional[float], valid: Optional[torch.Tensor],
           num_items_in_batch, multiplier: float = 1.0) -> torch.Tensor:
    """Reduce rows the kernels already zeroed where ignored. ``weight`` as :func:`row_weight`; ``multiplier``
    (``T**2`` when asked) is applied last."""
    if reduction == "none":
        return rows * multiplier if multiplier != 1.0 else rows
    total = rows.sum()
    if weight is not None:
        return total * (weight * multiplier)
    count = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    count = torch.as_tensor(count, device=rows.device).to(rows.dtype).clamp(min=1e-30 if num_items_in_batch is not None else 1)
    return total / count * multiplier if multiplier != 1.0 else total / count


def clamp_value_min0(rows: torch.Tensor) -> torch.Tensor:
    """``max(rows, 0)`` in value with the gradient of ``rows`` unchanged (every divergence is >= 0; float32
    cancellation can dip below): the op's incoming gradient stays the reduction's, its backward stays copy-free."""
    with torch.no_grad():
        fix = rows.detach().neg().clamp_min(0).nan_to_num(nan=0.0, posinf=0.0)
    return rows + fix


def row_weights(weight: Optional[torch.Tensor], lead: torch.Size, device: torch.device) -> Optional[torch.Tensor]:
    """Check a per-row loss ``weight`` (the leading shape ``lead`` of the logits, or those rows flattened) and
    return it flat ``[N]``; None stays None. Finite and non-negative (checked on the host; skipped while
    torch.compile traces)."""
    if weight is None:
        return None
    V.tensor("weight", weight, floating=True)
    rows = math.prod(lead)
    if weight.shape != lead and tuple(weight.shape) != (rows,):
        raise ValueError(f"weight must have the logits' leading shape {tuple(lead)} (or be flat [{rows}]), got "
                         f"shape {tuple(weight.shape)}")
    V.same_device("weight", weight, "student_logits", device)
    if not V.is_compiling() and weight.numel():
        w = weight.detach()
        if bool(torch.isnan(w).any()):
            raise ValueError("weight must not contain NaN")
        if bool((w < 0).any()):
            raise ValueError(f"weight must be non-negative, found {float(w.min()):.6g}")
        if bool(torch.isinf(w).any()):
            raise ValueError("weight must be finite (found inf)")
    return weight.reshape(rows)


def apply_row_weights(rows: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-row losses times their weights (ignored rows are already 0 and stay 0), through autograd."""
    return rows if weight is None else rows * weight.to(rows.dtype)


class _WeightedFused(torch.autograd.Function):
    """A fused divergence op whose per-row losses are weighted: the gradients it computes in its forward pass
    (for ``grad_scale``) are multiplied by the weight column in place, once, so that the backward of a reduction
    hands them on untouched, as it does unweighted (no second ``[N, V]`` tensor; docs/design.md)."""

    @staticmethod
    def forward(ctx, s, tch, w, run, need_s, need_t, grad_scale):
        rows, grad_s, grad_t = run()
        col = w.detach().unsqueeze(1)
        for need, grad in ((need_s, grad_s), (need_t, grad_t)):
            if need:
                grad.mul_(col.to(grad.dtype))
        rows = clamp_value_min0(rows)
        ctx.needs, ctx.grad_scale = (need_s, need_t), grad_scale
        ctx.save_for_backward(grad_s, grad_t, rows if w.requires_grad else None)
        ctx.set_materialize_grads(False)
        return rows * w.detach().to(rows.dtype)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return (None,) * 7
        check_no_double_backward("tgtfast.distill_loss")
        grad_s, grad_t, rows = ctx.saved_tensors
        factor = row_factor(g, ctx.grad_scale)
        out = [None if not need else grad if factor is None else grad * factor.to(grad.dtype)
               for need, grad in zip(ctx.needs, (grad_s, grad_t))]
        grad_w = None if rows is None else g * rows
        return out[0], out[1], grad_w, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    *,
    beta: Optional[float] = None,
    alpha: Optional[float] = None,
    lam: Optional[float] = None,
    t: Optional[float] = None,
    temperature: float = 1.0,
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    num_items_in_batch: Union[int, float, torch.Tensor, None] = None,
    t2_scaling: bool = False,
    logit_scale: Pair = None,
    logit_softcap: Pair = None,
    vocab_mismatch: Optional[str] = None,
    backend: Optional[str] = None,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""A distillation divergence between teacher and student logits, loss and gradients in one fused pass.

    Per row (token), with ``q = softmax(student_logits / T)`` and ``p = softmax(teacher_logits / T)``:

    ==================  ==================  ===============================================================
    ``divergence``      parameters          per row
    ==================  ==================  ===============================================================
    ``forward_kl``                          ``KL(p || q)`` (:func:`tgtfast.kd_loss`)
    ``reverse_kl``                          ``KL(q || p)``
    ``jsd``             ``beta=0.5``        ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``;
                                            ``beta = 0`` is forward KL and ``1`` reverse KL (TRL, Liger)
    ``skew_kl``         ``alpha=0.1``       ``KL(p || alpha p + (1 - alpha) q)`` (DistiLLM)
    ``skew_reverse_kl`` ``alpha=0.1``       ``KL(q || (1 - alpha) p + alpha q)`` (DistiLLM)
    ``tvd``                                 ``sum |p - q| / 2`` (subgradient 0 where ``p_j = q_j``)
    ``symmetric_kl``    ``lam=0.5``         ``(1 - lam) KL(p || q) + lam KL(q || p)`` (torchtune)
    ``ab_divergence``   ``alpha``, ``beta`` the alpha-beta divergence (ABKD), with its limit forms
    ``taid``            ``t``               ``KL(r || q)``, ``r = softmax((1 - t) stopgrad(s) / T + t z_t / T)``
                                            (TAID; :class:`tgtfast.TAIDSchedule` moves ``t``)
    ==================  ==================  ===============================================================

    The math of each, with its gradients and the AB-divergence's limit forms, is in docs/design.md
    ("Divergences"); :func:`tgtfast.reference.divergence_rows` is the specification.

    Args:
        student_logits: ``[N, V]`` or ``[B, L, V]`` floating logits (float32, bfloat16, float16, float64).
        teacher_logits: the teacher's logits, same leading shape; it gets a gradient when it requires one. Or a
            :class:`tgtfast.SparseTeacher` (cached top-k log-probabilities): the divergence is then taken on the
            teacher's kept classes plus one tail bucket (docs/design.md, "Sparse teachers").
        divergence: one of the names above.
        beta, alpha, lam, t: the divergence's parameters (keyword only); a parameter the divergence does not take
            is an error. ``beta``, ``alpha``, ``lam``, ``t`` are in ``[0, 1]`` except the AB-divergence's ``alpha``
            and ``beta``, any finite reals.
        temperature: ``T > 0`` dividing both logits (after any logit scale and soft-capping).
        target: optional integer tensor of the leading shape; rows equal to ``ignore_index`` are left out (loss 0,
            gradient 0, whatever their logits hold).
        ignore_index: the label of ignored rows.
        reduction: ``"batchmean"`` / ``"mean"`` (the sum over rows not ignored divided by their number: a
            per-token mean, 0 if every row is ignored), ``"sum"``, or ``"none"`` (per-row losses in the leading
            shape).
        num_items_in_batch: with a mean, divide by this count instead of the rows of this call: pass the number of
            loss tokens of the whole optimiser step (all micro-batches and processes) and gradient accumulation
            over micro-batches equals one big batch (Hugging Face's ``num_items_in_batch``).
        t2_scaling: multiply the loss by ``T**2`` (Hinton's convention, gradients whose scale does not change
            with ``T``). Off by default: the loss is the divergence itself.
        logit_scale: a number, or a ``(student, teacher)`` pair (``None`` in a pair: that model has none),
            multiplying the logits as a model with a logit scale does before its softmax.
        logit_softcap: the models' final logit soft-capping ``cap * tanh(x / cap)`` (after the scale), as Gemma
            applies it; a number or a ``(student, teacher)`` pair. Computed with torch ops before the fused
            kernel (one extra pass over the logits).
        vocab_mismatch: when the student and teacher have different vocabulary sizes (e.g. 151936 vs 152064):
            ``"slice"`` keeps the first ``min`` columns of both (the extra columns are padding of the larger
            embedding), ``"pad"`` gives the smaller one ``-inf`` logits (no probability) up to the larger size.
            ``None`` (default): different sizes are an error naming both.
        backend: ``None`` / ``"auto"``, ``"cpp"``, ``"triton"``, ``"cuda"`` or ``"reference"`` (see
            :func:`tgtfast.backends`). Only ``"reference"`` supports forward-mode AD and double backward; the fused
            backends raise a clear error for them.
        weight: optional per-row loss weights, the logits' leading shape (``[N]`` or ``[B, L]``), finite and
            non-negative (NaN, inf or a negative weight is a ``ValueError``). Each row's divergence is multiplied
            by its weight before the reduction, so its gradients scale by the same factor; a mean still divides by
            the number of rows not ignored (or ``num_items_in_batch``), not by the weights' sum: pass
            ``num_items_in_batch=weight.sum()`` for a weight-normalised mean. A weight that requires grad gets the
            per-row divergences as its gradient. The fused pass over the logits is unchanged; the backward
            multiplies the stored ``[N, V]`` gradient by the weight column (the same product any non-uniform
            upstream gradient costs). Used by :mod:`tgtfast.imperfect` (teacher-reliability weights).

    Returns:
        The reduced loss (0-dim; float32, float64 for float64 inputs), or per-row losses for ``"none"``.

    Non-finite logits follow docs/design.md, "Conventions": NaN or ``+inf`` in a row makes that row NaN; a teacher
    logit of ``-inf`` is a class with no teacher probability (it makes reverse-type divergences ``+inf`` where the
    student has mass there, as the math says). Every divergence is non-negative: rows are clamped at 0 in value
    against float32 cancellation (their gradient is untouched).
    """
    V.tensor("student_logits", student_logits, floating=True)
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [N, V] or [B, L, V], got shape {tuple(student_logits.shape)}")
    if isinstance(teacher_logits, SparseTeacher):
        return _sparse_distill_loss(student_logits, teacher_logits, divergence, dict(beta=beta, alpha=alpha, lam=lam,
                                    t=t), temperature, target, ignore_index, reduction, num_items_in_batch,
                                    t2_scaling, logit_scale, logit_softcap, backend, weight)
    V.tensor("teacher_logits", teacher_logits, floating=True)
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} does not match student_logits shape "
                         f"{tuple(student_logits.shape)} in its leading dimensions")
    V.same_device("teacher_logits", teacher_logits, "student_logits", student_logits.device)
    div = resolve(divergence, beta=beta, alpha=alpha, lam=lam, t=t)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    temperature = V.temperature(temperature, dtype)
    check_reduction(reduction, num_items_in_batch)
    V.boolean("t2_scaling", t2_scaling)
    scale_s, scale_t = _pair("logit_scale", logit_scale)
    cap_s, cap_t = _pair("logit_softcap", logit_softcap)
    s, tch = match_vocab(student_logits, teacher_logits, vocab_mismatch)
    k = s.shape[-1]
    if k == 0:
        raise ValueError("student_logits has an empty class dimension (V = 0)")
    lead = s.shape[:-1]
    valid = None
    if target is not None:
        V.target(target, lead, "the logits'", "student_logits", s.device)
        valid = (target != ignore_index).reshape(-1)
    w = row_weights(weight, lead, s.device)
    # Soft-capping is a torch op before the kernel; a logit scale alone folds into the kernel's scale (free).
    if cap_s is not None:
        s, scale_s = model_logits(s, scale_s, cap_s), None
    if cap_t is not None:
        tch, scale_t = model_logits(tch, scale_t, cap_t), None
    a_s = (1.0 if scale_s is None else scale_s) / temperature
    a_t = (1.0 if scale_t is None else scale_t) / temperature
    s = s.to(dtype).reshape(-1, k)
    tch = tch.to(dtype).reshape(-1, k)
    multiplier = temperature**2 if t2_scaling else 1.0

    chosen = select(backend, s.device, dtype, op="divergence")
    if chosen is Backend.REFERENCE:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if valid is not None:  # ignored rows must not leak NaN/inf into the gradient
            s, tch = reference.mask_rows(s, tch, valid, True)
        rows = reference.divergence_rows(s.to(acc) * a_s, tch.to(acc) * a_t, div.name, param_a=div.param_a,
                                         param_b=div.param_b)
        if valid is not None:
            rows = torch.where(valid, rows, rows.new_zeros(()))
        rows = apply_row_weights(clamp_value_min0(rows), w)
        scale = row_weight(reduction, rows.shape[0], valid, num_items_in_batch)
    else:
        check_no_tangent("tgtfast.distill_loss", student_logits, teacher_logits)
        grad_on = torch.is_grad_enabled()
        scale = row_weight(reduction, s.shape[0], valid, num_items_in_batch)
        need_s, need_t = grad_on and s.requires_grad, grad_on and tch.requires_grad
        grad_scale = (1.0 if scale is None else scale) * multiplier

        def run():
            return _op.impl(chosen)(
                s.contiguous(), tch.contiguous(), None if valid is None else valid.contiguous(), div.code,
                div.param_a, div.param_b, a_s, a_t, need_s, need_t, grad_scale,
            )

        if w is not None and (need_s or need_t):  # the weights go into the stored gradients, in place
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            rows = _WeightedFused.apply(s, tch, w.to(acc), run, need_s, need_t, grad_scale)
        else:
            rows = apply_row_weights(clamp_value_min0(run()[0]), w)
    out = reduce(rows, reduction, scale, valid, num_items_in_batch, multiplier)
    return out.reshape(lead) if reduction == "none" else out


def _sparse_distill_loss(student_logits, teacher: SparseTeacher, divergence, params, temperature, target,
                         ignore_index, reduction, num_items_in_batch, t2_scaling, logit_scale, logit_softcap,
                         backend, weight=None):
    """:func:`distill_loss` against a :class:`SparseTeacher` (its arguments, already partly checked)."""
    div = resolve(divergence, **params)
    temperature = V.temperature(temperature, student_logits.dtype)
    check_reduction(reduction, num_items_in_batch)
    V.boolean("t2_scaling", t2_scaling)
    scale_s, _ = _pair("logit_scale", logit_scale)
    cap_s, _ = _pair("logit_softcap", logit_softcap)
    lead, k = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher.shape != lead:
        raise ValueError(f"the sparse teacher has leading shape {tuple(teacher.shape)} but student_logits has "
                         f"{tuple(lead)}")
    valid = None
    if target is not None:
        V.target(target, lead, "the logits'", "student_logits", student_logits.device)
        valid = (target != ignore_index).reshape(-1)
    w = row_weights(weight, lead, student_logits.device)
    s = student_logits
    if cap_s is not None:
        s, scale_s = model_logits(s, scale_s, cap_s), None
    a_s = (1.0 if scale_s is None else scale_s) / temperature
    multiplier = temperature**2 if t2_scaling else 1.0
    s = s.reshape(-1, k)
    scale = row_weight(reduction, s.shape[0], valid, num_items_in_batch)
    rows = sparse_rows(s, teacher, div, a_s, temperature, valid, backend, "tgtfast.distill_loss",
                       grad_scale=(1.0 if scale is None else scale) * multiplier)
    rows = apply_row_weights(clamp_value_min0(rows), w)
    out = reduce(rows, reduction, scale, valid, num_items_in_batch, multiplier)
    return out.reshape(lead) if reduction == "none" else out
