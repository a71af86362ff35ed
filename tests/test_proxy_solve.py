"""The Proxy Teacher (tgtfast.proxy): the solve, Eq. 21, the coefficient search and its command line."""

import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch

import tgtfast
from tgtfast import proxy as px
from tgtfast import reference

F64 = torch.float64
BACKENDS = ("cpp", "cuda", "reference")


@pytest.fixture(autouse=True, params=BACKENDS)
def backend(request, monkeypatch):
    """Every test of this file runs on each implementation of the solve (chosen by the dispatch point); one that
    is not available here is skipped with the reason. The CUDA backend runs the tests that take the `device`
    fixture (their tensors go to the GPU); the others use CPU tensors and are skipped there."""
    avail = tgtfast.backends(op="proxy_teacher")[request.param]
    if avail != "available":
        pytest.skip(f"{request.param} backend {avail}")
    if request.param == "cuda" and "device" not in request.fixturenames:
        pytest.skip("CPU-tensor test (the CUDA backend runs the tests that take the device fixture)")
    monkeypatch.setenv("TGTFAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def device(backend):
    return torch.device("cuda" if backend == "cuda" else "cpu")


def teacher(n, k, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=F64) * scale, -1)


def labels_for(p, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(p.float(), 1, generator=g)[:, 0]


def objective(p, q, eta):
    """L(p, q) straight from the definition, eta [M, K] -> [N]."""
    m = torch.arange(1, eta.shape[0] + 1, dtype=F64).view(-1, 1, 1)
    pert = (eta[:, None, :] * (1 - q)[None] ** m).sum(0)
    return (torch.xlogy(p, p) - torch.xlogy(p, q) + p * pert).sum(-1)


# ------------------------------------------------------------------------------------------------ binary


@pytest.mark.parametrize("layout", ["shared", "per_class", "negative"])
def test_binary_is_global_minimum_of_brute_force_grid(layout, device):
    """K = 2 against an independent oracle: L(p, q) evaluated on a grid of 10^5 values of q_0."""
    g = torch.Generator().manual_seed(3)
    p = teacher(40, 2, scale=3.0)
    p = torch.cat([p, torch.tensor([[0.5, 0.5], [1e-9, 1 - 1e-9], [0.999, 0.001]], dtype=F64)])
    c = 6
    if layout == "shared":
        eta = (torch.rand(c, 5, generator=g, dtype=F64) * 11 - 1)[:, :, None].expand(-1, -1, 2)
    elif layout == "per_class":
        eta = torch.rand(c, 5, 2, generator=g, dtype=F64) * 11 - 1
    else:  # strongly non-convex
        eta = torch.rand(c, 5, 2, generator=g, dtype=F64) * 30 - 20
    q = px.proxy_teacher(p.to(device), eta.to(device))
    assert q.shape == (c, p.shape[0], 2) and q.device.type == device.type
    q = q.cpu()
    grid = torch.linspace(0, 1, 100_001, dtype=F64)[1:-1]
    m = torch.arange(1, 6, dtype=F64).view(-1, 1, 1)
    for ci in range(c):
        f_ours = objective(p, q[ci], eta[ci])
        # brute force: L(p, (g, 1 - g)) on the whole grid for every row at once, [N, G]
        pert0 = (eta[ci, :, 0].view(-1, 1, 1) * (1 - grid).view(1, 1, -1) ** m).sum(0)
        pert1 = (eta[ci, :, 1].view(-1, 1, 1) * grid.view(1, 1, -1) ** m).sum(0)
        p0, p1 = p[:, 0:1], p[:, 1:2]
        f_all = torch.xlogy(p0, p0) + torch.xlogy(p1, p1) - p0 * grid.log() - p1 * torch.log1p(-grid)
        f_grid = (f_all + p0 * pert0 + p1 * pert1).min(1).values
        excess = f_ours - f_grid
        assert float(excess.max()) <= 1e-12 * (1 + float(f_grid.abs().max())), (ci, float(excess.max()))


# ------------------------------------------------------------------------------------------------ KL case


@pytest.mark.parametrize("k", [2, 3, 10])
def test_zero_coeffs_return_the_teacher(k, device):
    p = teacher(50, k).to(device)
    assert torch.equal(px.proxy_teacher(p, torch.zeros(5, device=device)), p)
    assert torch.equal(px.proxy_teacher(p, torch.zeros(3, k, device=device)), p)
    cands = torch.rand(4, 5, k, dtype=F64).to(device)
    cands[2] = 0
    q = px.proxy_teacher(p, cands)
    assert torch.equal(q[2], p)
    assert not torch.allclose(q[1], p)


# ------------------------------------------------------------------------------------------------ multi-class


@pytest.mark.parametrize("k", [3, 10])
@pytest.mark.parametrize("per_class", [False, True])
def test_multiclass_stationary_and_descent(k, per_class):
    g = torch.Generator().manual_seed(k)
    p = teacher(300, k, scale=2.5)
    c, m = 8, 5
    eta = torch.rand((c, m, k) if per_class else (c, m), generator=g, dtype=F64) * 11 - 1
    q = px.proxy_teacher(p, eta, batched=True)
    assert q.shape == (c, 300, k) and q.dtype == F64
    assert torch.allclose(q.sum(-1), torch.ones((), dtype=F64), atol=1e-12) and bool((q > 0).all())
    res = px.stationarity_residual(p, q, eta, batched=True)
    assert float(res.max()) < 1e-6
    eta_k = eta if per_class else eta[:, :, None].expand(-1, -1, k)
    for ci in range(c):  # descent from the teacher, checked against the package's PTLoss spec
        l_star = reference.ptloss_rows(q[ci].log(), p, eta_k[ci], teacher_is_logits=False)
        l_teacher = reference.ptloss_rows(p.log(), p, eta_k[ci], teacher_is_logits=False)
        assert bool((l_star <= l_teacher + 1e-12).all())
        # one candidate at a time equals the batched solve
    single = px.proxy_teacher(p, eta_k[3])
    assert torch.allclose(single, q[3], atol=1e-12, rtol=0)


def _objective_np(q, p, eta):
    """L(p, q) for one row from the definition, numpy float64: q, p [K], eta [M, K]."""
    m = np.arange(1, eta.shape[0] + 1)[:, None]
    pert = (eta * (1.0 - q)[None, :] ** m).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0) + p * pert))


