"""Per-row loss weights in ``tgtfast.distill_loss`` (the ``weight`` argument): every divergence on every backend
this machine runs against the float64 eager reference with the weight (``tgtfast.reference.distill_loss``), the
reductions and a caller-given count, sparse teachers, the modules, and bad weights."""

import pytest
import torch

import tgtfast
from tgtfast import reference as R

AVAILABLE = tgtfast.backends("divergence")
BACKENDS = [b for b in ("reference", "cpp") if AVAILABLE[b] == "available"]

# (divergence, public keyword arguments, kernel-order parameters)
CASES = [
    ("forward_kl", {}, (0.0, 0.0)),
    ("reverse_kl", {}, (0.0, 0.0)),
    ("jsd", {"beta": 0.3}, (0.3, 0.0)),
    ("skew_kl", {"alpha": 0.2}, (0.2, 0.0)),
    ("skew_reverse_kl", {"alpha": 0.4}, (0.4, 0.0)),
    ("tvd", {}, (0.0, 0.0)),
    ("symmetric_kl", {"lam": 0.3}, (0.3, 0.0)),
    ("ab_divergence", {"alpha": 0.5, "beta": 0.7}, (0.5, 0.7)),
    ("ab_divergence", {"alpha": 0.0, "beta": 0.0}, (0.0, 0.0)),
    ("taid", {"t": 0.4}, (0.4, 0.0)),
]
IDS = [f"{d}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for d, kw, _ in CASES]


def _inputs(shape=(6,), k=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(*shape, k, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = (2 * torch.randn(*shape, k, generator=g, dtype=torch.float64)).requires_grad_(True)
    w = torch.rand(*shape, generator=g, dtype=torch.float64) * 2
    return s, t, w


def _check(got, want, s, t):
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    up = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    for a, b in zip(torch.autograd.grad((got * up).sum(), (s, t)), torch.autograd.grad((want * up).sum(), (s, t))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,kw,params", CASES, ids=IDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_weighted_matches_reference_float64(backend, div, kw, params, reduction):
    s, t, w = _inputs()
    target = torch.tensor([1, -100, 3, 4, 0, 2])
    got = tgtfast.distill_loss(s, t, div, **kw, temperature=1.3, target=target, reduction=reduction,
                               backend=backend, weight=w)
    want = R.distill_loss(s, t, div, param_a=params[0], param_b=params[1], temperature=1.3, target=target,
                          reduction=reduction, weight=w)
    _check(got, want, s, t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_is_an_independent_rescaling_of_the_rows(backend):
    """Against the unweighted loss itself: weighted rows are the per-row losses times the weights, the mean
    divides by the rows not ignored (not the weights' sum), num_items_in_batch replaces that count, and the
    gradients are those of the rows scaled by the weights."""
    s, t, w = _inputs(shape=(2, 3), seed=1)
    target = torch.tensor([[0, -100, 2], [3, 4, 5]])
    rows = tgtfast.distill_loss(s, t, "jsd", beta=0.4, target=target, reduction="none", backend=backend)
    got = tgtfast.distill_loss(s, t, "jsd", beta=0.4, target=target, reduction="none", backend=backend, weight=w)
    torch.testing.assert_close(got, rows * w)
    mean = tgtfast.distill_loss(s, t, "jsd", beta=0.4, target=target, backend=backend, weight=w)
    torch.testing.assert_close(mean, (rows * w).sum() / 5)
    flat = tgtfast.distill_loss(s, t, "jsd", beta=0.4, target=target, backend=backend, weight=w.reshape(-1),
                                num_items_in_batch=w.sum())
    torch.testing.assert_close(flat, (rows * w).sum() / w.sum())
    g_w = torch.autograd.grad(mean, s)[0]
    g_rows = torch.autograd.grad((rows * w.detach()).sum() / 5, s)[0]
    torch.testing.assert_close(g_w, g_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_removes_a_row_and_weight_gets_its_gradient(backend):
    s, t, _ = _inputs(seed=2)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.5], dtype=torch.float64, requires_grad=True)
    loss = tgtfast.distill_loss(s, t, "forward_kl", reduction="sum", backend=backend, weight=w)
    g_s, g_w = torch.autograd.grad(loss, (s, w))
    assert torch.all(g_s[1] == 0) and torch.all(g_s[4] == 0)
    rows = R.distill_loss(s.detach(), t.detach(), "forward_kl", reduction="none")
    torch.testing.assert_close(g_w, rows, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_weighted_against_float64_reference(backend):
    s, t, w = _inputs(shape=(4, 5), k=300, seed=3)
    s32, t32 = s.detach().float().requires_grad_(True), t.detach().float()
    got = tgtfast.distill_loss(s32, t32, "reverse_kl", temperature=2.0, backend=backend, weight=w.float())
    want = R.distill_loss(s.detach(), t.detach(), "reverse_kl", temperature=2.0, weight=w)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_sparse_teacher_weighted():
    s, t, w = _inputs(k=40, seed=4)
    logp = torch.log_softmax(t.detach(), -1)
    top = logp.topk(8, dim=-1)
    teacher = tgtfast.SparseTeacher(top.indices, top.values)
    rows = tgtfast.distill_loss(s, teacher, "forward_kl", reduction="none")
    got = tgtfast.distill_loss(s, teacher, "forward_kl", reduction="none", weight=w)
    torch.testing.assert_close(got, rows * w)
    mean = tgtfast.distill_loss(s, teacher, "forward_kl", weight=w)
    torch.testing.assert_close(mean, (rows * w).mean())


def test_module_passes_the_weight():
    s, t, w = _inputs(seed=5)
    loss_fn = tgtfast.JSDLoss(beta=0.5, temperature=1.5)
    got = loss_fn(s, t, weight=w)
    want = R.distill_loss(s, t, "jsd", param_a=0.5, temperature=1.5, weight=w)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(AVAILABLE.get("triton") != "available", reason=f"triton backend {AVAILABLE.get('triton')}")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes NaN in masked lanes
def test_triton_weighted_tiny():
    s, t, w = _inputs(shape=(3,), k=7, seed=6)
    s32, t32 = s.detach().float().requires_grad_(True), t.detach().float()
    got = tgtfast.distill_loss(s32, t32, "skew_kl", alpha=0.3, backend="triton", weight=w.float(), reduction="sum")
    want = R.distill_loss(s.detach().requires_grad_(True), t.detach(), "skew_kl", param_a=0.3, weight=w,
                          reduction="sum")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), "weight must not contain NaN"),
        (torch.tensor([1.0, -0.5, 1.0, 1.0, 1.0, 1.0]), "weight must be non-negative"),
        (torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0, 1.0]), "weight must be finite"),
        (torch.ones(5), "weight must have the logits' leading shape"),
        (torch.ones(2, 3), "weight must have the logits' leading shape"),
    ],
)
def test_bad_weight_is_a_clear_error(weight, match):
    s, t, _ = _inputs(seed=7)
    with pytest.raises(ValueError, match=match):
        tgtfast.distill_loss(s, t, weight=weight.double())


def test_integer_weight_is_a_type_error():
    s, t, _ = _inputs(seed=8)
    with pytest.raises(TypeError, match="weight must be a floating tensor"):
        tgtfast.distill_loss(s, t, weight=torch.ones(6, dtype=torch.long))
