"""The divergence menu through its public entry points: ``tgtfast.distill_loss``, the per-divergence modules and
``tgtfast.fused_linear_distill_loss``, on every backend this machine runs, against the float64 reference; the
gradient table of docs/design.md ("Divergences") against autograd of the reference; the conventions (temperature,
reductions, a caller-given token count, logit scale and soft-capping, vocabulary mismatch); bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

import tgtfast
from tgtfast import reference as R

BACKENDS = ["reference"] + [b for b in ("cpp",) if tgtfast.backends("divergence")[b] == "available"]

# (divergence, public keyword arguments, kernel-order parameters)
CASES = [
    ("forward_kl", {}, (0.0, 0.0)),
    ("reverse_kl", {}, (0.0, 0.0)),
    ("jsd", {"beta": 0.3}, (0.3, 0.0)),
    ("jsd", {"beta": 0.0}, None),  # the endpoints: forward / reverse KL
    ("jsd", {"beta": 1.0}, None),
    ("skew_kl", {"alpha": 0.1}, (0.1, 0.0)),
    ("skew_reverse_kl", {"alpha": 0.4}, (0.4, 0.0)),
    ("tvd", {}, (0.0, 0.0)),
    ("symmetric_kl", {"lam": 0.3}, (0.3, 0.0)),
    ("ab_divergence", {"alpha": 0.5, "beta": 0.7}, (0.5, 0.7)),
    ("ab_divergence", {"alpha": 1.3, "beta": -0.4}, (1.3, -0.4)),
    ("ab_divergence", {"alpha": 0.6, "beta": 0.0}, (0.6, 0.0)),
    ("ab_divergence", {"alpha": 0.0, "beta": 0.8}, (0.0, 0.8)),
    ("ab_divergence", {"alpha": 0.5, "beta": -0.5}, (0.5, -0.5)),
    ("ab_divergence", {"alpha": 0.0, "beta": 0.0}, (0.0, 0.0)),
    ("taid", {"t": 0.4}, (0.4, 0.0)),
]
IDS = [f"{d}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for d, kw, _ in CASES]


def _ref_name(div, kw):
    if div == "jsd" and kw["beta"] in (0.0, 1.0):
        return ("forward_kl" if kw["beta"] == 0.0 else "reverse_kl"), (0.0, 0.0)
    return div, None


def _logits(n=6, k=13, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    t = (scale * torch.randn(n, k, generator=g, dtype=torch.float64)).to(dtype)
    return s, t


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,kw,params", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_matches_reference_float64(backend, div, kw, params, reduction):
    s, t = _logits()
    s.requires_grad_(True)
    t.requires_grad_(True)
    target = torch.tensor([1, -100, 3, 4, -100, 0])
    got = tgtfast.distill_loss(s, t, div, **kw, temperature=1.7, target=target, reduction=reduction, backend=backend)
    name, p = _ref_name(div, kw)
    p = params if p is None else p
    want = R.distill_loss(s, t, name, param_a=p[0], param_b=p[1], temperature=1.7, target=target, reduction=reduction)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    w = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)  # a non-uniform incoming grad
    for a, b in zip(_grads((got * w).sum(), s, t), _grads((want * w).sum(), s, t)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("div,kw,params", [c for c in CASES if c[2] is not None], ids=[i for c, i in zip(CASES, IDS) if c[2]])
def test_low_precision_inputs_against_float64(backend, dtype, div, kw, params):
    s, t = _logits(n=5, k=300, dtype=dtype, seed=1)
    s.requires_grad_(True)
    got = tgtfast.distill_loss(s, t, div, **kw, temperature=2.0, backend=backend)
    assert got.dtype == torch.float32
    s64 = s.detach().double().requires_grad_(True)
    want = R.distill_loss(s64, t.double(), div, param_a=params[0], param_b=params[1], temperature=2.0)
    (g,) = _grads(got, s)
    (g64,) = _grads(want, s64)
    assert g.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 1e-1)
    torch.testing.assert_close(g.double(), g64, rtol=tol * 10, atol=tol * 1e-2)


def _doc_table(div, a, b, lp, lq):
    """dq, dp of docs/design.md's gradient table, written independently of the reference."""
    p, q = lp.exp(), lq.exp()

    def lmix(w):  # log(w p + (1 - w) q)
        return torch.log(w * p + (1 - w) * q)

    if div == "forward_kl":
        return -p, p * (lp - lq)
    if div == "reverse_kl":
        return q * (lq - lp), -q
    if div == "jsd":
        lm = lmix(a)
        return (1 - a) * q * (lq - lm), a * p * (lp - lm)
    if div == "skew_kl":
        m = torch.exp(lmix(a))
        return -(1 - a) * p * q / m, p * (lp - torch.log(m)) - a * p * p / m
    if div == "skew_reverse_kl":
        m = torch.exp(lmix(1 - a))
        return q * (lq - torch.log(m)) - a * q * q / m, -(1 - a) * p * q / m
    if div == "tvd":
        sg = torch.sign(p - q)
        return -q * sg / 2, p * sg / 2
    if div == "symmetric_kl":
        return -(1 - a) * p + a * q * (lq - lp), (1 - a) * p * (lp - lq) - a * q
    if div == "ab_divergence":
        pa, qb = torch.exp(a * lp), torch.exp(b * lq)
        if a != 0 and b != 0 and a + b != 0:
            return (torch.exp((a + b) * lq) - pa * qb) / a, (torch.exp((a + b) * lp) - pa * qb) / b
        if b == 0 and a != 0:
            return (torch.exp(a * lq) - pa) / a, pa * (lp - lq)
        if a == 0 and b != 0:
            return qb * (lq - lp), (torch.exp(b * lp) - qb) / b
        if a != 0:
            r = torch.exp(a * (lp - lq))
            return (1 - r) / a, (r - 1) / a
        return lq - lp, lp - lq
    raise AssertionError(div)


