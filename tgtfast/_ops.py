"""torch.library registration of the fused ops: fake (meta) kernels and autograd.

The C++ op ``tgtfast::ptloss_fwd`` is declared by the extension (csrc/ops.cpp) with CPU and CUDA kernels; the
Triton op ``tgtfast::ptloss_fwd_triton`` is declared here with ``torch.library.triton_op`` so Inductor can see
inside it. Both return ``(loss_rows, grad_student, grad_teacher)``: the gradients of ``grad_scale * loss_rows``
are computed in the forward pass. The caller passes as ``grad_scale`` the weight its reduction gives every row
(1 for ``sum``, ``1 / N`` for a mean), so for the usual ``loss.backward()`` the backward hands the stored
gradient on untouched: no second pass over the logits and no second buffer. Any other incoming gradient is
applied out of place, so backward may run more than once on a retained graph (``gradcheck`` does).
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
                     need_grad_student, need_grad_teacher, grad_scale=1.0):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((student.shape[0],), dtype=acc)
    grad_s = torch.empty_like(student) if need_grad_student else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if need_grad_teacher else teacher.new_empty((0,))
    return loss, grad_s, grad_t


def _ptloss_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.needs = (bool(inputs[7]), bool(inputs[8]))
    ctx.grad_scale = float(inputs[9]) if len(inputs) > 9 else 1.0
    ctx.save_for_backward(grad_s, grad_t)
    # No gradient ever flows into the gradient outputs: do not let autograd build [N, K] zeros for them.
    ctx.set_materialize_grads(False)


def _row_factor(g_loss: torch.Tensor, grad_scale: float):
    """What the stored gradients must be multiplied by: None when nothing (the common case), else a
    0-dim tensor (uniform incoming gradient) or an [N, 1] column."""
    uniform = g_loss.numel() <= 1 or g_loss.stride(0) == 0  # a reduction's backward expands one value
    if not uniform:
        return (g_loss / grad_scale).unsqueeze(1)
    factor = g_loss.reshape(-1)[:1].reshape(()) / grad_scale if g_loss.numel() else g_loss.new_ones(())
    if not torch.compiler.is_compiling() and bool(factor == 1):
        return None
    return factor


def _ptloss_backward(ctx, g_loss, _g_grad_s, _g_grad_t):
    if g_loss is None:
        return (None,) * 10
    grad_s, grad_t = ctx.saved_tensors
    factor = _row_factor(g_loss, ctx.grad_scale)
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


# ------------------------------------------------------------------------------------------------
# Teacher Guided Training: the latent perturbation z + sigma * noise(seed, offset), the noise fill, and the
# temperature softmax of the generic perturb -> decode -> label path (tgtfast/tgt.py). Tables map a backend
# name to the op; a backend missing from a table cannot run that op (tgtfast.dispatch.select checks).
PERTURB: Dict[str, Callable] = {}
LATENT_NOISE: Dict[str, Callable] = {}
TEMPERATURE_SOFTMAX: Dict[str, Callable] = {}


def _perturb_fake(z, sigma, seed, offset):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _latent_noise_fake(out, seed, offset):
    return None


def _softmax_fake(logits, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _perturb_setup_context(ctx, inputs, output):
    pass


def _perturb_backward(ctx, grad):
    # d(z + sigma * noise)/dz is the identity; sigma, seed and offset are not differentiable.
    return grad, None, None, None


def _softmax_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.inv_temperature = 1.0 / float(inputs[1])


def _softmax_backward(ctx, grad):
    # From the saved output y: dx = y * (g - sum_k g_k y_k) / T, accumulated in float32 (float64 for float64).
    (y,) = ctx.saved_tensors
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf, gf = y.to(acc), grad.to(acc)
    gx = yf * (gf - (gf * yf).sum(-1, keepdim=True)) * ctx.inv_temperature
    return gx.to(y.dtype), None


def _register_tgt(names: Dict[str, str], backends) -> None:
    """Register fake kernels (C++ ops only) and autograd for the TGT ops `names` and file them under `backends`."""
    for table, key, fake, autograd in (
        (PERTURB, "perturb", _perturb_fake, (_perturb_backward, _perturb_setup_context)),
        (LATENT_NOISE, "latent_noise_", _latent_noise_fake, None),
        (TEMPERATURE_SOFTMAX, "temperature_softmax", _softmax_fake, (_softmax_backward, _softmax_setup_context)),
    ):
        qualname = names[key]
        if fake is not None and backends != ("triton",):
            torch.library.register_fake(qualname)(fake)
        if autograd is not None:
            torch.library.register_autograd(qualname, autograd[0], setup_context=autograd[1])
        op = getattr(torch.ops.tgtfast, qualname.split("::")[1]).default
        for backend in backends:
            table[backend] = op


if _ext.ext is not None and hasattr(torch.ops.tgtfast, "perturb"):
    _register_tgt({k: f"tgtfast::{k}" for k in ("perturb", "latent_noise_", "temperature_softmax")}, ("cpp", "cuda"))

tgt_triton_error: Optional[str] = None
try:
    from tgtfast.kernels import noise as _triton_noise
    from tgtfast.kernels import softmax as _triton_softmax

    torch.library.triton_op("tgtfast::perturb_triton", _triton_noise.perturb, mutates_args=())
    torch.library.triton_op("tgtfast::latent_noise_triton_", _triton_noise.latent_noise_, mutates_args={"out"})
    torch.library.triton_op("tgtfast::temperature_softmax_triton", _triton_softmax.temperature_softmax,
                            mutates_args=())
    _register_tgt(
        {
            "perturb": "tgtfast::perturb_triton",
            "latent_noise_": "tgtfast::latent_noise_triton_",
            "temperature_softmax": "tgtfast::temperature_softmax_triton",
        },
        ("triton",),
    )
except Exception as exc:  # triton missing or broken: these ops report the backend as unavailable
    tgt_triton_error = f"{type(exc).__name__}: {exc}"
    logger.debug("tgtfast: Triton TGT kernels not registered (%s)", tgt_triton_error)
