"""fused_linear_ptloss against the independent float64 oracle (tests/oracle.py: the logits, the closed-form
PTLoss and cross-entropy gradients, then dh = G W, dW = G^T h, db = sum G, all in float64 on the same rounded
inputs). Every backend, "reference" included, is judged against it with per-dtype tolerances.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import tgtfast
from conftest import ATOL, cpu_backends, needs_backend
from oracle import assert_close64, fused_linear_oracle

CUDA = pytest.mark.skipif(not torch.cuda.is_available() or tgtfast.backends()["cuda"] != "available",
                          reason=f"cuda backend {tgtfast.backends()['cuda']}")


def make(n=37, h=16, ht=12, v=50, *, dtype=torch.float32, bias=True, lead=None, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    x = {
        "hs": torch.randn(*shape, h, generator=g),
        "ws": torch.randn(v, h, generator=g) * 0.6,
        "bs": torch.randn(v, generator=g) if bias else None,
        "ht": torch.randn(*shape, ht, generator=g),
        "wt": torch.randn(v, ht, generator=g) * 0.6,
        "bt": torch.randn(v, generator=g) if bias else None,
    }
    x = {k: None if t is None else t.to(device=device, dtype=dtype) for k, t in x.items()}
    target = torch.randint(0, v, shape, generator=g).to(device)
    return x, target


def run(fn, x, *args, scale=2.0, **kw):
    """Loss and the gradients (hidden, weight, bias) of fn(...).sum() * scale."""
    hs = x["hs"].detach().clone().requires_grad_(True)
    ws = x["ws"].detach().clone().requires_grad_(True)
    bs = None if x["bs"] is None else x["bs"].detach().clone().requires_grad_(True)
    args = [torch.tensor(a) if isinstance(a, list) else a for a in args]  # the reference takes tensors
    out = fn(hs, ws, x["ht"], x["wt"], *args, student_bias=bs, teacher_bias=x["bt"], **kw)
    (out.sum() * scale).backward()
    return out.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def oracle(x, *args, scale=2.0, chunk_size=None, **kw):
    """(loss, grad hidden, grad weight, grad bias) of the float64 oracle, gradients of loss.sum() * scale."""
    acc = torch.float64 if torch.float64 in (x["hs"].dtype, x["ht"].dtype) else torch.float32
    args = [None if a is None else torch.as_tensor(a).to(acc) for a in args]  # coeffs run in the acc dtype
    return fused_linear_oracle(x["hs"], x["ws"], x["ht"], x["wt"], *args, student_bias=x["bs"],
                               teacher_bias=x["bt"], grad_output=scale, **kw)


def check_against_oracle(x, dtype, *args, backend=None, **kw):
    """A backend against the float64 oracle: the loss to float32 accuracy (logits and loss accumulate in
    float32 for every input dtype but float64), gradients to the tolerance of their dtype."""
    got = run(tgtfast.fused_linear_ptloss, x, *args, backend=backend, **kw)
    truth = oracle(x, *args, **kw)
    for what, a, c in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, truth):
        if c is None:
            assert a is None, what
            continue
        assert a.shape == c.shape, what
        tol_dtype = dtype if what != "loss" or dtype == torch.float64 else torch.float32
        assert_close64(a, c, tol_dtype, f"{backend} {what}")
    return got


COEFFS = [None, [0.5, -0.2, 1.0]]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("coeffs", COEFFS)
def test_matches_reference(backend, dtype, reduction, coeffs):
    x, target = make(dtype=dtype)
    target[::4] = -100
    got = check_against_oracle(x, dtype, coeffs, target=target, temperature=2.0, reduction=reduction,
                               chunk_size=8, backend=backend)
    assert got[0].dtype == dtype
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype


@pytest.mark.parametrize("backend", cpu_backends())
def test_three_d_hidden_and_per_class_coeffs(backend):
    x, target = make(lead=(3, 7), v=40, bias=False)
    target[0, :3] = -100
    coeffs = torch.rand(2, 40) - 0.3
    got = check_against_oracle(x, torch.float32, coeffs, target=target, reduction="none", chunk_size=5,
                               backend=backend)
    assert got[0].shape == (3, 7)
    assert bool((got[0][0, :3] == 0).all())
    assert got[3] is None
    check_against_oracle(x, torch.float32, coeffs, target=target, chunk_size=5, backend=backend)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 100])
def test_chunk_sizes_agree(chunk_size):
    x, target = make(n=37)
    target[3:9] = -100
    kw = dict(target=target, temperature=1.5, ce_weight=0.25)
    full = run(tgtfast.fused_linear_ptloss, x, [0.3, 0.1], chunk_size=37, **kw)
    got = run(tgtfast.fused_linear_ptloss, x, [0.3, 0.1], chunk_size=chunk_size, **kw)
    for a, b in zip(got, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    check_against_oracle(x, torch.float32, [0.3, 0.1], chunk_size=chunk_size, **kw)


def test_default_chunk_size():
    assert tgtfast.fused_linear.default_chunk_size(32000) == 512
    assert tgtfast.fused_linear.default_chunk_size(128256) == 128
    assert tgtfast.fused_linear.default_chunk_size(10) == 4096
    assert tgtfast.fused_linear.default_chunk_size(10**9) == 32


def test_ignore_index_rows_leave_no_trace():
    x, target = make(n=20)
    target[5:12] = 7
    got = run(tgtfast.fused_linear_ptloss, x, [1.0], target=target, ignore_index=7, ce_weight=0.5, chunk_size=6)
    x["hs"][5:12] = torch.randn(7, x["hs"].shape[1]) * 100  # what an ignored row holds does not matter
    x["ht"][5:12] = torch.randn(7, x["ht"].shape[1]) * 100
    again = run(tgtfast.fused_linear_ptloss, x, [1.0], target=target, ignore_index=7, ce_weight=0.5, chunk_size=6)
    torch.testing.assert_close(got[0], again[0])
    assert bool((got[1][5:12] == 0).all()) and bool((again[1][5:12] == 0).all())
    torch.testing.assert_close(got[1][:5], again[1][:5])
    check_against_oracle(x, torch.float32, [1.0], target=target, ignore_index=7, ce_weight=0.5, chunk_size=6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("ignore_index", [-100, 7, -1, 0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none", "mean"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.4])
def test_ignore_index_values(backend, ignore_index, reduction, ce_weight):
    """Rows whose target is ignore_index (not -100 unless it is -100) leave both terms; without cross-entropy a
    kept row may hold -100 as an ordinary label."""
    x, target = make(n=23, v=30, seed=4)
    g = torch.Generator().manual_seed(5)
    target[target == ignore_index] = (ignore_index + 1) % 30
    ignored = torch.rand(23, generator=g) < 0.35
    ignored[0], ignored[-1] = True, False
    target[ignored] = ignore_index
    if ce_weight == 0 and ignore_index != -100:
        target[(~ignored).nonzero()[:4, 0]] = -100
    x["hs"][ignored] *= 1e3  # whatever an ignored row holds does not matter
    got = check_against_oracle(x, torch.float32, [0.5, -0.2], target=target, ignore_index=ignore_index,
                               reduction=reduction, kd_weight=0.7, ce_weight=ce_weight, temperature=1.5,
                               chunk_size=4, backend=backend)
    assert bool((got[1][ignored] == 0).all())
    if reduction == "none":
        assert bool((got[0][ignored] == 0).all()) and bool((got[0][~ignored] > 0).all())
    mod = tgtfast.FusedLinearPTLoss([0.5, -0.2], ignore_index=ignore_index, reduction=reduction, kd_weight=0.7,
                                    ce_weight=ce_weight, temperature=1.5, chunk_size=4, backend=backend)
    out = mod(x["hs"], x["ws"], x["ht"], x["wt"], target, student_bias=x["bs"], teacher_bias=x["bt"])
    torch.testing.assert_close(out, got[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored(reduction):
    x, target = make(n=9)
    target[:] = -100
    loss, gh, gw, gb = run(tgtfast.fused_linear_ptloss, x, target=target, ce_weight=1.0, reduction=reduction)
    assert bool((loss == 0).all()) and torch.isfinite(loss).all()
    for g in (gh, gw, gb):
        assert bool((g == 0).all())


def test_cross_entropy_term():
    x, target = make(n=25)
    target[::3] = -100
    only_ce = run(tgtfast.fused_linear_ptloss, x, target=target, kd_weight=0.0, ce_weight=1.0, chunk_size=7)
    logits = F.linear(x["hs"], x["ws"], x["bs"])
    assert torch.allclose(only_ce[0], F.cross_entropy(logits, target, ignore_index=-100), rtol=1e-5, atol=1e-6)
    # the mix is linear in the weights
    kd = run(tgtfast.fused_linear_ptloss, x, [0.4], target=target, temperature=3.0)
    mix = run(tgtfast.fused_linear_ptloss, x, [0.4], target=target, temperature=3.0, kd_weight=0.6, ce_weight=0.4)
    for a, b, c in zip(mix, kd, only_ce):
        torch.testing.assert_close(a, 0.6 * b + 0.4 * c, rtol=1e-5, atol=1e-6)
    check_against_oracle(x, torch.float32, [0.4], target=target, temperature=3.0, kd_weight=0.6, ce_weight=0.4,
                         chunk_size=4)


def test_defaults_are_plain_ptloss():
    """Defaults are API: temperature 1, batchmean, no cross-entropy, kd weight 1, ignore_index -100."""
    x, target = make(n=11)
    target[2] = -100
    got = tgtfast.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"], target=target)
    want = fused_linear_oracle(x["hs"], x["ws"], x["ht"], x["wt"], target=target)[0]
    assert_close64(got, want, torch.float32, "defaults")
    mod = tgtfast.FusedLinearPTLoss()
    assert (mod.temperature, mod.reduction, mod.kd_weight, mod.ce_weight, mod.ignore_index, mod.chunk_size) == \
        (1.0, "batchmean", 1.0, 0.0, -100, None)


def test_module_and_state_dict():
    x, target = make(n=13)
    mod = tgtfast.FusedLinearPTLoss([0.5, 0.25], temperature=2.0, ce_weight=0.5, chunk_size=4)
    assert torch.equal(mod.state_dict()["coeffs"], torch.tensor([0.5, 0.25]))
    got = mod(x["hs"], x["ws"], x["ht"], x["wt"], target, student_bias=x["bs"], teacher_bias=x["bt"])
    want = tgtfast.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"], [0.5, 0.25], temperature=2.0,
                                       ce_weight=0.5, target=target, student_bias=x["bs"], teacher_bias=x["bt"])
    torch.testing.assert_close(got, want)
    assert "ce_weight=0.5" in repr(mod)


def test_teacher_gets_no_gradient_and_grad_output_scaling():
    x, _ = make(n=10)
    wt = x["wt"].clone().requires_grad_(True)
    ht = x["ht"].clone().requires_grad_(True)
    hs = x["hs"].clone().requires_grad_(True)
    loss = tgtfast.fused_linear_ptloss(hs, x["ws"], ht, wt)
    assert loss.requires_grad
    loss.backward(torch.tensor(3.0), retain_graph=True)
    assert wt.grad is None and ht.grad is None
    g3 = hs.grad.clone()
    hs.grad = None
    loss.backward()
    torch.testing.assert_close(g3, 3 * hs.grad)


def test_no_grad_and_frozen_weight():
    x, _ = make(n=10)
    with torch.no_grad():
        loss = tgtfast.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"])
    assert not loss.requires_grad
    hs = x["hs"].clone().requires_grad_(True)
    out = tgtfast.fused_linear_ptloss(hs, x["ws"], x["ht"], x["wt"])  # weight frozen: only the hidden states
    out.backward()
    want = fused_linear_oracle(x["hs"], x["ws"], x["ht"], x["wt"], grad_output=1.0)[1]
    assert_close64(hs.grad, want, torch.float32, "grad hidden")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    x, target = make(n=29, h=32, ht=24, v=300, dtype=dtype)
    target[::5] = -100
    kw = dict(target=target, temperature=1.5, ce_weight=0.3, chunk_size=8, backend=backend)
    got = check_against_oracle(x, dtype, [0.5, -0.1], **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    # Logits are float32 all the way: the loss matches the float64 truth to float32 accuracy (not to bf16's),
    # and every gradient to one rounding to the input dtype.
    kw.pop("chunk_size"), kw.pop("backend")
    truth = oracle(x, [0.5, -0.1], **kw)
    assert abs(float(got[0]) - float(truth[0])) <= 1e-5 * (1 + abs(float(truth[0])))
    eps = torch.finfo(dtype).eps
    for what, a, b in zip(("grad hidden", "grad weight", "grad bias"), got[1:], truth[1:]):
        err = (a.double() - b).abs()
        assert bool((err <= eps * b.abs() + ATOL[dtype] * b.abs().max()).all()), (what, err.max())


def test_mixed_teacher_dtype():
    x, target = make(n=12)
    x["ht"], x["wt"], x["bt"] = (t.to(torch.bfloat16) for t in (x["ht"], x["wt"], x["bt"]))
    got = run(tgtfast.fused_linear_ptloss, x, [0.2], target=target, chunk_size=5)
    want = oracle(x, [0.2], target=target)
    for what, a, b in zip(("loss", "grad hidden", "grad weight", "grad bias"), got, want):
        assert_close64(a, b, torch.float32, what)


BAD = [
    (dict(ws=torch.randn(50, 15)), ValueError, "student_weight must be \\[V, H\\] with H = 16"),
    (dict(wt=torch.randn(50, 11)), ValueError, "teacher_weight must be \\[V, H_t\\] with H_t = 12"),
    (dict(wt=torch.randn(49, 12)), ValueError, "teacher_weight has V = 49 rows but student_weight has V = 50"),
    (dict(ht=torch.randn(36, 12)), ValueError, "teacher_hidden leading shape"),
    (dict(hs=torch.randn(37)), ValueError, "student_hidden must be 2-D or 3-D"),
    (dict(ws=torch.randn(50, 16, 1)), ValueError, "student_weight must be 2-D"),
    (dict(hs=torch.randint(0, 3, (37, 16))), TypeError, "student_hidden must be a floating tensor"),
    (dict(ws=torch.randn(50, 16, dtype=torch.float64)), TypeError, "student_weight dtype"),
    (dict(wt=[[1.0]]), TypeError, "teacher_weight must be a torch.Tensor"),
    (dict(bs=torch.randn(49)), ValueError, "student_bias must have shape \\[50\\]"),
    (dict(bt=torch.randn(50, 1)), ValueError, "teacher_bias must be 1-D"),
]


@pytest.mark.parametrize("change,exc,match", BAD)
def test_bad_tensors(change, exc, match):
    x, _ = make()
    x.update(change)
    with pytest.raises(exc, match=match):
        tgtfast.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"], student_bias=x["bs"],
                                    teacher_bias=x["bt"])


BAD_ARGS = [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=1e-45), ValueError, "temperature"),  # 1 / T overflows float32
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    (dict(ce_weight=0.5), ValueError, "ce_weight != 0 needs target"),
    (dict(ce_weight=-1.0), ValueError, "ce_weight must be in"),
    (dict(kd_weight=float("nan")), ValueError, "kd_weight must be in"),
    (dict(target=torch.zeros(36, dtype=torch.long)), ValueError, "target shape"),
    (dict(target=torch.zeros(37)), TypeError, "target must be an integer tensor"),
    (dict(target=torch.full((37,), 50), ce_weight=1.0), ValueError, "target holds class 50 outside \\[0, 50\\)"),
    (dict(coeffs=torch.ones(2, 49)), ValueError, "coeffs has K = 49"),
    (dict(backend="fast"), ValueError, "backend='fast' is not one of"),
]


@pytest.mark.parametrize("kw,exc,match", BAD_ARGS)
def test_bad_arguments(kw, exc, match):
    x, _ = make()
    with pytest.raises(exc, match=match):
        tgtfast.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"], **kw)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="coeffs must have shape"):
        tgtfast.FusedLinearPTLoss(torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="reduction"):
        tgtfast.FusedLinearPTLoss(reduction="mean_over_batch")
    with pytest.raises(ValueError, match="chunk_size"):
        tgtfast.FusedLinearPTLoss(chunk_size=-3)


@needs_backend("triton")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf in masked lanes of the interpreter's numpy
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_triton_backend(reduction):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    x, target = make(n=9, h=8, ht=6, v=24)
    target[2] = -1
    check_against_oracle(x, torch.float32, [0.5, -0.2], target=target, temperature=2.0, ce_weight=0.25,
                         reduction=reduction, chunk_size=4, ignore_index=-1, backend="triton")


@CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends(backend, dtype):
    if tgtfast.backends()[backend] != "available":
        pytest.skip(f"{backend} backend {tgtfast.backends()[backend]}")
    x, target = make(n=300, h=64, ht=48, v=1000, dtype=dtype, device="cuda")
    target[::7] = -1
    check_against_oracle(x, dtype, [0.5, -0.2], target=target, temperature=2.0, ce_weight=0.3, chunk_size=128,
                         ignore_index=-1, backend=backend)



def test_under_torch_compile():
    """The call is a graph break under torch.compile: the compiled caller gets the eager result."""
    x, target = make(n=12)
    target[:3] = -100

    def step(hs, ws, ht, wt):
        return tgtfast.fused_linear_ptloss(hs * 1.0, ws, ht, wt, [0.5], target=target, ce_weight=0.5,
                                           chunk_size=5) * 2

    hs = x["hs"].clone().requires_grad_(True)
    out = torch.compile(step, backend="eager")(hs, x["ws"], x["ht"], x["wt"])
    out.backward()
    ref = fused_linear_oracle(x["hs"], x["ws"], x["ht"], x["wt"], [0.5], target=target, ce_weight=0.5,
                              grad_output=1.0)
    assert_close64(out, 2 * ref[0], torch.float32, "loss")
    assert_close64(hs.grad, 2 * ref[1], torch.float32, "grad hidden")


def test_never_materialises_the_logits():
    """No tensor created during forward+backward is anywhere near [N, V]: only chunks of it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    n, h, v, chunk = 256, 16, 100, 8
    x, target = make(n=n, h=h, ht=h, v=v)
    hs = x["hs"].clone().requires_grad_(True)
    ws = x["ws"].clone().requires_grad_(True)
    with Largest():
        loss = tgtfast.fused_linear_ptloss(hs, ws, x["ht"], x["wt"], [0.5], target=target, ce_weight=0.5,
                                           chunk_size=chunk)
        loss.backward()
    assert Largest.largest <= max(n * h, v * h, chunk * v), Largest.largest
    assert Largest.largest < n * v // 4
