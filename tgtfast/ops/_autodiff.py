"""What the fused ops do not differentiate, refused with a clear error instead of a silently wrong number.

The fused kernels compute first derivatives only, in the forward pass (or a dedicated backward kernel). Forward-mode
AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) has no formula through them, and a double backward
(``create_graph=True``) would get a gradient that is not connected to the inputs. Every public entry point of a
fused op calls :func:`check_no_tangent` on its differentiable inputs, and every backward of a fused op calls
:func:`check_no_double_backward`; both name ``backend="reference"``, the differentiable PyTorch math, as the way out.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

__all__ = ["check_no_tangent", "check_no_double_backward"]


_WAY_OUT = "pass backend='reference' for differentiable PyTorch math"


def check_no_tangent(op: str, *tensors, way_out: str = _WAY_OUT) -> None:
    """Raise if any tensor carries a forward-mode tangent (``torch.func.jvp`` or ``forward_ad.make_dual``)."""
    if torch.compiler.is_compiling():
        return
    for x in tensors:
        if isinstance(x, torch.Tensor) and _fwad.unpack_dual(x).tangent is not None:
            raise RuntimeError(
                f"{op}: forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) has no formula through the fused "
                f"kernels; {way_out}"
            )


def check_no_double_backward(op: str, way_out: str = _WAY_OUT) -> None:
    """Raise inside a fused op's backward when autograd records it (``create_graph=True``)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported by the fused kernels, whose gradients are "
            f"computed in one pass; {way_out}"
        )
