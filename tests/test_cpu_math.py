"""The fast-math helpers of the C++ CPU kernels (csrc/common/cpu_math.h) over the whole float32 range, and the
PTLoss cases where they used to give silently wrong numbers (a subnormal teacher probability or label smoothing
made the C++ loss -inf).

``tgtfast._C._math_eval(name, x, isa)`` applies one helper elementwise inside the same vectorised loops the kernels
use, in the AVX2+FMA build and in the baseline build. Every helper is checked against torch's float64 result on
float32 bit patterns that cover every exponent (a strided walk through all positive and negative patterns and
through all subnormals) plus 0, -0, +-inf, NaN, +-FLT_MAX and +-FLT_MIN, with the tolerance of its documented
accuracy and the exact special values of its contract (the table at the top of cpu_math.h).
"""

import math

import pytest
import torch

import tgtfast
from tgtfast import reference

FLT_MIN = torch.finfo(torch.float32).tiny  # smallest normal float32, 2^-126
FLT_MAX = torch.finfo(torch.float32).max
INF, NAN = math.inf, math.nan


def _ext():
    from tgtfast import _C

    return _C


def _isas():
    if tgtfast.backends()["cpp"] != "available":
        return []
    return ["avx2", "baseline"] if _ext().cpu_isa() == "avx2" else ["baseline"]


ISAS = pytest.mark.parametrize("isa", _isas() or [pytest.param("none", marks=pytest.mark.skip("no C++ backend"))])


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def sweep() -> torch.Tensor:
    """float32 inputs covering every exponent of both signs, all kinds of subnormals, and the special values."""
    # Positive finite and infinite patterns 0 .. 0x7f800000 with a prime stride (every exponent gets ~260 values),
    # every subnormal pattern with a stride, the values next to the boundaries, and both signs of all of them.
    normal = torch.arange(0, 0x7F800001, 32749, dtype=torch.int64)
    sub = torch.arange(1, 0x00800000, 997, dtype=torch.int64)
    edges = torch.tensor([0, 1, 2, 3, 0x007FFFFF, 0x00800000, 0x00800001, 0x3F7FFFFF, 0x3F800000, 0x3F800001,
                          0x7F7FFFFF, 0x7F800000], dtype=torch.int64)
    pos = _from_bits(torch.cat([normal, sub, edges]))
    specials = torch.tensor([NAN, -NAN, INF, -INF, FLT_MAX, -FLT_MAX, FLT_MIN, -FLT_MIN, 0.0, -0.0],
                            dtype=torch.float32)
    return torch.cat([pos, -pos, specials])


def dense(lo: float, hi: float, n: int = 200001) -> torch.Tensor:
    """A dense grid of float32 values in [lo, hi] (the ranges where each polynomial does its work)."""
    return torch.linspace(lo, hi, n, dtype=torch.float64).float()


def evaluate(name: str, x: torch.Tensor, isa: str) -> torch.Tensor:
    y = _ext()._math_eval(name, x, isa)
    assert y.dtype == torch.float32 and y.shape == x.shape
    return y