def _scipy_proxy(p, eta):
    """Independent float64 oracle for one row: scipy.optimize.minimize (BFGS, numerical gradient) of L(p, q) over
    the simplex, parametrised by K - 1 free logits, started from the teacher (the solve's local minimiser is the
    one reached from there)."""
    from scipy.optimize import minimize

    def q_of(z):
        zz = np.append(z, 0.0)
        e = np.exp(zz - zz.max())
        return e / e.sum()

    z0 = np.log(p[:-1]) - np.log(p[-1])
    r = minimize(lambda z: _objective_np(q_of(z), p, eta), z0, method="BFGS", options={"gtol": 1e-11, "maxiter": 2000})
    return q_of(r.x)


@pytest.mark.parametrize("k", [3, 4])
def test_multiclass_matches_scipy_oracle(k, device):
    """K >= 3 against scipy on the simplex: same minimiser (to the oracle's accuracy) and never a higher L."""
    pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(100 + k)
    p = teacher(12, k, scale=2.0, seed=k)
    eta = torch.rand(3, 4, k, generator=g, dtype=F64) * 11 - 1  # the paper's range [-1, 10]
    q = px.proxy_teacher(p.to(device), eta.to(device)).cpu()
    worst_q, worst_l = 0.0, -math.inf
    for ci in range(eta.shape[0]):
        for n in range(p.shape[0]):
            pn, en = p[n].numpy(), eta[ci].numpy()
            q_sc = _scipy_proxy(pn, en)
            worst_q = max(worst_q, float(np.abs(q[ci, n].numpy() - q_sc).max()))
            worst_l = max(worst_l, _objective_np(q[ci, n].numpy(), pn, en) - _objective_np(q_sc, pn, en))
    assert worst_q < 1e-6, worst_q
    assert worst_l <= 1e-13, worst_l


def test_multiclass_negative_coefficients_still_converge():
    g = torch.Generator().manual_seed(5)
    p = teacher(200, 4, scale=3.0)
    eta = torch.rand(6, 5, 4, generator=g, dtype=F64) * 12 - 6
    q = px.proxy_teacher(p, eta)
    assert bool(torch.isfinite(q).all())
    assert float(px.stationarity_residual(p, q, eta).max()) < 1e-6


def test_float32_input_and_output_dtype():
    p = teacher(20, 3).float()
    q = px.proxy_teacher(p, torch.linspace(-1, 3, 5))
    assert q.dtype == torch.float32 and q.shape == (20, 3)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_degenerate_teachers_are_finite(k):
    p = torch.cat([torch.eye(k, dtype=F64), torch.full((2, k), 1.0 / k, dtype=F64)])
    if k > 2:
        half = torch.zeros(1, k, dtype=F64)
        half[0, :2] = 0.5
        p = torch.cat([p, half])
    eta = torch.rand(5, 5, k, dtype=F64) * 11 - 1
    q = px.proxy_teacher(p, eta)
    assert bool(torch.isfinite(q).all())
    assert torch.allclose(q.sum(-1), torch.ones((), dtype=F64), atol=1e-12)
    if k > 2:  # classes the teacher gives no mass get none
        assert bool((q[:, p == 0] == 0).all())
        assert float(px.stationarity_residual(p, q, eta).max()) < 1e-6
    d = px.deviation(q, torch.arange(p.shape[0]) % k)
    assert bool(torch.isfinite(d).all())


