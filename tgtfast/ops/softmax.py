"""The ``softmax`` op: ``softmax(logits / temperature)`` over the last dimension, the labelling step of the generic
(non-MLP) TGT path (docs/design.md, "TGT step").

Everything about registering it lives here: the C++/CUDA op ``tgtfast::temperature_softmax`` (schema in
csrc/ops.cpp, kernels in csrc/softmax/ and csrc/cuda/softmax_cuda*), its fake kernel and autograd, the Triton op
(kernels/softmax.py, registered the first time the Triton backend is chosen) and the dispatcher entry
``"temperature_softmax"``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from tgtfast import _ext
from tgtfast.dispatch import Backend, register_op
from tgtfast.validation import FLOAT_DTYPES

OP = "temperature_softmax"
IMPL: Dict[str, Callable] = {}  # backend name -> temperature_softmax(logits, temperature) -> Tensor


def _fake(logits, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.inv_temperature = 1.0 / float(inputs[1])


def _backward(ctx, grad):
    # From the saved output y: dx = y * (g - sum_k g_k y_k) / T, accumulated in float32 (float64 for float64).
    (y,) = ctx.saved_tensors
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    yf, gf = y.to(acc), grad.to(acc)
    gx = yf * (gf - (gf * yf).sum(-1, keepdim=True)) * ctx.inv_temperature
    return gx.to(y.dtype), None


def _register(qualname: str, backends, fake: bool) -> None:
    if fake:
        torch.library.register_fake(qualname)(_fake)
    torch.library.register_autograd(qualname, _backward, setup_context=_setup_context)
    for b in backends:
        IMPL[b] = getattr(torch.ops.tgtfast, qualname.split("::")[1]).default


def _load_triton() -> None:
    if "triton" in IMPL:
        return
    from tgtfast.kernels import softmax as kernels

    torch.library.triton_op("tgtfast::temperature_softmax_triton", kernels.temperature_softmax, mutates_args=())
    _register("tgtfast::temperature_softmax_triton", ("triton",), fake=False)


_missing: Dict[Backend, str] = {}
if _ext.ext is not None and hasattr(torch.ops.tgtfast, "temperature_softmax"):
    _register("tgtfast::temperature_softmax", ("cpp", "cuda"), fake=True)
else:
    _missing[Backend.CPP] = _missing[Backend.CUDA] = "the compiled extension has no temperature_softmax op"

register_op(OP, missing=_missing, dtypes={"cuda": FLOAT_DTYPES, "triton": FLOAT_DTYPES},
            loaders={Backend.TRITON: _load_triton})
