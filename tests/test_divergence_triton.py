"""Triton divergence kernel (`kernels/divergence.py`) against the float64 eager reference.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set below before Triton is imported), as
tests/test_ptloss_triton.py does; with ``TRITON_INTERPRET=0`` and a GPU it runs the compiled kernel on CUDA. Shapes
are small because the interpreter runs every tile operation through numpy.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
# The interpreter or GPU choice, its skips and the probe of the interpreter's runtime loop bounds are those of the
# PTLoss kernel's tests (importing them skips this module where they skip).
from test_ptloss_triton import DEVICE, needs_runtime_loops  # noqa: E402

from tgtfast.kernels import divergence as dk  # noqa: E402
from tgtfast.reference import DIVERGENCES, divergence_rows  # noqa: E402

# numpy warns about the NaN/inf that masked lanes and the bad-input tests compute in the interpreter
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (divergence, param_a, param_b): every divergence, the ends of the parameter ranges, every AB form
CASES = [
    ("forward_kl", 0.0, 0.0),
    ("reverse_kl", 0.0, 0.0),
    ("jsd", 0.3, 0.0),
    ("jsd", 0.7, 0.0),
    ("skew_kl", 0.0, 0.0),
    ("skew_kl", 0.5, 0.0),
    ("skew_kl", 1.0, 0.0),
    ("skew_reverse_kl", 0.0, 0.0),
    ("skew_reverse_kl", 0.5, 0.0),
    ("skew_reverse_kl", 1.0, 0.0),
    ("tvd", 0.0, 0.0),
    ("symmetric_kl", 0.0, 0.0),
    ("symmetric_kl", 0.3, 0.0),
    ("symmetric_kl", 1.0, 0.0),
    ("ab_divergence", 0.5, 0.7),
    ("ab_divergence", -0.3, 0.8),
    ("ab_divergence", 1.5, -0.5),
    ("ab_divergence", 0.6, 0.0),
    ("ab_divergence", 0.0, 0.4),
    ("ab_divergence", 0.5, -0.5),
    ("ab_divergence", 0.0, 0.0),
    ("taid", 0.0, 0.0),
    ("taid", 0.4, 0.0),
    ("taid", 1.0, 0.0),
]
IDS = [f"{name}-{a:g}-{b:g}" if name == "ab_divergence" else f"{name}-{a:g}" for name, a, b in CASES]
cases = pytest.mark.parametrize("name,a,b", CASES, ids=IDS)


# ----------------------------------------------------------------------------------------------- helpers
def make_inputs(n, k, dtype=torch.float32, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * k)
    s = scale * torch.randn(n, k, generator=g)
    t = scale * torch.randn(n, k, generator=g)
    return s.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE)


def run(s, t, name, a, b, s_scale=1.0, t_scale=1.0, valid=None, grad_scale=1.0, need=(True, True)):
    return dk.divergence_fwd(s, t, valid, DIVERGENCES.index(name), a, b, s_scale, t_scale, need[0], need[1],
                             grad_scale)


def reference(s, t, name, a, b, s_scale=1.0, t_scale=1.0, grad_scale=1.0):
    """Rows and the gradients of ``grad_scale * rows`` in float64 by autograd: at temperature ``1 / scale`` when
    both scales agree, else on the pre-scaled logits."""
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    if s_scale == t_scale:
        rows = divergence_rows(s64, t64, name, param_a=a, param_b=b, temperature=1.0 / s_scale)
    else:
        rows = divergence_rows(s64 * s_scale, t64 * t_scale, name, param_a=a, param_b=b)
    gs, gt = torch.autograd.grad((grad_scale * rows).sum(), (s64, t64), allow_unused=True)
    return rows.detach(), gs, torch.zeros_like(t64) if gt is None else gt


def check(out, ref, tol=2e-5):
    """``|out - ref| <= tol (1 + max |ref| of the row)``: the float32 cancellation of these sums is relative to the
    size of the row's terms. NaN must match NaN."""
    out = out.detach().double().cpu()
    assert out.shape == ref.shape
    size = ref.abs().nan_to_num(0.0, 0.0, 0.0)
    size = size.amax(-1, keepdim=True) if ref.dim() == 2 else size
    same = (out == ref) | (out.isnan() & ref.isnan()) | ((out - ref).abs() <= tol * (1.0 + size))
    assert bool(same.all()), f"max err {(out - ref).abs().nan_to_num(math.inf).max().item():.3e}\n{out}\n{ref}"


