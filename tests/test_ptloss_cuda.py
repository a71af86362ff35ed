"""The compiled CUDA kernel of ``torch.ops.tgtfast.ptloss_fwd`` against the float64 reference.

The GPU tests skip unless a CUDA device is visible and the extension registered a CUDA kernel for the op
(``csrc/cuda/ptloss_cuda_launcher.cpp``). The oracle is ``tgtfast.reference.ptloss_rows`` in float64 on the
same (rounded) inputs, with gradients by autograd, except in two places where the contract of the fused
op (docs/design.md, "PTLoss") and autograd of the reference part ways:

* probability teacher, student gradient: the op returns ``(q - p) + ...``, which assumes ``sum(p) == 1``;
  a float16/bfloat16 teacher row only sums to 1 up to rounding, and autograd then differs by
  ``q * (sum(p) - 1)``. The closed form of the contract is the oracle there.
* teacher entries with ``p0_j == 0``, where autograd of the reference may be NaN (``xlogy`` at 0): the op
  follows the xlogy convention, ``0`` for a logit teacher and ``(1 - delta) (g_j + 1) = -inf`` (the
  derivative of ``p log p`` at 0+) for a probability teacher without smoothing.

``test_oracle_matches_autograd`` checks the closed form against autograd wherever both are defined, and
runs without a GPU.

Tolerances: the loss is accumulated in float32 from inputs that are exact in every dtype, so it gets a
float32 tolerance for all dtypes; gradients are rounded to the input dtype, so they get a relative
tolerance of a few units of that dtype plus an absolute term relative to the largest gradient.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tgtfast.reference import ptloss_rows

try:  # importing the extension registers torch.ops.tgtfast
    importlib.import_module("tgtfast._C")
except Exception:  # noqa: BLE001 - the tests below skip when the op is missing
    pass

DEVICE = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# |kernel - reference| <= RTOL * |reference| + max(ATOL * max|reference|, subnormal step) for gradients
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_ATOL = {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-5
MAX_ORDERS = 32  # tgtfast::cuda::kMaxOrders


def _op():
    return torch.ops.tgtfast.ptloss_fwd


def _has_cuda_kernel() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        _op()
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("tgtfast::ptloss_fwd", "CUDA"))
    except (AttributeError, RuntimeError):
        return False


requires_cuda_kernel = pytest.mark.skipif(
    not _has_cuda_kernel(), reason="needs a CUDA device and the compiled CUDA kernel of tgtfast::ptloss_fwd"
)


# ----------------------------------------------------------------------------------------------------
# Oracle


def closed_form_grads(s, t, coeffs, temperature, label_smoothing, teacher_is_logits):
    """dL/ds and dL/dt of the contract (docs/design.md, "PTLoss") in float64, xlogy convention for p0 == 0."""
    s, t = s.double(), t.double()
    k = s.shape[-1]
    log_q = torch.log_softmax(s / temperature, -1)
    q = log_q.exp()
    if teacher_is_logits:
        log_p0 = torch.log_softmax(t / temperature, -1)
        p0 = log_p0.exp()
    else:
        p0, log_p0 = t, torch.log(t)
    p = (1 - label_smoothing) * p0 + label_smoothing / k
    log_p = torch.log(p) if label_smoothing > 0 else log_p0
    x = -torch.expm1(log_q)
    h = torch.zeros_like(q)
    hp = torch.zeros_like(q)
    if coeffs is not None and coeffs.numel() > 0:
        eta = coeffs.double()
        if eta.dim() == 1:
            eta = eta[:, None].expand(-1, k)
        for m in range(1, eta.shape[0] + 1):
            h = h + eta[m - 1] * x**m
            hp = hp + m * eta[m - 1] * x ** (m - 1)
    g = log_p - log_q + h
    a = -p * hp
    grad_s = ((q - p) + q * (a - (a * q).sum(-1, keepdim=True))) / temperature
    if teacher_is_logits:
        zero = torch.zeros_like(p0)
        p0g = torch.where(p0 == 0, zero, p0 * g)
        grad_t = torch.where(p0 == 0, zero, (1 - label_smoothing) * p0 * (g - p0g.sum(-1, keepdim=True)) / temperature)
    else:
        grad_t = (1 - label_smoothing) * (g + 1)
    return grad_s, grad_t


def reference(s, t, coeffs, temperature, label_smoothing, teacher_is_logits, valid=None):
    """(loss, grad_student, grad_teacher) in float64 for the rounded inputs s, t."""
    sd = s.detach().double().requires_grad_()
    td = t.detach().double().requires_grad_()
    loss = ptloss_rows(
        sd,
        td,
        coeffs.double() if coeffs.numel() > 0 else None,
        temperature=temperature,
        teacher_is_logits=teacher_is_logits,
        label_smoothing=label_smoothing,
    )
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (sd, td))
    closed_s, closed_t = closed_form_grads(s, t, coeffs, temperature, label_smoothing, teacher_is_logits)
    if not teacher_is_logits:
        grad_s = closed_s
    # Where autograd of the reference is undefined (xlogy at p == 0), the contract's closed form decides.
    grad_t = torch.where(torch.isfinite(grad_t), grad_t, closed_t)
    loss = loss.detach()
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        grad_s = torch.where(valid[:, None], grad_s, torch.zeros_like(grad_s))
        grad_t = torch.where(valid[:, None], grad_t, torch.zeros_like(grad_t))
    return loss, grad_s, grad_t


def assert_close_loss(out, ref):
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=LOSS_RTOL, atol=LOSS_ATOL, equal_nan=True)


def assert_close_grad(out, ref, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, (what, out.dtype, out.shape)
    out = out.double()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), f"{what}: non-finite entries differ"
    assert torch.equal(out[~finite].nan_to_num(), ref[~finite].nan_to_num()), f"{what}: inf/NaN entries differ"
    if not finite.any():
        return
    scale = ref[finite].abs().max().item()
    finfo = torch.finfo(dtype)
    subnormal_step = finfo.smallest_normal * finfo.eps  # rounding to a subnormal is exact only to this
    torch.testing.assert_close(
        out[finite],
        ref[finite],
        rtol=GRAD_RTOL[dtype],
        atol=max(GRAD_ATOL[dtype] * scale, subnormal_step),
        msg=lambda m: f"{what}: {m}",
    )


def make_inputs(n, k, dtype, teacher_is_logits, *, scale=3.0, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) * scale
    t = torch.randn(n, k, generator=g) * scale
    if not teacher_is_logits:
        t = torch.softmax(t, -1)
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_coeffs(m, k, per_class, *, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    shape = (m, k) if per_class else (m,)
    return (torch.rand(shape, generator=g) * 2.5 - 0.5).to(device=device, dtype=torch.float32)


def run_and_check(
    s, t, coeffs, temperature=1.0, label_smoothing=0.0, teacher_is_logits=True, valid=None, grad_scale=None
):
    args = (s, t, coeffs, valid, temperature, label_smoothing, teacher_is_logits, True, True)
    if grad_scale is None:  # the schema default, 1.0
        loss, gs, gt = _op()(*args)
    else:
        loss, gs, gt = _op()(*args, grad_scale)
    rl, rgs, rgt = reference(s, t, coeffs, temperature, label_smoothing, teacher_is_logits, valid)
    if grad_scale is not None:
        rgs, rgt = rgs * grad_scale, rgt * grad_scale
    assert_close_loss(loss, rl)
    assert_close_grad(gs, rgs, s.dtype, "grad_student")
    assert_close_grad(gt, rgt, t.dtype, "grad_teacher")
    return loss, gs, gt


# ----------------------------------------------------------------------------------------------------
# The oracle itself (no GPU needed)


@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("per_class", [False, True])
def test_oracle_matches_autograd(teacher_is_logits, per_class):
    s, t = make_inputs(5, 13, torch.float64, teacher_is_logits, device="cpu")
    if not teacher_is_logits:
        t = t / t.sum(-1, keepdim=True)  # exactly normalised in float64: the closed form assumes sum(p) == 1
    coeffs = make_coeffs(3, 13, per_class, device="cpu")
    for temperature, delta in [(1.0, 0.0), (2.5, 0.1), (0.6, 0.3)]:
        sd = s.clone().requires_grad_()
        td = t.clone().requires_grad_()
        loss = ptloss_rows(
            sd, td, coeffs, temperature=temperature, teacher_is_logits=teacher_is_logits, label_smoothing=delta
        )
        auto_s, auto_t = torch.autograd.grad(loss.sum(), (sd, td))
        closed_s, closed_t = closed_form_grads(s, t, coeffs, temperature, delta, teacher_is_logits)
        torch.testing.assert_close(closed_s, auto_s, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(closed_t, auto_t, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# GPU tests


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [2, 7, 1000, 32000])
@pytest.mark.parametrize("m,per_class", [(0, False), (1, False), (1, True), (5, False), (5, True)])
def test_matches_reference(dtype, k, m, per_class):
    n = 3 if k >= 32000 else 6
    s, t = make_inputs(n, k, dtype, True, seed=k + m)
    coeffs = make_coeffs(m, k, per_class) if m else torch.zeros(0, device=DEVICE)
    run_and_check(s, t, coeffs)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 1000, 3000, 32000])
@pytest.mark.parametrize(
    "temperature,label_smoothing,teacher_is_logits",
    [(2.0, 0.0, True), (0.7, 0.1, True), (1.0, 0.0, False), (3.0, 0.2, False)],
)
def test_options(dtype, k, temperature, label_smoothing, teacher_is_logits):
    n = 3 if k >= 32000 else 5
    s, t = make_inputs(n, k, dtype, teacher_is_logits, seed=k)
    coeffs = make_coeffs(3, k, per_class=k % 2 == 1)
    run_and_check(s, t, coeffs, temperature, label_smoothing, teacher_is_logits)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [2, 1000, 32000])
def test_valid_mask(dtype, k):
    n = 7
    s, t = make_inputs(n, k, dtype, True, seed=3)
    valid = torch.tensor([True, False, True, True, False, False, True], device=DEVICE)
    s[~valid] = float("nan")  # ignored rows must not be read: no NaN may leak
    t[~valid] = float("inf")
    loss, gs, gt = run_and_check(s, t, make_coeffs(2, k, False), 1.5, 0.1, True, valid)
    assert torch.all(loss[~valid] == 0)
    assert torch.all(gs[~valid] == 0) and torch.all(gt[~valid] == 0)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_ignored(dtype):
    s, t = make_inputs(4, 300, dtype, True)
    valid = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    loss, gs, gt = _op()(s, t, make_coeffs(2, 300, False), valid, 1.0, 0.0, True, True, True)
    assert torch.all(loss == 0) and torch.all(gs == 0) and torch.all(gt == 0)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 300, 5000, 32000])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
def test_extreme_logits(dtype, k, teacher_is_logits):
    s, t = make_inputs(4, k, dtype, teacher_is_logits, seed=5)
    s[:, ::3] = 1e4
    s[:, 1::5] = -1e4
    if teacher_is_logits:
        t[:, 1::4] = 1e4
        t[:, 2::7] = -1e4
    coeffs = make_coeffs(5, k, False)
    loss, gs, gt = run_and_check(s, t, coeffs, 1.0, 0.0, teacher_is_logits)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all()
    if teacher_is_logits:
        assert torch.isfinite(gt).all()
    run_and_check(s, t, coeffs, 2.5, 0.1, teacher_is_logits)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [7, 1000, 32000])
def test_nan_propagates_within_its_row(dtype, k):
    s, t = make_inputs(4, k, dtype, True, seed=6)
    s[1, k // 2] = float("nan")
    t[2, k - 1] = float("nan")
    loss, gs, gt = _op()(s, t, make_coeffs(2, k, False), None, 1.0, 0.0, True, True, True)
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    keep = torch.tensor([0, 3], device=DEVICE)
    rl, rgs, rgt = reference(s[keep], t[keep], make_coeffs(2, k, False), 1.0, 0.0, True)
    assert_close_loss(loss[keep], rl)
    assert_close_grad(gs[keep], rgs, dtype, "grad_student")
    assert_close_grad(gt[keep], rgt, dtype, "grad_teacher")


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_hot_teacher(dtype, label_smoothing):
    """PolyLoss-style one-hot probabilities: zeros in p give 0 loss terms; dL/dp0 is -inf there if delta == 0."""
    k = 1000
    s, _ = make_inputs(6, k, dtype, True, seed=7)
    t = torch.nn.functional.one_hot(torch.arange(6, device=DEVICE) * 37, k).to(dtype)
    coeffs = torch.tensor([1.0], device=DEVICE)
    loss, gs, gt = run_and_check(s, t, coeffs, 1.0, label_smoothing, False)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all()
    if label_smoothing == 0:
        assert torch.all(gt[t == 0] == float("-inf"))
    else:
        assert torch.isfinite(gt).all()


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_scale", [2.0, -0.25, 1.0 / 4096])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
def test_grad_scale(dtype, grad_scale, teacher_is_logits):
    """Gradients are those of grad_scale * loss (the caller's reduction weight); the loss is unscaled."""
    k = 3000
    s, t = make_inputs(5, k, dtype, teacher_is_logits, seed=12)
    valid = torch.tensor([True, True, False, True, True], device=DEVICE)
    run_and_check(s, t, make_coeffs(2, k, True), 1.7, 0.1, teacher_is_logits, valid, grad_scale)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_s,need_t", [(True, False), (False, True), (False, False)])
def test_gradient_flags(dtype, need_s, need_t):
    k = 1000
    s, t = make_inputs(5, k, dtype, True, seed=8)
    coeffs = make_coeffs(2, k, True)
    loss, gs, gt = _op()(s, t, coeffs, None, 1.3, 0.05, True, need_s, need_t)
    full = _op()(s, t, coeffs, None, 1.3, 0.05, True, True, True)
    assert torch.equal(loss, full[0])
    for flag, out, ref in ((need_s, gs, full[1]), (need_t, gt, full[2])):
        if flag:
            assert torch.equal(out, ref)
        else:
            assert out.shape == (0,) and out.device.type == "cuda"


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [301, 1001, 4099])
@pytest.mark.parametrize("shift_s,shift_t", [(0, 0), (1, 1), (1, 0), (0, 3)])
def test_unaligned_rows(dtype, k, shift_s, shift_t):
    """Rows not 16-byte aligned (odd K, storage offsets): scalar head/tail and the scalar fallback."""
    n = 4
    s0, t0 = make_inputs(n, k, dtype, True, seed=9)
    s_buf = torch.zeros(n * k + 8, dtype=dtype, device=DEVICE)
    t_buf = torch.zeros(n * k + 8, dtype=dtype, device=DEVICE)
    s = s_buf[shift_s : shift_s + n * k].view(n, k)
    t = t_buf[shift_t : shift_t + n * k].view(n, k)
    s.copy_(s0)
    t.copy_(t0)
    assert s.is_contiguous() and t.is_contiguous()
    run_and_check(s, t, make_coeffs(3, k, False), 1.2, 0.05, True)


