"""What every op of ``tgtfast bench`` builds: a :class:`Case` (one runner per implementation, how to compare
results), with the error measure, tolerances and the package's backends that can run the inputs."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import tgtfast

IMPLS = ("eager", "compile", "cpp", "triton", "cuda")
GPU_BACKENDS = ("cuda", "triton")


def backend_impls(device: torch.device, dtype: torch.dtype, supported: Sequence[str],
                  op: Optional[str] = None) -> List[str]:
    """The package's backends among `supported` that can run tensors of `device` and `dtype` here (for `op`, a
    name of the dispatcher, when given)."""
    avail = tgtfast.backends(op) if op else tgtfast.backends()
    out = []
    for name in supported:
        if avail.get(name) != "available":
            continue
        if (name in GPU_BACKENDS) != (device.type == "cuda"):
            continue
        out.append(name)
    return out


@dataclasses.dataclass
class Case:
    """One op on one shape: a runner per implementation and how to judge the results.

    run[impl]() performs one timed call (forward, or forward+backward) and returns what :attr:`compare`
    takes; compare(result, reference_result) -> max error, scaled so that ``tol`` separates right from wrong.
    The reference result is truth() when given, else the first row's (the eager reference). Rows in
    ``incomparable`` (eager code that draws different random numbers) are reported without a verdict."""

    op: str
    shape: Dict[str, int]
    dtype: torch.dtype
    device: torch.device
    run: Dict[str, Callable[[], Any]]
    compare: Callable[[Any, Any], float]
    tol: float
    moved_bytes: Optional[int]
    work: int  # elements of work, for the per-element cost
    work_unit: str
    size_key: str  # the shape entry a sweep varies (x axis of the plot)
    truth: Optional[Callable[[], Any]] = None
    incomparable: Sequence[str] = ()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        return float("inf")
    return float(((a - b).abs() / (1.0 + b.abs())).max()) if a.numel() else 0.0


def _tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