def check_all(got, ref, keep=None, tol=2e-5):
    """Loss and both gradients against the reference, which counts as 0 in the rows where ``keep`` is False."""
    for out, r in zip(got, ref):
        if keep is not None:
            k = keep.cpu() if r.dim() == 1 else keep.cpu()[:, None]
            r = torch.where(k, r, 0.0)
        check(out, r, tol)


def tol_for(name, a, b):
    # the AB-divergence's negative powers (and the squared log ratio of alpha = beta = 0) have terms far larger than
    # the divergence; the reference's float64 is then the better answer by more
    return 1e-4 if name == "ab_divergence" and (min(a, b) < 0 or a == b == 0) else 2e-5


# --------------------------------------------------------------------------------------- host-side choices
def test_codes_match_the_reference_table():
    assert dk.NAMES == DIVERGENCES


def test_kernel_params():
    code = DIVERGENCES.index
    # the ends of the parameter ranges run as forward / reverse KL
    for name, a, to in (("jsd", 0.0, "forward_kl"), ("jsd", 1.0, "reverse_kl"), ("skew_kl", 0.0, "forward_kl"),
                        ("skew_reverse_kl", 0.0, "reverse_kl"), ("symmetric_kl", 0.0, "forward_kl"),
                        ("symmetric_kl", 1.0, "reverse_kl")):
        assert dk.kernel_params(code(name), a, 0.0).code == code(to)
    p = dk.kernel_params(code("jsd"), 0.25, 0.0)
    assert (p.w_p, p.w_q) == (0.25, 0.75) and p.log_w_p == math.log(0.25) and p.log_w_q == math.log(0.75)
    p = dk.kernel_params(code("skew_reverse_kl"), 1.0, 0.0)
    assert (p.w_p, p.w_q, p.log_w_p, p.log_w_q) == (0.0, 1.0, -math.inf, 0.0)
    # the AB form by exact comparisons in double: only the exact limits leave the general form
    ab = code("ab_divergence")
    for a, b, case in ((0.5, 0.7, dk.AB_GENERAL), (1e-30, 0.7, dk.AB_GENERAL), (0.5, -0.5 + 1e-15, dk.AB_GENERAL),
                       (0.5, 0.0, dk.AB_BETA_ZERO), (0.0, -0.7, dk.AB_ALPHA_ZERO), (-2.0, 2.0, dk.AB_OPPOSITE),
                       (0.0, 0.0, dk.AB_BOTH_ZERO)):
        p = dk.kernel_params(ab, a, b)
        assert p.ab_case == case.value and (p.w_p, p.w_q, p.ab_sum) == (a, b, a + b)
    with pytest.raises(ValueError, match="unknown divergence"):
        dk.kernel_params(len(DIVERGENCES), 0.0, 0.0)


def test_launch_config():
    assert dk.launch_config(7) == (64, 8, 2)
    assert dk.launch_config(33) == (32, 64, 8)
    assert dk.launch_config(4096) == (1, 4096, 16)
    assert dk.launch_config(32000) == (1, 4096, 16)


# --------------------------------------------------------------------------------------- against the spec
@cases
@pytest.mark.parametrize("k", [1, 7, 33])
def test_matches_reference(name, a, b, k):
    """Every divergence and parameter, temperature 1.5 (both scales 1 / 1.5), gradients of 0.5 * loss."""
    s, t = make_inputs(5, k)
    got = run(s, t, name, a, b, 1 / 1.5, 1 / 1.5, grad_scale=0.5)
    assert got[0].dtype == torch.float32 and got[0].shape == (5,)
    assert got[1].dtype == s.dtype and got[1].shape == s.shape and got[2].shape == t.shape
    check_all(got, reference(s, t, name, a, b, 1 / 1.5, 1 / 1.5, grad_scale=0.5), tol=tol_for(name, a, b))


