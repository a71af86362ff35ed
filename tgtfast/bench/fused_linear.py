"""``tgtfast bench --op fused_linear``: PTLoss from hidden states and output projections (``N, H, V``),
forward+backward, against the materialised logits."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

import tgtfast
from tgtfast import reference
from tgtfast.bench.case import Case, _err, backend_impls


def _case_fused_linear(shape: Dict[str, int], dtype: torch.dtype, device: torch.device,
                       impls: Optional[List[str]]):
    n, h, v = shape["N"], shape["H"], shape["V"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hs = (torch.randn(n, h, generator=g)).to(device, dtype).requires_grad_(True)
    ws = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_(True)
    ht = (torch.randn(n, h, generator=g)).to(device, dtype)
    wt = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype)
    coeffs = torch.linspace(-0.5, 2.0, 5).to(device)

    def materialised():
        return reference.ptloss(hs @ ws.t(), ht @ wt.t(), coeffs)

    def finish(loss):
        hs.grad = ws.grad = None
        loss.backward()
        return loss.detach(), hs.grad, ws.grad

    run = {"eager": lambda: finish(materialised())}
    compiled = torch.compile(materialised)
    run["compile"] = lambda: finish(compiled())
    for impl in impls or backend_impls(device, dtype, ("cpp", "triton", "cuda")):
        if impl in ("eager", "compile"):
            continue
        run[impl] = lambda impl=impl: finish(tgtfast.fused_linear_ptloss(hs, ws, ht, wt, coeffs, backend=impl))
    if impls:
        run = {name: fn for name, fn in run.items() if name in impls}

    def compare(a, b):
        return max(abs(float(a[0]) - float(b[0])) / max(1.0, abs(float(b[0]))), _err(a[1], b[1]), _err(a[2], b[2]))

    def truth():  # the materialised reference in float64 judges every row, the eager one included
        h64, w64 = (x.detach().double().requires_grad_(True) for x in (hs, ws))
        loss = reference.ptloss(h64 @ w64.t(), ht.double() @ wt.double().t(), coeffs.double())
        loss.backward()
        return loss.detach(), h64.grad, w64.grad

    esz = hs.element_size()
    moved = (2 * n * h + 2 * v * h) * esz + (n * h + v * h) * esz
    return Case("fused_linear", shape, dtype, device, run, compare, 2e-3 if dtype == torch.float32 else 5e-2,
                moved, n * v, "logit", "V", truth=truth)
