"""The one place that chooses a backend for an op call.

Backends: ``"cuda"`` (compiled CUDA kernels, CUDA tensors), ``"triton"`` (Triton kernels, CUDA tensors, or the
CPU under ``TRITON_INTERPRET=1``), ``"cpp"`` (compiled C++ kernels, CPU tensors) and ``"reference"`` (eager
PyTorch, any device). ``backend=None`` (or ``"auto"``) picks, in order, cuda -> triton for CUDA tensors and
cpp for CPU tensors, falling back to the reference. The environment variable ``TGTFAST_BACKEND`` overrides
``auto`` for the whole process. Nothing else in the package looks at devices to choose an implementation.

Not every op has every backend: the module of an op (``tgtfast/ops/<stem>.py``) declares, with
:func:`register_op`, which backends lack it (and why), where narrower than the backend's which dtypes its kernels
take, and which backends load their kernels only when first chosen (Triton: importing it costs seconds, so
``import tgtfast`` does not). :func:`select` and :func:`backends` take the op's name into account.

This module is a leaf: it imports the compiled extension's loader and nothing else of the package; ops import it.
"""

from __future__ import annotations

import enum
import importlib.util
import os
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from tgtfast import _ext

__all__ = ["Backend", "backends", "select", "register_op", "ensure_loaded"]


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
    else:  # whether an op's Triton kernels loaded is that op's business (register_op)
        status[Backend.TRITON] = None
    status[Backend.REFERENCE] = None
    return status


_PROBED = _probe()
_HAS_CUDA_DEVICE = torch.cuda.is_available()


# op name -> (backend -> why that backend lacks the op, backend -> dtypes the op's kernels take there)
_OPS: Dict[str, Tuple[Dict[Backend, str], Dict[Backend, Tuple[torch.dtype, ...]]]] = {}
# op name -> backend -> loader not yet run (it registers the kernels; raising means they cannot load)
_LOADERS: Dict[str, Dict[Backend, Callable[[], None]]] = {}
# op name -> backend -> limit(call) -> None if the backend's kernels take this call, else why not
_LIMITS: Dict[str, Dict[Backend, Callable[[Dict[str, object]], Optional[str]]]] = {}


def register_op(
    op: str,
    missing: Optional[Dict[Union[str, Backend], str]] = None,
    dtypes: Optional[Dict[Union[str, Backend], Tuple[torch.dtype, ...]]] = None,
    loaders: Optional[Dict[Union[str, Backend], Callable[[], None]]] = None,
    limits: Optional[Dict[Union[str, Backend], Callable[[Dict[str, object]], Optional[str]]]] = None,
) -> None:
    """Declare which backends implement `op`: `missing` maps each backend without it (or whose kernels for it
    failed to load) to the reason; `dtypes` narrows the dtypes a backend takes for this op; `loaders` maps a
    backend to a function that loads its kernels, run once, the first time that backend is considered for the op
    (an exception it raises marks the backend missing, with the exception as the reason); `limits` maps a
    backend to a check of one call's sizes (the keywords the op passes to :func:`select`, e.g. ``orders=M``)
    that returns why that backend's kernels cannot take it, or None. Backends not named implement it with all
    their dtypes and sizes. Calling it again for the same op replaces the declaration."""
    _OPS[op] = (
        {Backend(b): why for b, why in (missing or {}).items()},
        {Backend(b): tuple(d) for b, d in (dtypes or {}).items()},
    )
    _LOADERS[op] = {Backend(b): fn for b, fn in (loaders or {}).items()}
    _LIMITS[op] = {Backend(b): fn for b, fn in (limits or {}).items()}


