"""``tgtfast bench --op sparse``: distillation from a sparse (top-k) teacher, forward+backward on student logits
``[N, V]`` with ``TOPK`` cached classes per row (JSD, beta 0.5, tail bucket), against eager and ``torch.compile`` of
its reference; the row ``dense_kl`` times the fused dense forward KL on the same student logits (a dense teacher),
the bar the issue sets (its loss is another quantity: no match verdict)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

import tgtfast
from tgtfast import reference
from tgtfast.bench.case import Case, _err, _tol, backend_impls

DIVERGENCE, PARAMS, TEMPERATURE = "jsd", {"beta": 0.5}, 2.0


def _case_sparse(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]]):
    n, v, k = shape["N"], shape["V"], shape["TOPK"]
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=g) * 3).to(device=device, dtype=dtype)
    values, indices = torch.log_softmax(t.float(), -1).topk(k, -1)
    teacher = tgtfast.SparseTeacher(indices, values)

    def eager(s):
        return tgtfast.distill_loss(s, teacher, DIVERGENCE, **PARAMS, temperature=TEMPERATURE, backend="reference")

    torch._dynamo.reset()
    steps = {"eager": eager, "compile": torch.compile(eager)}
    for impl in backend_impls(device, dtype, ("cpp", "triton", "cuda"), op="sparse_coarse"):
        steps[impl] = lambda s, impl=impl: tgtfast.distill_loss(s, teacher, DIVERGENCE, **PARAMS,
                                                                temperature=TEMPERATURE, backend=impl)
    dense = backend_impls(device, dtype, ("cuda", "cpp"), op="divergence")
    if dense:
        steps["dense_kl"] = lambda s: tgtfast.distill_loss(s, t, "forward_kl", temperature=TEMPERATURE,
                                                           backend=dense[0])
    run = {}
    for impl, step in steps.items():
        if impls and impl not in impls and impl != "dense_kl":
            continue

        def one(step=step):
            s.grad = None
            loss = step(s)
            loss.backward()
            return loss.detach(), s.grad

        run[impl] = one

    def compare(x, y):
        return max(abs(float(x[0]) - float(y[0])) / max(1.0, abs(float(y[0]))), _err(x[1], y[1]))

    def truth():
        sd = s.detach().double().requires_grad_(True)
        loss = tgtfast.distill_loss(sd, tgtfast.SparseTeacher(indices, values.double()), DIVERGENCE, **PARAMS,
                                    temperature=TEMPERATURE, backend="reference")
        loss.backward()
        return loss.detach(), sd.grad

    # forward reads the logits, backward reads them again and writes the gradient
    return Case("sparse", shape, dtype, device, run, compare, _tol(dtype), 3 * n * v * s.element_size(), n * v,
                "elem", "V", truth=truth, incomparable=("dense_kl",))
