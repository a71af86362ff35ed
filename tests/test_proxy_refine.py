"""The refine step of ``search_coefficients``: gradient descent on the Eq. 21 deviation D from the best random
candidate must actually descend: a real drop of D where one is available, and a first step along minus a
finite-difference gradient of D (a climbing or mis-signed step would be rejected by the backtracking and leave D
unchanged, which the older test ``deviation <= refined_from`` accepted)."""

import itertools

import pytest
import torch

import tgtfast
from tgtfast import proxy as px

F64 = torch.float64


@pytest.fixture(params=["cpp", "cuda", "reference"])
def backend(request):
    avail = tgtfast.backends(op="proxy_teacher")[request.param]
    if avail != "available":
        pytest.skip(f"{request.param} backend {avail}")
    return request.param


@pytest.fixture
def device(backend):
    """The CUDA backend takes CUDA tensors (the search runs its kernel, the refine the CPU solve)."""
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _problem(device, n=120):
    """A sharp (over-confident) teacher with labels drawn from it: the best random candidate is far from a
    stationary point of D, so a gradient step has a lot to gain."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(n, 3, generator=g, dtype=F64) * 3.0, -1)
    y = torch.multinomial(p.float(), 1, generator=torch.Generator().manual_seed(1))[:, 0]
    return p.to(device), y.to(device)


def _search(p, y, backend, **kw):
    return px.search_coefficients(p, y, num_candidates=10, seed=1, order=3, backend=backend, **kw)


def _fd_gradient(p, y, coeffs, backend, h=1e-5):
    """Central differences of D(coeffs) = deviation(proxy_teacher(p, coeffs), y)."""
    def dev(c):
        return float(px.deviation(px.proxy_teacher(p, c, backend=backend), y))

    g = torch.zeros_like(coeffs)
    for idx in itertools.product(*(range(s) for s in coeffs.shape)):
        a, b = coeffs.clone(), coeffs.clone()
        a[idx] += h
        b[idx] -= h
        g[idx] = (dev(a) - dev(b)) / (2 * h)
    return g


def test_refine_lowers_the_deviation_by_a_real_margin(backend, device):
    p, y = _problem(device)
    base = _search(p, y, backend)
    r = _search(p, y, backend, refine=True, refine_steps=4)
    assert r.refined_from == base.deviation
    assert r.refine_steps >= 1
    # a real descent, not "did not grow": at least 20% off the best random candidate's D here
    assert r.deviation <= 0.8 * r.refined_from, (r.deviation, r.refined_from)
    # the reported D is that of the returned coefficients
    d_check = float(px.deviation(px.proxy_teacher(p, r.coeffs.to(device), backend=backend), y))
    assert abs(r.deviation - d_check) <= 1e-9 * d_check


def test_refine_first_step_follows_minus_the_finite_difference_gradient(backend, device):
    p, y = _problem(device)
    base = _search(p, y, backend)
    r = _search(p, y, backend, refine=True, refine_steps=1)
    assert r.refine_steps == 1
    step = r.coeffs - base.coeffs
    g = _fd_gradient(p, y, base.coeffs.to(device), backend).cpu()
    assert float(g.norm()) > 1e-4  # a point where the gradient is informative
    cos = float((step * -g).sum() / (step.norm() * g.norm()))
    assert cos > 0.999, cos
    # and the step pays off to first order: D drops by at least half of what the linear model predicts
    assert r.deviation < base.deviation + 0.5 * float((g * step).sum())
