"""pytest-benchmark suite for the fused linear PTLoss: ``pytest benchmarks/ --benchmark-only``.

Forward+backward from hidden states on a small shape: the materialised path (eager reference with autograd),
``torch.compile`` of it and ``tgtfast.fused_linear_ptloss``. ``benchmarks/bench_fused_linear.py`` measures the
issue's shapes with peak memory.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fused_linear import VARIANTS, _fwd_bwd, make_inputs, make_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(2048, 1024, 32000)] if DEVICE.type == "cuda" else [(256, 256, 8000)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,h,v", SHAPES)
def test_fused_linear_fwd_bwd(benchmark, variant, n, h, v):
    x, target, coeffs = make_inputs(n, h, v, 5, torch.float32, DEVICE)
    step = make_step(variant, coeffs, target, 2.0, 0.0, None)
    _fwd_bwd(step, x)

    def run():
        _fwd_bwd(step, x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"N": n, "H": h, "V": v, "variant": variant})
    benchmark(run)
