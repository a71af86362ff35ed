"""The machinery of every fused linear loss: output projections and a row loss, chunk by chunk.

At vocabulary sizes of 32k-256k the student and teacher logits dominate memory (8192 tokens x 128k classes in
float32 is 4 GiB per tensor). A fused linear loss never builds them: :func:`launch` walks the rows in chunks, and
for each chunk

1. computes the student and teacher logits of the chunk into two preallocated ``[chunk, V]`` buffers
   (``torch.addmm``: MKL / cuBLAS), and applies the models' logit transforms in place when asked,
2. runs the fused row loss of the selected backend on them (loss rows and the gradient wrt the student logits
   in one pass, already weighted by the reduction), and folds in the gradient of the optional cross-entropy
   term (``softmax - onehot``, computed in place in the student buffer),
3. turns the chunk's logit gradient into the gradients of the student's hidden states (its rows), weight and
   bias (accumulated over chunks; a half-precision weight's gradient in its own dtype, a group of chunks at a
   time: :class:`_WeightGrad`).

The gradients are therefore ready when the forward pass returns; backward only scales them by the incoming
gradient. Memory is ``O(chunk x V)`` plus the gradients themselves, never ``O(N x V)``. The losses built on it:
:func:`tgtfast.fused_linear_ptloss` (tgtfast/losses/fused_linear.py) and :func:`tgtfast.fused_linear_distill_loss`
(tgtfast/losses/fused_linear_distill.py).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from tgtfast import validation as V
from tgtfast.losses.functional import _REDUCTIONS
from tgtfast.ops._autodiff import check_no_double_backward

__all__ = ["default_chunk_size", "prepare", "launch", "Prepared"]


_CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``: the largest power of two whose float32 logits
    (``rows x vocab_size x 4`` bytes) fit in 64 MiB, clamped to ``[32, 4096]``.
    ``vocab_size=32000`` gives 512 rows, ``128256`` gives 128."""
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

    def grad_weight_into(self, grad: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """out [S, H] = grad^T [S, r] @ hidden [r, H], in out's dtype (the accumulation dtype)."""
        if self.cuda_out_dtype:
            torch.mm(grad.t(), hidden.to(grad.dtype), out_dtype=out.dtype, out=out)
        else:
            torch.mm(grad.t().to(out.dtype), hidden.to(out.dtype), out=out)


_GROUP_BYTES = 128 * 2**20  # logit gradients of the rows whose weight gradient is added at once (low precision)
_SLAB_BYTES = 64 * 2**20  # accumulation-dtype rows of the weight gradient added at once


def weight_grad_plan(v: int, h: int, n: int, chunk: int, weight: torch.dtype, acc: torch.dtype,
                     operand: torch.dtype) -> Tuple[int, int]:
    """``(group rows, slab rows)`` of :class:`_WeightGrad` for a ``[v, h]`` weight of dtype ``weight`` and ``n``
    rows in chunks of ``chunk``; ``(0, 0)`` when the gradient is summed in an ``acc`` accumulator instead."""
    if weight == acc or v * h * acc.itemsize <= _GROUP_BYTES + _SLAB_BYTES:
        return 0, 0
    rows = max(chunk, (_GROUP_BYTES // (v * operand.itemsize)) // chunk * chunk)
    rows = min(rows, -(-max(n, 1) // chunk) * chunk)
    return rows, max(1, min(v, _SLAB_BYTES // (h * acc.itemsize)))


class _WeightGrad:
    """The student weight's gradient ``sum over rows of grad[r, :]^T hidden[r, :]``, held in the weight's dtype.

    A float32 (float64) weight, or a half-precision one whose float32 copy would be no larger than a group and a
    slab: each chunk's product is added into a float32 accumulator (``addmm_``), rounded once at the end. A larger
    half-precision weight has no float32 ``[V, H]`` accumulator (2 GiB at V = 128256, H = 4096, plus its rounded
    copy): the chunks' logit gradients are gathered into a group of up to ``_GROUP_BYTES`` (whole chunks), and each
    full group is added slab by slab of the vocabulary: ``slab = round(slab + grad_group^T @ hidden_group)``, the
    product and the sum in float32 and one rounding per group. The result is rounded ``ceil(N / group rows)`` times
    (once when the rows fit one group); the float32 temporaries are one slab (``_SLAB_BYTES``)."""

    def __init__(self, matmul: _Matmul, weight: torch.Tensor, n: int, chunk: int, operand: torch.dtype) -> None:
        """``operand``: the dtype the group holds the logit gradients and hidden rows in (the GEMM operands')."""
        v, h = weight.shape
        self.matmul, self.acc = matmul, matmul.acc
        group, self.slab = weight_grad_plan(v, h, n, chunk, weight.dtype, self.acc, operand)
        self.grouped = group > 0
        self.out = torch.zeros((v, h), dtype=weight.dtype if self.grouped else self.acc, device=weight.device)
        if not self.grouped:
            return
        self.grad = torch.empty((group, v), dtype=operand, device=weight.device)
        self.hidden = torch.empty((group, h), dtype=operand, device=weight.device)
        self.tmp = torch.empty((self.slab, h), dtype=self.acc, device=weight.device)
        self.filled = 0

    def add(self, grad: torch.Tensor, hidden: torch.Tensor) -> None:
        """Add ``grad^T @ hidden`` (``grad`` [r, V] as :meth:`_Matmul.grad_operand` gives it, ``hidden`` [r, H])."""
        if not self.grouped:
            self.out.addmm_(grad.t().to(self.acc), hidden.to(self.acc))
            return
        r = grad.shape[0]
        if self.filled + r > self.grad.shape[0]:
            self._flush()
        self.grad[self.filled:self.filled + r].copy_(grad)
        self.hidden[self.filled:self.filled + r].copy_(hidden)
        self.filled += r

    def _flush(self) -> None:
        if self.filled == 0:
            return
        g, h = self.grad[: self.filled], self.hidden[: self.filled]
        for start in range(0, self.out.shape[0], self.slab):
            end = min(self.out.shape[0], start + self.slab)
            tmp = self.tmp[: end - start]
            self.matmul.grad_weight_into(g[:, start:end], h, tmp)
            tmp.add_(self.out[start:end])
            self.out[start:end].copy_(tmp)
        self.filled = 0

    def result(self) -> torch.Tensor:
        if self.grouped:
            self._flush()
        return self.out


def _has_mm_out_dtype() -> bool:
    try:
        return "dtype" in torch.ops.aten.mm.overloads()
    except Exception:  # noqa: BLE001 - no float32-output GEMM for bf16 in this torch: use the upcast path
        return False


_HAS_MM_OUT_DTYPE = _has_mm_out_dtype()


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
    student = _Matmul(ws, bs, acc)
    teacher = None if wt is None else _Matmul(wt, bt, acc)  # None: a sparse teacher (cfg.sparse)
    chunk = min(cfg.chunk_size, max(n, 1))
    s_buf = torch.empty((chunk, v), dtype=acc, device=device)
    t_buf = None if teacher is None else torch.empty((chunk, v), dtype=acc, device=device)
    rows_out = torch.empty((n,), dtype=acc, device=device)
    grad_h = torch.empty_like(hs) if need[0] else None
    grad_w = None
    if need[1]:
        grad_w = _WeightGrad(student, ws, n, chunk, ws.dtype if student.cuda_out_dtype else acc)
    grad_b = torch.zeros((v,), dtype=acc, device=device) if need[2] else None
    per_row = isinstance(row_scale, torch.Tensor)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        s = s_buf[: end - start]
        h_chunk = hs[start:end]
        student.logits_into(h_chunk, s)
        if teacher is None:
            t = cfg.sparse.rows(start, end)
        else:
            t = t_buf[: end - start]
            teacher.logits_into(ht[start:end], t)
        valid = None if cfg.valid is None else cfg.valid[start:end]
        scale = row_scale[start:end].unsqueeze(1).to(acc) if per_row else row_scale
        kd_scale = cfg.kd_weight * (1.0 if per_row else scale)
        chain = cfg.transform(s, t) if cfg.transform is not None else None
        rows, grad = cfg.kd_chunk(s, t, valid, any_grad, kd_scale)
        rows = rows.to(acc)
        if per_row and grad is not None:
            grad.mul_(scale)
        if cfg.parts is not None:
            cfg.parts[0][start:end] = rows
        if cfg.kd_weight != 1.0:
            rows = rows * cfg.kd_weight
        if cfg.ce_weight != 0.0:
            ce_rows = _ce_chunk_inplace(s, cfg.target[start:end], valid, grad, cfg.ce_weight * scale)
            rows = rows + cfg.ce_weight * ce_rows
            if cfg.parts is not None:
                cfg.parts[1][start:end] = ce_rows
        rows_out[start:end] = rows
        if grad is None:
            continue
        if chain is not None:  # the gradient wrt the projection's own logits (before scale and soft-capping)
            grad.mul_(chain)
        if need[2]:
            grad_b.add_(grad.sum(0))
        grad = student.grad_operand(grad)
        if need[0]:
            student.grad_hidden_into(grad, grad_h[start:end])
        if need[1]:  # ignored rows have zero gradient, but 0 * NaN hidden states (padding) would still be NaN
            h_w = h_chunk if valid is None else torch.where(valid.unsqueeze(1), h_chunk, h_chunk.new_zeros(()))
            grad_w.add(grad, h_w)
        del grad
    if grad_w is not None:
        grad_w = grad_w.result().to(ws.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bs.dtype)
    return rows_out, grad_h, grad_w, grad_b


class _ChunkedLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, cfg: _Config):
        ctx.cfg = cfg
        need = cfg.need
        if cfg.reduction == "none":
            # per-row incoming gradients are only known in backward: the gradients are computed there
            rows, _, _, _ = _run(cfg, hs, ws, bs, ht, wt, bt, 1.0, (False, False, False))
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
            return rows
        weight = cfg.weight
        rows, gh, gw, gb = _run(cfg, hs, ws, bs, ht, wt, bt, weight, need)
        ctx.save_for_backward(gh, gw, gb)
        return rows.sum() * weight

    @staticmethod
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        check_no_double_backward("fused linear loss", way_out="the losses of tgtfast.reference materialise the "
                                 "logits and are differentiable")
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
class Prepared:
    """The checked operands of one fused linear call and what was derived from them."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, *,
            target, ignore_index, reduction, kd_weight, ce_weight, chunk_size, num_items_in_batch=None,
            vocab_mismatch=None) -> Prepared:
    """Check the operands of a fused linear loss (shapes, dtypes, devices, labels) and cast them as ``nn.Linear``
    would compute. ``vocab_mismatch`` ("slice" / "pad", see :func:`tgtfast.distill_loss`) lets the two projections
    have different vocabulary sizes."""
    from tgtfast.losses.sparse import SparseTeacher

    sparse = teacher_hidden if isinstance(teacher_hidden, SparseTeacher) else None
    hs = _check_tensor("student_hidden", student_hidden, (2, 3))
    ws = _check_tensor("student_weight", student_weight, (2,))
    device = hs.device
    hs, ws, student_bias = _as_compute_dtype(device, "student", hs, ws, student_bias)
    if ws.device != device:
        raise ValueError(f"student_weight is on {ws.device} but student_hidden is on {device}")
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be [V, H] with H = {hs.shape[-1]} (student_hidden's last "
                         f"dimension), got shape {tuple(ws.shape)}")
    if sparse is not None:
        if sparse.shape != hs.shape[:-1]:
            raise ValueError(f"the sparse teacher has leading shape {tuple(sparse.shape)} but student_hidden has "
                             f"{tuple(hs.shape[:-1])}")
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("a sparse teacher takes no teacher_weight or teacher_bias")
        ht = wt = teacher_bias = None
    else:
        ht, wt, teacher_bias = _check_teacher(hs, teacher_hidden, teacher_weight, teacher_bias, device)
    if ws.dtype != hs.dtype:
        raise TypeError(f"student_weight dtype {ws.dtype} does not match student_hidden dtype {hs.dtype}")
    if ws.shape[0] == 0:
        raise ValueError("student_weight has no rows (V = 0)")
    if vocab_mismatch is not None:
        V.choice("vocab_mismatch", vocab_mismatch, ("slice", "pad"))
    v_student = ws.shape[0]
    if wt is not None and wt.shape[0] != ws.shape[0]:
        if vocab_mismatch is None:
            raise ValueError(
                f"teacher_weight has V = {wt.shape[0]} rows but student_weight has V = {ws.shape[0]}: both "
                "projections must produce the same vocabulary, or pass vocab_mismatch='slice' (keep the first "
                "min(V) classes of both) or 'pad' (-inf logits for the smaller one's missing classes)")
        if vocab_mismatch == "slice":
            v = min(ws.shape[0], wt.shape[0])
            ws, wt = ws[:v], wt[:v]
            student_bias = None if student_bias is None else student_bias[:v]
            teacher_bias = None if teacher_bias is None else teacher_bias[:v]
        else:
            v = max(ws.shape[0], wt.shape[0])
            ws, student_bias = _pad_projection(ws, student_bias, v)
            wt, teacher_bias = _pad_projection(wt, teacher_bias, v)
    for name, b, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if b is None:
            continue
        _check_tensor(name, b, (1,))
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{name} must have shape [{w.shape[0]}] (V), got {tuple(b.shape)}")
        if b.device != device:
            raise ValueError(f"{name} is on {b.device} but student_hidden is on {device}")
    v = ws.shape[0]
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
            bad = valid & ((tgt < 0) | (tgt >= v_student))
            if bool(bad.any()):
                raise ValueError(f"target holds class {int(tgt[bad][0])} outside [0, {v_student}) that is not "
                                 f"ignore_index={ignore_index}")
    elif ce_weight != 0:
        raise ValueError("ce_weight != 0 needs target (the labels of the cross-entropy term)")
    acc = torch.float64 if torch.float64 in (hs.dtype, hs.dtype if ht is None else ht.dtype) else torch.float32
    if num_items_in_batch is not None:
        weight = 1.0 / float(num_items_in_batch)
    elif reduction in ("mean", "batchmean"):
        weight = 1.0 / max(int(valid.sum()) if valid is not None else n, 1)
    else:
        weight = 1.0
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hs.requires_grad,
        grad_on and ws.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    return Prepared(hs=hs, ws=ws, bs=student_bias, ht=ht, wt=wt, bt=teacher_bias, v=v, v_student=v_student,
                    lead=lead, n=n, valid=valid, target=tgt, acc=acc, device=device, reduction=reduction,
                    kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=int(chunk_size), weight=weight, need=need,
                    sparse=sparse)


def _check_teacher(hs, ht, wt, bt, device):
    """The dense teacher's hidden states and projection: shapes, dtypes, devices; cast as nn.Linear computes."""
    ht = _check_tensor("teacher_hidden", ht, (2, 3))
    wt = _check_tensor("teacher_weight", wt, (2,))
    ht, wt, bt = _as_compute_dtype(device, "teacher", ht, wt, bt)
    for name, x in (("teacher_hidden", ht), ("teacher_weight", wt)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_hidden is on {device}")
    if wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"teacher_weight must be [V, H_t] with H_t = {ht.shape[-1]} (teacher_hidden's last "
                         f"dimension), got shape {tuple(wt.shape)}")
    if ht.shape[:-1] != hs.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(ht.shape[:-1])} does not match student_hidden "
                         f"leading shape {tuple(hs.shape[:-1])}")
    if wt.dtype != ht.dtype:
        raise TypeError(f"teacher_weight dtype {wt.dtype} does not match teacher_hidden dtype {ht.dtype}")
    return ht, wt, bt


def _pad_projection(weight: torch.Tensor, bias: Optional[torch.Tensor], v: int):
    """Extend a projection to `v` rows whose logits are -inf (zero weight rows, bias -inf); gradients of the added
    rows are dropped by autograd's slicing."""
    extra = v - weight.shape[0]
    if extra == 0:
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros((extra, weight.shape[1]))])
    base = bias if bias is not None else weight.new_zeros((v - extra,))
    bias = torch.cat([base, base.new_full((extra,), -math.inf)])
    return weight, bias


def launch(args: Prepared, kd_chunk, transform=None, parts: bool = False):
    """Run the chunked loss: ``kd_chunk(s, t, valid, need_grad, grad_scale) -> (rows, grad or None)`` on each chunk of
    logits, after ``transform(s, t)`` (in place; returns the factor turning gradients wrt the transformed student
    logits into gradients wrt the projection's, or None). With ``parts`` also returns the reduced soft (divergence)
    and hard (cross-entropy) terms, detached."""
    a = args
    cfg = _Config(acc=a.acc, valid=a.valid, target=a.target, reduction=a.reduction, kd_weight=a.kd_weight,
                  ce_weight=a.ce_weight, chunk_size=a.chunk_size, need=a.need, weight=a.weight, kd_chunk=kd_chunk,
                  transform=transform, parts=None, sparse=a.sparse)
    if parts:
        cfg.parts = (torch.zeros((a.n,), dtype=a.acc, device=a.device), torch.zeros((a.n,), dtype=a.acc, device=a.device))
    with torch.autocast(a.device.type, enabled=False):
        out = _ChunkedLossFunction.apply(
            a.hs.reshape(a.n, a.hs.shape[-1]).contiguous(), a.ws.contiguous(),
            None if a.bs is None else a.bs.contiguous(),
            None if a.ht is None else a.ht.detach().reshape(a.n, a.ht.shape[-1]).contiguous(),
            None if a.wt is None else a.wt.detach().contiguous(),
            None if a.bt is None else a.bt.detach().contiguous(), cfg,
        )
    out = out.reshape(a.lead) if a.reduction == "none" else out
    if not parts:
        return out
    soft, hard = (p.reshape(a.lead) if a.reduction == "none" else p.sum() * a.weight for p in cfg.parts)
    return out, soft, hard
