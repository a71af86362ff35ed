"""The C++ CPU kernel of ``tgtfast::divergence_fwd`` against the float64 eager reference
(``tgtfast.reference.divergence_rows``; math in docs/design.md, "Divergences").

Reference gradients are autograd's of ``(grad_scale * rows).sum()`` with respect to the raw logits, the reference
run at ``temperature = 1 / scale`` when both scales agree and on pre-scaled logits otherwise (the chain rule then
supplies the scale).
"""

import math

import pytest
import torch

import tgtfast
from tgtfast import reference as R
from tgtfast.reference import DIVERGENCES

pytestmark = pytest.mark.skipif(tgtfast.backends(op="divergence")["cpp"] != "available",
                                reason=f"cpp divergence backend {tgtfast.backends(op='divergence')['cpp']}")

CODE = {name: code for code, name in enumerate(DIVERGENCES)}

# (divergence, param_a, param_b): every divergence, the endpoints of the mixtures, the AB-divergence's general form
# with every sign pattern and its four limit forms.
CASES = [
    ("forward_kl", 0.0, 0.0),
    ("reverse_kl", 0.0, 0.0),
    ("jsd", 0.1, 0.0),
    ("jsd", 0.5, 0.0),
    ("jsd", 0.9, 0.0),
    ("skew_kl", 0.0, 0.0),
    ("skew_kl", 0.1, 0.0),
    ("skew_kl", 0.5, 0.0),
    ("skew_kl", 1.0, 0.0),
    ("skew_reverse_kl", 0.0, 0.0),
    ("skew_reverse_kl", 0.1, 0.0),
    ("skew_reverse_kl", 0.5, 0.0),
    ("skew_reverse_kl", 1.0, 0.0),
    ("tvd", 0.0, 0.0),
    ("symmetric_kl", 0.0, 0.0),
    ("symmetric_kl", 0.3, 0.0),
    ("symmetric_kl", 1.0, 0.0),
    ("ab_divergence", 0.5, 0.7),     # alpha, beta > 0
    ("ab_divergence", -0.3, 0.8),    # alpha < 0, alpha + beta > 0
    ("ab_divergence", 1.5, -0.5),    # beta < 0
    ("ab_divergence", -0.4, -0.3),   # alpha + beta < 0
    ("ab_divergence", 0.7, 0.0),     # beta = 0
    ("ab_divergence", -0.5, 0.0),
    ("ab_divergence", 0.0, 0.6),     # alpha = 0
    ("ab_divergence", 0.0, -0.4),
    ("ab_divergence", 0.6, -0.6),    # alpha = -beta
    ("ab_divergence", 0.0, 0.0),     # both 0
    ("ab_divergence", 1.0, 0.0),     # forward KL
    ("taid", 0.0, 0.0),
    ("taid", 0.4, 0.0),
    ("taid", 1.0, 0.0),
]
IDS = [f"{n}-{a:g}-{b:g}" for n, a, b in CASES]
# One parameter set per divergence, for the tests of conventions.
ONE_EACH = [("forward_kl", 0.0, 0.0), ("reverse_kl", 0.0, 0.0), ("jsd", 0.4, 0.0), ("skew_kl", 0.1, 0.0),
            ("skew_reverse_kl", 0.3, 0.0), ("tvd", 0.0, 0.0), ("symmetric_kl", 0.3, 0.0),
            ("ab_divergence", 0.5, 0.7), ("ab_divergence", 0.6, -0.6), ("taid", 0.4, 0.0)]
ONE_IDS = [f"{n}-{a:g}-{b:g}" for n, a, b in ONE_EACH]


def run(s, t, case, scale_s=1.0, scale_t=1.0, grad_scale=1.0, valid=None, need=(True, True)):
    name, a, b = case
    return torch.ops.tgtfast.divergence_fwd.default(s, t, valid, CODE[name], a, b, scale_s, scale_t, need[0],
                                                    need[1], grad_scale)


