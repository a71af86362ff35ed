"""Triton kernels of the sparse ops (`kernels/sparse.py`) against the float64 eager reference.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set below before Triton is imported), as
tests/test_ptloss_triton.py does; with ``TRITON_INTERPRET=0`` and a GPU it runs the compiled kernels on CUDA. Shapes
are small because the interpreter runs every tile operation through numpy.

The oracle (``tgtfast.reference.coarse_logits`` on ``scale * student`` in float64 and autograd through it, with the
op's conventions for NaN and for a tail of -inf), the inputs and the scenarios of the contract are those of the CUDA
kernels' tests (tests/test_sparse_cuda.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
# The interpreter or GPU choice, its skips and the probe of the interpreter's runtime loop bounds are those of the
# PTLoss kernel's tests (importing them skips this module where they skip).
from test_ptloss_triton import DEVICE, needs_runtime_loops  # noqa: E402
from test_sparse_cuda import (  # noqa: E402
    check_both, make_inputs, reference, scenario_empty, scenario_ignored_rows, scenario_kept_mass,
    scenario_matches, scenario_minus_inf, scenario_nan_and_inf,
)

from tgtfast.kernels import sparse as sk  # noqa: E402

# numpy warns about the NaN/inf that masked lanes and the bad-input tests compute in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

INF = float("inf")


def make(n, v, k, dtype=torch.float32, seed=0):
    return make_inputs(n, v, k, dtype, seed, DEVICE)


def run(s, idx, grad, valid=None, scale=1.0):
    """Both kernels: the forward, and the backward from the forward's own output."""
    coarse = sk.sparse_coarse_fwd(s, idx, valid, scale)
    return coarse, sk.sparse_coarse_bwd(s, idx, coarse, grad, valid, scale)


def test_launch_config():
    assert sk.launch_config(7, words=True) == (64, 32, 8)
    assert sk.launch_config(7, words=False) == (64, 8, 2)
    assert sk.launch_config(40, words=True) == (32, 64, 8)
    assert sk.launch_config(4096, words=True) == (1, 4096, 16)
    assert sk.launch_config(131072, words=False) == (1, 4096, 16)


@pytest.mark.parametrize("v", [7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_matches_reference(v, dtype):
    """Every kept count (1, 3, V - 1, V: a tail of one class, and none) on rows of one chunk."""
    for k in sorted({1, 3, v - 1, v}):
        scenario_matches(run, make, v, k, dtype)


@needs_runtime_loops
@pytest.mark.parametrize("v", [300, 4100])
def test_chunked_rows(monkeypatch, v):
    """Rows walked in several chunks: of 64 classes (two bitmap words) at V = 300, the real 4096 just past it at
    V = 4100; the kept classes fall in different chunks, some sharing a bitmap word."""
    if v == 300:
        monkeypatch.setattr(sk, "_MAX_BLOCK_K", 64)
        assert sk.launch_config(v, words=True)[1] == 64
    for k in (1, 3, v - 1, v) if v == 300 else (1, 64, v - 1):
        scenario_matches(run, make, v, k, torch.float32)


@needs_runtime_loops
def test_chunked_row_starting_with_minus_inf(monkeypatch):
    """A row whose first chunks are all -inf or kept: the running maximum is -inf there and must not turn the sum
    into NaN; a row whose last chunks are all -inf."""
    monkeypatch.setattr(sk, "_MAX_BLOCK_K", 64)
    s, idx, grad = make(3, 300, 5, torch.float32, 2)
    s[1, :150] = -INF
    idx[1] = torch.tensor([160, 161, 190, 250, 299])
    s[2, 64:] = -INF
    check_both(run(s, idx, grad, None, 1.3), reference(s, idx, grad, None, 1.3))


@needs_runtime_loops
def test_kept_classes_in_chunks(monkeypatch):
    """The forward's gather in several steps (one kept class a step): the entries, a NaN found in a later step (the
    whole row NaN, entries written by earlier steps too), ignored rows."""
    monkeypatch.setattr(sk, "kept_block", lambda n_kept, block_n: 1)
    scenario_matches(run, make, 40, 39, torch.float32)
    scenario_nan_and_inf(run, make, 40, 5)
    scenario_ignored_rows(run, make, 40, 3)


@pytest.mark.parametrize("scenario", [scenario_minus_inf, scenario_kept_mass, scenario_nan_and_inf,
                                      scenario_ignored_rows], ids=lambda f: f.__name__[9:])
def test_contract(scenario):
    """The scenarios of the contract (tests/test_sparse_cuda.py) on rows of 40 classes, 3 kept."""
    scenario(run, make, 40, 3)


def test_float64_inputs():
    """float64 computes in float64 (1.25 is exact in float32, the type the scale reaches the kernels in)."""
    scenario_matches(run, make, 40, 3, torch.float64)
    s, idx, grad = make(3, 40, 3, torch.float64, 7)
    got = run(s, idx, grad, None, 1.25)
    ref = reference(s, idx, grad, None, 1.25)
    for out, r in zip(got, ref):
        assert (out.cpu() - r).abs().max() < 1e-12


def test_empty_inputs():
    scenario_empty(run, DEVICE)


def test_through_the_registered_op():
    """The kernels as ``tgtfast::sparse_coarse_{fwd,bwd}_triton`` (tgtfast/ops/sparse.py): the forward op's
    autograd runs the backward op."""
    from tgtfast import dispatch
    from tgtfast.ops import sparse as ops

    why = dispatch.ensure_loaded("sparse_coarse", "triton")
    if why is not None:
        pytest.skip(f"triton backend: {why}")
    s0, idx, grad = make(4, 40, 3, torch.float32, 8)
    valid = torch.tensor([True, True, False, True], device=DEVICE)
    s = s0.clone().requires_grad_()
    coarse = ops.coarse("triton")(s, idx, valid, 0.7)
    (coarse * grad).sum().backward()
    check_both((coarse, s.grad), reference(s0, idx, grad, valid, 0.7))
