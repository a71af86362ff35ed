"""The one place that chooses a backend for an op call.

Backends: ``"cuda"`` (compiled CUDA kernels, CUDA tensors), ``"triton"`` (Triton kernels, CUDA tensors, or the
CPU under ``TRITON_INTERPRET=1``), ``"cpp"`` (compiled C++ kernels, CPU tensors) and ``"reference"`` (eager
PyTorch, any device). ``backend=None`` (or ``"auto"``) picks, in order, cuda -> triton for CUDA tensors and
cpp for CPU tensors, falling back to the reference. The environment variable ``TGTFAST_BACKEND`` overrides
``auto`` for the whole process. Nothing else in the package looks at devices to choose an implementation.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from typing import Container, Dict, Optional, Union

import torch

from tgtfast import _ext, _ops

__all__ = ["Backend", "backends", "select"]


class Backend(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"
    CPP = "cpp"
    REFERENCE = "reference"


# dtypes each backend's kernels take
_DTYPES = {
    Backend.CUDA: (torch.float32, torch.float16, torch.bfloat16),
    Backend.TRITON: (torch.float32, torch.float16, torch.bfloat16),
    Backend.CPP: (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    Backend.REFERENCE: (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> Dict[Backend, Optional[str]]:
    """Backend -> None if it is installed and has a device to run on, else the reason it has not.
    Run once at import: the answers do not change within a process (and torch.compile sees constants)."""
    status: Dict[Backend, Optional[str]] = {}
    status[Backend.CPP] = None if _ext.ext is not None else f"compiled extension not loaded ({_ext.error})"
    if _ext.ext is None:
        status[Backend.CUDA] = "compiled extension not loaded"
    elif not _ext.built_with_cuda():
        status[Backend.CUDA] = "extension built without CUDA (torch without CUDA, no nvcc, or TGTFAST_SKIP_CUDA_BUILD)"
    elif not torch.cuda.is_available():
        status[Backend.CUDA] = "no CUDA device visible"
    else:
        status[Backend.CUDA] = None
    if importlib.util.find_spec("triton") is None:
        status[Backend.TRITON] = "triton is not installed"
    elif "triton" not in _ops.PTLOSS_FWD:
        status[Backend.TRITON] = f"Triton kernels failed to load ({_ops.triton_error})"
    else:
        status[Backend.TRITON] = None
    status[Backend.REFERENCE] = None
    return status


_PROBED = _probe()
_HAS_CUDA_DEVICE = torch.cuda.is_available()


def _status() -> Dict[Backend, Optional[str]]:
    status = dict(_PROBED)
    if status[Backend.TRITON] is None and not _HAS_CUDA_DEVICE and not triton_interpret():
        status[Backend.TRITON] = "no CUDA device visible (set TRITON_INTERPRET=1 to run on the CPU, slowly)"
    return status


def backends() -> Dict[str, str]:
    """What is available on this machine: ``{name: "available" | "unavailable: <why>"}``."""
    return {b.value: ("available" if why is None else f"unavailable: {why}") for b, why in _status().items()}


def _env_backend() -> Backend:
    value = os.environ.get("TGTFAST_BACKEND", "auto").strip().lower() or "auto"
    try:
        return Backend(value)
    except ValueError:
        raise ValueError(
            f"TGTFAST_BACKEND={value!r} is not a backend; expected one of {[b.value for b in Backend]}"
        ) from None


def _supports(
    backend: Backend, device: torch.device, dtype: torch.dtype, kernels: Optional[Container[str]] = None
) -> Optional[str]:
    """None if `backend` can run on this device and dtype (and has a kernel in `kernels`), else why not."""
    why = _status()[backend]
    if why is not None:
        return why
    if kernels is not None and backend is not Backend.REFERENCE and backend.value not in kernels:
        return "this op has no kernel of that backend in this build"
    if backend is Backend.CUDA and device.type != "cuda":
        return f"needs CUDA tensors, got {device.type}"
    if backend is Backend.CPP and device.type != "cpu":
        return f"needs CPU tensors, got {device.type}"
    if backend is Backend.TRITON and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    if dtype not in _DTYPES[backend]:
        return f"does not take {dtype}"
    return None


def select(
    backend: Union[str, Backend, None],
    device: torch.device,
    dtype: torch.dtype,
    *,
    op: str = "op",
    kernels: Optional[Container[str]] = None,
) -> Backend:
    """Choose the backend for one call of `op` on tensors of `device` and `dtype`.

    `kernels`, when given, names the backends that have a kernel for `op` (e.g. the keys of its table in
    ``tgtfast._ops``); the others count as unavailable for this call. Raises ValueError when a forced
    backend cannot run the call (naming the reason).
    """
    if backend is None:
        chosen = _env_backend()
    else:
        try:
            chosen = Backend(backend.lower() if isinstance(backend, str) else backend)
        except ValueError:
            raise ValueError(
                f"{op}: backend={backend!r} is not one of {[b.value for b in Backend]}"
            ) from None
    if chosen is not Backend.AUTO:
        why = _supports(chosen, device, dtype, kernels)
        if why is not None:
            raise ValueError(f"{op}: backend={chosen.value!r} cannot run this call: {why}")
        return chosen
    order = (Backend.CUDA, Backend.TRITON) if device.type == "cuda" else (Backend.CPP,)
    for candidate in order:
        if _supports(candidate, device, dtype, kernels) is None:
            return candidate
    return Backend.REFERENCE