def truth(s, t, case, scale_s=1.0, scale_t=1.0, grad_scale=1.0):
    """float64 reference rows and the gradients of grad_scale * rows wrt the raw logits."""
    name, a, b = case
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    if scale_s == scale_t:
        rows = R.divergence_rows(s64, t64, name, param_a=a, param_b=b, temperature=1.0 / scale_s)
    else:
        rows = R.divergence_rows(s64 * scale_s, t64 * scale_t, name, param_a=a, param_b=b)
    gs, gt = torch.autograd.grad((grad_scale * rows).sum(), (s64, t64), allow_unused=True)  # taid, t = 0
    gt = torch.zeros_like(t64) if gt is None else gt
    return rows.detach(), gs, gt


def logits(n, k, dtype=torch.float64, scale=3.0):
    return (torch.randn(n, k, dtype=torch.float64) * scale).to(dtype)


def assert_near(out, ref, rtol, what, floor=0.0, torch_err=None):
    """|out - ref| <= rtol * (|ref| + max|ref| / 10) + floor, elementwise (gradients are small where p and q are),
    plus twice `torch_err` (the error of the reference run in the kernel's dtype) where given."""
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = (out - ref).abs()
    bound = rtol * (ref.abs() + 0.1 * ref.abs().max()) + floor
    if torch_err is not None:
        bound = bound + 2 * torch_err
    bad = ~(err <= bound)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} off, max err {err.max().item():.3e}, "
                                 f"max |ref| {ref.abs().max().item():.3e}")