@needs_runtime_loops
@cases
def test_chunked_rows(monkeypatch, name, a, b):
    """Rows longer than BLOCK_K take the three-loop path; different student and teacher scales; an ignored row
    holding NaN."""
    monkeypatch.setattr(dk, "_MAX_BLOCK_K", 32)
    assert dk.launch_config(100)[1] == 32
    s, t = make_inputs(4, 100, seed=1)
    ref = reference(s, t, name, a, b, 0.8, 1.25)
    s[2, 5], t[2, 50] = float("nan"), float("nan")
    valid = torch.tensor([True, True, False, True], device=DEVICE)
    check_all(run(s, t, name, a, b, 0.8, 1.25, valid), ref, keep=valid, tol=tol_for(name, a, b))


@needs_runtime_loops
@pytest.mark.parametrize("name,a,b", [("forward_kl", 0, 0), ("jsd", 0.3, 0), ("skew_reverse_kl", 0.5, 0),
                                      ("tvd", 0, 0), ("ab_divergence", 0.5, 0.7), ("taid", 0.4, 0)])
def test_chunked_row_starting_with_minus_inf(monkeypatch, name, a, b):
    """A row whose first chunk is absent for both (-inf student and teacher logits): the online max is -inf there
    and must not turn the running sums into NaN; the row equals the reference on the other classes and its
    gradients are 0 on the absent ones."""
    monkeypatch.setattr(dk, "_MAX_BLOCK_K", 32)
    cut = 35
    s, t = make_inputs(3, 100, seed=2)
    s[1, :cut] = t[1, :cut] = float("-inf")
    loss, gs, gt = run(s, t, name, a, b, 0.7, 0.7)
    check_all((loss[1:2], gs[1:2, cut:], gt[1:2, cut:]), reference(s[1:2, cut:], t[1:2, cut:], name, a, b, 0.7, 0.7))
    assert not gs[1, :cut].any() and not gt[1, :cut].any()
    check_all((loss[::2], gs[::2], gt[::2]), reference(s[::2], t[::2], name, a, b, 0.7, 0.7))


@cases
def test_student_and_teacher_scales_differ(name, a, b):
    """The single-tile path with ``a_s != a_t`` (a logit scale on one side), against the reference on the
    pre-scaled logits."""
    s, t = make_inputs(3, 33, seed=3)
    check_all(run(s, t, name, a, b, 1.3, 0.6, grad_scale=2.0), reference(s, t, name, a, b, 1.3, 0.6, 2.0),
              tol=tol_for(name, a, b))


# ------------------------------------------------------------------------------------------- non-finite values
# parameters where the divergence is plain KL; the reference multiplies the other term by 0, which is NaN where that
# term is infinite (TAID: 0 * (-inf) logits in its mixture), while the kernel takes the KL itself
KL_ENDS = {("skew_kl", 0.0): "forward_kl", ("skew_reverse_kl", 0.0): "reverse_kl", ("symmetric_kl", 0.0): "forward_kl",
           ("symmetric_kl", 1.0): "reverse_kl", ("taid", 1.0): "forward_kl"}


