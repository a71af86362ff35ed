"""search_coefficients' teacher inputs (logits at a temperature, probabilities as given), refinement kept inside
the sampling box, and the check that the chosen coefficients' proxy teacher is the global minimiser of the loss,
against a brute-force grid over the simplex."""

import warnings

import pytest
import torch

from tgtfast import proxy as px

F64 = torch.float64


def _problem(n=120, k=3, scale=3.0, seed=0):
    """A sharp teacher with labels drawn from it (the refine step has much to gain here)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=F64) * scale, -1)
    y = torch.multinomial(p.float(), 1, generator=torch.Generator().manual_seed(1))[:, 0]
    return p, y


def test_logits_at_a_temperature_equal_the_probabilities_tempered_by_hand():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(60, 4, generator=g, dtype=F64) * 3
    y = torch.randint(0, 4, (60,), generator=g)
    kw = dict(num_candidates=8, order=2, seed=3)
    by_hand = px.search_coefficients(torch.softmax(logits / 2.5, -1), y, **kw)
    new = px.search_coefficients(labels=y, teacher_logits=logits, temperature=2.5, **kw)
    old = px.search_coefficients(logits, y, teacher_is_logits=True, temperature=2.5, **kw)
    for r in (new, old):
        torch.testing.assert_close(r.candidate_deviations, by_hand.candidate_deviations, rtol=1e-12, atol=1e-15)
        assert r.inputs == "logits" and r.temperature == 2.5
    assert by_hand.inputs == "probs" and new.to_dict()["inputs"] == "logits"


def test_a_temperature_with_probabilities_is_an_error_not_ignored():
    p, y = _problem(n=10)
    with pytest.raises(ValueError, match="temperature=2 with teacher probabilities.*teacher_logits="):
        px.search_coefficients(p, y, temperature=2.0)
    px.search_coefficients(p, y, temperature=1.0, num_candidates=2)  # 1 is "as given"


@pytest.mark.parametrize("call, match", [
    (lambda p, y: px.search_coefficients(p, y, teacher_logits=p), "teacher once"),
    (lambda p, y: px.search_coefficients(labels=y), "teacher once"),
    (lambda p, y: px.search_coefficients(p), "labels is required"),
    (lambda p, y: px.search_coefficients(labels=y, teacher_logits=p, teacher_is_logits=True), "teacher_is_logits"),
])
def test_the_teacher_is_given_once(call, match):
    p, y = _problem(n=10)
    with pytest.raises(TypeError, match=match):
        call(p, y)


def test_refine_stays_in_the_sampling_box_and_still_descends():
    # this problem took refined coefficients to [-4.2, 14.8] when the step was not projected
    p, y = _problem()
    base = px.search_coefficients(p, y, num_candidates=10, seed=1, order=3)
    r = px.search_coefficients(p, y, num_candidates=10, seed=1, order=3, refine=True, refine_steps=20)
    assert float(r.coeffs.min()) >= -1.0 and float(r.coeffs.max()) <= 10.0
    assert r.refine_steps >= 1 and r.deviation <= 0.8 * base.deviation
    # some coefficient sits on the box's edge: the unconstrained descent wanted to leave it
    assert bool(((r.coeffs == -1.0) | (r.coeffs == 10.0)).any())
    d = float(px.deviation(px.proxy_teacher(p, r.coeffs), y))
    assert d == pytest.approx(r.deviation, rel=1e-9)
    assert r.global_check["not_global"] == 0


def _loss(p, q, eta):
    """L(p, q) for rows p [N, K] against points q [G, K] -> [N, G], directly from the definition."""
    h = sum(eta[m][None, :] * (1 - q) ** (m + 1) for m in range(eta.shape[0]))
    return (p[:, None, :] * (torch.log(p)[:, None, :] - torch.log(q)[None] + h[None])).sum(-1)


def test_global_check_agrees_with_a_brute_force_grid_over_the_simplex():
    p, y = _problem(n=40, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = px.search_coefficients(p, y, num_candidates=10, seed=1, order=3, low=-25, high=30, refine=True)
    q = px.proxy_teacher(p, r.coeffs)
    s = torch.linspace(1e-4, 1 - 1e-4, 500, dtype=F64)
    a, b = torch.meshgrid(s, s, indexing="ij")
    inside = (a + b) < 1 - 1e-4
    grid = torch.stack([a[inside], b[inside], 1 - a[inside] - b[inside]], 1)
    low, where = _loss(p, grid, r.coeffs).min(1)
    at_q = torch.stack([_loss(p[i:i + 1], q[i:i + 1], r.coeffs)[0, 0] for i in range(len(p))])
    lower = low < at_q - 1e-6
    assert int(lower.sum()) > 0  # a case with minima the solve from the teacher does not reach
    check = r.global_check
    assert check["convex"] is False and check["checked_rows"] == 40
    assert check["not_global"] == int(lower.sum())
    assert check["argmax_differs"] == int((lower & (grid[where].argmax(1) != q.argmax(1))).sum())
    assert any("not the global minimiser" in str(w.message) for w in caught)
    assert r.to_dict()["global_check"] == check


def test_convex_coefficients_need_no_multistart_and_the_check_can_be_skipped():
    p, y = _problem(n=30)
    r = px.search_coefficients(p, y, num_candidates=3, seed=0, order=2, low=0.0, high=1.0)
    assert r.global_check["convex"] is True and r.global_check["not_global"] == 0
    assert px.search_coefficients(p, y, num_candidates=3, check_global=False).global_check is None
