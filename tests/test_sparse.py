"""Distilling from a sparse (top-k) teacher: ``tgtfast.SparseTeacher`` through ``tgtfast.distill_loss`` and
``tgtfast.fused_linear_distill_loss`` on every backend this machine runs, against the float64 reference and against
the dense divergence of the densified teacher (the tail spread like the student's); the refused combinations; bad
input."""

import math

import pytest
import torch
import torch.nn.functional as F

import tgtfast
from tgtfast import reference as R

BACKENDS = ["reference"] + [b for b in ("cpp",) if tgtfast.backends("sparse_coarse")[b] == "available"]

CASES = [
    ("forward_kl", {}, (0.0, 0.0)),
    ("reverse_kl", {}, (0.0, 0.0)),
    ("jsd", {"beta": 0.3}, (0.3, 0.0)),
    ("skew_kl", {"alpha": 0.1}, (0.1, 0.0)),
    ("skew_reverse_kl", {"alpha": 0.2}, (0.2, 0.0)),
    ("tvd", {}, (0.0, 0.0)),
    ("symmetric_kl", {"lam": 0.4}, (0.4, 0.0)),
    ("ab_divergence", {"alpha": 0.3, "beta": 0.7}, (0.3, 0.7)),
    ("taid", {"t": 0.6}, (0.6, 0.0)),
]
IDS = [c[0] for c in CASES]


def _setup(n=7, v=40, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(n, v, generator=g, dtype=torch.float64)).to(dtype)
    t = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(t, -1)
    values, indices = lp.topk(k, -1)
    return s, t, indices, values


def _densified(s, indices, values, temperature=1.0):
    """The dense teacher log-probabilities the coarse divergence equals: kept classes as cached (tempered over the
    kept classes and the tail), the tail mass spread over the other classes like the student's (detached)."""
    coarse = R.sparse_teacher_logprobs(values, "bucket", temperature)
    q = torch.softmax(s.detach() / temperature, -1)
    q_tail = 1 - q.gather(-1, indices).sum(-1, keepdim=True)
    dense = q * coarse[:, -1:].exp() / q_tail
    return dense.scatter(-1, indices, coarse[:, :-1].exp()).log()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div,kw,params", CASES, ids=IDS)
