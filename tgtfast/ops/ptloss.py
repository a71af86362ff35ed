"""The ``ptloss`` op: per-row PTLoss and, in the same pass, its gradients (docs/design.md, "PTLoss").

Everything about registering it lives here: the C++/CUDA op ``tgtfast::ptloss_fwd`` (schema in csrc/ops.cpp,
kernels in csrc/ptloss/ and csrc/cuda/ptloss_cuda*), its fake kernel and autograd, the Triton op
``tgtfast::ptloss_fwd_triton`` (kernels/ptloss.py, registered with ``torch.library.triton_op`` the first time the
Triton backend is chosen, so ``import tgtfast`` does not import Triton), and the op's entries in the dispatcher
(``"ptloss"``, and ``"fused_linear_ptloss"``, which runs this op on chunks of logits).

Every implementation returns ``(loss_rows, grad_student, grad_teacher)``: the gradients of
``grad_scale * loss_rows`` are computed in the forward pass. The caller passes as ``grad_scale`` the weight its
reduction gives every row (1 for ``sum``, ``1 / N`` for a mean), so for the usual ``loss.backward()`` the
backward hands the stored gradient on untouched: no second pass over the logits and no second buffer. Any other
incoming gradient is applied out of place, so backward may run more than once on a retained graph.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from tgtfast import _ext
from tgtfast.dispatch import Backend, register_op
from tgtfast.ops._autodiff import check_no_double_backward

OP = "ptloss"

# backend name -> callable with the ptloss_fwd schema (Triton's is added by _load_triton)
IMPL: Dict[str, Callable] = {}


def _fake(student, teacher, coeffs, valid, temperature, label_smoothing, teacher_is_logits,
          need_grad_student, need_grad_teacher, grad_scale=1.0):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((student.shape[0],), dtype=acc)
    grad_s = torch.empty_like(student) if need_grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if need_grad_teacher else teacher.new_empty((0,))
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.needs = (bool(inputs[7]), bool(inputs[8]))
    ctx.grad_scale = float(inputs[9]) if len(inputs) > 9 else 1.0
    ctx.save_for_backward(grad_s, grad_t)
    # No gradient ever flows into the gradient outputs: do not let autograd build [N, K] zeros for them.
    ctx.set_materialize_grads(False)


def row_factor(g_loss: torch.Tensor, grad_scale: float):
    """What the stored gradients must be multiplied by: None when nothing (the common case), else a
    0-dim tensor (uniform incoming gradient) or an [N, 1] column."""
    uniform = g_loss.numel() <= 1 or g_loss.stride(0) == 0  # a reduction's backward expands one value
    if not uniform:
        return (g_loss / grad_scale).unsqueeze(1)
    factor = g_loss.reshape(-1)[:1].reshape(()) / grad_scale if g_loss.numel() else g_loss.new_ones(())
    if not torch.compiler.is_compiling() and bool(factor == 1):
        return None
    return factor


def _backward(ctx, g_loss, _g_grad_s, _g_grad_t):
    if g_loss is None:
        return (None,) * 10
    check_no_double_backward("tgtfast.ptloss")
    grad_s, grad_t = ctx.saved_tensors
    factor = row_factor(g_loss, ctx.grad_scale)
    out = []
    for need, grad in zip(ctx.needs, (grad_s, grad_t)):
        if not need:
            out.append(None)
        elif factor is None:
            out.append(grad)
        else:
            out.append(grad * factor.to(grad.dtype))
    return out[0], out[1], None, None, None, None, None, None, None, None


def _register_autograd(name: str) -> None:
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)


def _load_triton() -> None:
    if "triton" in IMPL:  # loaded for the other op that runs this kernel
        return
    from tgtfast.kernels import ptloss as kernels

    torch.library.triton_op("tgtfast::ptloss_fwd_triton", kernels.ptloss_fwd, mutates_args=())
    _register_autograd("tgtfast::ptloss_fwd_triton")
    IMPL["triton"] = torch.ops.tgtfast.ptloss_fwd_triton.default


_missing: Dict[Backend, str] = {}
if _ext.ext is not None:
    torch.library.register_fake("tgtfast::ptloss_fwd")(_fake)
    _register_autograd("tgtfast::ptloss_fwd")
    IMPL["cpp"] = IMPL["cuda"] = torch.ops.tgtfast.ptloss_fwd.default

CUDA_MAX_ORDERS = 32  # kMaxOrders of csrc/cuda/ptloss_cuda.h: the CUDA kernel keeps the coefficients in registers


def _cuda_orders(call) -> Optional[str]:
    m = int(call.get("orders", 0))
    return None if m <= CUDA_MAX_ORDERS else f"its kernel takes at most {CUDA_MAX_ORDERS} orders M, got {m}"


_LIMITS = {Backend.CUDA: _cuda_orders}
register_op(OP, missing=_missing, loaders={Backend.TRITON: _load_triton}, limits=_LIMITS)
# tgtfast.fused_linear_ptloss runs this op on chunks of logits it computes itself: the same backends.
register_op("fused_linear_ptloss", missing=_missing, loaders={Backend.TRITON: _load_triton}, limits=_LIMITS)


def impl(backend: Backend) -> Callable:
    """The ``ptloss_fwd`` implementation of `backend` (one :func:`tgtfast.dispatch.select` chose)."""
    return IMPL[Backend(backend).value]
