"""The ``proxy_solve`` op: the Proxy Teacher solve (docs/design.md, "Proxy Teacher").

Everything about registering it lives here: the compiled ops ``tgtfast::proxy_solve`` and
``tgtfast::proxy_deviation_sums`` (schemas and CPU kernels in csrc/proxy_solve/, CUDA kernels in
csrc/cuda/proxy_solve_cuda*), their fake kernels, the op's entry in the dispatcher (under the name
``"proxy_teacher"``, the one users pass to ``tgtfast.backends(op=...)``), the choice of the implementation for a
call and the call of the compiled ops. The float64 PyTorch reference solve is :mod:`tgtfast.proxy.solve`; this
module does not import it (``import tgtfast.ops.proxy_solve`` loads nothing of :mod:`tgtfast.proxy`).

Backends: ``"cpp"`` (one parallel C++ loop over the whole ``candidates x rows`` grid), ``"cuda"`` (the same on a
GPU, for CUDA tensors), ``"reference"`` (batched float64 PyTorch on CPU copies). There is no Triton kernel. Every
implementation works in float64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from tgtfast import _ext
from tgtfast.dispatch import Backend, register_op, select

__all__ = ["OP", "solver", "cpu_solver", "compiled_solve"]

OP = "proxy_teacher"
_F64 = torch.float64


def _solve_fake(teacher_probs, coeffs, max_iter, tol):
    n, k = teacher_probs.shape
    c = coeffs.shape[0]
    return teacher_probs.new_empty((c, n, k)), teacher_probs.new_empty((c, n))


def _deviation_sums_fake(teacher_probs, coeffs, labels, max_iter, tol):
    c = coeffs.shape[0]
    return teacher_probs.new_empty((c,)), teacher_probs.new_empty((c,)), teacher_probs.new_empty((c,))


def _has_compiled_ops() -> bool:
    return _ext.ext is not None and hasattr(torch.ops.tgtfast, "proxy_solve")


if _has_compiled_ops():
    torch.library.register_fake("tgtfast::proxy_solve")(_solve_fake)
    torch.library.register_fake("tgtfast::proxy_deviation_sums")(_deviation_sums_fake)

register_op(
    OP,
    missing={"triton": "no Triton kernel for the Proxy Teacher solve (the CUDA kernel covers GPUs)"},
    dtypes={"cuda": (_F64,), "cpp": (_F64,), "reference": (_F64,)},
)


def solver(backend: Optional[str], device: torch.device) -> str:
    """Which implementation solves this call: ``"cuda"`` (on `device`), ``"cpp"`` or ``"reference"`` (on CPU
    copies). The one dispatch point decides; the data is float64. An unknown or unusable backend raises
    ValueError naming it."""
    chosen = select(backend, device, _F64, op=OP)
    if chosen is Backend.REFERENCE and device.type != "cpu":  # the reference solves CPU copies
        chosen = select(backend, torch.device("cpu"), _F64, op=OP)
    return chosen.value


def cpu_solver(backend: Optional[str], device: torch.device) -> str:
    """The implementation for solves of CPU copies within a call on `device`: the one :func:`solver` picks, or,
    where that is the CUDA kernel, ``"cpp"`` (``"reference"`` without the extension)."""
    chosen = solver(backend, device)
    if chosen != "cuda":
        return chosen
    try:
        return select("cpp", torch.device("cpu"), _F64, op=OP).value
    except ValueError:
        return Backend.REFERENCE.value


def compiled_solve(solver_name: str, device: torch.device, p64: torch.Tensor, eta64: torch.Tensor,
                   *rest) -> Tuple[torch.Tensor, ...]:
    """Run ``torch.ops.tgtfast.proxy_solve`` (``rest = (max_iter, tol)``) or ``proxy_deviation_sums``
    (``rest = (labels, max_iter, tol)``) where `solver_name` runs (CUDA on `device`, else the CPU), returning CPU
    tensors."""
    dev = device if solver_name == "cuda" else torch.device("cpu")
    args = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in (p64, eta64.contiguous(), *rest)]
    op = torch.ops.tgtfast.proxy_deviation_sums if isinstance(rest[0], torch.Tensor) else torch.ops.tgtfast.proxy_solve
    return tuple(t.cpu() for t in op(*args))