# ------------------------------------------------------------------------------------------------ Eq. 21


def test_deviation_matches_direct_eq21():
    p = teacher(64, 4)
    q = px.proxy_teacher(p, torch.rand(3, 5, 4, dtype=F64) * 5)
    q[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)  # 0 log 0 = 0
    y = labels_for(p)
    d = px.deviation(q, y)
    for c in range(3):
        norms, negent = [], []
        for n in range(64):
            onehot = [1.0 if j == int(y[n]) else 0.0 for j in range(4)]
            norms.append(math.sqrt(sum((float(q[c, n, j]) - onehot[j]) ** 2 for j in range(4))))
            negent.append(sum(float(v) * math.log(float(v)) for v in q[c, n] if float(v) > 0))
        direct = (sum(norms) / 64) ** 2 + (sum(negent) / 64) ** 2
        assert math.isclose(float(d[c]), direct, rel_tol=1e-12, abs_tol=1e-15)
    assert px.deviation(q[1], y).shape == ()
    assert math.isclose(float(px.deviation(q[1], y)), float(d[1]), rel_tol=1e-14)


# ------------------------------------------------------------------------------------------------ search


def test_search_deterministic_and_never_worse_than_kl():
    p = teacher(400, 3, scale=3.0)
    y = labels_for(p)
    a = px.search_coefficients(p, y, num_candidates=20, seed=7)
    b = px.search_coefficients(p, y, num_candidates=20, seed=7)
    c = px.search_coefficients(p, y, num_candidates=20, seed=8)
    assert torch.equal(a.coeffs, b.coeffs) and torch.equal(a.candidate_deviations, b.candidate_deviations)
    assert not torch.equal(a.candidates, c.candidates)
    for r in (a, c):
        assert r.candidate_deviations.shape == (21,)
        assert r.coeffs.shape == (5, 3)
        assert r.deviation <= r.kl_deviation
        assert r.deviation == float(r.candidate_deviations.min())
        assert math.isclose(r.kl_deviation, float(px.deviation(p, y)), rel_tol=1e-12)
        assert bool((r.candidates[1:] >= -1).all() and (r.candidates[1:] <= 10).all())
    # the reported deviation is the deviation of the returned coefficients
    assert math.isclose(a.deviation, float(px.deviation(px.proxy_teacher(p, a.coeffs), y)), rel_tol=1e-9)
    shared = px.search_coefficients(p, y, num_candidates=5, per_class=False, order=3)
    assert shared.coeffs.shape == (3,)


def test_search_keeps_kl_when_kl_is_best():
    # a teacher that is already (nearly) one-hot and right: nothing beats plain KL on D
    y = torch.arange(30) % 3
    p = torch.nn.functional.one_hot(y, 3).to(F64)
    r = px.search_coefficients(p, y, num_candidates=10)
    assert r.deviation <= r.kl_deviation and r.kl_deviation == 0.0 and r.best_index == 0


def test_search_from_logits_with_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, 3, generator=g, dtype=F64) * 3
    y = labels_for(torch.softmax(logits, -1))
    a = px.search_coefficients(logits, y, teacher_is_logits=True, temperature=2.0, num_candidates=5)
    b = px.search_coefficients(torch.softmax(logits / 2.0, -1), y, num_candidates=5)
    assert torch.allclose(a.candidate_deviations, b.candidate_deviations, rtol=1e-12)


def test_refine_reduces_or_keeps_deviation():
    p = teacher(300, 3, scale=3.0)
    y = labels_for(p)
    base = px.search_coefficients(p, y, num_candidates=10, seed=1)
    r = px.search_coefficients(p, y, num_candidates=10, seed=1, refine=True, refine_steps=5)
    assert r.refined_from == base.deviation
    assert r.deviation <= r.refined_from
    assert math.isclose(r.deviation, float(px.deviation(px.proxy_teacher(p, r.coeffs), y)), rel_tol=1e-9)


