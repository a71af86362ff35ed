"""The ``divergence`` op: per-row divergence of the distillation menu and, in the same pass, its gradients
(docs/design.md, "Divergences").

Everything about registering it lives here: the C++/CUDA op ``tgtfast::divergence_fwd`` (schema in csrc/ops.cpp,
kernels in csrc/divergence/ and csrc/cuda/divergence_cuda*), its fake kernel and autograd, the Triton op
``tgtfast::divergence_fwd_triton`` (kernels/divergence.py, registered the first time the Triton backend is chosen)
and the op's entries in the dispatcher (``"divergence"``, and ``"fused_linear_divergence"``, which runs this op on
chunks of logits).

Every implementation returns ``(loss_rows, grad_student, grad_teacher)``, the gradients of ``grad_scale *
loss_rows`` computed in the forward pass, as the ``ptloss`` op does (see tgtfast/ops/ptloss.py): backward hands
the stored gradients on untouched for the usual ``loss.backward()``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from tgtfast import _ext
from tgtfast.dispatch import Backend, register_op
from tgtfast.ops._autodiff import check_no_double_backward
from tgtfast.ops.ptloss import row_factor
from tgtfast.reference import DIVERGENCES

OP = "divergence"
CODES = {name: code for code, name in enumerate(DIVERGENCES)}

# backend name -> callable with the divergence_fwd schema (Triton's is added by _load_triton)
IMPL: Dict[str, Callable] = {}


def _fake(student, teacher, valid, divergence, param_a, param_b, student_scale, teacher_scale,
          need_grad_student, need_grad_teacher, grad_scale=1.0):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((student.shape[0],), dtype=acc)
    grad_s = torch.empty_like(student) if need_grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if need_grad_teacher else teacher.new_empty((0,))
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.needs = (bool(inputs[8]), bool(inputs[9]))
    ctx.grad_scale = float(inputs[10]) if len(inputs) > 10 else 1.0
    ctx.save_for_backward(grad_s, grad_t)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, _g_grad_s, _g_grad_t):
    if g_loss is None:
        return (None,) * 11
    check_no_double_backward("tgtfast.distill_loss")
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
    return (out[0], out[1]) + (None,) * 9


def _register_autograd(name: str) -> None:
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)


def _load_triton() -> None:
    if "triton" in IMPL:  # loaded for the other op that runs this kernel
        return
    from tgtfast.kernels import divergence as kernels

    torch.library.triton_op("tgtfast::divergence_fwd_triton", kernels.divergence_fwd, mutates_args=())
    _register_autograd("tgtfast::divergence_fwd_triton")
    IMPL["triton"] = torch.ops.tgtfast.divergence_fwd_triton.default


def _has_kernel(key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("tgtfast::divergence_fwd", key))
    except RuntimeError:  # the schema is not declared (an extension built before this op existed)
        return False


_missing: Dict[Backend, str] = {}
if _ext.ext is not None and _has_kernel("CPU"):
    torch.library.register_fake("tgtfast::divergence_fwd")(_fake)
    _register_autograd("tgtfast::divergence_fwd")
    IMPL["cpp"] = torch.ops.tgtfast.divergence_fwd.default
    if _has_kernel("CUDA"):
        IMPL["cuda"] = IMPL["cpp"]
    else:
        _missing[Backend.CUDA] = "the extension has no CUDA kernel for divergence_fwd"
else:
    why = "the compiled extension has no divergence_fwd kernel (rebuild it)"
    _missing[Backend.CPP] = _missing[Backend.CUDA] = why

register_op(OP, missing=_missing, dtypes={Backend.CUDA: (torch.float32, torch.float16, torch.bfloat16)},
            loaders={Backend.TRITON: _load_triton})
# tgtfast.fused_linear_distill_loss runs this op on chunks of logits it computes itself: the same backends.
register_op("fused_linear_divergence", missing=_missing, loaders={Backend.TRITON: _load_triton})


def impl(backend: Backend) -> Callable:
    """The ``divergence_fwd`` implementation of `backend` (one :func:`tgtfast.dispatch.select` chose)."""
    return IMPL[Backend(backend).value]
