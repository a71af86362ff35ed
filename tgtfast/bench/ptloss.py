"""``tgtfast bench --op ptloss``: PTLoss forward+backward on logits ``[N, K]`` with ``M`` orders."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

import tgtfast
from tgtfast import reference
from tgtfast.bench.case import Case, _err, _tol, backend_impls


def make_inputs(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)
    coeffs = torch.linspace(-0.5, 2.0, m).to(device) if m else None
    return s, t, coeffs


def make_step(impl: str, coeffs: Optional[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A function (student, teacher) -> PTLoss running one implementation."""
    if impl == "eager":
        return lambda s, t: reference.ptloss(s, t, coeffs)
    if impl == "compile":
        return torch.compile(lambda s, t: reference.ptloss(s, t, coeffs))
    return lambda s, t: tgtfast.ptloss(s, t, coeffs, backend=impl)


def available_impls(device: torch.device, dtype: torch.dtype) -> List[str]:
    """PTLoss implementations that can run here: eager, compile and the backends."""
    supported = ("cpp", "triton", "cuda") if dtype != torch.float16 or device.type == "cuda" else ()
    return ["eager", "compile"] + backend_impls(device, dtype, supported)


def _fwd_bwd(step, s, t):
    s.grad = None
    loss = step(s, t)
    loss.backward()
    return loss


def _case_ptloss(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]]):
    n, k, m = shape["N"], shape["K"], shape["M"]
    s, t, coeffs = make_inputs(n, k, m, dtype, device)
    s.requires_grad_(True)
    run = {}
    for impl in impls or available_impls(device, dtype):
        step = make_step(impl, coeffs)

        def one(step=step):
            loss = _fwd_bwd(step, s, t)
            return loss.detach(), s.grad

        run[impl] = one

    def compare(a, b):
        return max(abs(float(a[0]) - float(b[0])) / max(1.0, abs(float(b[0]))), _err(a[1], b[1]))

    def truth():  # the reference in float64 judges every row, the eager one included
        sd = s.detach().double().requires_grad_(True)
        loss = reference.ptloss(sd, t.detach().double(), None if coeffs is None else coeffs.double())
        loss.backward()
        return loss.detach(), sd.grad

    return Case("ptloss", shape, dtype, device, run, compare, _tol(dtype), 3 * n * k * s.element_size(),
                n * k, "elem", "K", truth=truth)