@pytest.mark.parametrize("k", [2, 3])
def test_gradient_is_the_implicit_derivative(k):
    p = teacher(6, k)
    eta = (torch.rand(3, k, dtype=F64) * 4).requires_grad_(True)
    w = torch.randn(6, k, dtype=F64)
    (gr,) = torch.autograd.grad((px.proxy_teacher(p, eta) * w).sum(), eta)
    fd = torch.zeros_like(gr)
    h = 1e-6
    for idx in np.ndindex(*eta.shape):
        e1, e2 = eta.detach().clone(), eta.detach().clone()
        e1[idx] += h
        e2[idx] -= h
        fd[idx] = ((px.proxy_teacher(p, e1) - px.proxy_teacher(p, e2)) * w).sum() / (2 * h)
    assert torch.allclose(gr, fd, rtol=1e-5, atol=1e-7)


def test_result_json_loads_into_ptloss(tmp_path):
    p = teacher(100, 3)
    y = labels_for(p)
    r = px.search_coefficients(p, y, num_candidates=5)
    path = tmp_path / "coeffs.json"
    r.save(path)
    data = json.loads(path.read_text())
    assert data["coeffs"] == r.coeffs.tolist() and data["deviation"] == r.deviation
    loss = tgtfast.PTLoss(str(path))
    assert torch.allclose(loss.coeffs.double(), r.coeffs.float().double())
    s = torch.randn(4, 3)
    assert torch.isfinite(loss(s, torch.randn(4, 3))).all()


