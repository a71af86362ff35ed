"""torch.library registration of the fused ops: fake (meta) kernels and autograd.

The C++ op ``tgtfast::ptloss_fwd`` is declared by the extension (csrc/ops.cpp) with CPU and CUDA kernels; the
Triton op ``tgtfast::ptloss_fwd_triton`` is declared here with ``torch.library.triton_op`` so Inductor can see
inside it. Both return ``(loss_rows, grad_student, grad_teacher)``: the gradients are computed in the forward
pass, and the backward only scales them by the incoming row gradients, in place (they are private buffers).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional

import torch

from tgtfast import _ext

logger = logging.getLogger("tgtfast")

# backend name -> callable with the ptloss_fwd schema
PTLOSS_FWD: Dict[str, Callable] = {}


def _ptloss_fwd_fake(student, teacher, coeffs, valid, temperature, label_smoothing, teacher_is_logits,
                     need_grad_student, need_grad_teacher):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((student.shape[0],), dtype=acc)
    grad_s = torch.empty_like(student) if need_grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if need_grad_teacher else teacher.new_empty((0,))
    return loss, grad_s, grad_t


def _ptloss_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.needs = (bool(inputs[7]), bool(inputs[8]))
    ctx.save_for_backward(grad_s, grad_t)


def _ptloss_backward(ctx, g_loss, _g_grad_s, _g_grad_t):
    grad_s, grad_t = ctx.saved_tensors
    scale = g_loss.unsqueeze(1)
    # In place: the buffers belong to this node. A second backward through the same graph
    # (retain_graph=True) is refused by autograd's saved-tensor version check instead of going wrong.
    out_s = grad_s.mul_(scale.to(grad_s.dtype)) if ctx.needs[0] else None
    out_t = grad_t.mul_(scale.to(grad_t.dtype)) if ctx.needs[1] else None
    return out_s, out_t, None, None, None, None, None, None, None


def _register_autograd(name: str) -> None:
    torch.library.register_autograd(name, _ptloss_backward, setup_context=_ptloss_setup_context)


if _ext.ext is not None:
    torch.library.register_fake("tgtfast::ptloss_fwd")(_ptloss_fwd_fake)
    _register_autograd("tgtfast::ptloss_fwd")
    PTLOSS_FWD["cpp"] = torch.ops.tgtfast.ptloss_fwd.default
    PTLOSS_FWD["cuda"] = torch.ops.tgtfast.ptloss_fwd.default

triton_error: Optional[str] = None
try:
    from tgtfast.kernels import ptloss as _triton_ptloss

    _ptloss_fwd_triton = torch.library.triton_op("tgtfast::ptloss_fwd_triton", _triton_ptloss.ptloss_fwd,
                                                 mutates_args=())
    _register_autograd("tgtfast::ptloss_fwd_triton")
    PTLOSS_FWD["triton"] = torch.ops.tgtfast.ptloss_fwd_triton.default
except Exception as exc:  # triton missing or broken: the dispatcher reports the backend as unavailable
    triton_error = f"{type(exc).__name__}: {exc}"
    logger.debug("tgtfast: Triton kernels not registered (%s)", triton_error)