def ulp_error(y: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|y - truth| in units of the float32 ulp at truth (the ulp of FLT_MIN below it)."""
    mag = truth.abs().clamp_min(FLT_MIN)
    ulp = torch.pow(2.0, torch.floor(torch.log2(mag)) - 23)
    return (y.double() - truth).abs() / ulp


def check_close(name, x, y, truth, max_ulp, where, abs_tol=0.0):
    """On `where`: finite results within max_ulp ulps (or abs_tol absolute) of the float64 truth."""
    x, y, truth = x[where], y[where], truth[where]
    err = ulp_error(y, truth)
    ok = (err <= max_ulp) | ((y.double() - truth).abs() <= abs_tol)
    bad = ~ok
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {x.numel()} off, e.g. x={x[bad][:4].tolist()} y={y[bad][:4].tolist()} "
        f"truth={truth[bad][:4].tolist()} (max {err.max().item():.2f} ulp)"
    )


def check_special(name, isa, cases):
    """Exact results: NaN must be NaN, signed zeros keep their sign."""
    x = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    y = evaluate(name, x, isa)
    wants = torch.tensor([c[1] for c in cases], dtype=torch.float32).tolist()  # as float32
    for xi, yi, want in zip(x.tolist(), y.tolist(), wants):
        if math.isnan(want):
            assert math.isnan(yi), f"{name}({xi}) = {yi}, want NaN"
        else:
            assert yi == want and math.copysign(1.0, yi) == math.copysign(1.0, want), f"{name}({xi}) = {yi}, want {want}"


@ISAS
def test_unknown_name_raises(isa):
    with pytest.raises(Exception):
        _ext()._math_eval("no_such_helper", torch.zeros(3), isa)


@ISAS
def test_exp(isa):
    x = torch.cat([sweep(), dense(-104.0, 89.0)])
    y = evaluate("exp", x, isa)
    truth = torch.exp(x.double())
    normal = (truth >= FLT_MIN) & (truth <= FLT_MAX)
    check_close("exp", x, y, truth, 2.0, normal)
    # Results below FLT_MIN are flushed to 0 (documented): never negative, never above FLT_MIN.
    low = truth < FLT_MIN
    assert bool(((y[low] >= 0) & (y[low].double() <= FLT_MIN)).all())
    assert bool(torch.isinf(y[truth > FLT_MAX]).all())
    assert bool(torch.isnan(y[torch.isnan(x)]).all())
    check_special("exp", isa, [(0.0, 1.0), (-0.0, 1.0), (INF, INF), (-INF, 0.0), (NAN, NAN), (FLT_MAX, INF),
                               (-FLT_MAX, 0.0), (FLT_MIN, 1.0), (-FLT_MIN, 1.0), (1e-45, 1.0), (-1e-45, 1.0)])


@ISAS
def test_exp_nonpos(isa):
    x = torch.cat([sweep(), dense(-104.0, 0.0)])
    x = x[~(x > 0)]  # the contract: x <= 0 or NaN
    y = evaluate("exp_nonpos", x, isa)
    truth = torch.exp(x.double())
    check_close("exp_nonpos", x, y, truth, 2.0, truth >= FLT_MIN)
    low = truth < FLT_MIN
    assert bool(((y[low] >= 0) & (y[low].double() <= FLT_MIN)).all())
    assert bool(torch.isnan(y[torch.isnan(x)]).all())
    check_special("exp_nonpos", isa, [(0.0, 1.0), (-0.0, 1.0), (-INF, 0.0), (NAN, NAN), (-FLT_MAX, 0.0),
                                      (-FLT_MIN, 1.0), (-1e-45, 1.0)])


@ISAS
def test_log(isa):
    x = torch.cat([sweep(), dense(0.25, 4.0)])
    y = evaluate("log", x, isa)
    truth = torch.log(x.double())
    pos = (x > 0) & torch.isfinite(x)
    # 2 ulp, or 2^-24 absolute near x = 1 where log x -> 0.
    check_close("log", x, y, truth, 2.0, pos, abs_tol=2.0**-24)
    sub = pos & (x < FLT_MIN)
    assert bool(sub.any()) and bool(torch.isfinite(y[sub]).all())  # the PTLoss bug: log(subnormal) was -inf
    assert bool(torch.isnan(y[x < 0]).all())
    check_special("log", isa, [(0.0, -INF), (-0.0, -INF), (INF, INF), (-INF, NAN), (NAN, NAN), (-1.0, NAN),
                               (-1e-45, NAN), (1.0, 0.0)])
    tiny = evaluate("log", torch.tensor([1e-45, FLT_MIN / 2, FLT_MIN], dtype=torch.float32), isa).double()
    assert torch.allclose(tiny, torch.tensor([1e-45, FLT_MIN / 2, FLT_MIN], dtype=torch.float32).double().log(),
                          rtol=1e-6, atol=0)


@ISAS
def test_tanh(isa):
    x = torch.cat([sweep(), dense(-10.0, 10.0)])
    y = evaluate("tanh", x, isa)
    truth = torch.tanh(x.double())
    finite = torch.isfinite(x)
    check_close("tanh", x, y, truth, 3.0, finite)
    sub = finite & (x.abs() < FLT_MIN)
    assert torch.equal(y[sub], x[sub])  # tiny arguments give themselves (not 0 from 1 - exp(-2|x|))
    assert bool(torch.isnan(y[torch.isnan(x)]).all())
    check_special("tanh", isa, [(0.0, 0.0), (-0.0, -0.0), (INF, 1.0), (-INF, -1.0), (NAN, NAN), (FLT_MAX, 1.0),
                                (-FLT_MAX, -1.0), (1e-45, 1e-45), (-1e-45, -1e-45)])


@ISAS
def test_sigmoid(isa):
    x = torch.cat([sweep(), dense(-100.0, 30.0)])
    y = evaluate("sigmoid", x, isa)
    truth = torch.sigmoid(x.double())
    finite = torch.isfinite(x)
    check_close("sigmoid", x, y, truth, 3.0, finite & (truth >= FLT_MIN))
    low = finite & (truth < FLT_MIN)
    assert bool(((y[low] >= 0) & (y[low].double() <= FLT_MIN)).all())
    assert bool(torch.isnan(y[torch.isnan(x)]).all())
    check_special("sigmoid", isa, [(0.0, 0.5), (-0.0, 0.5), (INF, 1.0), (-INF, 0.0), (NAN, NAN), (FLT_MAX, 1.0),
                                   (-FLT_MAX, 0.0), (1e-45, 0.5), (-1e-45, 0.5)])


# fast_sincos: documented for |theta| <= 8192 (the noise uses [0, 2 pi]); absolute error 2e-7 (plus the float32
# rounding of the argument itself, which is exact here: the truth is taken at the same float32 theta).
SINCOS_RANGE = 8192.0


@ISAS
@pytest.mark.parametrize("name", ["sin", "cos"])
def test_sincos(isa, name):
    x = torch.cat([sweep(), dense(0.0, 2 * math.pi), dense(-SINCOS_RANGE, SINCOS_RANGE)])
    y = evaluate(name, x, isa)
    truth = (torch.sin if name == "sin" else torch.cos)(x.double())
    inside = torch.isfinite(x) & (x.abs() <= SINCOS_RANGE)
    err = (y.double() - truth).abs()[inside]
    assert err.max().item() <= 2e-7, f"{name}: max abs error {err.max().item():.3e}"
    # relative accuracy of sin near 0 (tiny and subnormal arguments give themselves)
    small = inside & (x.abs() < 1e-3)
    if name == "sin":
        check_close("sin", x, y, truth, 2.0, small)
    assert bool(torch.isnan(y[~torch.isfinite(x)]).all())  # +-inf and NaN
    want = [(0.0, 0.0 if name == "sin" else 1.0), (1e-45, 1e-45 if name == "sin" else 1.0),
            (-1e-45, -1e-45 if name == "sin" else 1.0), (INF, NAN), (-INF, NAN), (NAN, NAN)]
    check_special(name, isa, want)


# --- PTLoss on the inputs that reach the helpers' edge cases -------------------------------------------------


def _backends():
    avail = tgtfast.backends()
    return [b for b in ("cpp", "triton") if avail[b] == "available"]


BACKENDS = pytest.mark.parametrize("backend", _backends() or [pytest.param("none", marks=pytest.mark.skip("none"))])


def _truth(s, t, coeffs, temperature, teacher_is_logits, label_smoothing):
    """Loss and gradients in float64 with the xlogy convention (p_j = 0 adds nothing), so that teacher logits of
    -inf have a finite truth (the eager reference takes 0 * log 0 literally there)."""
    s = s.detach().double().requires_grad_(True)
    t = t.detach().double().requires_grad_(True)
    k = s.shape[-1]
    log_q = torch.log_softmax(s / temperature, -1)
    if teacher_is_logits:
        log_p = torch.log_softmax(t / temperature, -1)
        p = log_p.exp()
    else:
        p = t
        log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    if label_smoothing > 0:
        p = (1 - label_smoothing) * p + label_smoothing / k
        log_p = torch.log(torch.where(p > 0, p, torch.ones_like(p)))
    pos = p > 0
    log_p = torch.where(pos, log_p, torch.zeros_like(log_p))  # -inf * 0 would put NaN into the gradients
    loss = torch.where(pos, p * (log_p - log_q), torch.zeros_like(p))
    if coeffs is not None:
        x = -torch.expm1(log_q)
        loss = loss + p * sum(c * x ** (m + 1) for m, c in enumerate(coeffs.tolist()))
    loss = loss.sum(-1)
    (loss.sum() * 2).backward()
    return loss.detach(), s.grad, t.grad


def _run(backend, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = tgtfast.ptloss(s, t, reduction="none", backend=backend, **kw)
    (loss.sum() * 2).backward()
    return loss.detach(), s.grad, t.grad


def _assert_matches(backend, s, t, coeffs=None, temperature=1.0, teacher_is_logits=False, label_smoothing=0.0,
                    check_teacher_grad=True):
    kw = dict(temperature=temperature, teacher_is_logits=teacher_is_logits, label_smoothing=label_smoothing)
    if coeffs is not None:
        kw["coeffs"] = coeffs
    loss, gs, gt = _run(backend, s, t, **kw)
    want, ws, wt = _truth(s, t, coeffs, temperature, teacher_is_logits, label_smoothing)
    assert bool(torch.isfinite(loss).all()), f"{backend}: loss {loss.tolist()}"
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-6), (loss.tolist(), want.tolist())
    assert torch.allclose(gs.double(), ws, rtol=1e-4, atol=1e-6), (gs.tolist(), ws.tolist())
    if check_teacher_grad:
        assert bool(torch.isfinite(gt).all()), f"{backend}: teacher gradient {gt.tolist()}"
        assert torch.allclose(gt.double(), wt, rtol=1e-4, atol=1e-5), (gt.tolist(), wt.tolist())


def _subnormal_teacher():
    t = torch.softmax(torch.tensor([[0.0, -95.0, -5.0], [-3.0, 0.0, -100.0]]), -1)
    assert 0 < float(t[0, 1]) < FLT_MIN and 0 < float(t[1, 2]) < FLT_MIN
    return t


STUDENT = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.25, -0.5]])


@BACKENDS
@pytest.mark.parametrize("coeffs", [None, [0.5, -0.25]])
def test_ptloss_subnormal_teacher_probability(backend, coeffs):
    """A float32 subnormal teacher probability: C++ returned -inf (fast log of a subnormal was -inf)."""
    c = None if coeffs is None else torch.tensor(coeffs)
    _assert_matches(backend, STUDENT, _subnormal_teacher(), coeffs=c)


@BACKENDS
def test_ptloss_subnormal_teacher_probability_reference(backend):
    """The same case against the package's own eager reference in float64 (loss only)."""
    s, t = STUDENT, _subnormal_teacher()
    want = reference.ptloss_rows(s.double(), t.double(), teacher_is_logits=False)
    got = tgtfast.ptloss(s, t, teacher_is_logits=False, reduction="none", backend=backend)
    assert torch.allclose(got.double(), want, rtol=1e-5)


@BACKENDS
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_ptloss_subnormal_label_smoothing(backend, teacher_is_logits):
    """label_smoothing = 1e-42 (a float32 subnormal delta / K): C++ returned -inf (and NaN teacher gradients)."""
    if teacher_is_logits:
        t = torch.tensor([[0.0, -float("inf"), -5.0], [-3.0, 0.0, -200.0]])
    else:
        t = torch.tensor([[0.75, 0.0, 0.25], [0.5, 0.5, 0.0]])
    _assert_matches(backend, STUDENT, t, teacher_is_logits=teacher_is_logits, label_smoothing=1e-42)


@BACKENDS
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("coeffs", [None, [0.5, -0.25]])
def test_ptloss_teacher_logits_partly_neg_inf(backend, label_smoothing, coeffs):
    """Teacher logits of -inf (p_j = 0): a finite loss and finite gradients that match the xlogy truth."""
    t = torch.tensor([[0.0, -float("inf"), -5.0, 1.0], [-float("inf"), 0.0, 2.0, -float("inf")]])
    s = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.25, -0.5, 3.0]])
    c = None if coeffs is None else torch.tensor(coeffs)
    _assert_matches(backend, s, t, coeffs=c, teacher_is_logits=True, label_smoothing=label_smoothing)


