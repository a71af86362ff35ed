"""PTLoss on the CPU backends against the float64 reference, plus the API contract."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_truth, cpu_backends, needs_backend, run_loss
from hypothesis import given, settings
from hypothesis import strategies as st

import tgtfast
from tgtfast import reference

BACKENDS = cpu_backends()


def make_inputs(shape, dtype, teacher_is_logits=True, scale=3.0):
    s = torch.randn(shape, dtype=torch.float64) * scale
    t = torch.randn(shape, dtype=torch.float64) * scale
    if not teacher_is_logits:
        t = t.softmax(-1)
    return s.to(dtype), t.to(dtype)


def make_coeffs(layout, m, k):
    if layout == "none":
        return None
    if layout == "shared":
        return torch.linspace(-0.8, 3.0, m)
    return torch.rand(m, k) * 4 - 1


def check_against_reference(backend, s, t, coeffs, **kw):
    dtype = s.dtype
    out = run_loss(tgtfast.ptloss, s, t, coeffs=coeffs, backend=backend, **kw)
    c64 = None if coeffs is None else coeffs.double()
    truth = run_loss(reference.ptloss, s.double(), t.double(), coeffs=c64, **kw)
    same = run_loss(reference.ptloss, s, t, coeffs=None if coeffs is None else coeffs.to(dtype), **kw)
    for name, o, sd, tr in zip(("loss", "grad student", "grad teacher"), out, same, truth):
        assert o.dtype == (tr.dtype if name == "loss" and dtype == torch.float64 else o.dtype)
        assert_close_to_truth(o, sd, tr, dtype, name)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(64, 32), (41, 1271), (3, 5, 401), (7, 2)])
@pytest.mark.parametrize("layout,m", [("none", 0), ("shared", 1), ("shared", 5), ("per_class", 3), ("shared", 8)])
def test_matches_reference(backend, dtype, shape, layout, m):
    s, t = make_inputs(shape, dtype)
    check_against_reference(backend, s, t, make_coeffs(layout, m, shape[-1]), temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("temperature,smoothing", [(2.5, 0.0), (0.5, 0.1), (1.0, 0.3)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "mean"])
def test_options_match_reference(backend, dtype, teacher_is_logits, temperature, smoothing, reduction):
    s, t = make_inputs((33, 157), dtype, teacher_is_logits)
    if not teacher_is_logits:  # bfloat16 probabilities do not sum to 1 closely: keep the teacher in float32
        t = torch.randn(33, 157, dtype=torch.float64).mul(3).softmax(-1).float()
    check_against_reference(backend, s, t, make_coeffs("per_class", 4, 157), temperature=temperature,
                            label_smoothing=smoothing, teacher_is_logits=teacher_is_logits, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_ignore_index_rows(backend, reduction):
    s, t = make_inputs((4, 6, 50), torch.float32)
    target = torch.randint(0, 50, (4, 6))
    target[torch.rand(4, 6) < 0.4] = -100
    target[0, 0] = -100
    s[0, 0, 3] = float("nan")  # an ignored row may hold anything
    out = check_against_reference(backend, s, t, make_coeffs("shared", 3, 50), target=target, reduction=reduction)
    loss, gs, gt = out
    ignored = target == -100
    assert torch.all(gs[ignored] == 0) and torch.all(gt[ignored] == 0)
    if reduction == "none":
        assert torch.all(loss[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_empty_batch(backend):
    s, t = make_inputs((5, 9), torch.float32)
    target = torch.full((5,), -100)
    loss, gs, gt = run_loss(tgtfast.ptloss, s, t, coeffs=[1.0, 2.0], target=target, backend=backend)
    assert loss.item() == 0 and torch.all(gs == 0) and torch.all(gt == 0)
    s0 = torch.zeros(0, 9, requires_grad=True)
    loss = tgtfast.ptloss(s0, torch.zeros(0, 9), [1.0], backend=backend)
    loss.backward()
    assert loss.item() == 0 and s0.grad.shape == (0, 9)
    assert tgtfast.ptloss(s0, torch.zeros(0, 9), reduction="none", backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_equals_torch_kl_div(backend):
    s, t = make_inputs((37, 91), torch.float64)
    for temperature in (1.0, 3.0):
        p = torch.softmax(t / temperature, -1)
        expected = F.kl_div(torch.log_softmax(s / temperature, -1), p, reduction="batchmean")
        got = tgtfast.ptloss(s, t, None, temperature=temperature, backend=backend)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
        got_probs = tgtfast.kd_loss(s, p, temperature=temperature, teacher_is_logits=False, backend=backend)
        assert torch.allclose(got_probs, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_case_is_paper_eq12(backend):
    """K = 2 with coeffs[m-1] = (epsilon_m, gamma_m) is the paper's Eq. 12."""
    eps = torch.tensor([0.5, -0.3, 2.0], dtype=torch.float64)
    gam = torch.tensor([1.5, 0.7, -0.2], dtype=torch.float64)
    s, t = make_inputs((20, 2), torch.float64)
    ps0 = torch.softmax(s, -1)[:, 0]
    pt0 = torch.softmax(t, -1)[:, 0]
    kl = pt0 * torch.log(pt0 / ps0) + (1 - pt0) * torch.log((1 - pt0) / (1 - ps0))
    pert = sum(pt0 * eps[m] * (1 - ps0) ** (m + 1) + (1 - pt0) * gam[m] * ps0 ** (m + 1) for m in range(3))
    expected = (kl + pert).mean()
    got = tgtfast.ptloss(s, t, torch.stack([eps, gam], 1), backend=backend)
    assert torch.allclose(got, expected, rtol=1e-10)