@cases
def test_teacher_minus_inf(name, a, b):
    """A teacher logit of -inf is a class of zero probability: where the reference is finite the kernel agrees (the
    logit's gradient 0); where the divergence is +inf (reverse KL, the AB-divergence's negative powers of p, a
    student -inf under teacher mass) so is the loss. Row 2 also has an absent class (-inf in both), row 3 a student
    -inf where the teacher has mass."""
    s, t = make_inputs(4, 7, seed=4)
    t[:3, 1] = t[:3, 4] = float("-inf")
    s[2, 1] = float("-inf")
    s[3, 2] = float("-inf")
    loss, gs, gt = run(s, t, name, a, b, 0.9, 0.9)
    if name == "taid" and a == 0.0:  # r = q: a zero divergence (the reference's mixture holds 0 * (-inf) = NaN)
        assert not loss.any() and not gt.any() and torch.isfinite(gs).all()
        return
    ref_loss, ref_gs, ref_gt = reference(s, t, KL_ENDS.get((name, a), name), a, b, 0.9, 0.9)
    finite = torch.isfinite(ref_loss)
    check(loss[~finite], ref_loss[~finite])  # +inf, or NaN where the AB-divergence meets 0^(-a) 0^b
    if name in ("forward_kl", "jsd", "skew_kl", "tvd", "taid"):  # finite, as the design says
        assert finite[:3].all()
    check(loss[finite], ref_loss[finite], tol_for(name, a, b))
    for out, ref in ((gs[finite], ref_gs[finite]), (gt[finite], ref_gt[finite])):
        # autograd through the reference's log-mixture of an absent class (-inf in both) is NaN: there the kernel's
        # gradient need only be finite
        assert torch.isfinite(out).all()
        check(out, torch.where(ref.isnan(), out.double().cpu(), ref), tol_for(name, a, b))
    assert not gt[:3][finite[:3]][:, [1, 4]].any()


@cases
def test_nonfinite_rows_are_nan(name, a, b):
    """NaN or +inf anywhere in a row (student or teacher), or a student row of all -inf: that row's loss and every
    element of both its gradients are NaN; the other rows are unaffected. (The reference is no judge here: its
    ``x log x`` guard turns a NaN teacher probability into a 0 term.)"""
    s, t = make_inputs(6, 7, seed=5)
    s[1, 3] = float("nan")
    t[3, 6] = float("inf")
    s[4] = float("-inf")
    t[5, 0] = float("nan")
    loss, gs, gt = run(s, t, name, a, b, 1.1, 1.1)
    bad = [1, 3, 4, 5]
    assert loss[bad].isnan().all() and gs[bad].isnan().all() and gt[bad].isnan().all()
    check_all((loss[::2][:2], gs[::2][:2], gt[::2][:2]), reference(s[[0, 2]], t[[0, 2]], name, a, b, 1.1, 1.1),
              tol=tol_for(name, a, b))


@pytest.mark.parametrize("k", [7, 33])
def test_ignored_rows_are_zero_even_with_nan(k):
    s, t = make_inputs(6, k, seed=6)
    valid = torch.tensor([True, False, True, False, True, False], device=DEVICE)
    s[1], t[3], s[5, 0] = float("nan"), float("nan"), float("inf")
    for name, a, b in (("jsd", 0.3, 0.0), ("ab_divergence", -0.3, 0.8), ("taid", 0.4, 0.0)):
        ref = reference(s[::2], t[::2], name, a, b, 0.5, 0.5, 0.25)
        got = run(s, t, name, a, b, 0.5, 0.5, valid, grad_scale=0.25)
        assert all(torch.isfinite(x).all() for x in got)
        assert not any(x[1::2].any() for x in got)
        check_all([x[::2] for x in got], ref, tol=tol_for(name, a, b))
        got = run(s, t, name, a, b, 0.5, 0.5, torch.zeros_like(valid))
        assert not any(x.any() for x in got)


@pytest.mark.parametrize("name,a,b", [("forward_kl", 0, 0), ("symmetric_kl", 0.3, 0), ("ab_divergence", 0.5, 0.7)])
def test_extreme_logits_are_finite(name, a, b):
    """Logits of +-1e4 (ties at the maximum, mass where the other side has none, equal rows): finite results."""
    g = torch.Generator().manual_seed(7)
    s = torch.where(torch.rand(4, 9, generator=g) < 0.5, -1e4, 1e4).to(DEVICE)
    t = torch.where(torch.rand(4, 9, generator=g) < 0.5, -1e4, 1e4).to(DEVICE)
    s[0], t[0] = 1e4, -1e4
    s[2] = t[2]
    got = run(s, t, name, a, b)
    assert all(torch.isfinite(x).all() for x in got)
    check_all(got, reference(s, t, name, a, b), tol=1e-4)