def test_coeffs_main_end_to_end(tmp_path, capsys):
    p = teacher(200, 3)
    y = labels_for(p)
    torch.save(p.float(), tmp_path / "pred.pt")
    np.save(tmp_path / "labels.npy", y.numpy())
    out = tmp_path / "c.json"
    rc = px.coeffs_main(["--teacher", str(tmp_path / "pred.pt"), "--labels", str(tmp_path / "labels.npy"),
                         "--order", "3", "--num-candidates", "7", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed["coeffs"] == saved["coeffs"] and len(saved["coeffs"]) == 3
    assert saved["deviation"] <= saved["kl_deviation"]
    bad = px.coeffs_main(["--teacher", str(tmp_path / "pred.pt"), "--labels", str(tmp_path / "pred.pt"),
                          "--out", str(out)])
    assert bad == 2 and "labels" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_argument():
    p = teacher(10, 3)
    y = labels_for(p)
    cases = [
        (lambda: px.search_coefficients(p, y.double()), TypeError, "labels"),
        (lambda: px.search_coefficients(p, y + 3), ValueError, "labels"),
        (lambda: px.search_coefficients(p, -y - 1), ValueError, "labels"),
        (lambda: px.search_coefficients(p, y[:5]), ValueError, "labels"),
        (lambda: px.search_coefficients(p * 1.1, y), ValueError, "teacher"),
        (lambda: px.search_coefficients(p - 0.5, y), ValueError, "teacher"),
        (lambda: px.search_coefficients(p, y, low=2.0, high=1.0), ValueError, "low"),
        (lambda: px.search_coefficients(p, y, order=0), ValueError, "order"),
        (lambda: px.search_coefficients(p, y, num_candidates=0), ValueError, "num_candidates"),
        (lambda: px.search_coefficients(p, y, order=2.5), TypeError, "order"),
        (lambda: px.search_coefficients(p, y, temperature=0.0), ValueError, "temperature"),
        (lambda: px.search_coefficients(p, y, backend="cuda"), ValueError, "backend"),
        (lambda: px.proxy_teacher(p, torch.zeros(5, 4), batched=False), ValueError, "coeffs"),
        (lambda: px.proxy_teacher(p, torch.zeros(2, 5, 4)), ValueError, "coeffs"),
        (lambda: px.proxy_teacher(p, torch.zeros(2, 2, 2, 2)), ValueError, "coeffs"),
        (lambda: px.proxy_teacher(p, torch.tensor([float("nan")])), ValueError, "coeffs"),
        (lambda: px.proxy_teacher(p[0], torch.zeros(5)), ValueError, "teacher_probs"),
        (lambda: px.proxy_teacher(p.long(), torch.zeros(5)), TypeError, "teacher_probs"),
        (lambda: px.deviation(p, y[:3]), ValueError, "labels"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()


# ------------------------------------------------------------------------------------------------ distributed


def _dist_worker(rank, world, init_file, p, y, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        shard = slice(rank, None, world)  # uneven shards on purpose
        r = px.search_coefficients(p[shard], y[shard], num_candidates=8, seed=3, refine=True, refine_steps=2)
        torch.save({"dev": r.candidate_deviations, "coeffs": r.coeffs, "d": r.deviation}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_sharded_search_equals_single_process():
    import torch.multiprocessing as mp

    p = teacher(101, 3, scale=3.0)
    y = labels_for(p)
    single = px.search_coefficients(p, y, num_candidates=8, seed=3, refine=True, refine_steps=2)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), p, y, d), nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(os.path.join(d, f"{rank}.pt"))
            assert torch.allclose(got["dev"], single.candidate_deviations, rtol=1e-12, atol=0)
            assert torch.allclose(got["coeffs"], single.coeffs, rtol=1e-9, atol=1e-12)
            assert math.isclose(got["d"], single.deviation, rel_tol=1e-9)


# ------------------------------------------------------------------------------------------------ backends agree


@pytest.mark.parametrize("k", [2, 3, 7])
def test_compiled_solve_matches_reference(k, backend, device):
    if backend == "reference":
        pytest.skip("compares a compiled solve with the reference")
    g = torch.Generator().manual_seed(11)
    p = teacher(150, k, scale=2.5)
    p[0] = torch.nn.functional.one_hot(torch.tensor(0), k).to(F64)  # degenerate rows ride along
    p[1] = 1.0 / k
    if k > 2:
        p[2, 1] = 0.0
        p[2] /= p[2].sum()
    eta = torch.rand(5, 5, k, generator=g, dtype=F64) * 11 - 1
    eta[1] = 0
    q_compiled = px.proxy_teacher(p.to(device), eta.to(device), backend=backend).cpu()
    q_ref = px.proxy_teacher(p, eta, backend="reference")
    assert torch.allclose(q_compiled, q_ref, rtol=0, atol=1e-9)
    y = labels_for(p)
    a = px.search_coefficients(p.to(device), y.to(device), num_candidates=12, order=3, backend=backend)
    b = px.search_coefficients(p, y, num_candidates=12, order=3, backend="reference")
    assert torch.allclose(a.candidate_deviations, b.candidate_deviations, rtol=1e-9, atol=1e-15)
    assert a.best_index == b.best_index


def test_compiled_search_does_not_depend_on_thread_count(backend):
    if backend != "cpp":
        pytest.skip("C++ solve only")
    p = teacher(600, 3)
    y = labels_for(p)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = px.search_coefficients(p, y, num_candidates=9)
        torch.set_num_threads(2)
        two = px.search_coefficients(p, y, num_candidates=9)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.candidate_deviations, two.candidate_deviations)


def test_proxy_backend_without_kernel_is_refused():
    p = teacher(4, 3)
    with pytest.raises(ValueError, match="backend"):
        px.proxy_teacher(p, torch.ones(2), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        px.proxy_teacher(p, torch.ones(2), backend="nope")


@pytest.mark.skipif(tgtfast.backends()["cuda"] != "available", reason="needs the CUDA backend and a GPU")
@pytest.mark.parametrize("k", [2, 3, 6])
def test_cuda_solve_matches_cpu(k, backend):
    if backend != "cpp":
        pytest.skip("once per k")
    g = torch.Generator().manual_seed(21)
    p = teacher(300, k, scale=2.5)
    p[0] = 1.0 / k
    eta = torch.rand(7, 5, k, generator=g, dtype=F64) * 11 - 1
    eta[2] = 0
    q_cpu = px.proxy_teacher(p, eta, backend="cpp")
    q_gpu = px.proxy_teacher(p.cuda(), eta.cuda(), backend="cuda")
    assert q_gpu.is_cuda
    assert torch.allclose(q_gpu.cpu(), q_cpu, rtol=0, atol=1e-9)
    y = labels_for(p)
    a = px.search_coefficients(p, y, num_candidates=10, backend="cpp")
    b = px.search_coefficients(p.cuda(), y.cuda(), num_candidates=10, backend="cuda")
    assert torch.allclose(a.candidate_deviations, b.candidate_deviations, rtol=1e-9, atol=1e-15)


def test_search_takes_the_seeds_torch_generators_take():
    """Any seed torch.Generator.manual_seed takes is accepted (negative ones included), the same draws each time."""
    p = torch.softmax(torch.randn(20, 3, dtype=torch.float64), -1)
    y = torch.randint(0, 3, (20,))
    a = tgtfast.search_coefficients(p, y, order=2, num_candidates=4, seed=-5, backend="reference")
    b = tgtfast.search_coefficients(p, y, order=2, num_candidates=4, seed=-5, backend="reference")
    assert torch.equal(a.coeffs, b.coeffs)
    with pytest.raises(ValueError, match="seed"):
        tgtfast.search_coefficients(p, y, order=2, num_candidates=4, seed=2**64, backend="reference")