@needs_backend("cpp")
@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("coeffs", [None, [0.7, -0.4, 1.3], "per_class"])
def test_gradcheck_cpp(teacher_is_logits, coeffs):
    s, t = make_inputs((4, 7), torch.float64, teacher_is_logits)
    if coeffs == "per_class":
        coeffs = torch.rand(2, 7, dtype=torch.float64) * 3 - 1
    target = torch.tensor([1, -100, 2, 3])
    s.requires_grad_(True)
    t.requires_grad_(True)

    def fn(a, b):
        return tgtfast.ptloss(a, b, coeffs, temperature=1.3, label_smoothing=0.05, teacher_is_logits=teacher_is_logits,
                              target=target, reduction="none", backend="cpp")

    if teacher_is_logits:
        assert torch.autograd.gradcheck(fn, (s, t))
    else:  # probabilities live on the simplex: check the student gradient only
        assert torch.autograd.gradcheck(lambda a: fn(a, t.detach()), (s,))


@needs_backend("cpp")
def test_teacher_probability_gradient_formula():
    s, t = make_inputs((6, 11), torch.float64, teacher_is_logits=False)
    check_against_reference("cpp", s, t, torch.tensor([0.3, 1.1], dtype=torch.float64), teacher_is_logits=False,
                            label_smoothing=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_are_finite(backend):
    s = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4]])
    t = torch.tensor([[-1e4, 1e4, 3.0, 0.0], [1e4, -1e4, 0.0, 0.0]])
    loss, gs, gt = run_loss(tgtfast.ptloss, s, t, coeffs=[2.0, -1.0, 0.5], backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    truth = run_loss(reference.ptloss, s.double(), t.double(), coeffs=torch.tensor([2.0, -1.0, 0.5]).double())
    assert torch.allclose(loss.double(), truth[0], rtol=1e-5)
    assert torch.allclose(gs.double(), truth[1], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_row_only(backend):
    s, t = make_inputs((3, 8), torch.float32)
    s[1, 2] = float("nan")
    loss, gs, _ = run_loss(tgtfast.ptloss, s, t, coeffs=[1.0], reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isnan(gs[1]).all()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(gs[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    s, t = make_inputs((16, 40), torch.float32)
    s_nc, t_nc = s.t().contiguous().t(), t[:, ::1]
    s_view = torch.randn(40, 16).t()  # non-contiguous
    check_against_reference(backend, s_view, t_nc, make_coeffs("shared", 2, 40))
    check_against_reference(backend, s_nc, t.t().contiguous().t(), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_without_grad_and_no_grad_mode(backend):
    s, t = make_inputs((8, 30), torch.float32)
    s.requires_grad_(True)
    loss = tgtfast.ptloss(s, t, [1.0, 2.0], backend=backend)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        again = tgtfast.ptloss(s, t, [1.0, 2.0], backend=backend)
    assert torch.allclose(again, loss.detach())


@needs_backend("cpp")
@pytest.mark.parametrize("target", [None, torch.tensor([0, -100, 1, 2])])
def test_retained_graph_and_scaled_backward(target):
    """The fused op hands its stored gradient on without copying when the incoming gradient is the
    reduction's own; any other incoming gradient (or a second backward) must still be right."""
    s, t = make_inputs((4, 10), torch.float32)
    s.requires_grad_(True)
    expected = run_loss(reference.ptloss, s, t, coeffs=torch.tensor([1.0]), target=target)[1] / 2
    loss = tgtfast.ptloss(s, t, [1.0], target=target, backend="cpp")
    (g3,) = torch.autograd.grad(3 * loss, s, retain_graph=True)
    assert torch.allclose(g3, 3 * expected, atol=1e-6)
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    assert torch.allclose(g1, expected, atol=1e-6)
    loss.backward(retain_graph=True)
    assert torch.allclose(s.grad, expected, atol=1e-6)
    loss.backward(retain_graph=True)
    assert torch.allclose(s.grad, 2 * expected, atol=1e-6)
    # .grad holds the op's own buffer, which the accumulation changed: a further backward through the
    # retained graph is refused by autograd instead of returning a wrong gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    k=st.integers(1, 70),
    m=st.integers(0, 9),
    per_class=st.booleans(),
    temperature=st.floats(0.3, 4.0),
    smoothing=st.sampled_from([0.0, 0.05, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_property_cpp_vs_reference(n, k, m, per_class, temperature, smoothing, seed):
    if "cpp" not in BACKENDS:
        pytest.skip("cpp backend unavailable")
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g, dtype=torch.float64) * 4
    t = torch.randn(n, k, generator=g, dtype=torch.float64) * 4
    coeffs = (torch.rand((m, k) if per_class else (m,), generator=g, dtype=torch.float64) * 11 - 1) if m else None
    got = run_loss(tgtfast.ptloss, s.float(), t.float(), coeffs=None if coeffs is None else coeffs.float(),
                   temperature=temperature, label_smoothing=smoothing, backend="cpp")
    truth = run_loss(reference.ptloss, s, t, coeffs=coeffs, temperature=temperature, label_smoothing=smoothing)
    scale = 1 + truth[0].abs().item()
    assert abs(got[0].item() - truth[0].item()) <= 1e-4 * scale
    assert torch.allclose(got[1].double(), truth[1], atol=1e-4 * scale)
    assert torch.allclose(got[2].double(), truth[2], atol=1e-4 * scale)


@needs_backend("triton")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_triton_backend_through_public_api(reduction):
    """tgtfast.ptloss(backend="triton") goes through the registered triton_op and its autograd."""
    s, t = make_inputs((2, 3, 37), torch.float32)
    target = torch.tensor([[1, -100, 2], [3, 4, -100]])
    check_against_reference("triton", s, t, make_coeffs("shared", 2, 37), temperature=1.5, label_smoothing=0.1,
                            target=target, reduction=reduction)


@needs_backend("cpp")
def test_opcheck_ptloss_fwd():
    s, t = make_inputs((5, 13), torch.float32)
    valid = torch.tensor([True, False, True, True, True])
    for coeffs, need in ((torch.tensor([1.0, -0.5]), (True, True)), (torch.rand(3, 13), (True, False)),
                         (torch.zeros(0), (False, False))):
        args = (s.clone().requires_grad_(need[0]), t.clone().requires_grad_(need[1]), coeffs, valid, 1.5, 0.1, True,
                need[0], need[1])
        torch.library.opcheck(torch.ops.tgtfast.ptloss_fwd.default, args)


@needs_backend("cpp")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_torch_compile_with_ignored_rows(reduction):
    torch._dynamo.reset()
    s, t = make_inputs((6, 40), torch.float32)
    target = torch.tensor([1, -100, 3, 4, -100, 5])

    def step(a, b):
        return tgtfast.ptloss(a, b, torch.tensor([1.0, 0.5]), target=target, reduction=reduction, backend="cpp")

    eager = run_loss(step, s, t)
    compiled = run_loss(torch.compile(step, fullgraph=True), s, t)
    for e, c in zip(eager, compiled):
        assert torch.allclose(e, c, atol=1e-6)


class TestBadInput:
    s = torch.randn(4, 5)
    t = torch.randn(4, 5)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="teacher shape"):
            tgtfast.ptloss(self.s, torch.randn(4, 6))

    def test_coeffs_wrong_k(self):
        with pytest.raises(ValueError, match="coeffs has K = 3"):
            tgtfast.ptloss(self.s, self.t, torch.ones(2, 3))
        with pytest.raises(ValueError, match=r"coeffs must have shape \[M\] or \[M, K\]"):
            tgtfast.ptloss(self.s, self.t, torch.ones(2, 3, 5))

    def test_integer_inputs(self):
        with pytest.raises(TypeError, match="student_logits must be a floating"):
            tgtfast.ptloss(self.s.long(), self.t)
        with pytest.raises(TypeError, match="teacher must be a floating"):
            tgtfast.ptloss(self.s, self.t.long())
        with pytest.raises(TypeError, match="target must be an integer"):
            tgtfast.ptloss(self.s, self.t, target=torch.zeros(4))

    @pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
    def test_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature must be in"):
            tgtfast.ptloss(self.s, self.t, temperature=temperature)

    @pytest.mark.parametrize("smoothing", [-0.1, 1.0, 2.0])
    def test_label_smoothing(self, smoothing):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            tgtfast.ptloss(self.s, self.t, label_smoothing=smoothing)

    def test_teacher_probabilities(self):
        with pytest.raises(ValueError, match="non-negative"):
            tgtfast.ptloss(self.s, self.t, teacher_is_logits=False)
        with pytest.raises(ValueError, match="sum to 1"):
            tgtfast.ptloss(self.s, self.t.abs(), teacher_is_logits=False)

    def test_reduction_and_backend(self):
        with pytest.raises(ValueError, match="reduction must be one of"):
            tgtfast.ptloss(self.s, self.t, reduction="avg")
        with pytest.raises(ValueError, match="backend='fast' is not one of"):
            tgtfast.ptloss(self.s, self.t, backend="fast")
        with pytest.raises(ValueError, match="backend='cuda' cannot run this call"):
            tgtfast.ptloss(self.s, self.t, backend="cuda")

    def test_target_shape_and_device(self):
        with pytest.raises(ValueError, match="target shape"):
            tgtfast.ptloss(self.s, self.t, target=torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="is on meta"):
            tgtfast.ptloss(self.s, self.t.to("meta"))

    def test_non_finite_coeffs_and_low_rank_inputs(self):
        with pytest.raises(ValueError, match="coeffs must be finite"):
            tgtfast.ptloss(self.s, self.t, [1.0, float("nan")])
        with pytest.raises(ValueError, match=r"\[N, K\] or \[B, L, K\]"):
            tgtfast.ptloss(torch.randn(5), torch.randn(5))


def test_modules_and_defaults(tmp_path):
    s, t = make_inputs((8, 12), torch.float32)
    coeffs = [0.5, 1.0]
    mod = tgtfast.PTLoss(coeffs)
    assert mod.temperature == 1.0 and mod.reduction == "batchmean" and mod.teacher_is_logits
    assert torch.allclose(mod(s, t), tgtfast.ptloss(s, t, coeffs))
    assert torch.allclose(mod.state_dict()["coeffs"], torch.tensor(coeffs))
    path = tmp_path / "coeffs.json"
    path.write_text('{"coeffs": [0.5, 1.0]}')
    assert torch.allclose(tgtfast.PTLoss(str(path))(s, t), mod(s, t))
    assert torch.allclose(tgtfast.KDLoss(temperature=2.0)(s, t),
                          F.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1), reduction="batchmean"))
    ls = tgtfast.LabelSmoothedKDLoss()
    assert ls.label_smoothing == 0.1
    assert torch.allclose(ls(s, t), reference.ptloss(s, t, label_smoothing=0.1), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        tgtfast.KDLoss(temperature=0)


def test_focal_kd_matches_formula():
    s, t = make_inputs((10, 7), torch.float64)
    q = torch.softmax(s / 2, -1)
    p = torch.softmax(t / 2, -1)
    expected = (p * (1 - q) ** 1.5 * -torch.log(q)).sum(-1).mean()
    got = tgtfast.FocalKDLoss(gamma=1.5, temperature=2.0)(s, t)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-5)
    assert tgtfast.FocalKDLoss().gamma == 2.0


def test_backends_listing_explains_itself():
    listing = tgtfast.backends()
    assert set(listing) == {"cpp", "triton", "cuda", "reference"}
    assert listing["reference"] == "available"
    for name, state in listing.items():
        assert state == "available" or state.startswith("unavailable: ")


@needs_backend("cpp")
def test_masked_vocabulary_entries():
    """Logits of -inf (a masked vocabulary, whole 512-wide blocks of it here) act as if the entries were absent.
    (The eager reference gives NaN here: 0 * log 0 through autograd-friendly ops.)"""
    backend = "cpp"
    k, keep = 1800, torch.ones(1800, dtype=torch.bool)
    keep[100:1300] = False
    s, t = make_inputs((5, k), torch.float64)
    s[:, ~keep] = float("-inf")
    p = torch.softmax(t[:, keep], -1)
    t_full = torch.zeros(5, k, dtype=torch.float64)
    t_full[:, keep] = p
    coeffs = torch.tensor([0.5, 1.5], dtype=torch.float64)
    loss, gs, _ = run_loss(tgtfast.ptloss, s.float(), t_full.float(), coeffs=coeffs.float(), teacher_is_logits=False,
                           backend=backend)
    sub = run_loss(reference.ptloss, s[:, keep], p, coeffs=coeffs, teacher_is_logits=False)
    assert torch.allclose(loss.double(), sub[0], rtol=1e-5)
    assert torch.allclose(gs[:, keep].double(), sub[1], atol=1e-6)
    assert torch.all(gs[:, ~keep] == 0)
