"""PTLoss on the CPU backends against the independent float64 oracle (tests/oracle.py), plus the API contract.

Every backend, "reference" included, is judged against closed-form float64 losses and gradients computed from
the same (rounded) inputs, never against tgtfast.reference in the same dtype.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_backends, needs_backend, run_loss
from oracle import assert_close64, closed_form_grads, focal_oracle, ptloss_oracle, ptloss_rows64

import tgtfast

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


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_against_oracle(backend, s, t, coeffs, **kw):
    """Loss and both gradients of tgtfast.ptloss(backend) against the float64 oracle on the same inputs.

    Loss: float32 accuracy for float32/bf16 inputs on every backend (all accumulate in float32). Gradients: a
    few units of the input dtype."""
    dtype = torch.promote_types(s.dtype, t.dtype)
    acc = _acc(dtype)
    out = run_loss(tgtfast.ptloss, s, t, coeffs=coeffs, backend=backend, **kw)
    c = None if coeffs is None else torch.as_tensor(coeffs).to(acc)  # coefficients run in the accumulation dtype
    truth = ptloss_oracle(s, t, c, **kw)
    assert out[0].dtype == acc, out[0].dtype
    assert out[1].dtype == s.dtype and out[2].dtype == t.dtype
    assert_close64(out[0], truth[0], acc, f"{backend} loss")
    assert_close64(out[1], truth[1], s.dtype, f"{backend} grad student")
    assert_close64(out[2], truth[2], t.dtype, f"{backend} grad teacher")
    return out


def test_reference_backend_bf16_accumulates_in_float32():
    torch.manual_seed(0)
    s, t = make_inputs((41, 1271), torch.bfloat16)
    loss = tgtfast.ptloss(s, t, torch.linspace(-0.8, 3.0, 5), backend="reference")
    truth = ptloss_oracle(s, t, torch.linspace(-0.8, 3.0, 5))[0]
    assert_close64(loss, truth, torch.float32, "reference backend bf16 loss")


def test_oracle_matches_autograd_of_its_own_loss():
    """The oracle's closed-form gradients are the derivatives of its explicit loss (float64 autograd)."""
    for teacher_is_logits, smoothing, coeffs in ((True, 0.0, None), (True, 0.2, [0.7, -0.4, 1.3]),
                                                 (False, 0.1, torch.rand(2, 9) * 3 - 1), (False, 0.0, [2.0])):
        s, t = make_inputs((5, 9), torch.float64, teacher_is_logits)
        s.requires_grad_(True)
        t.requires_grad_(True)
        rows = ptloss_rows64(s, t, coeffs, temperature=1.7, teacher_is_logits=teacher_is_logits,
                             label_smoothing=smoothing)
        gs, gt = torch.autograd.grad(rows.sum(), (s, t))
        cs, ct = closed_form_grads(s.detach(), t.detach(), coeffs, 1.7, smoothing, teacher_is_logits)
        torch.testing.assert_close(cs, gs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ct, gt, rtol=1e-10, atol=1e-12)
        # and the KL part is torch's kl_div on the smoothed teacher
        if coeffs is None:
            p = torch.softmax(t.detach() / 1.7, -1) if teacher_is_logits else t.detach()
            p = (1 - smoothing) * p + smoothing / 9
            kl = F.kl_div(torch.log_softmax(s.detach() / 1.7, -1), p, reduction="none").sum(-1)
            torch.testing.assert_close(rows.detach(), kl, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(64, 32), (41, 1271), (3, 5, 401), (7, 2)])
