"""The compiled CUDA kernels of ``torch.ops.tgtfast.sparse_coarse_fwd`` and ``sparse_coarse_bwd`` against the float64
reference.

The GPU tests skip unless a CUDA device is visible and the extension registered the CUDA kernels of the op
(``tgtfast.backends("sparse_coarse")["cuda"] == "available"``, csrc/cuda/sparse_cuda_launcher.cpp). The oracle,
:func:`reference`, is ``tgtfast.reference.coarse_logits`` on ``scale * student`` in float64 on the CPU (the forward)
and autograd through it (the backward), on the same (rounded) inputs, with the op's conventions where they part
ways: a NaN anywhere in a row makes the row's coarse logits all NaN and its gradient NaN off the kept classes (the
reference keeps a NaN in its own entry), and the gradient off the kept classes is 0 where the tail is -inf
(autograd's ``exp(-inf - -inf)`` is NaN) or gets no gradient. The oracle, the input maker and the scenarios of the
contract (``scenario_*``) serve tests/test_sparse_triton.py too; :func:`test_oracle_conventions` checks the oracle
without a GPU.

Tolerances: the forward is float32 arithmetic on inputs exact in every dtype, so it gets a float32 tolerance relative
to the row's largest entry; the gradient is rounded to the student's dtype, so it also gets a relative tolerance of
one unit of that dtype.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import tgtfast
from tgtfast.reference import coarse_logits

try:  # importing the extension registers torch.ops.tgtfast
    importlib.import_module("tgtfast._C")
except Exception:  # noqa: BLE001 - the tests below skip when the op is missing
    pass

NAN, INF = float("nan"), float("inf")
DEVICE = "cuda"


# ----------------------------------------------------------------------------------------------------
# Oracle and inputs (shared with tests/test_sparse_triton.py)


def reference(s, idx, grad, valid=None, scale=1.0):
    """``(coarse, grad_student)`` in float64 on the CPU with the op's conventions (module docstring); ignored rows
    0. ``grad`` is the gradient of the coarse logits ``[N, k + 1]``."""
    s64 = s.detach().double().cpu().requires_grad_()
    idx, grad = idx.cpu(), grad.double().cpu()
    coarse = coarse_logits(s64 * scale, idx)
    (gs,) = torch.autograd.grad((coarse * grad).sum(), s64)
    coarse = coarse.detach()
    rest = torch.ones_like(gs, dtype=torch.bool).scatter_(1, idx, False)
    nan_rows = s64.detach().isnan().any(-1, keepdim=True)
    coarse = torch.where(nan_rows, NAN, coarse)
    gs = torch.where(nan_rows & rest, NAN, gs)
    gs = torch.where(((coarse[:, -1:] == -INF) | (grad[:, -1:] == 0)) & rest, 0.0, gs)  # no tail / no gradient
    if valid is not None:
        keep = valid.cpu()[:, None]
        coarse, gs = torch.where(keep, coarse, 0.0), torch.where(keep, gs, 0.0)
    return coarse, gs


def check(out, ref, tol=2e-5, rtol=0.0):
    """``|out - ref| <= tol (1 + max |ref| of the row) + rtol |ref|``; NaN must match NaN, infinities exactly."""
    out = out.detach().double().cpu()
    assert out.shape == ref.shape
    size = ref.abs().nan_to_num(0.0, 0.0, 0.0).amax(-1, keepdim=True)
    same = (out == ref) | (out.isnan() & ref.isnan()) | ((out - ref).abs() <= tol * (1.0 + size) + rtol * ref.abs())
    assert bool(same.all()), f"max err {(out - ref).abs().nan_to_num(math.inf).max().item():.3e}\n{out}\n{ref}"


def check_both(got, ref, dtype=torch.float32):
    """The coarse logits (float32 accurate) and the gradient (also rounded to the student's dtype)."""
    check(got[0], ref[0])
    check(got[1], ref[1], rtol=0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps)


def make_inputs(n, v, k, dtype=torch.float32, seed=0, device="cpu"):
    """Student logits ``[n, v]`` (3 randn), distinct kept classes ``[n, k]`` in random order and a gradient
    ``[n, k + 1]`` (float64 for float64 logits, else float32)."""
    g = torch.Generator().manual_seed(seed + 1000 * v + k)
    s = (3.0 * torch.randn(n, v, generator=g)).to(dtype)
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]) if n else torch.empty(0, k).long()
    grad = torch.randn(n, k + 1, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return s.to(device), idx.to(device), grad.to(device)


# ----------------------------------------------------------------------------------------------------
# Scenarios of the contract, run by both backends' tests: `run(s, idx, grad, valid, scale)` returns the forward and
# the backward from it, `make(n, v, k, dtype, seed)` the inputs on the backend's device.


def scenario_matches(run, make, v, k, dtype):
    """Scale 1 / 1.5, an ignored row holding NaN (never read)."""
    s, idx, grad = make(5, v, k, dtype, 0)
    valid = torch.tensor([True, True, False, True, True], device=s.device)
    ref = reference(s, idx, grad, valid, 1 / 1.5)
    s[2, 0] = NAN
    got = run(s, idx, grad, valid, 1 / 1.5)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[0].shape == (5, k + 1) and got[1].dtype == dtype and got[1].shape == s.shape
    check_both(got, ref, dtype)
    assert not got[0][2].any() and not got[1][2].any()
    if k == v:  # nothing left: the tail is -inf
        assert (got[0][[0, 1, 3, 4], -1] == -INF).all()


def scenario_minus_inf(run, make, v, k):
    """-inf among the rest (absent classes: no gradient), kept (a -inf kept entry), everything -inf, everything left
    -inf (the tail -inf and its gradient 0). Needs ``2 k < v``."""
    s, idx, grad = make(5, v, k, torch.float32, 3)
    s[0, : v // 2] = -INF
    s[0, idx[0]] = 1.0
    s[1, idx[1, 0]] = -INF
    s[2] = -INF
    s[3] = -INF
    s[3, idx[3]] = 2.0
    got = run(s, idx, grad, None, 0.9)
    check_both(got, reference(s, idx, grad, None, 0.9))
    assert got[0][2, :k].eq(-INF).all() and got[0][2:4, -1].eq(-INF).all() and torch.isfinite(got[1]).all()


def scenario_kept_mass(run, make, v, k):
    """The tail is computed on the rest, never as a difference: exact when the kept classes hold all but 1e-26 of
    the mass, or the rest lies 100 below them (past float32's exp range from the maximum)."""
    s, idx, grad = make(4, v, k, torch.float32, 4)
    for row, (top, rest) in enumerate(((0.0, -60.0), (100.0, 0.0), (30.0, -30.0), (5.0, 4.0))):
        s[row] = rest + 0.1 * s[row]
        s[row, idx[row]] = top
    got = run(s, idx, grad, None, 1.0)
    ref = reference(s, idx, grad)
    check_both(got, ref)
    assert (got[0][:, -1].double().cpu() - ref[0][:, -1]).abs().max() < 1e-4


def scenario_nan_and_inf(run, make, v, k):
    """NaN anywhere in a row (among the rest, kept) makes its coarse logits all NaN; +inf among the rest makes the
    tail +inf, a kept +inf only its own entry; a tail without gradient gives no gradient off the kept classes. The
    other rows are unaffected. Needs ``k >= 3`` and ``k + 2 <= v``."""
    s, idx, grad = make(7, v, k, torch.float32, 5)
    rest = torch.ones(s.shape, dtype=torch.bool, device=s.device).scatter_(1, idx, False)
    first, last = rest.int().argmax(-1), v - 1 - rest.flip(-1).int().argmax(-1)  # two classes of the rest per row
    s[1, first[1]] = NAN
    s[2, idx[2, 1]] = NAN
    s[3, last[3]] = INF
    s[4, idx[4, 2]] = INF
    s[5, first[5]], s[5, last[5]] = NAN, INF
    grad[6, -1] = 0.0
    coarse, gs = run(s, idx, grad, None, 0.5)
    assert coarse[[1, 2, 5]].isnan().all() and not coarse[[0, 3, 4, 6]].isnan().any()
    assert coarse[3, -1] == INF and coarse[4, 2] == INF and torch.isfinite(coarse[4, -1])
    assert not (gs[6] * rest[6]).any()
    check_both((coarse, gs), reference(s, idx, grad, None, 0.5))


def scenario_ignored_rows(run, make, v, k):
    """Ignored rows are 0 and never read: neither their NaN / inf logits nor their (out of range) indices."""
    s, idx, grad = make(6, v, k, torch.float32, 6)
    valid = torch.tensor([True, False, True, False, True, False], device=s.device)
    s[1], s[3, 0], s[5, idx[5, 0]] = NAN, INF, NAN
    idx[3] = -1
    got = run(s, idx, grad, valid, 0.25)
    assert all(torch.isfinite(x).all() for x in got) and not any(x[1::2].any() for x in got)
    distinct = torch.where(valid[:, None], idx, torch.arange(k, device=s.device))  # for the reference's gather
    check_both(got, reference(s, distinct, grad, valid, 0.25))
    got = run(s, idx, grad, torch.zeros_like(valid), 1.0)
    assert not any(x.any() for x in got)


def scenario_empty(run, device):
    """No rows; rows of no classes (the tail -inf, 0 in an ignored row)."""
    coarse, gs = run(*make_inputs(0, 5, 2, device=device), None, 1.0)
    assert coarse.shape == (0, 3) and gs.shape == (0, 5)
    s, idx = torch.empty(3, 0, device=device), torch.empty(3, 0, dtype=torch.int64, device=device)
    valid = torch.tensor([True, False, True], device=device)
    coarse, gs = run(s, idx, torch.ones(3, 1, device=device), valid, 1.0)
    assert coarse.tolist() == [[-INF], [0.0], [-INF]] and gs.shape == (3, 0)


def test_oracle_conventions():
    """The oracle on the CPU: a row with nothing left (tail -inf, gradient 0 off the kept classes), a NaN (the
    whole coarse row NaN, the gradient NaN off the kept classes), an ignored row (zeros)."""
    s = torch.tensor([[1.0, -INF, -INF], [0.5, NAN, 2.0], [3.0, 1.0, -1.0], [NAN, 0.0, 0.0]])
    idx = torch.tensor([[0], [0], [2], [0]])
    grad = torch.tensor([[2.0, 3.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    coarse, gs = reference(s, idx, grad, torch.tensor([True, True, True, False]), 0.5)
    assert coarse[0].tolist() == [0.5, -INF] and gs[0].tolist() == [1.0, 0.0, 0.0]
    assert coarse[1].isnan().all() and gs[1, 0] == 0.5 and gs[1, 1:].isnan().all()
    assert coarse[2, 0] == -0.5 and math.isclose(coarse[2, 1], math.log(math.exp(1.5) + math.exp(0.5)))
    assert not coarse[3].any() and not gs[3].any()


# ----------------------------------------------------------------------------------------------------
# The CUDA kernels


def _has_cuda_kernels() -> bool:
    return torch.cuda.is_available() and tgtfast.backends("sparse_coarse")["cuda"] == "available"


requires_cuda_kernel = pytest.mark.skipif(
    not _has_cuda_kernels(), reason="needs a CUDA device and the compiled CUDA kernels of tgtfast::sparse_coarse_*"
)


def make(n, v, k, dtype=torch.float32, seed=0):
    return make_inputs(n, v, k, dtype, seed, DEVICE)


def run(s, idx, grad, valid=None, scale=1.0):
    """Both ops: the forward, and the backward from the forward's own output."""
    coarse = torch.ops.tgtfast.sparse_coarse_fwd(s, idx, valid, scale)
    return coarse, torch.ops.tgtfast.sparse_coarse_bwd(s, idx, coarse, grad, valid, scale)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k", [1, 64, 512])
@pytest.mark.parametrize("v", [7, 4096, 32000, 131072])
def test_matches_reference(v, k, dtype):
    """Every row width (warp, 256- and 1024-thread rows) and kept count."""
    scenario_matches(run, make, v, min(k, v), dtype)


@requires_cuda_kernel
@pytest.mark.parametrize("v", [7, 40, 4096, 32000])
def test_nothing_or_one_class_left(v):
    """k = V - 1 (a tail of one class) and k = V (the tail -inf, no gradient but the kept classes'), in float16."""
    for k in (v - 1, v):
        scenario_matches(run, make, v, k, torch.float16)


@requires_cuda_kernel
def test_long_rows_in_segments():
    """Rows past one bitmap segment (262144 classes for a 1024-thread row): kept classes on both sides of the
    boundary, two sharing a bitmap word."""
    v = 300000
    s, idx, grad = make(3, v, 64, torch.bfloat16, 2)
    idx[0, :4] = torch.tensor([262143, 262144, 262145, 0])
    idx[1, :2] = torch.tensor([v - 1, 262140])
    check_both(run(s, idx, grad, None, 1.1), reference(s, idx, grad, None, 1.1), torch.bfloat16)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_misaligned_rows(dtype):
    """A student that does not start on 16 bytes (a scalar head before the vector loads forward; backward, where
    its gradient is aligned, a scalar walk)."""
    v = 4099
    s, idx, grad = make(5, v, 64, dtype, 3)
    buf = torch.empty(s.numel() + 1, dtype=dtype, device=DEVICE)
    buf[1:] = s.flatten()
    shifted = buf[1:].view(5, v)
    assert shifted.data_ptr() % 16 != 0
    check_both(run(shifted, idx, grad, None, 0.9), reference(s, idx, grad, None, 0.9), dtype)


@requires_cuda_kernel
@pytest.mark.parametrize("v,k", [(40, 3), (32000, 64)])
def test_contract(v, k):
    """The scenarios of the contract (-inf, NaN and +inf, kept classes with all the mass, ignored rows)."""
    scenario_minus_inf(run, make, v, k)
    scenario_kept_mass(run, make, v, k)
    scenario_nan_and_inf(run, make, v, k)
    scenario_ignored_rows(run, make, v, k)


@requires_cuda_kernel
def test_empty_inputs():
    scenario_empty(run, DEVICE)


@requires_cuda_kernel
def test_bad_arguments():
    s, idx, grad = make(3, 40, 3)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.tgtfast.sparse_coarse_fwd(s, idx.int(), None, 1.0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        torch.ops.tgtfast.sparse_coarse_fwd(s.double(), idx, None, 1.0)
    with pytest.raises(RuntimeError, match="valid"):
        torch.ops.tgtfast.sparse_coarse_fwd(s, idx, torch.ones(2, dtype=torch.bool, device=DEVICE), 1.0)
    coarse = torch.ops.tgtfast.sparse_coarse_fwd(s, idx, None, 1.0)
    with pytest.raises(RuntimeError, match="grad_coarse"):
        torch.ops.tgtfast.sparse_coarse_bwd(s, idx, coarse, grad[:, :2].contiguous(), None, 1.0)


@requires_cuda_kernel
def test_through_the_dispatcher_with_autograd():
    """``tgtfast.ops.sparse.coarse("cuda")``: the forward op's autograd runs the backward op."""
    from tgtfast.ops import sparse as ops

    s0, idx, grad = make(4, 32000, 64, torch.bfloat16, 8)
    valid = torch.tensor([True, True, False, True], device=DEVICE)
    s = s0.clone().requires_grad_()
    coarse = ops.coarse("cuda")(s, idx, valid, 0.7)
    (coarse * grad).sum().backward()
    check_both((coarse, s.grad), reference(s0, idx, grad, valid, 0.7), torch.bfloat16)