@BACKENDS
def test_temperature_softmax_leading_masked_tile(backend):
    """A row longer than one Triton tile whose first tile is all -inf (a masked vocabulary): Triton's online sum was
    exp(-inf + inf) = NaN for the whole row."""
    x = torch.randn(3, 5000)
    x[:, :4200] = -float("inf")
    if backend == "cpp":
        y = torch.ops.tgtfast.temperature_softmax(x, 0.7)
    else:
        from tgtfast.kernels import softmax as kernels

        y = kernels.temperature_softmax(x, 0.7)
    want = torch.softmax(x.double() / 0.7, -1)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-9)


@BACKENDS
@pytest.mark.parametrize("teacher_is_logits", [False, True])
def test_ptloss_label_smoothing_below_float32_range(backend, teacher_is_logits):
    """delta / K below the smallest float32 (1e-50 here): p_j = delta / K where p0_j = 0 rounds to 0 in float32,
    but log p_j = log(delta / K) is finite, and so is the teacher gradient (it was -inf)."""
    if teacher_is_logits:
        t = torch.tensor([[0.0, -float("inf"), -5.0], [-3.0, 0.0, -200.0]])
    else:
        t = torch.tensor([[0.75, 0.0, 0.25], [0.5, 0.5, 0.0]])
    _assert_matches(backend, STUDENT, t, teacher_is_logits=teacher_is_logits, label_smoothing=1e-50)