@requires_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_rows_and_orders(dtype):
    n, k, m = 3000, 37, MAX_ORDERS
    s, t = make_inputs(n, k, dtype, True, seed=10, scale=1.5)
    coeffs = make_coeffs(m, k, True) * 0.05
    valid = torch.rand(n, generator=torch.Generator().manual_seed(0)) > 0.2
    run_and_check(s, t, coeffs, 1.0, 0.0, True, valid.to(DEVICE))


@requires_cuda_kernel
def test_deterministic_and_current_stream():
    s, t = make_inputs(64, 32000, torch.bfloat16, True, seed=11)
    coeffs = make_coeffs(3, 32000, False)
    first = _op()(s, t, coeffs, None, 2.0, 0.1, True, True, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        second = _op()(s, t, coeffs, None, 2.0, 0.1, True, True, True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@requires_cuda_kernel
def test_empty_batch():
    s = torch.empty(0, 10, device=DEVICE)
    loss, gs, gt = _op()(s, s, torch.zeros(0, device=DEVICE), None, 1.0, 0.0, True, True, True)
    assert loss.shape == (0,) and gs.shape == (0, 10) and gt.shape == (0, 10)


@requires_cuda_kernel
def test_bad_arguments():
    s, t = make_inputs(2, 8, torch.float32, True)
    c = torch.zeros(0, device=DEVICE)
    op = _op()
    with pytest.raises(RuntimeError, match="teacher"):
        op(s, t.half(), c, None, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="teacher"):
        op(s, t[:, :4].contiguous(), c, None, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="coeffs"):
        op(s, t, torch.zeros(2, dtype=torch.float64, device=DEVICE), None, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="coeffs"):
        op(s, t, torch.zeros(2, 5, device=DEVICE), None, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="coeffs"):
        op(s, t, torch.zeros(MAX_ORDERS + 1, device=DEVICE), None, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="valid"):
        op(s, t, c, torch.ones(2, dtype=torch.uint8, device=DEVICE), 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="temperature"):
        op(s, t, c, None, 0.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        op(s, t, c, None, 1.0, 1.0, True, True, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(s.t(), t.t(), c, None, 1.0, 0.0, True, True, True)
    with pytest.raises(RuntimeError, match="dtype"):
        op(s.double(), t.double(), c.double(), None, 1.0, 0.0, True, True, True)