# --------------------------------------------------------------------------------------------- dtypes, flags
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,a,b", [("forward_kl", 0, 0), ("jsd", 0.3, 0), ("tvd", 0, 0),
                                      ("ab_divergence", -0.3, 0.8), ("taid", 0.4, 0)])
def test_low_precision_inputs(name, a, b, dtype):
    """Reference on the same (rounded) inputs in float64: the loss is float32-accurate and the gradients are off by
    their final rounding to the input dtype."""
    s, t = make_inputs(4, 33, dtype=dtype, seed=8)
    valid = torch.tensor([True, False, True, True], device=DEVICE)
    loss, gs, gt = run(s, t, name, a, b, 0.7, 0.7, valid)
    assert loss.dtype == torch.float32 and gs.dtype == gt.dtype == dtype
    ref_loss, ref_gs, ref_gt = reference(s, t, name, a, b, 0.7, 0.7)
    check_all((loss,), (ref_loss,), keep=valid, tol=tol_for(name, a, b))
    eps = torch.finfo(dtype).eps
    for out, ref in ((gs, ref_gs), (gt, ref_gt)):
        ref = torch.where(valid.cpu()[:, None], ref, 0.0)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=eps, atol=1e-6 + tol_for(name, a, b))


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)])
def test_need_grad_flags(need):
    s, t = make_inputs(3, 33, seed=9)
    got = run(s, t, "skew_kl", 0.5, 0.0, 0.8, 0.8, need=need)
    ref = reference(s, t, "skew_kl", 0.5, 0.0, 0.8, 0.8)
    check(got[0], ref[0])
    for flag, out, r, like in zip(need, got[1:], ref[1:], (s, t)):
        if flag:
            check(out, r)
        else:
            assert out.shape == (0,) and out.dtype == like.dtype and out.device == like.device


def test_float64_inputs():
    s, t = make_inputs(3, 33, dtype=torch.float64, seed=10)
    got = run(s, t, "jsd", 0.3, 0.0, 0.8, 0.8)
    assert all(x.dtype == torch.float64 for x in got)
    check_all(got, reference(s, t, "jsd", 0.3, 0.0, 0.8, 0.8), tol=1e-6)  # the scalars reach it as float32


def test_empty_inputs():
    s = torch.empty(0, 5, device=DEVICE)
    loss, gs, gt = run(s, s.clone(), "tvd", 0.0, 0.0, need=(True, False))
    assert loss.shape == (0,) and gs.shape == (0, 5) and gt.shape == (0,)
    s = torch.empty(3, 0, device=DEVICE)
    loss, gs, gt = run(s, s.clone(), "jsd", 0.5, 0.0)
    assert loss.tolist() == [0.0, 0.0, 0.0] and gs.shape == gt.shape == (3, 0)


def test_through_the_registered_op():
    """The kernel as ``tgtfast::divergence_fwd_triton`` (tgtfast/ops/divergence.py): its autograd hands the stored
    gradients on for ``(grad_scale * loss).sum().backward()``."""
    from tgtfast import dispatch
    from tgtfast.ops import divergence as ops

    why = dispatch.ensure_loaded("divergence", "triton")
    if why is not None:
        pytest.skip(f"triton backend: {why}")
    s0, t0 = make_inputs(4, 33, seed=11)
    s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
    loss, _, _ = ops.impl("triton")(s, t, None, DIVERGENCES.index("ab_divergence"), 0.6, 0.0, 0.5, 0.5, True, True,
                                    0.25)
    (0.25 * loss).sum().backward()
    check_all((loss, s.grad, t.grad), reference(s0, t0, "ab_divergence", 0.6, 0.0, 0.5, 0.5, 0.25))
