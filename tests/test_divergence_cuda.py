"""The compiled CUDA kernel of ``torch.ops.tgtfast.divergence_fwd`` against the float64 reference.

The GPU tests skip unless a CUDA device is visible and ``tgtfast.backends(op="divergence")`` reports the CUDA
backend available (the extension registered a CUDA kernel for the op, ``csrc/cuda/divergence_cuda_launcher.cpp``).
The oracle is ``tgtfast.reference.divergence_rows`` in float64 on the CPU, on the same (rounded) inputs times the
scales, with gradients by autograd (docs/design.md, "Divergences").

Tolerances: the loss is accumulated in float32 from inputs that are exact in every dtype, so it gets a float32
tolerance for all dtypes; gradients are rounded to the input dtype, so they get a relative tolerance of a few units
of that dtype plus an absolute term relative to the largest gradient.
"""

from __future__ import annotations

import pytest
import torch

import tgtfast
from oracle import assert_close64
from tgtfast.reference import DIVERGENCES, divergence_rows

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16]
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_ATOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6  # ATOL times the largest loss (tests/oracle.py's assert_close64)

# (divergence, param_a, param_b): every divergence, the AB-divergence in each of its forms (general, beta = 0,
# alpha = 0, alpha = -beta, both 0), and a few parameters each.
CASES = [
    ("forward_kl", 0.0, 0.0),
    ("reverse_kl", 0.0, 0.0),
    ("jsd", 0.5, 0.0),
    ("jsd", 0.1, 0.0),
    ("skew_kl", 0.1, 0.0),
    ("skew_kl", 0.6, 0.0),
    ("skew_reverse_kl", 0.1, 0.0),
    ("skew_reverse_kl", 0.6, 0.0),
    ("tvd", 0.0, 0.0),
    ("symmetric_kl", 0.3, 0.0),
    ("ab_divergence", 0.5, 0.5),
    ("ab_divergence", 1.5, -0.5),
    ("ab_divergence", 0.7, 0.0),
    ("ab_divergence", 0.0, 0.7),
    ("ab_divergence", 0.4, -0.4),
    ("ab_divergence", 0.0, 0.0),
    ("taid", 0.3, 0.0),
    ("taid", 0.9, 0.0),
]
# Cases whose rows stay finite when the teacher gives some classes no mass (logit -inf), and cases that are +inf.
FINITE_WITHOUT_MASS = [
    ("forward_kl", 0.0, 0.0),
    ("jsd", 0.5, 0.0),
    ("skew_kl", 0.6, 0.0),
    ("skew_reverse_kl", 0.6, 0.0),
    ("tvd", 0.0, 0.0),
    ("ab_divergence", 0.5, 0.5),
    ("ab_divergence", 0.7, 0.0),
    ("taid", 0.3, 0.0),
]
INFINITE_WITHOUT_MASS = [("reverse_kl", 0.0, 0.0), ("symmetric_kl", 0.3, 0.0), ("skew_reverse_kl", 0.0, 0.0)]
# Logits of +-1e4 overflow the AB-divergence's negative powers (as in the reference); the other cases stay finite.
EXTREME = [c for c in CASES if not (c[0] == "ab_divergence" and min(c[1], c[2]) < 0)]


def _case_id(case):
    name, a, b = case
    return name if name in ("forward_kl", "reverse_kl", "tvd") else f"{name}-{a:g}-{b:g}"


def _has_cuda_kernel() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return tgtfast.backends(op="divergence")["cuda"] == "available"
    except Exception:  # noqa: BLE001 - an extension without the op: the tests skip
        return False


requires_cuda_kernel = pytest.mark.skipif(
    not _has_cuda_kernel(), reason="needs a CUDA device and the compiled CUDA kernel of tgtfast::divergence_fwd"
)


def _op(s, t, case, valid=None, scales=(1.0, 1.0), need=(True, True), grad_scale=None):
    name, a, b = case
    args = (s, t, valid, DIVERGENCES.index(name), a, b, scales[0], scales[1], need[0], need[1])
    if grad_scale is not None:
        args += (grad_scale,)
    return torch.ops.tgtfast.divergence_fwd(*args)


# ----------------------------------------------------------------------------------------------------
# Oracle


def reference(s, t, case, valid=None, scales=(1.0, 1.0), grad_scale=1.0):
    """(loss, grad_student, grad_teacher) in float64 on the CPU for the rounded inputs s, t; rows where valid is
    false are 0 (and their inputs not used)."""
    name, a, b = case
    sd = s.detach().cpu().double()
    td = t.detach().cpu().double()
    if valid is not None:
        keep = valid.cpu()[:, None]
        sd = torch.where(keep, sd, torch.zeros_like(sd))
        td = torch.where(keep, td, torch.zeros_like(td))
    sd.requires_grad_()
    td.requires_grad_()
    rows = divergence_rows(sd * scales[0], td * scales[1], name, param_a=a, param_b=b)
    grads = torch.autograd.grad(rows.sum() * grad_scale, (sd, td), allow_unused=True)
    grad_s, grad_t = (torch.zeros_like(x) if g is None else g for g, x in zip(grads, (sd, td)))
    rows = rows.detach()
    if valid is not None:
        keep = valid.cpu()
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        grad_s = torch.where(keep[:, None], grad_s, torch.zeros_like(grad_s))
        grad_t = torch.where(keep[:, None], grad_t, torch.zeros_like(grad_t))
    return rows, grad_s, grad_t


