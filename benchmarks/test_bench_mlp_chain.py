"""pytest-benchmark suite for the fused MLP chain: ``pytest benchmarks/test_bench_mlp_chain.py --benchmark-only``.

Forward of the TGT teacher of the issue (decoder 64->256->784, labeler 784->256->K) for the eager modules and
every available fused backend; ``python benchmarks/bench_mlp_chain.py`` reports the same with peak memory.
"""

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
# the installed tgtfast (with its compiled extension), never the source tree `python -m pytest` puts first
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(_HERE)]
sys.path.insert(0, _HERE)
from bench_mlp_chain import LATENT, available_impls, make_step, make_teacher, run_once  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("impl", available_impls(DEVICE))
@pytest.mark.parametrize("k", [10, 1000])
def test_mlp_chain_fwd(benchmark, impl, k):
    decoder, labeler, g = make_teacher(k, DEVICE, torch.float32)
    z = torch.randn(4096, LATENT, generator=g).to(DEVICE)
    step = make_step(impl, decoder, labeler)

    def run():
        run_once(step, z, False)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"B": 4096, "K": k, "impl": impl})
    benchmark(run)
