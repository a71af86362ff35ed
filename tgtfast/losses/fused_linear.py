"""PTLoss straight from hidden states: the output projection, the loss and its gradients, chunk by chunk.

At vocabulary sizes of 32k-256k the student and teacher logits dominate memory (8192 tokens x 128k classes in
float32 is 4 GiB per tensor). :func:`fused_linear_ptloss` never builds them: it walks the rows in chunks, and for
each chunk

1. computes the student and teacher logits of the chunk into two preallocated ``[chunk, V]`` buffers
   (``torch.addmm``: MKL / cuBLAS),
2. runs the fused PTLoss op of the selected backend on them (loss rows and the gradient wrt the student logits
   in one pass, already weighted by the reduction), and folds in the gradient of the optional cross-entropy
   term (``softmax - onehot``, computed in place in the student buffer),
3. turns the chunk's logit gradient into the gradients of the student's hidden states (its rows), weight and
   bias (accumulated over chunks).

The gradients are therefore ready when the forward pass returns; backward only scales them by the incoming
gradient. Memory is ``O(chunk x V)`` plus the gradients themselves, never ``O(N x V)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.dispatch import Backend, select
from tgtfast.losses.functional import _REDUCTIONS, CoeffsLike, _as_coeffs
from tgtfast.losses.modules import coeffs_buffer
from tgtfast.ops import ptloss as _ptloss_op

__all__ = ["fused_linear_ptloss", "FusedLinearPTLoss", "default_chunk_size"]

_CHUNK_BYTES = 128 * 2**20  # float32 logits of one chunk
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``: the largest power of two whose float32 logits
    (``rows x vocab_size x 4`` bytes) fit in 128 MiB, clamped to ``[32, 4096]``.
    ``vocab_size=32000`` gives 1024 rows, ``128256`` gives 256."""
    rows = max(1, _CHUNK_BYTES // (4 * max(int(vocab_size), 1)))
    return int(min(4096, max(32, 1 << (rows.bit_length() - 1))))


class _Matmul:
    """The three products of one linear layer, with logits and weight gradient in the accumulation dtype
    (float32, or float64 for float64 inputs). Low-precision weights: on CUDA through cuBLAS GEMMs in the
    input dtype with float32 outputs (``out_dtype=``); elsewhere through a float32 copy of the weight made
    once per call."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], acc: torch.dtype) -> None:
        self.weight = weight
        low = weight.dtype != acc
        self.cuda_out_dtype = low and weight.is_cuda and _HAS_MM_OUT_DTYPE
        self.weight_acc = weight if not low or self.cuda_out_dtype else weight.to(acc)
        self.bias = None if bias is None else bias.to(acc)
        self.acc = acc

    def logits_into(self, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """out [r, V] = hidden [r, H] @ W^T + b, in the accumulation dtype."""
        if self.cuda_out_dtype:
            torch.mm(hidden, self.weight.t(), out_dtype=self.acc, out=out)
            if self.bias is not None:
                out.add_(self.bias)
        elif self.bias is None:
            torch.mm(hidden.to(self.acc), self.weight_acc.t(), out=out)
        else:
            torch.addmm(self.bias, hidden.to(self.acc), self.weight_acc.t(), out=out)

    def grad_operand(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """The chunk's logit gradient as the backward products take it (rounded once to the weight's dtype on
        the CUDA low-precision path, as autograd of the materialised logits would hold it)."""
        return grad_logits.to(self.weight.dtype) if self.cuda_out_dtype else grad_logits

    def grad_hidden_into(self, grad: torch.Tensor, out: torch.Tensor) -> None:
        """out [r, H] = grad [r, V] @ W, in the hidden states' dtype."""
        if out.dtype == grad.dtype and self.weight_acc.dtype == grad.dtype:
            torch.mm(grad, self.weight_acc, out=out)
        else:
            out.copy_(torch.mm(grad, self.weight_acc))

    def accumulate_grad_weight(self, acc: torch.Tensor, grad: torch.Tensor, hidden: torch.Tensor) -> None:
        """acc [V, H] += grad^T [V, r] @ hidden [r, H], accumulated in acc's dtype."""
        if self.cuda_out_dtype and _ADDMM_OUT_DTYPE_OK[0]:
            try:
                torch.addmm(acc, grad.t(), hidden, out_dtype=acc.dtype, out=acc)
                return
            except RuntimeError:  # this torch's CUDA addmm cannot accumulate into float32: upcast instead
                _ADDMM_OUT_DTYPE_OK[0] = False
        acc.addmm_(grad.t().to(acc.dtype), hidden.to(acc.dtype))


