"""Argument checks shared by every public entry point of tgtfast.

Each check names the argument it judges and raises ``TypeError`` for a value of the wrong kind and
``ValueError`` for a value of the right kind out of range, so a user's mistake surfaces as one clear message at
the call that made it. The compiled kernels keep ``TORCH_CHECK`` guards as the last line of defence; they are
never the first error a user sees.

This module imports nothing of the package, so every layer (ops, losses, the TGT step, the Proxy Teacher, the
trainer, the command line) can use it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch

__all__ = [
    "FLOAT_DTYPES",
    "SEED_LIMIT",
    "STREAM_LIMIT",
    "boolean",
    "choice",
    "integer",
    "real",
    "tensor",
    "float_tensor",
    "same_device",
    "target",
    "probabilities",
    "seed",
    "offset",
    "temperature",
    "is_compiling",
]

FLOAT_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SEED_LIMIT = 2**64
STREAM_LIMIT = 2**63 - 1  # offset + numel must stay below it (the ops take int64)


def is_compiling() -> bool:
    """True while torch.compile traces: data-dependent checks are skipped then (they would break the graph)."""
    return torch.compiler.is_compiling()


def _range_text(low: Optional[float], high: Optional[float], low_inclusive: bool, high_inclusive: bool) -> str:
    lo = "-inf" if low is None else f"{low:g}" if isinstance(low, float) else str(low)
    hi = "inf" if high is None else f"{high:g}" if isinstance(high, float) else str(high)
    return f"{'[' if low_inclusive and low is not None else '('}{lo}, {hi}{']' if high_inclusive and high is not None else ')'}"


def real(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    finite: bool = True,
) -> float:
    """A real number (not a bool) in the given range, returned as a float.

    >>> real("temperature", 2, low=0.0, low_inclusive=False)
    2.0
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (finite and not math.isfinite(value)):
        if low is None and high is None:
            raise ValueError(f"{name} must be finite, got {value}")
        raise ValueError(f"{name} must be in {_range_text(low, high, low_inclusive, high_inclusive)}, got {value}")
    ok = True
    if low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        raise ValueError(f"{name} must be in {_range_text(low, high, low_inclusive, high_inclusive)}, got {value}")
    return value


def integer(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer (not a bool) with ``low <= value <= high`` (either bound optional), returned as an int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def tensor(
    name: str,
    x: Any,
    *,
    dims: Optional[Sequence[int]] = None,
    min_dim: Optional[int] = None,
    floating: bool = False,
    dtypes: Optional[Sequence[torch.dtype]] = None,
) -> torch.Tensor:
    """A ``torch.Tensor`` with the given rank and dtype constraints (shape words use ``dims``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be a {names} tensor, got {x.dtype}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if dims is not None and x.dim() not in tuple(dims):
        raise ValueError(f"{name} must have {' or '.join(str(d) for d in dims)} dimensions, got shape {tuple(x.shape)}")
    if min_dim is not None and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    return x


def float_tensor(name: str, x: Any) -> torch.Tensor:
    """A float32, float64, bfloat16 or float16 tensor."""
    return tensor(name, x, dtypes=FLOAT_DTYPES)


def same_device(name: str, x: torch.Tensor, other_name: str, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {other_name} is on {device}")


def logits_pair(student_logits: Any, teacher_logits: Any) -> None:
    """Student and teacher logits of one shape (at least ``[N, V]``), floating, on one device."""
    tensor("student_logits", student_logits, floating=True, min_dim=2)
    tensor("teacher_logits", teacher_logits, floating=True)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
                         f"{tuple(student_logits.shape)}")
    same_device("teacher_logits", teacher_logits, "student_logits", student_logits.device)


def target(value: Any, lead: torch.Size, lead_of: str, device_of: str, device: torch.device,
           name: str = "target") -> torch.Tensor:
    """Integer class targets of the leading shape ``lead`` (that of ``lead_of``) on ``device`` (that of the
    argument ``device_of``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.shape != lead:
        raise ValueError(f"{name} shape {tuple(value.shape)} must equal {lead_of} leading shape {tuple(lead)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but {device_of} is on {device}")
    return value


def probabilities(name: str, p: torch.Tensor, *, tol: Optional[float] = None, what: str = "",
                  rows: Optional[torch.Tensor] = None) -> None:
    """Rows of ``p`` (last dimension) are finite, non-negative and sum to 1 within ``tol`` (by default 1e-3
    in float32/float64 and 2e-2 in half precision); ``rows``, a boolean mask over the rows (the leading
    dimensions), limits the check to those rows. Skipped while torch.compile traces."""
    if is_compiling() or p.numel() == 0:
        return
    label = f"{name}{what}"
    if tol is None:
        tol = 1e-3 if p.dtype in (torch.float32, torch.float64) else 2e-2
    d = p.detach()
    sums = d.sum(-1, dtype=torch.float64)  # NaN or inf anywhere in a row makes its float64 sum non-finite
    keep = None if rows is None else rows.reshape(sums.shape)

    def found(bad: torch.Tensor) -> bool:
        return bool((bad if keep is None else bad & keep).any())

    if found(~torch.isfinite(sums)):
        raise ValueError(f"{label} must be finite (found NaN or inf)")
    if found((d < 0).any(-1)):
        raise ValueError(f"{label} must be non-negative")
    off = (sums - 1).abs() > tol
    if found(off):
        worst = float(sums[off if keep is None else off & keep].flatten()[0])
        raise ValueError(f"{label} must sum to 1 over the last dimension; found a row summing to {worst:.6g}")


def seed(value: Any, name: str = "seed") -> int:
    """A Philox seed: an int in ``[0, 2**64)``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def offset(value: Any, numel: int, name: str = "offset") -> int:
    """A stream offset ``>= 0`` with ``offset + numel < 2**63``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value + numel > STREAM_LIMIT:
        raise ValueError(f"{name} + number of elements must be < 2**63, got {name} {value} and {numel} elements")
    return value


def temperature(value: Any, dtype: torch.dtype = torch.float32, name: str = "temperature") -> float:
    """A temperature ``T > 0`` small logits stay finite under: ``2**64 / T`` must be finite in the compute dtype
    (float32 math for half precision; ``T >= 5.4e-20`` in float32). Below that, ``logits / T`` overflows for
    ordinary logits and the loss turns into inf or NaN instead of failing here."""
    value = real(name, value, low=0.0, low_inclusive=False)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    low = 2.0**64 / torch.finfo(compute).max
    if value < low:
        raise ValueError(
            f"{name} must be at least {low:.3g} so that logits up to 2**64 divided by it stay finite in "
            f"{str(compute)[6:]}, got {value}"
        )
    return value