def assert_close_loss(out, ref):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close64(out, ref, torch.float32, "loss", rtol=LOSS_RTOL, atol=LOSS_ATOL)


def assert_close_grad(out, ref, dtype, what):
    """Within a few units of the gradient's dtype of the float64 truth, plus a term relative to its largest entry;
    non-finite entries must match."""
    assert out.dtype == dtype and out.shape == ref.shape, (what, out.dtype, out.shape)
    assert_close64(out, ref, dtype, what, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])


def make_inputs(n, k, dtype, *, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) * scale
    t = torch.randn(n, k, generator=g) * scale
    return s.to(device=DEVICE, dtype=dtype), t.to(device=DEVICE, dtype=dtype)


def run_and_check(s, t, case, valid=None, scales=(1.0, 1.0), grad_scale=None):
    loss, gs, gt = _op(s, t, case, valid, scales, grad_scale=grad_scale)
    rl, rgs, rgt = reference(s, t, case, valid, scales, 1.0 if grad_scale is None else grad_scale)
    assert_close_loss(loss, rl)
    assert_close_grad(gs, rgs, s.dtype, "grad_student")
    assert_close_grad(gt, rgt, t.dtype, "grad_teacher")
    return loss, gs, gt


# ----------------------------------------------------------------------------------------------------
# GPU tests


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 4096, 32000, 131072])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, dtype, k):
    n = 2 if k >= 32000 else 5
    s, t = make_inputs(n, k, dtype, seed=k)
    run_and_check(s, t, case)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 4096, 32000])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_scales_mask_and_grad_scale(case, dtype, k):
    """Different student and teacher scales (logit_scale / T), ignored rows holding NaN, a grad_scale."""
    n = 4
    s, t = make_inputs(n, k, dtype, seed=k + 1)
    valid = torch.tensor([True, False, True, False], device=DEVICE)
    s[~valid] = float("nan")  # ignored rows must not be read: no NaN may leak
    t[~valid] = float("inf")
    loss, gs, gt = run_and_check(s, t, case, valid, scales=(0.5, 1.7), grad_scale=0.25)
    assert torch.all(loss[~valid] == 0)
    assert torch.all(gs[~valid] == 0) and torch.all(gt[~valid] == 0)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 4096, 32000, 131072])
@pytest.mark.parametrize("case", FINITE_WITHOUT_MASS, ids=_case_id)
def test_teacher_without_mass(case, dtype, k):
    """Teacher logits of -inf are classes without mass: the row stays finite and matches the reference."""
    n = 2 if k >= 32000 else 3
    s, t = make_inputs(n, k, dtype, seed=k + 2)
    t[:, ::3] = float("-inf")
    t[1, : k // 2] = float("-inf")
    loss, gs, gt = run_and_check(s, t, case, scales=(1.0, 0.8))
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert torch.all(gt[t == float("-inf")] == 0)  # no mass, no gradient


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INFINITE_WITHOUT_MASS, ids=_case_id)
def test_teacher_without_mass_infinite(case, dtype):
    s, t = make_inputs(3, 4096, dtype, seed=3)
    t[0, 5] = float("-inf")
    loss, _, _ = _op(s, t, case)
    assert loss[0] == float("inf")
    assert_close_loss(loss[1:], reference(s[1:], t[1:], case)[0])


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 4096, 32000])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nonfinite_rows(case, dtype, k):
    """NaN or +inf in a row makes its loss and both its gradients NaN; so does a student row of only -inf."""
    s, t = make_inputs(6, k, dtype, seed=k + 4)
    s[1, k // 2] = float("nan")
    t[2, k - 1] = float("nan")
    s[3, 0] = float("inf")
    t[4, k // 3] = float("inf")
    s[5] = float("-inf")
    loss, gs, gt = _op(s, t, case)
    bad = torch.arange(1, 6, device=DEVICE)
    assert torch.isnan(loss[bad]).all()
    assert torch.isnan(gs[bad]).all() and torch.isnan(gt[bad]).all()
    rl, rgs, rgt = reference(s[:1], t[:1], case)
    assert_close_loss(loss[:1], rl)
    assert_close_grad(gs[:1], rgs, dtype, "grad_student")
    assert_close_grad(gt[:1], rgt, dtype, "grad_teacher")


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", EXTREME, ids=_case_id)
def test_extreme_logits(case, dtype):
    """Logits of +-1e4 (log-probabilities from the raw logits, never exp then log) give finite, correct rows."""
    k = 4096
    s, t = make_inputs(3, k, dtype, seed=5)
    s[:, ::7] += 40.0
    s[:, 1::5] = -1e4
    t[:, 1::4] += 30.0
    t[:, 2::9] = -1e4
    loss, gs, gt = run_and_check(s, t, case)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [301, 1001, 4099, 40001])
@pytest.mark.parametrize("shift_s,shift_t", [(0, 0), (1, 1), (1, 0)])
def test_unaligned_rows(dtype, k, shift_s, shift_t):
    """Rows not 16-byte aligned (odd K, storage offsets): scalar head/tail and the scalar fallback; float16 too."""
    n = 3
    s0, t0 = make_inputs(n, k, dtype, seed=9)
    s_buf = torch.zeros(n * k + 8, dtype=dtype, device=DEVICE)
    t_buf = torch.zeros(n * k + 8, dtype=dtype, device=DEVICE)
    s = s_buf[shift_s : shift_s + n * k].view(n, k)
    t = t_buf[shift_t : shift_t + n * k].view(n, k)
    s.copy_(s0)
    t.copy_(t0)
    assert s.is_contiguous() and t.is_contiguous()
    run_and_check(s, t, ("jsd", 0.5, 0.0), scales=(1.2, 0.9))


@requires_cuda_kernel
def test_many_rows():
    """Many rows per launch for each group size (4, 32 and 256 threads per row), a third of them ignored."""
    for k in (7, 100, 4096):
        n = 3000 if k < 4096 else 600
        s, t = make_inputs(n, k, torch.bfloat16, seed=10, scale=1.5)
        valid = (torch.rand(n, generator=torch.Generator().manual_seed(0)) > 0.2).to(DEVICE)
        run_and_check(s, t, ("ab_divergence", 0.5, 0.5), valid)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 4096, 32000, 131072])
