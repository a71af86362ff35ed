"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Every op of the package for each implementation on the same inputs: the eager reference, ``torch.compile`` of
it where that applies, and every available backend (the cases of :mod:`tgtfast.bench`). ``tgtfast bench``
reports the same with the roofline, the per-element cost and peak memory.
"""

import pytest
import torch

from tgtfast.bench import BUILDERS, op_available

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")

# Shapes sized for a pytest run (the issue-sized shapes are `tgtfast bench`'s defaults).
SHAPES = {
    "ptloss": [{"N": 256, "K": 4096, "M": 5}, {"N": 1024 if GPU else 256, "K": 32000, "M": 5}],
    "proxy": [{"N": 2000, "K": 3, "M": 5, "C": 20}],
    "tgt": [{"B": 1024, "D": 64, "X": 784, "K": 10}],
    "tgt_bwd": [{"B": 1024, "D": 64, "X": 784, "K": 10}],
    "fused_linear": [{"N": 1024, "H": 256, "V": 8192}],
}
IMPLS = ("eager", "compile", "cpp", "triton", "cuda")


def _params():
    for op, shapes in SHAPES.items():
        for shape in shapes:
            for impl in IMPLS:
                yield pytest.param(op, shape, impl, id=f"{op}-{'-'.join(f'{k}{v}' for k, v in shape.items())}-{impl}")


@pytest.mark.parametrize("op,shape,impl", list(_params()))
def test_op(benchmark, op, shape, impl):
    why = op_available(op)
    if why is not None:
        pytest.skip(why)
    case = BUILDERS[op](shape, torch.float32, DEVICE, None)
    if impl not in case.run:
        pytest.skip(f"{impl} does not run {op} here")
    fn = case.run[impl]
    fn()

    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"op": op, "impl": impl, **shape})
    benchmark(run)
