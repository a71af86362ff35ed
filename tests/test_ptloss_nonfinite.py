"""One documented behaviour for non-finite logits, the same on every backend (README, PTLoss conventions):

* a teacher logit of -inf is a class the teacher gives no mass: the row stays finite, as if the logit were
  very negative (and its teacher gradient is 0);
* a student logit of -inf where the teacher gives no mass either is an absent class: finite;
* a student row of all -inf has no distribution: that row's loss and both its gradients are NaN, and no other
  row is touched.
"""

import pytest
import torch

import tgtfast
from tgtfast import reference

BACKENDS = [b for b in ("cpp", "reference", "triton") if tgtfast.backends("ptloss")[b] == "available"]
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter computes inf - inf


def _run(backend, s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    rows = tgtfast.ptloss(s, t, [0.4, -0.2], reduction="none", backend=backend, **kw)
    (rows * torch.arange(1.0, rows.shape[0] + 1)).sum().backward()
    return rows.detach(), s.grad, t.grad


def _truth(s, t, **kw):
    """float64 reference with each -inf logit replaced by a logit so negative that exp underflows to 0."""
    s64, t64 = (torch.where(torch.isinf(x), torch.full_like(x, -1e5), x).double().requires_grad_(True)
                for x in (s, t))
    rows = reference.ptloss(s64, t64, torch.tensor([0.4, -0.2], dtype=torch.float64), reduction="none", **kw)
    (rows * torch.arange(1.0, rows.shape[0] + 1, dtype=torch.float64)).sum().backward()
    return rows.detach(), s64.grad, t64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_teacher_logits_partly_minus_inf(backend, temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 9, generator=g) * 2, torch.randn(4, 9, generator=g) * 2
    t[0, 3] = float("-inf")
    t[1, :4] = float("-inf")
    t[2, 8] = float("-inf")
    s[3, 5] = t[3, 5] = float("-inf")  # absent on both sides
    rows, gs, gt = _run(backend, s, t, temperature=temperature)
    want, ws, wt = _truth(s, t, temperature=temperature)
    assert torch.isfinite(rows).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), ws, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gt.double(), wt, rtol=1e-4, atol=1e-6)
    assert bool((gt[torch.isinf(t)] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_is_logits", [True, False])
def test_student_row_all_minus_inf_is_nan_in_its_row_only(backend, teacher_is_logits):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    if not teacher_is_logits:
        t = torch.softmax(t, -1)
    s[1] = float("-inf")
    rows, gs, gt = _run(backend, s, t, teacher_is_logits=teacher_is_logits)
    assert torch.isnan(rows[1]) and torch.isnan(gs[1]).all() and torch.isnan(gt[1]).all()
    keep = torch.tensor([0, 2])
    assert torch.isfinite(rows[keep]).all() and torch.isfinite(gs[keep]).all() and torch.isfinite(gt[keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_row_all_minus_inf_that_is_ignored_is_zero(backend):
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    s[1] = float("-inf")
    s.requires_grad_(True)
    loss = tgtfast.ptloss(s, t, target=torch.tensor([0, -100, 2]), backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(s.grad[1], torch.zeros(7)) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("content,match", [
    ("not json", "is not JSON"),
    ('{"x": 1}', 'has no "coeffs" entry'),
    ("[1, 2]", 'has no "coeffs" entry'),
    (None, "cannot be read"),
])
def test_ptloss_coefficient_file_errors_name_the_file(tmp_path, content, match):
    """PTLoss(FILE) reads the JSON `tgtfast coeffs --out` writes; anything else is a clear error, not a traceback."""
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"coeffs: .*c.json.* {match}"):
        tgtfast.PTLoss(path)


def test_integer_tensor_as_coeffs_is_refused():
    """`ptloss(s, t, labels)` once used the labels as perturbation coefficients; an integer tensor is refused."""
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(TypeError, match=r"coeffs must be a floating tensor, got torch.int64 \(class labels go in "):
        tgtfast.ptloss(s, t, torch.tensor([0, 1, 2, 3]))
    # plain Python numbers are coefficients, as documented
    torch.testing.assert_close(tgtfast.ptloss(s, t, [1, 2]), tgtfast.ptloss(s, t, [1.0, 2.0]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_probability_rows_are_checked_only_where_not_ignored(backend):
    """Padding rows of a probability teacher may hold anything; a bad row that counts is refused."""
    s, t = torch.randn(3, 5), torch.softmax(torch.randn(3, 5), -1)
    t[1] = float("nan")
    loss = tgtfast.ptloss(s, t, teacher_is_logits=False, target=torch.tensor([0, 7, 2]), ignore_index=7,
                          backend=backend)
    assert torch.isfinite(loss)
    for row, bad, match in ((0, -0.5, "be non-negative"), (2, 0.7, "sum to 1"), (0, float("inf"), "be finite")):
        t2 = t.clone()
        t2[row, 0] = bad
        with pytest.raises(ValueError, match=f"teacher probabilities .*must {match}"):
            tgtfast.ptloss(s, t2, teacher_is_logits=False, target=torch.tensor([0, 7, 2]), ignore_index=7,
                           backend=backend)