_ADDMM_OUT_DTYPE_OK = [True]


def _has_mm_out_dtype() -> bool:
    try:
        return "dtype" in torch.ops.aten.mm.overloads()
    except Exception:  # noqa: BLE001 - no float32-output GEMM for bf16 in this torch: use the upcast path
        return False


_HAS_MM_OUT_DTYPE = _has_mm_out_dtype()


def _ptloss_chunk(chosen: Backend, s, t, eta, valid, temperature, need_grad, grad_scale):
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


def _ce_chunk_inplace(s: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor],
                      grad: Optional[torch.Tensor], weight) -> torch.Tensor:
    """Cross-entropy rows of the logits ``s`` [r, V] (overwritten) and, if ``grad`` is given,
    ``grad += weight * (softmax(s) - onehot(target))`` (``weight``: a number or an [r, 1] column)."""
    tgt = target if valid is None else torch.where(valid, target, 0)
    if valid is not None:  # ignored rows: no NaN/inf from whatever their hidden states hold
        s.masked_fill_(~valid.unsqueeze(1), 0)
    picked = s.gather(1, tgt.unsqueeze(1))
    mx = s.amax(1, keepdim=True)
    s.sub_(mx).exp_()
    z = s.sum(1, keepdim=True)
    rows = (mx + z.log() - picked).squeeze(1)
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if grad is not None:
        s.div_(z)
        s.scatter_add_(1, tgt.unsqueeze(1), torch.full_like(picked, -1.0))
        if valid is not None:
            weight = valid.unsqueeze(1).to(s.dtype) * weight
        s.mul_(weight)
        grad.add_(s)
    return rows


