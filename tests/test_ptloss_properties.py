"""Property tests: the C++ PTLoss kernels against the independent float64 oracle (tests/oracle.py).

Hypothesis draws shapes, coefficients (shared or per class), every reduction, targets with random ignore masks
and a random ignore_index, logit or probability teachers, float32 and bfloat16 inputs, peaked softmaxes (logit
scales up to 100), probability rows with subnormal entries, temperatures from the smallest allowed (6e-20) to 20 and label smoothing in
[0, 0.5]. Derandomized and small, so the file runs in well under a minute.

Tolerances follow the error a float32 computation can make on the given (rounded) inputs: the logits divided by
T carry a relative error of a few float32 ulps, so the absolute error of log q grows with ``max|s| / T``
(the condition number ``cond`` below); the coefficients multiply it by at most ``sum_m m |eta_m|``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import needs_backend, run_loss
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracle import ptloss_oracle, row_weights

import tgtfast

pytestmark = needs_backend("cpp")

EPS32 = 2.0**-24
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REDUCTIONS = ["none", "sum", "mean", "batchmean"]
IGNORE_INDICES = [-100, -1, 0, 3, 7]


def build(n, k, m, per_class, coeff_scale, scale, teacher_is_logits, subnormal, dtype, with_target, ignore_index,
          ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    if subnormal and k >= 2:  # entries of float32 probability e^-87 .. e^-100: subnormal, not zero
        low = torch.rand(n, k, generator=g) < 0.4
        low[:, 0] = False
        t = torch.where(low, -87.0 - 13.0 * torch.rand(n, k, generator=g, dtype=torch.float64), t.clamp(-3, 3))
    coeffs = None
    if m:
        coeffs = (torch.rand((m, k) if per_class else (m,), generator=g, dtype=torch.float64) * 2 - 0.5) * coeff_scale
        coeffs = coeffs.float()
    target = None
    if with_target:
        ignored = torch.rand(n, generator=g) < ignore_frac
        kept_label = ignore_index + 1 + torch.randint(0, 5, (n,), generator=g)
        target = torch.where(ignored, torch.full((n,), ignore_index), kept_label)
    if teacher_is_logits:
        t = t.to(dtype)
    else:  # probabilities given in float32 (bf16 rows do not sum to 1 closely enough to be accepted as such)
        t = torch.softmax(t, -1).float()
    s = s.to(dtype)
    if target is not None:
        s[target == ignore_index, 0] = float("nan")  # an ignored row may hold anything
    return s, t, coeffs, target


def check(s, t, coeffs, target, *, temperature, smoothing, reduction, teacher_is_logits, ignore_index):
    kw = dict(temperature=temperature, teacher_is_logits=teacher_is_logits, label_smoothing=smoothing,
              reduction=reduction, ignore_index=ignore_index, target=target)
    loss, gs, gt = run_loss(tgtfast.ptloss, s, t, coeffs=coeffs, backend="cpp", **kw)
    # the kernel sees label_smoothing in its float32 accumulation dtype (2e-158 is 0 there, and a teacher
    # probability of 0 then has the teacher gradient -inf of d(p log p)/dp at 0)
    kw["label_smoothing"] = float(torch.tensor(smoothing, dtype=torch.float32))
    tl, tgs, tgt = ptloss_oracle(s, t, coeffs, **kw)
    k = s.shape[-1]
    valid = torch.ones(s.shape[0], dtype=torch.bool) if target is None else target != ignore_index
    if valid.any():
        big = s[valid].double().abs().max().item()
        if teacher_is_logits:
            big = max(big, t[valid].double().abs().max().item())
    else:
        big = 0.0
    cond = 1.0 + big / temperature + math.log(k + 1)
    eta = 1.0 if coeffs is None else 1.0 + sum((i + 1) * coeffs[i].abs().max().item() for i in range(coeffs.shape[0]))
    w = row_weights(valid, reduction, 2.0)  # per-row weight of the loss and gradients (run_loss: 2 * loss.sum())
    w_row = w / 2.0 if reduction == "none" else w
    # loss: per row ~ cond * eta float32 ulps; reduced losses add the rows' weights
    loss_atol = 8 * EPS32 * cond * eta * (float(w_row.sum()) if reduction != "none" else 1.0)
    assert torch.isfinite(loss).all() == torch.isfinite(tl).all(), (loss, tl)
    err = (loss.double() - tl).abs()
    assert bool((err <= 1e-5 * tl.abs() + loss_atol).all()), f"loss {loss} truth {tl} err {err.max():.3e}"
    # gradients: rounded to the dtype of their input, plus the float32 arithmetic error of the row
    for what, got, truth, dtype in (("grad student", gs, tgs, s.dtype), ("grad teacher", gt, tgt, t.dtype)):
        assert got.dtype == dtype
        assert not bool(torch.isnan(got).any()), what
        rtol = 2.0**-7 if dtype == torch.bfloat16 else 4 * EPS32
        row_scale = w[:, None] * eta * (1.0 / temperature if teacher_is_logits or what == "grad student" else 1.0)
        atol = 16 * EPS32 * cond * row_scale + (2.0**-8 * truth.abs().amax(-1, keepdim=True)
                                                if dtype == torch.bfloat16 else 0)
        if what == "grad teacher" and not teacher_is_logits:
            atol = atol + 16 * EPS32 * cond * w[:, None] * truth.abs().amax(-1, keepdim=True)
            # a smoothed probability formed in float32 below its normal range keeps only 2^-149 / p of relative
            # accuracy, and log p inherits it (e.g. smoothing 1.4e-45 with a subnormal teacher entry)
            p32 = (1 - kw["label_smoothing"]) * t.double() + kw["label_smoothing"] / k
            sub = (p32 > 0) & (p32 < torch.finfo(torch.float32).tiny)
            atol = atol + torch.where(sub, 2 * 2.0**-149 / p32.clamp_min(1e-300), torch.zeros_like(p32)) * w[:, None]
        err = (got.double() - truth).abs()
        bad = ~((err <= rtol * truth.abs() + atol) | (torch.isinf(truth) & (got.double() == truth)))
        assert not bool(bad.any()), (
            f"{what}: {int(bad.sum())} off, max err {err[bad].max():.3e}, got {got[bad][:3].tolist()} "
            f"truth {truth[bad][:3].tolist()}")
    if target is not None:
        ignored = target == ignore_index
        assert bool((gs[ignored] == 0).all()) and bool((gt[ignored] == 0).all())


@settings(max_examples=150, **SETTINGS)
@given(
    n=st.integers(1, 8),
    k=st.integers(1, 40),
    m=st.integers(0, 6),
    per_class=st.booleans(),
    coeff_scale=st.sampled_from([0.5, 4.0]),
    scale=st.sampled_from([0.1, 1.0, 4.0, 30.0, 100.0]),
    teacher_is_logits=st.booleans(),
    subnormal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    with_target=st.booleans(),
    ignore_index=st.sampled_from(IGNORE_INDICES),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    # down to the smallest allowed temperature (tgtfast.validation.temperature: 2**64 / T finite in float32)
    temperature=st.one_of(st.sampled_from([0.05, 20.0, 1.0, 1e-3, 1e-8, 6e-20]), st.floats(0.05, 20.0)),
    # smoothing below float32's normal range (rounded there to 0 or a subnormal): test_tiny_label_smoothing
    smoothing=st.one_of(st.sampled_from([0.0, 0.5, 1e-30]), st.floats(1e-30, 0.5)),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**16),
)
def test_cpp_matches_oracle(n, k, m, per_class, coeff_scale, scale, teacher_is_logits, subnormal, dtype, with_target,
                            ignore_index, ignore_frac, temperature, smoothing, reduction, seed):
    s, t, coeffs, target = build(n, k, m, per_class, coeff_scale, scale, teacher_is_logits, subnormal, dtype,
                                 with_target, ignore_index, ignore_frac, seed)
    check(s, t, coeffs, target, temperature=temperature, smoothing=smoothing, reduction=reduction,
          teacher_is_logits=teacher_is_logits, ignore_index=ignore_index)


@settings(max_examples=25, **SETTINGS)
@given(
    rows=st.lists(st.lists(st.sampled_from([0.0, -3.0, -5.0, -87.0, -95.0, -99.0, -200.0, 2.0]), min_size=3,
                           max_size=3), min_size=1, max_size=4),
    student_scale=st.sampled_from([0.0, 1.0, 10.0]),
    temperature=st.sampled_from([0.05, 1.0, 20.0]),
    smoothing=st.sampled_from([0.0, 0.1]),
    m=st.integers(0, 3),
    seed=st.integers(0, 100),
)
@example(rows=[[0.0, -95.0, -5.0]], student_scale=0.0, temperature=1.0, smoothing=0.0, m=0, seed=0)
def test_subnormal_probability_teacher(rows, student_scale, temperature, smoothing, m, seed):
    """Teacher probabilities softmax(rows) in float32, some entries subnormal (e^-87 .. e^-99)."""
    t = torch.softmax(torch.tensor(rows, dtype=torch.float64), -1).float()
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(t.shape, generator=g, dtype=torch.float64) * student_scale).float()
    coeffs = torch.tensor([0.5, -0.25, 1.0][:m]) if m else None
    for reduction in ("none", "batchmean"):
        check(s, t, coeffs, None, temperature=temperature, smoothing=smoothing, reduction=reduction,
              teacher_is_logits=False, ignore_index=-100)


def test_known_bad_subnormal_teacher_row():
    """softmax([0, -95, -5]) as a probability teacher, student zeros: KL(p || uniform) = log 3 - H(p) = 1.0584
    (the C++ kernel once returned -inf: log of a subnormal probability)."""
    t = torch.softmax(torch.tensor([[0.0, -95.0, -5.0]]), -1)
    assert 0 < float(t[0, 1]) < torch.finfo(torch.float32).tiny  # subnormal
    s = torch.zeros(1, 3)
    truth = ptloss_oracle(s, t, None, teacher_is_logits=False)[0].item()
    assert abs(truth - 1.0584) < 1e-4
    got = tgtfast.ptloss(s, t, teacher_is_logits=False, backend="cpp").item()
    assert math.isfinite(got) and abs(got - truth) <= 1e-5 * truth, got
    check(s, t, None, None, temperature=1.0, smoothing=0.0, reduction="batchmean", teacher_is_logits=False,
          ignore_index=-100)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
def test_every_reduction_every_ignore_index(reduction, ignore_index):
    """Deterministic companion of the property: every reduction with every ignore_index, bf16 and float32."""
    for dtype in (torch.float32, torch.bfloat16):
        s, t, coeffs, target = build(6, 17, 3, True, 4.0, 4.0, True, False, dtype, True, ignore_index, 0.5, 11)
        check(s, t, coeffs, target, temperature=0.7, smoothing=0.2, reduction=reduction, teacher_is_logits=True,
              ignore_index=ignore_index)


@pytest.mark.parametrize("smoothing", [1e-40, 1e-300])
def test_tiny_label_smoothing(smoothing):
    """label_smoothing below float32's normal range (it rounds to 0 there): once -inf or 0 loss and a NaN
    teacher gradient from the C++ kernel."""
    s = torch.tensor([[1.0, -3.0]])
    t = torch.tensor([[4.0, -4.0]])
    check(s, t, None, None, temperature=0.05, smoothing=smoothing, reduction="sum", teacher_is_logits=True,
          ignore_index=-100)


@pytest.mark.parametrize("temperature", [1e-3, 1e-8, 6e-20])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
def test_extreme_temperatures_within_the_allowed_range(temperature, teacher_is_logits):
    """Down to the smallest temperature tgtfast accepts, the C++ loss and gradients stay within float32's error
    of the float64 oracle (which grows like max|logits| / T), with targets and every reduction."""
    for reduction in REDUCTIONS:
        s, t, coeffs, target = build(5, 13, 2, False, 1.0, 3.0, teacher_is_logits, False, torch.float32, True, 7,
                                     0.3, 5)
        check(s, t, coeffs, target, temperature=temperature, smoothing=0.1, reduction=reduction,
              teacher_is_logits=teacher_is_logits, ignore_index=7)
