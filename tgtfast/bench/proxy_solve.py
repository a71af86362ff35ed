"""``tgtfast bench --op proxy``: the Proxy Teacher coefficient search (``N, K, M`` and ``C`` candidates)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

import tgtfast
from tgtfast.bench.case import Case, _err, backend_impls


def _case_proxy(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, impls: Optional[List[str]]):
    n, k, m, c = shape["N"], shape["K"], shape["M"], shape["C"]
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2.0, -1)
    y = torch.multinomial(p.float(), 1, generator=g)[:, 0]
    names = impls or (["eager"] + backend_impls(torch.device("cpu"), torch.float64, ("cpp",)))
    run = {}
    for impl in names:
        backend = "reference" if impl == "eager" else impl
        run[impl] = lambda backend=backend: tgtfast.search_coefficients(
            p, y, order=m, num_candidates=c, seed=0, backend=backend).candidate_deviations
    return Case("proxy", shape, torch.float64, torch.device("cpu"), run, _err, 1e-9, None, (c + 1) * n,
                "pair", "N")
