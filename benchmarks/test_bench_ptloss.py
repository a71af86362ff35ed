"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Forward+backward of PTLoss for each implementation on the same inputs (the eager reference, torch.compile of
it, and every available backend). ``tgtfast bench`` reports the same with the roofline and peak memory.
"""

import pytest
import torch

from tgtfast.bench import _fwd_bwd, available_impls, make_inputs, make_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(256, 4096, 5), (1024, 32000, 5)] if DEVICE.type == "cuda" else [(256, 4096, 5), (256, 32000, 5)]


@pytest.mark.parametrize("impl", available_impls(DEVICE, torch.float32))
@pytest.mark.parametrize("n,k,m", SHAPES)
def test_ptloss_fwd_bwd(benchmark, impl, n, k, m):
    s, t, coeffs = make_inputs(n, k, m, torch.float32, DEVICE)
    s.requires_grad_(True)
    step = make_step(impl, coeffs)
    _fwd_bwd(step, s, t)

    def run():
        _fwd_bwd(step, s, t)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"N": n, "K": k, "M": m, "impl": impl})
    benchmark(run)