def test_matches_reference_and_the_densified_teacher(backend, div, kw, params):
    s, _, indices, values = _setup()
    s.requires_grad_(True)
    target = torch.tensor([0, -100, 2, 3, 4, -100, 6])
    teacher = tgtfast.SparseTeacher(indices, values)
    got = tgtfast.distill_loss(s, teacher, div, **kw, temperature=1.3, target=target, reduction="none",
                               backend=backend)
    valid = target != -100
    coarse_t = R.sparse_teacher_logprobs(values, "bucket", 1.3)
    want = R.sparse_divergence_rows(s, indices, coarse_t, div, param_a=params[0], param_b=params[1],
                                    temperature=1.3)
    want = torch.where(valid, want, torch.zeros_like(want))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    w = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    (g,) = torch.autograd.grad((got * w).sum(), s)
    (g_ref,) = torch.autograd.grad((want * w).sum(), s)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-11)
    assert g[~valid].abs().max() == 0
    # the value is the dense divergence against the teacher whose tail is spread like the student's
    dense = R.divergence_rows(s.detach() / 1.3, _densified(s, indices, values, 1.3), div, param_a=params[0],
                              param_b=params[1])
    torch.testing.assert_close(got.detach()[valid], dense[valid], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_renormalize_equals_dense_teacher_with_zeros_outside_top_k(backend):
    s, _, indices, values = _setup(seed=1)
    teacher = tgtfast.SparseTeacher(indices, values, tail="renormalize")
    kept = torch.log_softmax(values / 2.0, -1)
    dense_t = torch.full_like(s, -math.inf).scatter(-1, indices, kept)
    for div, kw, a in (("forward_kl", {}, 0.0), ("jsd", {"beta": 0.5}, 0.5), ("tvd", {}, 0.0),
                       ("skew_kl", {"alpha": 0.2}, 0.2)):
        got = tgtfast.distill_loss(s, teacher, div, **kw, temperature=2.0, backend=backend)
        want = R.divergence_rows(s / 2.0, dense_t, div, param_a=a).mean()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_top_k_equal_to_the_vocabulary_is_the_dense_loss():
    s, t, _, _ = _setup(v=12, seed=2)
    lp = torch.log_softmax(t, -1)
    values, indices = lp.topk(12, -1)
    for tail in ("bucket", "renormalize"):
        got = tgtfast.distill_loss(s, tgtfast.SparseTeacher(indices, values, tail=tail), "jsd", beta=0.5,
                                   temperature=1.5)
        torch.testing.assert_close(got, tgtfast.distill_loss(s, t, "jsd", beta=0.5, temperature=1.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_student(backend):
    s, _, indices, values = _setup(n=5, v=300, k=16, seed=3, dtype=torch.bfloat16)
    teacher = tgtfast.SparseTeacher(indices.int(), values.float())
    leaf = s.clone().requires_grad_(True)
    got = tgtfast.distill_loss(leaf, teacher, "skew_kl", alpha=0.1, temperature=2.0, backend=backend)
    (g,) = torch.autograd.grad(got, leaf)
    assert got.dtype == torch.float32 and g.dtype == torch.bfloat16
    s64 = s.double().requires_grad_(True)
    want = tgtfast.distill_loss(s64, tgtfast.SparseTeacher(indices, values), "skew_kl", alpha=0.1, temperature=2.0,
                                backend="reference")
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(g.double(), torch.autograd.grad(want, s64)[0], rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_sparse_teacher(backend):
    g = torch.Generator().manual_seed(4)
    n, h, v, k = 23, 8, 40, 5
    hs = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    lp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1)
    values, indices = lp.topk(k, -1)
    target = torch.randint(0, v, (n,), generator=g)
    target[[1, 9]] = -100
    teacher = tgtfast.SparseTeacher(indices, values)
    loss = tgtfast.fused_linear_distill_loss(hs, ws, teacher, "tvd", target=target, ce_weight=0.5, chunk_size=4,
                                             temperature=1.7, backend=backend)
    s = hs @ ws.T
    want = (tgtfast.distill_loss(s, teacher, "tvd", target=target, temperature=1.7, backend="reference")
            + 0.5 * F.cross_entropy(s, target))
    torch.testing.assert_close(loss, want)
    for a, b in zip(torch.autograd.grad(loss, (hs, ws)), torch.autograd.grad(want, (hs, ws))):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="takes no teacher_weight"):
        tgtfast.fused_linear_distill_loss(hs, ws, teacher, ws)


def test_refused_combinations():
    s, _, indices, values = _setup()
    with pytest.raises(ValueError, match="alpha \\+ beta = 1"):
        tgtfast.distill_loss(s, tgtfast.SparseTeacher(indices, values), "ab_divergence", alpha=0.5, beta=0.7)
    renorm = tgtfast.SparseTeacher(indices, values, tail="renormalize")
    for div, kw in (("reverse_kl", {}), ("symmetric_kl", {"lam": 0.5}), ("skew_reverse_kl", {"alpha": 0.0}),
                    ("jsd", {"beta": 1.0})):
        with pytest.raises(ValueError, match="tail='bucket'"):
            tgtfast.distill_loss(s, renorm, div, **kw)


BAD = [
    (lambda i, v: (i.clone().index_fill_(1, torch.tensor([0]), 40), v), "row 0: an index outside \\[0, 40\\)"),
    (lambda i, v: (torch.cat([i[:, :1], i[:, :-1]], 1), v), "row 0: an index repeated"),
    (lambda i, v: (i, v.clone().index_put_((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"),
                                          dtype=v.dtype))), "row 3: a NaN log-probability"),
    (lambda i, v: (i, v.clone().index_put_((torch.tensor([2]), torch.tensor([0])), torch.tensor(0.5,
                                          dtype=v.dtype))), "row 2: a log-probability above 0"),
    (lambda i, v: (i, torch.full_like(v, math.log(0.5))), "row 0: kept probabilities summing to more than 1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,match", BAD)
def test_bad_rows_are_named(make, match, backend):
    # the reference checks the teacher in torch; the C++ kernel checks each row in its pass and reports a status
    s, _, indices, values = _setup()
    i, v = make(indices, values)
    with pytest.raises(ValueError, match=match):
        tgtfast.distill_loss(s, tgtfast.SparseTeacher(i, v), backend=backend)
    with pytest.raises(ValueError, match=match):
        tgtfast.distill_loss(s.float(), tgtfast.SparseTeacher(i, v.float()), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_that_are_ignored_are_not_checked(backend):
    s, _, indices, values = _setup()
    values = values.clone()
    values[1] = float("nan")
    indices = indices.clone()
    indices[4, 0] = -3
    target = torch.tensor([0, -100, 2, 3, -100, 5, 6])
    leaf = s.clone().requires_grad_(True)
    loss = tgtfast.distill_loss(leaf, tgtfast.SparseTeacher(indices, values), target=target, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(leaf.grad).all()
    assert (leaf.grad[[1, 4]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_losses_take_any_incoming_gradient(backend):
    # reduction="none" and a weighted sum: the CPU kernel's stored gradient is scaled per row in backward
    s, _, indices, values = _setup(n=6, v=50, k=4, seed=7)
    teacher = tgtfast.SparseTeacher(indices, values)
    w = torch.linspace(0.0, 2.0, 6, dtype=torch.float64)
    leaf = s.clone().requires_grad_(True)
    rows = tgtfast.distill_loss(leaf, teacher, "jsd", beta=0.4, temperature=1.3, reduction="none", backend=backend)
    (g,) = torch.autograd.grad((rows * w).sum(), leaf)
    s64 = s.clone().requires_grad_(True)
    want = R.sparse_divergence_rows(s64, indices, R.sparse_teacher_logprobs(values, "bucket", 1.3), "jsd",
                                    param_a=0.4, temperature=1.3)
    torch.testing.assert_close(rows, want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g, torch.autograd.grad((want * w).sum(), s64)[0], rtol=1e-9, atol=1e-12)


def test_bad_construction():
    _, _, indices, values = _setup()
    with pytest.raises(TypeError, match="indices must be an int32 or int64"):
        tgtfast.SparseTeacher(indices.float(), values)
    with pytest.raises(ValueError, match="same shape"):
        tgtfast.SparseTeacher(indices[:, :3], values)
    with pytest.raises(ValueError, match="tail must be one of"):
        tgtfast.SparseTeacher(indices, values, tail="drop")
    with pytest.raises(ValueError, match="k = 6 classes but the student has V = 4"):
        tgtfast.distill_loss(torch.randn(7, 4), tgtfast.SparseTeacher(indices, values.float()))
    with pytest.raises(ValueError, match="leading shape"):
        tgtfast.distill_loss(torch.randn(6, 40), tgtfast.SparseTeacher(indices, values.float()))


def test_a_cache_taken_at_the_loss_temperature_is_used_as_cached():
    s, t, _, _ = _setup(v=12, seed=5)
    values, indices = torch.log_softmax(t / 2.0, -1).topk(12, -1)
    teacher = tgtfast.SparseTeacher(indices, values, temperature=2.0)
    torch.testing.assert_close(tgtfast.distill_loss(s, teacher, temperature=2.0),
                               tgtfast.distill_loss(s, t, temperature=2.0))
    assert "temperature=2" in repr(teacher)