@pytest.mark.parametrize("layout,m", [("none", 0), ("shared", 1), ("shared", 5), ("per_class", 3), ("shared", 8)])
def test_matches_reference(backend, dtype, shape, layout, m):
    s, t = make_inputs(shape, dtype)
    check_against_oracle(backend, s, t, make_coeffs(layout, m, shape[-1]), temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
@pytest.mark.parametrize("temperature,smoothing", [(2.5, 0.0), (0.5, 0.1), (1.0, 0.3)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "mean"])
def test_options_match_reference(backend, dtype, teacher_is_logits, temperature, smoothing, reduction):
    s, t = make_inputs((33, 157), dtype, teacher_is_logits)
    if not teacher_is_logits:  # bfloat16 probabilities do not sum to 1 closely: keep the teacher in float32
        t = torch.randn(33, 157, dtype=torch.float64).mul(3).softmax(-1).float()
    check_against_oracle(backend, s, t, make_coeffs("per_class", 4, 157), temperature=temperature,
                         label_smoothing=smoothing, teacher_is_logits=teacher_is_logits, reduction=reduction)


IGNORE_INDICES = [-100, 7, -1, 0]


def make_target(lead, k, ignore_index, frac=0.4, seed=0):
    """Random class targets with a random fraction of rows set to ignore_index (row 0 always ignored). With a
    non-default ignore_index some kept rows hold -100, which must then count as an ordinary row."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, k, lead, generator=g)
    target[target == ignore_index] = (ignore_index + 1) % k  # only the rows chosen below are ignored
    ignored = torch.rand(lead, generator=g) < frac
    ignored.view(-1)[0] = True
    ignored.view(-1)[-1] = False
    target[ignored] = ignore_index
    if ignore_index != -100:
        kept = (~ignored).nonzero()
        target[tuple(kept[: max(1, len(kept) // 2)].T)] = -100
    return target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "mean"])
@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
def test_ignore_index_rows(backend, reduction, ignore_index):
    s, t = make_inputs((4, 6, 50), torch.float32)
    target = make_target((4, 6), 50, ignore_index)
    ignored = target == ignore_index
    s[0, 0, 3] = float("nan")  # an ignored row may hold anything
    t[0, 0, 5] = float("inf")
    out = check_against_oracle(backend, s, t, make_coeffs("shared", 3, 50), target=target, reduction=reduction,
                               ignore_index=ignore_index)
    loss, gs, gt = out
    assert torch.all(gs[ignored] == 0) and torch.all(gt[ignored] == 0)
    assert torch.all(gs[~ignored].abs().sum(-1) > 0)
    if reduction == "none":
        assert torch.all(loss[ignored] == 0) and torch.all(loss[~ignored] > 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
@pytest.mark.parametrize("teacher_is_logits", [True, False])
def test_ignore_index_kd_loss_and_probability_teacher(backend, ignore_index, teacher_is_logits):
    s, t = make_inputs((9, 13), torch.float32, teacher_is_logits)
    target = make_target((9,), 13, ignore_index, seed=1)
    s[target == ignore_index] = float("nan")
    for reduction in ("batchmean", "none"):
        kw = dict(temperature=2.0, teacher_is_logits=teacher_is_logits, reduction=reduction,
                  ignore_index=ignore_index, target=target)
        got = run_loss(tgtfast.kd_loss, s, t, backend=backend, **kw)
        truth = ptloss_oracle(s, t, None, **kw)
        assert_close64(got[0], truth[0], torch.float32, "kd_loss")
        assert_close64(got[1], truth[1], torch.float32, "kd_loss grad student")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
def test_ignore_index_modules(backend, ignore_index):
    s, t = make_inputs((2, 5, 11), torch.float32)
    target = make_target((2, 5), 11, ignore_index, seed=2)
    s[target == ignore_index] = float("nan")
    cases = [
        (tgtfast.PTLoss([0.5, -0.25], temperature=1.5, ignore_index=ignore_index, backend=backend),
         dict(coeffs=torch.tensor([0.5, -0.25]), temperature=1.5)),
        (tgtfast.KDLoss(temperature=3.0, reduction="sum", ignore_index=ignore_index, backend=backend),
         dict(temperature=3.0, reduction="sum")),
        (tgtfast.LabelSmoothedKDLoss(0.2, reduction="none", ignore_index=ignore_index, backend=backend),
         dict(label_smoothing=0.2, reduction="none")),
    ]
    for mod, kw in cases:
        assert mod.ignore_index == ignore_index
        got = run_loss(lambda a, b: mod(a, b, target), s, t)
        truth = ptloss_oracle(s, t, kw.pop("coeffs", None), target=target, ignore_index=ignore_index, **kw)
        for what, a, b in zip(("loss", "grad student", "grad teacher"), got, truth):
            assert_close64(a, b, torch.float32, f"{type(mod).__name__} {what}")


@pytest.mark.parametrize("ignore_index", IGNORE_INDICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_ignore_index_focal(ignore_index, reduction):
    s, t = make_inputs((3, 4, 9), torch.float32)
    target = make_target((3, 4), 9, ignore_index, seed=3)
    s[target == ignore_index] *= 50  # finite garbage: masking must remove it (NaN rows: see test_adversarial)
    for teacher_is_logits in (True, False):
        tt = t if teacher_is_logits else t.softmax(-1)
        kw = dict(gamma=1.5, temperature=2.0, teacher_is_logits=teacher_is_logits, reduction=reduction,
                  ignore_index=ignore_index)
        truth = focal_oracle(s, tt, target=target, **kw)
        got = run_loss(lambda a, b: tgtfast.focal_kd_loss(a, b, target=target, **kw), s, tt)
        assert_close64(got[0], truth[0], torch.float32, "focal_kd_loss")
        assert_close64(got[1], truth[1], torch.float32, "focal_kd_loss grad")
        mod = tgtfast.FocalKDLoss(**kw)
        assert mod.ignore_index == ignore_index
        got = run_loss(lambda a, b: mod(a, b, target), s, tt)
        assert_close64(got[0], truth[0], torch.float32, "FocalKDLoss")
        assert_close64(got[1], truth[1], torch.float32, "FocalKDLoss grad")


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
    check_against_oracle("cpp", s, t, torch.tensor([0.3, 1.1], dtype=torch.float64), teacher_is_logits=False,
                         label_smoothing=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_are_finite(backend):
    s = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, 1e4]])
    t = torch.tensor([[-1e4, 1e4, 3.0, 0.0], [1e4, -1e4, 0.0, 0.0]])
    loss, gs, gt = run_loss(tgtfast.ptloss, s, t, coeffs=[2.0, -1.0, 0.5], backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    truth = ptloss_oracle(s, t, [2.0, -1.0, 0.5])
    assert_close64(loss, truth[0], torch.float32, "loss")
    assert_close64(gs, truth[1], torch.float32, "grad student")
    assert_close64(gt, truth[2], torch.float32, "grad teacher")


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
    check_against_oracle(backend, s_view, t_nc, make_coeffs("shared", 2, 40))
    check_against_oracle(backend, s_nc, t.t().contiguous().t(), None)


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
    expected = ptloss_oracle(s, t, [1.0], target=target, grad_output=1.0)[1].float()
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


@needs_backend("triton")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_triton_backend_through_public_api(reduction):
    """tgtfast.ptloss(backend="triton") goes through the registered triton_op and its autograd."""
    s, t = make_inputs((2, 3, 37), torch.float32)
    target = torch.tensor([[1, 7, 2], [3, -100, 7]])  # ignore_index 7: the -100 row counts
    check_against_oracle("triton", s, t, make_coeffs("shared", 2, 37), temperature=1.5, label_smoothing=0.1,
                         target=target, reduction=reduction, ignore_index=7)


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

    def test_probabilities_are_judged_in_their_own_dtype(self):
        """A bfloat16 row summing to 1 + 1.2e-3 is accepted with a float32 student, as with a bfloat16 one (half
        precision: 2e-2); the same row given in float32 is refused (1e-3)."""
        p = torch.tensor([[0.8984375, 0.0625, 0.040283203125]])  # exact in bfloat16, sums to 1.0012...
        p = torch.cat([p, torch.tensor([[0.5, 0.25, 0.25]])])
        assert 1e-3 < float(p.sum(-1).max()) - 1 < 2e-2
        s = torch.randn(2, 3)
        for student in (s, s.bfloat16()):
            assert torch.isfinite(tgtfast.ptloss(student, p.bfloat16(), teacher_is_logits=False))
        with pytest.raises(ValueError, match="sum to 1"):
            tgtfast.ptloss(s, p, teacher_is_logits=False)

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
    assert_close64(ls(s, t), ptloss_oracle(s, t, label_smoothing=0.1)[0], torch.float32, "LabelSmoothedKDLoss")
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
    sub = ptloss_oracle(s[:, keep].float(), p.float(), coeffs.float(), teacher_is_logits=False)
    assert_close64(loss, sub[0], torch.float32, "loss")
    assert_close64(gs[:, keep], sub[1], torch.float32, "grad student")
    assert torch.all(gs[:, ~keep] == 0)


# ------------------------------------------------------------------------------------------------
# adversarial regressions


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), float("inf")])
@pytest.mark.parametrize("whole_row", [True, False])
@pytest.mark.parametrize("teacher_is_logits", [True, False])
def test_focal_ignored_row_with_non_finite_logits(bad, whole_row, teacher_is_logits):
    """An ignored row of FocalKDLoss may hold -inf/NaN logits: finite loss, and a zero, finite gradient for that
    row, so that the weight gradient of the nn.Linear producing the logits stays finite."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randn(5, 6, dtype=torch.float64)
    if not teacher_is_logits:
        t = t.softmax(-1)
    target = torch.tensor([1, 3, 7, 0, 2])  # ignore_index 7: row 2
    poison = torch.zeros(5, 6, dtype=torch.float64)
    poison[2, :] = 0.0
    if whole_row:
        poison[2, :] = bad
    else:
        poison[2, [1, 4]] = bad
    logits = lin(x) + poison  # the identity's gradient: lin gets exactly what the loss gives the logits
    logits.retain_grad()
    mod = tgtfast.FocalKDLoss(gamma=2.0, temperature=1.5, teacher_is_logits=teacher_is_logits, ignore_index=7)
    loss = mod(logits, t, target)
    assert torch.isfinite(loss), loss
    loss.backward()
    assert torch.isfinite(logits.grad).all(), logits.grad
    assert bool((logits.grad[2] == 0).all())
    assert torch.isfinite(lin.weight.grad).all() and torch.isfinite(lin.bias.grad).all()
    clean = lin(x).detach()
    truth = focal_oracle(clean, t, gamma=2.0, temperature=1.5, teacher_is_logits=teacher_is_logits,
                         ignore_index=7, target=target, grad_output=1.0)
    assert_close64(loss, truth[0], torch.float32, "focal loss")  # focal runs in float32
    assert_close64(logits.grad, truth[1], torch.float32, "focal grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_probabilities_are_refused(backend, bad):
    t = torch.softmax(torch.randn(3, 5), -1)
    t[1, 2] = bad
    with pytest.raises(ValueError, match="teacher"):
        tgtfast.ptloss(torch.randn(3, 5), t, teacher_is_logits=False, backend=backend)
    with pytest.raises(ValueError, match="teacher"):
        tgtfast.kd_loss(torch.randn(3, 5), t, teacher_is_logits=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_whose_inverse_overflows_float32_is_refused(backend):
    s, t = make_inputs((4, 6), torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        tgtfast.ptloss(s, t, temperature=1e-45, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        tgtfast.kd_loss(s, t, temperature=1e-45, backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        tgtfast.PTLoss([1.0], temperature=1e-45, backend=backend)(s, t)
    with pytest.raises(ValueError, match="temperature"):
        tgtfast.focal_kd_loss(s, t, temperature=1e-45)
    with pytest.raises(ValueError, match="temperature"):
        tgtfast.FocalKDLoss(temperature=1e-45)(s, t)


@pytest.mark.parametrize("temperature", [1e-30, 1e-36, 1e-38, 3e-39, 6e-20, 1e-19, 1e-10, 1e-5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_never_gives_negative_kl(backend, temperature):
    """KL >= 0: a tiny temperature is either refused or gives a non-negative loss (inf allowed, not NaN)."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(6, 9, generator=g) * 3
        t = torch.randn(6, 9, generator=g) * 3
        for reduction in ("none", "batchmean"):
            try:
                loss = tgtfast.ptloss(s, t, temperature=temperature, reduction=reduction, backend=backend)
            except ValueError as exc:
                assert "temperature" in str(exc)
                continue
            assert bool((loss >= 0).all()), (seed, loss)