@pytest.mark.parametrize("case", [("forward_kl", 0.0, 0.0), ("taid", 0.3, 0.0)], ids=_case_id)
def test_student_gradient_only(case, dtype, k):
    """Forward KL and TAID without the teacher gradient: loss and student gradient come out of one merged sweep."""
    n = 2 if k >= 32000 else 5
    s, t = make_inputs(n, k, dtype, seed=k + 6)
    valid = torch.tensor([True, False] + [True] * (n - 2), device=DEVICE)
    t[:, ::5] = float("-inf")
    loss, gs, gt = _op(s, t, case, valid, scales=(0.7, 1.3), need=(True, False), grad_scale=0.5)
    rl, rgs, _ = reference(s, t, case, valid, scales=(0.7, 1.3), grad_scale=0.5)
    assert_close_loss(loss, rl)
    assert_close_grad(gs, rgs, dtype, "grad_student")
    assert gt.shape == (0,)


@requires_cuda_kernel
@pytest.mark.parametrize("need_s,need_t", [(True, False), (False, True), (False, False)])
def test_gradient_flags(need_s, need_t):
    s, t = make_inputs(5, 1000, torch.bfloat16, seed=8)
    case = ("skew_kl", 0.1, 0.0)
    loss, gs, gt = _op(s, t, case, need=(need_s, need_t))
    full = _op(s, t, case)
    assert torch.equal(loss, full[0])
    for flag, out, ref in ((need_s, gs, full[1]), (need_t, gt, full[2])):
        if flag:
            assert torch.equal(out, ref)
        else:
            assert out.shape == (0,) and out.device.type == "cuda"


@requires_cuda_kernel
def test_deterministic_and_current_stream():
    s, t = make_inputs(64, 32000, torch.bfloat16, seed=11)
    case = ("jsd", 0.5, 0.0)
    first = _op(s, t, case)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = _op(s, t, case)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda_kernel
def test_empty_batch():
    s = torch.empty(0, 10, device=DEVICE)
    loss, gs, gt = _op(s, s, ("forward_kl", 0.0, 0.0))
    assert loss.shape == (0,) and gs.shape == (0, 10) and gt.shape == (0, 10)


@requires_cuda_kernel
def test_bad_arguments():
    s, t = make_inputs(2, 8, torch.float32)
    op = torch.ops.tgtfast.divergence_fwd
    with pytest.raises(RuntimeError, match="teacher"):
        op(s, t.half(), None, 0, 0.0, 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="teacher"):
        op(s, t[:, :4].contiguous(), None, 0, 0.0, 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="divergence"):
        op(s, t, None, len(DIVERGENCES), 0.0, 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="param_a"):
        op(s, t, None, DIVERGENCES.index("jsd"), 1.5, 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="param_a"):
        op(s, t, None, DIVERGENCES.index("ab_divergence"), float("nan"), 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="scale"):
        op(s, t, None, 0, 0.0, 0.0, 0.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="valid"):
        op(s, t, torch.ones(2, dtype=torch.uint8, device=DEVICE), 0, 0.0, 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(s.t(), t.t(), None, 0, 0.0, 0.0, 1.0, 1.0, True, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(s.double(), t.double(), None, 0, 0.0, 0.0, 1.0, 1.0, True, True)