def ensure_loaded(op: str, backend: Union[str, Backend]) -> Optional[str]:
    """Run `op`'s loader for `backend` if it has one not yet run; returns None when the backend's kernels for
    `op` are loaded (or need no loading), else why not."""
    backend = Backend(backend)
    loader = _LOADERS.get(op, {}).pop(backend, None)
    if loader is not None:
        try:
            loader()
        except Exception as exc:  # a broken or missing Triton install: the backend is reported unavailable
            why = f"kernels failed to load ({type(exc).__name__}: {exc})"
            _OPS.setdefault(op, ({}, {}))[0][backend] = why
    entry = _OPS.get(op)
    return None if entry is None else entry[0].get(backend)


def _status(op: Optional[str] = None, load: Union[Backend, str, None] = None) -> Dict[Backend, Optional[str]]:
    """Backend -> None if it can run `op` at all, else why not; `load` ("all" or one backend) first runs the
    pending loaders of the backends that are otherwise available."""
    status = dict(_PROBED)
    if status[Backend.TRITON] is None and not _HAS_CUDA_DEVICE and not triton_interpret():
        status[Backend.TRITON] = "no CUDA device visible (set TRITON_INTERPRET=1 to run on the CPU, slowly)"
    if op is not None and load is not None:
        for b in list(_LOADERS.get(op, {})):
            if status[b] is None and (load == "all" or b == load):
                ensure_loaded(op, b)
    if op in _OPS:
        for b, why in _OPS[op][0].items():
            if status[b] is None:
                status[b] = why
    return status


def backends(op: Optional[str] = None) -> Dict[str, str]:
    """What is available on this machine: ``{name: "available" | "unavailable: <why>"}``; with `op`, for
    that op (e.g. ``"ptloss"``, ``"perturb_decode_label_mlp"``)."""
    status = _status(op, load="all")  # an explicit question about an op loads its kernels to answer it
    return {b.value: ("available" if why is None else f"unavailable: {why}") for b, why in status.items()}


def _env_backend() -> Backend:
    value = os.environ.get("TGTFAST_BACKEND", "auto").strip().lower() or "auto"
    try:
        return Backend(value)
    except ValueError:
        raise ValueError(
            f"TGTFAST_BACKEND={value!r} is not a backend; expected one of {[b.value for b in Backend]}"
        ) from None


def _supports(backend: Backend, device: torch.device, dtype: torch.dtype, op: Optional[str] = None,
              call: Optional[Dict[str, object]] = None) -> Optional[str]:
    """None if `backend` can run `op` on this device and dtype (and, given `call`, these sizes), else why not."""
    why = _status(op, load=backend)[backend]
    if why is not None:
        return why
    if backend is Backend.CUDA and device.type != "cuda":
        return f"needs CUDA tensors, got {device.type}"
    if backend is Backend.CPP and device.type != "cpu":
        return f"needs CPU tensors, got {device.type}"
    if backend is Backend.TRITON and device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    dtypes = _OPS[op][1].get(backend, _DTYPES[backend]) if op in _OPS else _DTYPES[backend]
    if dtype not in dtypes:
        return f"does not take {dtype}"
    limit = _LIMITS.get(op, {}).get(backend)
    if limit is not None and call:
        return limit(call)
    return None


def select(
    backend: Union[str, Backend, None], device: torch.device, dtype: torch.dtype, *, op: str = "op", **call: object
) -> Backend:
    """Choose the backend for one call of `op` on tensors of `device` and `dtype`; `call` holds the sizes an op's
    backend limits judge (see :func:`register_op`), so automatic selection passes over a backend whose kernels
    would refuse the call.

    Raises ValueError when a forced backend cannot run the call (naming the reason).
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
        why = _supports(chosen, device, dtype, op, call)
        if why is not None:
            raise ValueError(f"{op}: backend={chosen.value!r} cannot run this call: {why}")
        return chosen
    order = (Backend.CUDA, Backend.TRITON) if device.type == "cuda" else (Backend.CPP,)
    for candidate in order:
        if _supports(candidate, device, dtype, op, call) is None:
            return candidate
    return Backend.REFERENCE