@pytest.mark.parametrize("div,kw,params", [c for c in CASES if c[2] is not None and c[0] != "taid"],
                         ids=[i for c, i in zip(CASES, IDS) if c[2] is not None and c[0] != "taid"])
def test_design_gradient_table_matches_autograd(div, kw, params):
    s, t = _logits(n=4, k=9, seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)
    rows = R.divergence_rows(s, t, div, param_a=params[0], param_b=params[1])
    gs, gt = _grads(rows.sum(), s, t)
    lq, lp = torch.log_softmax(s.detach(), -1), torch.log_softmax(t.detach(), -1)
    dq, dp = _doc_table(div, params[0], params[1], lp, lq)
    q, p = lq.exp(), lp.exp()
    torch.testing.assert_close(gs, dq - q * dq.sum(-1, keepdim=True), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gt, dp - p * dp.sum(-1, keepdim=True), rtol=1e-9, atol=1e-12)


def test_taid_gradients_and_endpoints():
    s, t = _logits(n=4, k=9, seed=4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    tt, temp = 0.35, 1.5
    rows = R.divergence_rows(s, t, "taid", param_a=tt, temperature=temp)
    gs, gt = _grads(rows.sum(), s, t)
    u_s, u_t = s.detach() / temp, t.detach() / temp
    lr = torch.log_softmax((1 - tt) * u_s + tt * u_t, -1)
    lq = torch.log_softmax(u_s, -1)
    r, q = lr.exp(), lq.exp()
    torch.testing.assert_close(gs, (q - r) / temp)  # no gradient through the (detached) student in the target
    dr = r * (lr - lq)
    torch.testing.assert_close(gt, tt * (dr - r * dr.sum(-1, keepdim=True)) / temp)
    torch.testing.assert_close(R.divergence_rows(s, t, "taid", param_a=1.0), R.divergence_rows(s, t, "forward_kl"))
    assert R.divergence_rows(s, t, "taid", param_a=0.0).abs().max() < 1e-12


def test_reference_identities():
    s, t = _logits(n=5, k=11, seed=5)
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    rows = lambda d, a=0.0, b=0.0: R.divergence_rows(s, t, d, param_a=a, param_b=b)  # noqa: E731
    torch.testing.assert_close(rows("forward_kl"), F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(rows("reverse_kl"), F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1))
    torch.testing.assert_close(rows("ab_divergence", 1.0, 0.0), rows("forward_kl"))
    torch.testing.assert_close(rows("ab_divergence", 0.0, 1.0), rows("reverse_kl"))
    torch.testing.assert_close(rows("skew_kl", 0.0), rows("forward_kl"))
    torch.testing.assert_close(rows("skew_reverse_kl", 0.0), rows("reverse_kl"))
    assert rows("skew_kl", 1.0).abs().max() < 1e-12
    torch.testing.assert_close(rows("symmetric_kl", 0.25), 0.75 * rows("forward_kl") + 0.25 * rows("reverse_kl"))
    torch.testing.assert_close(rows("tvd"), 0.5 * (lp.exp() - lq.exp()).abs().sum(-1))
    m = 0.5 * (lp.exp() + lq.exp())
    jsd = 0.5 * (lp.exp() * (lp - m.log())).sum(-1) + 0.5 * (lq.exp() * (lq - m.log())).sum(-1)
    torch.testing.assert_close(rows("jsd", 0.5), jsd)
    # the AB-divergence is continuous at its limit forms
    for a, b, a0, b0 in [(0.4, 1e-7, 0.4, 0.0), (1e-7, 0.6, 0.0, 0.6), (0.5, -0.5 + 1e-7, 0.5, -0.5)]:
        torch.testing.assert_close(rows("ab_divergence", a, b), rows("ab_divergence", a0, b0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_and_t2_scaling(backend):
    s, t = _logits()
    plain = tgtfast.distill_loss(s, t, "jsd", beta=0.4, temperature=3.0, backend=backend)
    torch.testing.assert_close(plain, R.distill_loss(s / 3, t / 3, "jsd", param_a=0.4))
    scaled = tgtfast.distill_loss(s, t, "jsd", beta=0.4, temperature=3.0, t2_scaling=True, backend=backend)
    torch.testing.assert_close(scaled, 9 * plain)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    tgtfast.distill_loss(s1, t, "reverse_kl", temperature=3.0, t2_scaling=True, backend=backend).backward()
    (9 * tgtfast.distill_loss(s2, t, "reverse_kl", temperature=3.0, backend=backend)).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_with_num_items_in_batch(backend):
    s, t = _logits(n=12, k=10, seed=6)
    target = torch.tensor([1, -100, 2, 3, -100, -100, 4, 5, 6, -100, 7, 8])
    big = s.clone().requires_grad_(True)
    full = tgtfast.distill_loss(big, t, "skew_kl", alpha=0.2, target=target, backend=backend)
    full.backward()
    micro = s.clone().requires_grad_(True)
    count = int((target != -100).sum())
    total = 0
    for rows in (slice(0, 5), slice(5, 12)):  # micro-batches with different numbers of loss tokens
        part = tgtfast.distill_loss(micro[rows], t[rows], "skew_kl", alpha=0.2, target=target[rows],
                                    num_items_in_batch=count, backend=backend)
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(micro.grad, big.grad)
    # a tensor count works too
    t_count = tgtfast.distill_loss(s, t, "skew_kl", alpha=0.2, target=target, num_items_in_batch=torch.tensor(count),
                                   backend=backend)
    torch.testing.assert_close(t_count, full.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_leading_shape(backend):
    s, t = _logits(n=6, k=8, seed=7)
    s3, t3 = s.reshape(2, 3, 8), t.reshape(2, 3, 8)
    target = torch.tensor([[0, -100, 1], [2, 3, -100]])
    none = tgtfast.distill_loss(s3, t3, "tvd", target=target, reduction="none", backend=backend)
    assert none.shape == (2, 3) and none[0, 1] == 0 and none[1, 2] == 0
    total = tgtfast.distill_loss(s3, t3, "tvd", target=target, reduction="sum", backend=backend)
    mean = tgtfast.distill_loss(s3, t3, "tvd", target=target, reduction="mean", backend=backend)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, none.sum() / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_scale_and_softcap_as_the_model_applies_them(backend):
    s, t = _logits(seed=8)
    sa = s.clone().requires_grad_(True)
    got = tgtfast.distill_loss(sa, t, "symmetric_kl", lam=0.2, logit_scale=(0.5, 2.0), temperature=1.3,
                               backend=backend)
    sb = s.clone().requires_grad_(True)
    want = R.distill_loss(sb * 0.5, t * 2.0, "symmetric_kl", param_a=0.2, temperature=1.3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grads(got, sa)[0], _grads(want, sb)[0])
    sa = s.clone().requires_grad_(True)
    got = tgtfast.distill_loss(sa, t, "forward_kl", logit_scale=2.0, logit_softcap=(3.0, None), backend=backend)
    sb = s.clone().requires_grad_(True)
    want = R.distill_loss(3.0 * torch.tanh(2.0 * sb / 3.0), 2.0 * t, "forward_kl")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grads(got, sa)[0], _grads(want, sb)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_mismatch(backend):
    s, _ = _logits(n=4, k=10, seed=9)
    _, t = _logits(n=4, k=12, seed=10)
    with pytest.raises(ValueError, match="10 classes but the teacher's have 12"):
        tgtfast.distill_loss(s, t, backend=backend)
    got = tgtfast.distill_loss(s, t, vocab_mismatch="slice", backend=backend)
    torch.testing.assert_close(got, R.distill_loss(s, t[:, :10], "forward_kl"))
    got = tgtfast.distill_loss(s, t, "reverse_kl", vocab_mismatch="pad", backend=backend)
    padded = torch.cat([s, torch.full((4, 2), -math.inf, dtype=s.dtype)], 1)
    torch.testing.assert_close(got, R.distill_loss(padded, t, "reverse_kl"))
    with pytest.raises(ValueError, match="vocab_mismatch must be one of"):
        tgtfast.distill_loss(s, t, vocab_mismatch="crop", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_nan_rows(backend):
    s, t = _logits(n=3, k=6, seed=11)
    s = s.clone()
    s[1, 2] = float("nan")
    sg = s.clone().requires_grad_(True)
    loss = tgtfast.distill_loss(sg, t, "jsd", beta=0.5, target=torch.full((3,), -100), backend=backend)
    loss.backward()
    assert loss.item() == 0 and torch.equal(sg.grad, torch.zeros_like(s))
    rows = tgtfast.distill_loss(s, t, "jsd", beta=0.5, reduction="none", backend=backend)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    t_nan = t.clone()
    t_nan[2, 0] = float("nan")  # a NaN teacher logit is a NaN row too, for every divergence
    for div, kw in (("forward_kl", {}), ("taid", {"t": 1.0}), ("tvd", {}), ("ab_divergence", {"alpha": 1, "beta": 0})):
        rows = tgtfast.distill_loss(s.nan_to_num(), t_nan, div, **kw, reduction="none", backend=backend)
        assert torch.isnan(rows[2]) and torch.isfinite(rows[:2]).all(), div
    # a teacher class of -inf logit: finite for forward KL, +inf for reverse KL
    t = t.clone()
    t[0, 1] = -math.inf
    assert torch.isfinite(tgtfast.distill_loss(s[[0]], t[[0]], backend=backend))
    assert tgtfast.distill_loss(s[[0]], t[[0]], "reverse_kl", backend=backend).item() == math.inf


BAD = [
    (dict(divergence="kl"), ValueError, "divergence must be one of .*forward_kl.*taid"),
    (dict(divergence="jsd", beta=1.5), ValueError, r"beta must be in \[0, 1\]"),
    (dict(divergence="skew_kl", alpha=-0.1), ValueError, r"alpha must be in \[0, 1\]"),
    (dict(divergence="symmetric_kl", lam=float("nan")), ValueError, "lam must be in"),
    (dict(divergence="tvd", beta=0.5), ValueError, "beta=0.5 is not a parameter of divergence 'tvd'"),
    (dict(divergence="ab_divergence", alpha=0.5), ValueError, "needs beta="),
    (dict(divergence="ab_divergence", alpha=float("inf"), beta=0.1), ValueError, "alpha must be finite"),
    (dict(divergence="taid"), ValueError, "needs t="),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(reduction="sum", num_items_in_batch=10), ValueError, "num_items_in_batch .* needs reduction"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be in"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be in"),
    (dict(t2_scaling=1), TypeError, "t2_scaling must be a bool"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_arguments(kwargs, exc, match):
    s, t = _logits(n=2, k=4)
    with pytest.raises(exc, match=match):
        tgtfast.distill_loss(s, t, **kwargs)


def test_bad_tensors():
    s, t = _logits(n=2, k=4)
    with pytest.raises(TypeError, match="student_logits"):
        tgtfast.distill_loss(s.long(), t)
    with pytest.raises(ValueError, match="leading dimensions"):
        tgtfast.distill_loss(s, t[:1])
    with pytest.raises(ValueError, match="target"):
        tgtfast.distill_loss(s, t, target=torch.zeros(3, dtype=torch.long))
    # an integer tensor given positionally as PTLoss coefficients is most likely the labels
    with pytest.raises(TypeError, match="coeffs must be a floating tensor.*target="):
        tgtfast.ptloss(s, t, torch.tensor([0, 1]))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs a fused backend")
def test_forward_ad_and_double_backward_are_refused_by_fused_kernels():
    s, t = _logits(n=3, k=5)
    with pytest.raises(RuntimeError, match="forward-mode AD.*backend='reference'"):
        torch.func.jvp(lambda x: tgtfast.distill_loss(x, t, "jsd", backend="cpp"), (s,), (torch.ones_like(s),))
    x = s.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(tgtfast.distill_loss(x, t, "tvd", backend="cpp"), x, create_graph=True)


def test_reference_backend_supports_forward_ad_and_double_backward():
    s, t = _logits(n=3, k=5)
    v = torch.randn_like(s)
    _, tangent = torch.func.jvp(lambda x: tgtfast.distill_loss(x, t, "jsd", backend="reference"), (s,), (v,))
    eps = 1e-6
    fd = (tgtfast.distill_loss(s + eps * v, t, "jsd", backend="reference")
          - tgtfast.distill_loss(s - eps * v, t, "jsd", backend="reference")) / (2 * eps)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-9)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda y: tgtfast.distill_loss(y, t, "skew_kl", backend="reference"), (x,))


def test_other_fused_ops_refuse_forward_ad():
    if tgtfast.backends("perturb")["cpp"] != "available":
        pytest.skip("needs the compiled extension")
    z = torch.randn(3, 4)
    for fn in (lambda x: tgtfast.perturb(x, 0.1, 1, backend="cpp"),
               lambda x: tgtfast.temperature_softmax(x, 2.0, backend="cpp"),
               lambda x: tgtfast.ptloss(x, z, backend="cpp")):
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.func.jvp(fn, (z,), (torch.ones_like(z),))
    # softmax and perturb have differentiable backwards: their double backward is right, not refused
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda y: tgtfast.temperature_softmax(y, 1.5, backend="cpp"), (x,))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(tgtfast.ptloss(x, x.detach() * 2, backend="cpp"), x, create_graph=True)


MODULES = [
    (tgtfast.ForwardKLLoss(), "forward_kl", {}),
    (tgtfast.ReverseKLLoss(temperature=2.0), "reverse_kl", {"temperature": 2.0}),
    (tgtfast.JSDLoss(0.3), "jsd", {"beta": 0.3}),
    (tgtfast.SkewKLLoss(alpha=0.2), "skew_kl", {"alpha": 0.2}),
    (tgtfast.SkewReverseKLLoss(0.2), "skew_reverse_kl", {"alpha": 0.2}),
    (tgtfast.TVDLoss(reduction="sum"), "tvd", {"reduction": "sum"}),
    (tgtfast.SymmetricKLLoss(lam=0.7), "symmetric_kl", {"lam": 0.7}),
    (tgtfast.ABDivergenceLoss(0.2, 0.7), "ab_divergence", {"alpha": 0.2, "beta": 0.7}),
    (tgtfast.TAIDLoss(0.6), "taid", {"t": 0.6}),
    (tgtfast.DistillLoss("jsd", beta=0.9, t2_scaling=True, temperature=2.0), "jsd",
     {"beta": 0.9, "t2_scaling": True, "temperature": 2.0}),
]


@pytest.mark.parametrize("module,div,kw", MODULES, ids=[m[1] for m in MODULES])
def test_modules_equal_the_functional_form(module, div, kw):
    s, t = _logits(seed=12)
    target = torch.tensor([0, 1, -100, 2, 3, 4])
    torch.testing.assert_close(module(s, t, target), tgtfast.distill_loss(s, t, div, target=target, **kw))
    assert div in repr(module)


def test_module_arguments_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        tgtfast.JSDLoss(beta=2.0)
    with pytest.raises(TypeError, match="at most 1 positional"):
        tgtfast.JSDLoss(0.1, 0.2)
    with pytest.raises(ValueError, match="reduction must be one of"):
        tgtfast.TVDLoss(reduction="avg")
    with pytest.raises(ValueError, match="exactly one of t"):
        tgtfast.TAIDLoss()
    with pytest.raises(ValueError, match="needs beta="):
        tgtfast.ABDivergenceLoss(alpha=0.3)


def test_taid_loss_reads_its_schedule():
    class Schedule:
        t = 0.25

    sched = Schedule()
    loss = tgtfast.TAIDLoss(schedule=sched, temperature=1.5)
    s, t = _logits(seed=13)
    torch.testing.assert_close(loss(s, t), tgtfast.distill_loss(s, t, "taid", t=0.25, temperature=1.5))
    sched.t = 0.75
    torch.testing.assert_close(loss(s, t), tgtfast.distill_loss(s, t, "taid", t=0.75, temperature=1.5))


# ---------------------------------------------------------------------------------------------- fused linear


def _hidden(n=19, h=8, v=23, seed=14, v_t=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return rnd(n, h), rnd(v, h), rnd(n, h + 3), rnd(v_t or v, h + 3), rnd(v), rnd(v_t or v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,kw,params", [c for c in CASES if c[2] is not None],
                         ids=[i for c, i in zip(CASES, IDS) if c[2] is not None])
def test_fused_linear_matches_reference(backend, div, kw, params):
    hs, ws, ht, wt, bs, bt = _hidden()
    target = torch.randint(0, 23, (19,), generator=torch.Generator().manual_seed(0))
    target[[2, 7]] = -100
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss, soft, hard = tgtfast.fused_linear_distill_loss(
        leaves[0], leaves[1], ht, wt, div, **kw, student_bias=leaves[2], teacher_bias=bt, temperature=1.4,
        target=target, kd_weight=0.6, ce_weight=0.4, chunk_size=4, return_parts=True, backend=backend)
    ref_leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    want = R.fused_linear_distill_loss(ref_leaves[0], ref_leaves[1], ht, wt, div, param_a=params[0],
                                       param_b=params[1], student_bias=ref_leaves[2], teacher_bias=bt,
                                       temperature=1.4, target=target, kd_weight=0.6, ce_weight=0.4)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(0.6 * soft + 0.4 * hard, loss.detach())
    assert not soft.requires_grad and not hard.requires_grad
    for a, b in zip(_grads(loss, *leaves), _grads(want, *ref_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_transforms_and_counts(backend):
    hs, ws, ht, wt, _, _ = _hidden(seed=15)
    target = torch.arange(19) % 23
    target[0] = -100
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws)]
    got = tgtfast.fused_linear_distill_loss(
        leaves[0], leaves[1], ht, wt, "reverse_kl", target=target, ce_weight=0.5, logit_scale=(0.7, 1.3),
        logit_softcap=(4.0, 2.5), num_items_in_batch=30, chunk_size=5, t2_scaling=True, temperature=2.0,
        backend=backend)
    ref = [x.clone().requires_grad_(True) for x in (hs, ws)]
    s = 4.0 * torch.tanh(0.7 * (ref[0] @ ref[1].T) / 4.0)
    t = 2.5 * torch.tanh(1.3 * (ht @ wt.T) / 2.5)
    valid = target != -100
    kd = R.divergence_rows(s, t, "reverse_kl", temperature=2.0)[valid].sum() * 4.0 / 30
    ce = F.cross_entropy(s[valid], target[valid], reduction="sum") * 0.5 / 30
    torch.testing.assert_close(got, kd + ce)
    for a, b in zip(_grads(got, *leaves), _grads(kd + ce, *ref)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["slice", "pad"])
def test_fused_linear_vocab_mismatch(mode):
    hs, ws, ht, wt, _, _ = _hidden(seed=16, v=23, v_t=25)
    with pytest.raises(ValueError, match="teacher_weight has V = 25 rows but student_weight has V = 23"):
        tgtfast.fused_linear_distill_loss(hs, ws, ht, wt)
    leaf = ws.clone().requires_grad_(True)
    got = tgtfast.fused_linear_distill_loss(hs, leaf, ht, wt, "forward_kl", vocab_mismatch=mode, chunk_size=8)
    (g,) = _grads(got, leaf)
    assert g.shape == ws.shape
    ref = ws.clone().requires_grad_(True)
    s, t = hs @ ref.T, ht @ wt.T
    if mode == "slice":
        want = R.distill_loss(s, t[:, :23], "forward_kl")
    else:
        want = R.distill_loss(torch.cat([s, torch.full((19, 2), -math.inf, dtype=s.dtype)], 1), t, "forward_kl")
    torch.testing.assert_close(got, want)
    if mode == "slice":
        torch.testing.assert_close(g, _grads(want, ref)[0])


def test_fused_linear_bf16_hidden_states_accumulate_in_float32():
    hs, ws, ht, wt, _, _ = _hidden(seed=17, dtype=torch.bfloat16)
    leaf = hs.clone().requires_grad_(True)
    got = tgtfast.fused_linear_distill_loss(leaf, ws, ht, wt, "jsd", beta=0.5, chunk_size=8)
    assert got.dtype == torch.float32
    (g,) = _grads(got, leaf)
    assert g.dtype == torch.bfloat16
    want = R.distill_loss(hs.double() @ ws.double().T, ht.double() @ wt.double().T, "jsd", param_a=0.5)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-3)


def test_fused_linear_module_and_errors():
    hs, ws, ht, wt, _, _ = _hidden(seed=18)
    target = torch.arange(19) % 23
    mod = tgtfast.FusedLinearDistillLoss("tvd", ce_weight=0.2, kd_weight=0.8, chunk_size=6)
    torch.testing.assert_close(mod(hs, ws, ht, wt, target),
                               tgtfast.fused_linear_distill_loss(hs, ws, ht, wt, "tvd", target=target, ce_weight=0.2,
                                                                 kd_weight=0.8))
    with pytest.raises(ValueError, match="ce_weight != 0 needs target"):
        tgtfast.fused_linear_distill_loss(hs, ws, ht, wt, ce_weight=0.5)
    with pytest.raises(ValueError, match="not a parameter"):
        tgtfast.FusedLinearDistillLoss("forward_kl", beta=0.3)
    x = hs.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(tgtfast.fused_linear_distill_loss(x, ws, ht, wt), x, create_graph=True)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda y: tgtfast.fused_linear_distill_loss(y, ws, ht, wt), (hs,), (torch.ones_like(hs),))