@pytest.mark.parametrize("shape", [(5, 1100), (2, 5000)], ids=["K1100", "K5000"])
@pytest.mark.parametrize("scales", [(0.8, 0.8), (0.7, 1.9)], ids=["same-scale", "own-scales"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_matches_reference(case, scales, shape):
    s, t = logits(*shape), logits(*shape)
    loss, gs, gt = run(s, t, case, *scales, grad_scale=0.3)
    rows, rs, rt = truth(s, t, case, *scales, grad_scale=0.3)
    assert loss.dtype == torch.float64 and gs.dtype == gt.dtype == torch.float64
    assert_near(loss, rows, 1e-10, "loss", floor=1e-13)
    assert_near(gs, rs, 1e-9, "grad student", floor=1e-13)
    assert_near(gt, rt, 1e-9, "grad teacher", floor=1e-13)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_matches_float64_reference(case):
    s, t = logits(6, 1500, torch.float32), logits(6, 1500, torch.float32)
    loss, gs, gt = run(s, t, case, 1 / 1.5, 1 / 1.5, grad_scale=2.0)
    rows, rs, rt = truth(s, t, case, 1 / 1.5, 1 / 1.5, grad_scale=2.0)
    assert loss.dtype == torch.float32 and gs.dtype == gt.dtype == torch.float32
    # the reference itself in float32: the error float32 cannot avoid (AB(0, 0)'s teacher gradient sums K logs)
    s32, t32 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    rows32 = R.divergence_rows(s32, t32, case[0], param_a=case[1], param_b=case[2], temperature=1.5)
    gs32, gt32 = torch.autograd.grad((2.0 * rows32).sum(), (s32, t32), allow_unused=True)
    gt32 = torch.zeros_like(t32) if gt32 is None else gt32
    errs = [(x.double() - y).abs() for x, y in ((rows32.detach(), rows), (gs32, rs), (gt32, rt))]
    assert_near(loss, rows, 2e-5, "loss", floor=2e-6, torch_err=errs[0])
    assert_near(gs, rs, 2e-5, "grad student", floor=2e-7, torch_err=errs[1])
    assert_near(gt, rt, 2e-5, "grad teacher", floor=2e-7, torch_err=errs[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_half_inputs_accumulate_in_float32(case, dtype):
    s, t = logits(4, 700, dtype, scale=1.0), logits(4, 700, dtype, scale=1.0)  # negative powers stay in float16
    loss, gs, gt = run(s, t, case, 0.9, 1.2, grad_scale=0.5)
    rows, rs, rt = truth(s, t, case, 0.9, 1.2, grad_scale=0.5)  # from the rounded inputs
    assert loss.dtype == torch.float32 and gs.dtype == gt.dtype == dtype
    assert_near(loss, rows, 2e-5, "loss", floor=2e-6)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-10  # one rounding of the output
    assert_near(gs, rs, ulp + 2e-5, "grad student", floor=1e-6)
    assert_near(gt, rt, ulp + 2e-5, "grad teacher", floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_IDS)
def test_ignored_rows_are_zero_and_not_read(case, dtype):
    s, t = logits(7, 600, dtype), logits(7, 600, dtype)
    valid = torch.tensor([True, False, True, True, False, False, True])
    s[~valid] = float("nan")
    t[1] = float("inf")
    loss, gs, gt = run(s, t, case, 0.9, 0.9, valid=valid)
    assert not bool(loss[~valid].any()) and not bool(gs[~valid].any()) and not bool(gt[~valid].any())
    kept = run(s[valid], t[valid], case, 0.9, 0.9)
    for out, ref in zip((loss, gs, gt), kept):
        assert torch.equal(out[valid], ref)  # rows are computed independently
    none = run(s, t, case, valid=torch.zeros(7, dtype=torch.bool))
    for out in none:
        assert out.shape[0] == 7 and not bool(out.any())


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_IDS)
def test_need_grad_flags(case):
    s, t = logits(3, 900, torch.float32), logits(3, 900, torch.float32)
    full = run(s, t, case, grad_scale=0.7)
    for need in ((True, False), (False, True), (False, False)):
        loss, gs, gt = run(s, t, case, grad_scale=0.7, need=need)
        torch.testing.assert_close(loss, full[0], rtol=1e-6, atol=1e-7)
        for flag, out, ref in zip(need, (gs, gt), full[1:]):
            if flag:
                torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
            else:
                assert out.shape == (0,) and out.dtype == torch.float32


# Where the teacher gives a class no mass the row stays finite for these (reverse-type divergences are +inf there).
FINITE_WITH_ZERO_TEACHER = [("forward_kl", 0.0, 0.0), ("jsd", 0.5, 0.0), ("tvd", 0.0, 0.0), ("taid", 0.4, 0.0),
                            ("taid", 1.0, 0.0), ("skew_kl", 0.1, 0.0), ("skew_reverse_kl", 0.5, 0.0),
                            ("ab_divergence", 0.5, 0.7), ("ab_divergence", 0.7, 0.0)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", FINITE_WITH_ZERO_TEACHER, ids=[f"{n}-{a:g}-{b:g}" for n, a, b in
                                                                FINITE_WITH_ZERO_TEACHER])
def test_teacher_minus_inf_is_a_class_without_mass(case, dtype):
    s, t = logits(4, 1300, dtype), logits(4, 1300, dtype)
    zero = torch.rand(4, 1300) < 0.3
    zero[:, 600:1100] = True  # a whole block without teacher mass
    t[zero] = -math.inf
    loss, gs, gt = run(s, t, case, 0.8, 0.8, grad_scale=1.3)
    rows, rs, rt = truth(s, t, case, 0.8, 0.8, grad_scale=1.3)
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(gs).all()) and bool(torch.isfinite(gt).all())
    assert not bool(gt[zero].any())
    rtol, floor = (1e-9, 1e-13) if dtype == torch.float64 else (2e-5, 2e-7)
    assert_near(loss, rows, rtol, "loss", floor=10 * floor)
    assert_near(gs, rs, rtol, "grad student", floor=floor)
    assert_near(gt, rt, rtol, "grad teacher", floor=floor)


@pytest.mark.parametrize("endpoint", [("jsd", 0.0, "forward_kl"), ("jsd", 1.0, "reverse_kl"),
                                      ("skew_kl", 0.0, "forward_kl"), ("skew_reverse_kl", 0.0, "reverse_kl"),
                                      ("symmetric_kl", 0.0, "forward_kl"), ("symmetric_kl", 1.0, "reverse_kl")],
                         ids=lambda e: f"{e[0]}-{e[1]:g}")
def test_mixture_endpoints_are_the_kl_itself(endpoint):
    """At an endpoint the kernel runs that KL: its log m is the exact log q / log p, not the log of an underflowed
    probability, and symmetric KL at lam = 0 keeps forward KL's zero-mass teacher classes finite (the reference's
    `0 * inf` there is NaN)."""
    name, a, kl = endpoint
    s, t = logits(3, 800, torch.float32), logits(3, 800, torch.float32)
    s[0, :400] *= 30  # probabilities far below float32's range
    if kl == "forward_kl":
        t[1, ::5] = -math.inf
    for got, want in zip(run(s, t, (name, a, 0.0), 0.7, 0.7, 0.3), run(s, t, (kl, 0.0, 0.0), 0.7, 0.7, 0.3)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_taid_endpoints_take_one_side(dtype):
    """t = 0: r = q and the teacher is not read (NaN there changes nothing); t = 1: r = p, forward KL, whatever -inf
    the student has (the reference's own endpoints, without 0 * (-inf))."""
    s, t = logits(3, 900, dtype), logits(3, 900, dtype)
    t[0, 5] = math.nan
    t[1] = -math.inf
    loss, gs, gt = run(s, t, ("taid", 0.0, 0.0), 0.8, 0.8, 1.5)
    rows, rs, rt = truth(s, t, ("taid", 0.0, 0.0), 0.8, 0.8, 1.5)
    assert not bool(loss.any()) and not bool(gt.any())
    assert_near(gs, rs, 1e-9, "grad student", floor=1e-13 if dtype == torch.float64 else 1e-7)
    s, t = logits(3, 900, dtype), logits(3, 900, dtype)
    s[:, ::3] = -math.inf
    t[:, ::3] = -math.inf
    s[2, 1] = -math.inf  # a class the teacher gives mass to: +inf
    out = run(s, t, ("taid", 1.0, 0.0), 0.8, 0.8, 1.5)
    assert bool(torch.isfinite(out[0][:2]).all()) and float(out[0][2]) == math.inf
    for got, want in zip(out, run(s, t, ("forward_kl", 0.0, 0.0), 0.8, 0.8, 1.5)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    rows, rs, rt = truth(s[:2], t[:2], ("taid", 1.0, 0.0), 0.8, 0.8, 1.5)
    rtol, floor = (1e-9, 1e-13) if dtype == torch.float64 else (2e-5, 2e-7)
    assert_near(out[0][:2], rows, rtol, "loss", floor=10 * floor)
    assert_near(out[1][:2], rs, rtol, "grad student", floor=floor)
    assert_near(out[2][:2], rt, rtol, "grad teacher", floor=floor)


@pytest.mark.parametrize("case", [("forward_kl", 0.0, 0.0), ("jsd", 0.5, 0.0), ("tvd", 0.0, 0.0),
                                  ("skew_kl", 0.1, 0.0), ("taid", 0.4, 0.0)], ids=lambda c: c[0])
def test_absent_classes(case):
    """Student and teacher both -inf on a class: it takes no part, and its gradients are 0."""
    s, t = logits(3, 700), logits(3, 700)
    absent = torch.zeros(3, 700, dtype=torch.bool)
    absent[:, ::7] = True
    s[absent] = -math.inf
    t[absent] = -math.inf
    loss, gs, gt = run(s, t, case)
    ref = run(s[:, ~absent[0]].contiguous(), t[:, ~absent[0]].contiguous(), case)
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-14)
    assert not bool(gs[absent].any()) and not bool(gt[absent].any())
    torch.testing.assert_close(gs[:, ~absent[0]], ref[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gt[:, ~absent[0]], ref[2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_IDS)
def test_nonfinite_rows_are_nan(case, dtype):
    s, t = logits(8, 1100, dtype), logits(8, 1100, dtype)
    s[1, 17] = math.nan
    t[2, 1050] = math.inf
    s[3] = -math.inf              # the student has no distribution
    t[4] = -math.inf              # nor the teacher
    t[5, 512:1024] = -math.inf    # a block of -inf and NaN
    t[5, 900] = math.nan
    s[6, 3] = math.inf
    s[7, 0] = math.nan            # NaN in the first element of a block
    loss, gs, gt = run(s, t, case, 0.9, 0.9)
    bad = torch.arange(1, 8)
    assert bool(loss[bad].isnan().all()), loss
    assert bool(gs[bad].isnan().all()) and bool(gt[bad].isnan().all())
    ok = run(s[:1], t[:1], case, 0.9, 0.9)
    assert torch.equal(loss[:1], ok[0]) and torch.equal(gs[:1], ok[1]) and torch.equal(gt[:1], ok[2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_class_and_small_rows(case):
    s, t = logits(3, 1), logits(3, 1)
    for out in run(s, t, case):  # p = q = 1: 0 up to rounding (TAID forms log r and log q from other sums)
        assert float(out.abs().max()) <= 1e-14
    s, t = logits(4, 3), logits(4, 3)
    loss, gs, gt = run(s, t, case, 1.1, 0.6, grad_scale=0.4)
    rows, rs, rt = truth(s, t, case, 1.1, 0.6, grad_scale=0.4)
    assert_near(loss, rows, 1e-10, "loss", floor=1e-14)
    assert_near(gs, rs, 1e-9, "grad student", floor=1e-13)
    assert_near(gt, rt, 1e-9, "grad teacher", floor=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_no_rows(dtype):
    s = torch.empty(0, 11, dtype=dtype)
    loss, gs, gt = run(s, s.clone(), ("jsd", 0.5, 0.0))
    assert loss.shape == (0,) and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gs.shape == gt.shape == (0, 11) and gs.dtype == gt.dtype == dtype


def test_bad_arguments():
    s, t = logits(2, 5, torch.float32), logits(2, 5, torch.float32)
    with pytest.raises(RuntimeError, match="unknown divergence"):
        torch.ops.tgtfast.divergence_fwd(s, t, None, len(DIVERGENCES), 0.0, 0.0, 1.0, 1.0, True, True, 1.0)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.tgtfast.divergence_fwd(s, t[:, :4].contiguous(), None, 0, 0.0, 0.0, 1.0, 1.0, True, True, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.tgtfast.divergence_fwd(s, t.double(), None, 0, 0.0, 0.0, 1.0, 1.0, True, True, 1.0)
    with pytest.raises(RuntimeError, match="valid"):
        torch.ops.tgtfast.divergence_fwd(s, t, torch.ones(3, dtype=torch.bool), 0, 0.0, 0.0, 1.0, 1.0, True, True, 1.0)


def test_registered_as_the_cpp_backend():
    from tgtfast.ops import divergence

    assert divergence.impl("cpp") is torch.ops.tgtfast.divergence_fwd.default


@pytest.mark.parametrize("case", [("jsd", 0.3, 0.0), ("ab_divergence", -0.3, 0.8)], ids=["jsd", "ab"])
def test_opcheck(case):
    name, a, b = case
    s = logits(4, 9).requires_grad_(True)
    t = logits(4, 9).requires_grad_(True)
    torch.library.opcheck(torch.ops.tgtfast.divergence_fwd.default,
                          (s, t, torch.tensor([True, False, True, True]), CODE[name], a, b, 0.8, 1.2, True, True, 0.5))
    torch.library.opcheck(torch.ops.tgtfast.divergence_fwd.default,
                          (s.float(), t.detach().float(), None, CODE[name], a, b, 1.0, 1.0, True, False, 1.0))
