"""``tgtfast bench --op divergence``: one divergence of the menu, forward+backward on logits ``[N, K]``.

The shape's ``D`` is the divergence's index in :data:`tgtfast.DIVERGENCES` (0 forward_kl ... 8 taid); its
parameters are fixed here (:data:`PARAMS`), so that every run measures the same thing."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

import tgtfast
from tgtfast import reference
from tgtfast.bench.case import Case, _err, _tol, backend_impls

# The parameters each divergence is benchmarked with (those of the peers' defaults where they have one).
PARAMS = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "tvd": {},
    "symmetric_kl": {"lam": 0.5},
    "ab_divergence": {"alpha": 0.2, "beta": 0.7},
    "taid": {"t": 0.5},
}
TEMPERATURE = 2.0


def divergence_of(shape: Dict[str, int]) -> str:
    d = int(shape.get("D", 0))
    if not 0 <= d < len(tgtfast.DIVERGENCES):
        raise ValueError(f"D must index tgtfast.DIVERGENCES (0..{len(tgtfast.DIVERGENCES) - 1}), got {d}")
    return tgtfast.DIVERGENCES[d]


def _kernel_params(name: str):
    """The divergence's parameters in the reference's (kernel) order."""
    values = list(PARAMS[name].values()) + [0.0, 0.0]
    return values[0], values[1]


def _case_divergence(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]]):
    n, k = shape["N"], shape["K"]
    name = divergence_of(shape)
    a, b = _kernel_params(name)
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(n, k, generator=g) * 3).to(device=device, dtype=dtype)

    def eager(s, t):
        return reference.distill_loss(s, t, name, param_a=a, param_b=b, temperature=TEMPERATURE)

    # Every divergence compiles the same function with other constants: without a reset the ninth would exceed
    # dynamo's recompile limit and silently run eagerly.
    torch._dynamo.reset()
    steps = {"eager": eager, "compile": torch.compile(eager)}
    for impl in backend_impls(device, dtype, ("cpp", "triton", "cuda"), op="divergence"):
        steps[impl] = lambda s, t, impl=impl: tgtfast.distill_loss(s, t, name, **PARAMS[name],
                                                                   temperature=TEMPERATURE, backend=impl)
    run = {}
    for impl in impls or list(steps):
        if impl not in steps:
            continue

        def one(step=steps[impl]):
            s.grad = None
            loss = step(s, t)
            loss.backward()
            return loss.detach(), s.grad

        run[impl] = one

    def compare(x, y):
        return max(abs(float(x[0]) - float(y[0])) / max(1.0, abs(float(y[0]))), _err(x[1], y[1]))

    def truth():  # the reference in float64 judges every row, the eager one included
        sd = s.detach().double().requires_grad_(True)
        loss = reference.distill_loss(sd, t.detach().double(), name, param_a=a, param_b=b, temperature=TEMPERATURE)
        loss.backward()
        return loss.detach(), sd.grad

    return Case("divergence", shape, dtype, device, run, compare, _tol(dtype), 3 * n * k * s.element_size(),
                n * k, "elem", "K", truth=truth)