class _Config:
    """Everything of one call that is not a differentiable tensor."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def _run(cfg: _Config, hs, ws, bs, ht, wt, bt, row_scale, need: Tuple[bool, bool, bool]):
    """One sweep over the chunks. ``row_scale``: the weight of every row's loss in the result that is
    differentiated (a number, or an [N] tensor for reduction="none"). Returns the per-row combined loss
    [N] and the gradients (None where not needed)."""
    n, acc = hs.shape[0], cfg.acc
    v = ws.shape[0]
    device = hs.device
    any_grad = any(need)
    student, teacher = _Matmul(ws, bs, acc), _Matmul(wt, bt, acc)
    chunk = min(cfg.chunk_size, max(n, 1))
    s_buf = torch.empty((chunk, v), dtype=acc, device=device)
    t_buf = torch.empty((chunk, v), dtype=acc, device=device)
    rows_out = torch.empty((n,), dtype=acc, device=device)
    grad_h = torch.empty_like(hs) if need[0] else None
    grad_w = torch.zeros(ws.shape, dtype=acc, device=device) if need[1] else None
    grad_b = torch.zeros((v,), dtype=acc, device=device) if need[2] else None
    per_row = isinstance(row_scale, torch.Tensor)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        s, t = s_buf[: end - start], t_buf[: end - start]
        h_chunk = hs[start:end]
        student.logits_into(h_chunk, s)
        teacher.logits_into(ht[start:end], t)
        valid = None if cfg.valid is None else cfg.valid[start:end]
        scale = row_scale[start:end].unsqueeze(1).to(acc) if per_row else row_scale
        kd_scale = cfg.kd_weight * (1.0 if per_row else scale)
        rows, grad = _ptloss_chunk(cfg.backend, s, t, cfg.eta, valid, cfg.temperature, any_grad, kd_scale)
        rows = rows.to(acc)
        if per_row and grad is not None:
            grad.mul_(scale)
        if cfg.kd_weight != 1.0:
            rows = rows * cfg.kd_weight
        if cfg.ce_weight != 0.0:
            ce_rows = _ce_chunk_inplace(s, cfg.target[start:end], valid, grad, cfg.ce_weight * scale)
            rows = rows + cfg.ce_weight * ce_rows
        rows_out[start:end] = rows
        if grad is None:
            continue
        if need[2]:
            grad_b.add_(grad.sum(0))
        grad = student.grad_operand(grad)
        if need[0]:
            student.grad_hidden_into(grad, grad_h[start:end])
        if need[1]:  # ignored rows have zero gradient, but 0 * NaN hidden states (padding) would still be NaN
            h_w = h_chunk if valid is None else torch.where(valid.unsqueeze(1), h_chunk, h_chunk.new_zeros(()))
            student.accumulate_grad_weight(grad_w, grad, h_w)
        del grad
    if grad_w is not None:
        grad_w = grad_w.to(ws.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bs.dtype)
    return rows_out, grad_h, grad_w, grad_b


class _FusedLinearPTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, cfg: _Config):
        ctx.cfg = cfg
        need = cfg.need
        if cfg.reduction == "none":
            # per-row incoming gradients are only known in backward: the gradients are computed there
            rows, _, _, _ = _run(cfg, hs, ws, bs, ht, wt, bt, 1.0, (False, False, False))
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
            return rows
        weight = 1.0 if cfg.reduction == "sum" else 1.0 / max(cfg.count, 1)
        rows, gh, gw, gb = _run(cfg, hs, ws, bs, ht, wt, bt, weight, need)
        ctx.save_for_backward(gh, gw, gb)
        return rows.sum() * weight

    @staticmethod
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        if cfg.reduction == "none":
            hs, ws, bs, ht, wt, bt = ctx.saved_tensors
            _, gh, gw, gb = _run(cfg, hs, ws, bs, ht, wt, bt, grad_out.reshape(-1), cfg.need)
            return gh, gw, gb, None, None, None, None
        grads = list(ctx.saved_tensors)
        unit = not torch.compiler.is_compiling() and bool(grad_out == 1)
        if not unit:
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None


def _as_compute_dtype(device: torch.device, who: str, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]):
    """The dtype ``nn.Linear`` would compute ``hidden @ weight.T`` in: the autocast dtype inside
    ``torch.autocast`` (for float32/float16/bfloat16 operands), else, for half-precision hidden states with a
    float32 weight (or the reverse), the half dtype. The operands are cast to it (autograd returns each gradient
    in its input's dtype); the products still accumulate in float32."""
    if not isinstance(weight, torch.Tensor) or not isinstance(hidden, torch.Tensor):
        return hidden, weight, bias
    castable = (torch.float32, torch.float16, torch.bfloat16)
    operands = [x for x in (hidden, weight, bias) if isinstance(x, torch.Tensor)]
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
        if not all(x.dtype in castable for x in operands):
            return hidden, weight, bias
    elif hidden.dtype != weight.dtype and {hidden.dtype, weight.dtype} in ({torch.float32, torch.bfloat16},
                                                                          {torch.float32, torch.float16}):
        dtype = hidden.dtype if hidden.dtype in _LOW_PRECISION else weight.dtype
    else:
        return hidden, weight, bias
    cast = [None if x is None else x.to(dtype) for x in (hidden, weight, bias)]
    return cast[0], cast[1], cast[2]


def _check_tensor(name: str, x, dims: Tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    return x


@torch.compiler.disable
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
        chunk_size: rows per chunk; ``None`` picks :func:`default_chunk_size` ``(V)`` (about 128 MiB of float32
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
    hs = _check_tensor("student_hidden", student_hidden, (2, 3))
    ws = _check_tensor("student_weight", student_weight, (2,))
    ht = _check_tensor("teacher_hidden", teacher_hidden, (2, 3))
    wt = _check_tensor("teacher_weight", teacher_weight, (2,))
    device = hs.device
    hs, ws, student_bias = _as_compute_dtype(device, "student", hs, ws, student_bias)
    ht, wt, teacher_bias = _as_compute_dtype(device, "teacher", ht, wt, teacher_bias)
    for name, x in (("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be [V, H] with H = {hs.shape[-1]} (student_hidden's last "
                         f"dimension), got shape {tuple(ws.shape)}")
    if wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"teacher_weight must be [V, H_t] with H_t = {ht.shape[-1]} (teacher_hidden's last "
                         f"dimension), got shape {tuple(wt.shape)}")
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(f"teacher_weight has V = {wt.shape[0]} rows but student_weight has V = {ws.shape[0]}: "
                         "both projections must produce the same vocabulary")
    if ht.shape[:-1] != hs.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(ht.shape[:-1])} does not match student_hidden "
                         f"leading shape {tuple(hs.shape[:-1])}")
    if ws.dtype != hs.dtype:
        raise TypeError(f"student_weight dtype {ws.dtype} does not match student_hidden dtype {hs.dtype}")
    if wt.dtype != ht.dtype:
        raise TypeError(f"teacher_weight dtype {wt.dtype} does not match teacher_hidden dtype {ht.dtype}")
    v = ws.shape[0]
    if v == 0:
        raise ValueError("student_weight has no rows (V = 0)")
    for name, b, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if b is None:
            continue
        _check_tensor(name, b, (1,))
        if b.shape[0] != v:
            raise ValueError(f"{name} must have shape [{v}] (V), got {tuple(b.shape)}")
        if b.device != device:
            raise ValueError(f"{name} is on {b.device} but student_hidden is on {device}")
    temperature = V.temperature(temperature, torch.float64 if torch.float64 in (hs.dtype, ht.dtype) else torch.float32)
    kd_weight = V.real("kd_weight", kd_weight, low=0.0)
    ce_weight = V.real("ce_weight", ce_weight, low=0.0)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(v)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    lead = hs.shape[:-1]
    n = math.prod(lead)
    valid = tgt = None
    if target is not None:
        V.target(target, lead, "the hidden states'", "student_hidden", device)
        tgt = target.reshape(-1).to(torch.int64)
        valid = tgt != ignore_index
        if ce_weight != 0 and not torch.compiler.is_compiling():
            bad = valid & ((tgt < 0) | (tgt >= v))
            if bool(bad.any()):
                raise ValueError(f"target holds class {int(tgt[bad][0])} outside [0, {v}) that is not "
                                 f"ignore_index={ignore_index}")
    elif ce_weight != 0:
        raise ValueError("ce_weight != 0 needs target (the labels of the cross-entropy term)")

    acc = torch.float64 if torch.float64 in (hs.dtype, ht.dtype) else torch.float32
    eta = _as_coeffs(coeffs, v, device, acc)
    chosen = select(backend, device, acc, op="fused_linear_ptloss", orders=eta.shape[0] if eta.numel() else 0)
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hs.requires_grad,
        grad_on and ws.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    count = n
    if valid is not None and reduction in ("mean", "batchmean"):
        count = int(valid.sum())
    cfg = _Config(
        acc=acc, eta=eta, valid=valid, target=tgt, temperature=temperature, reduction=reduction,
        kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=int(chunk_size), backend=chosen, need=need,
        count=count,
    )
    with torch.autocast(device.type, enabled=False):
        out = _FusedLinearPTLossFunction.apply(
            hs.reshape(n, hs.shape[-1]).contiguous(), ws.contiguous(),
            None if student_bias is None else student_bias.contiguous(),
            ht.detach().reshape(n, ht.shape[-1]).contiguous(), wt.detach().contiguous(),
            None if teacher_bias is None else teacher_bias.detach().contiguous(), cfg,
        )
    return out.reshape(lead) if reduction == "none" else out


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

