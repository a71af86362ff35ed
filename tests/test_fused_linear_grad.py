"""Gradients of fused_linear_ptloss under non-uniform incoming gradients.

reduction="none" computes the gradients in backward, in a second sweep over the chunks, with each row's own
incoming gradient. A uniform incoming gradient (what every other test backpropagates) cannot tell a per-row scale
taken from the wrong rows, or a kd_weight left out of the per-row scale, from the right answer: these tests
use float64 gradcheck (one backward per output row) and random per-row incoming gradients, with kd_weight != 1,
a cross-entropy term, chunk sizes that do not divide N, with and without bias, against the float64 oracle and
against autograd through tgtfast.reference.fused_linear_ptloss.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from oracle import assert_close64, fused_linear_oracle

import tgtfast
from tgtfast import reference

N, H, HT, V = 7, 5, 4, 11
IGNORE = -1


def make(bias, seed=0, lead=(N,)):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    bs = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    ht = torch.randn(*lead, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, HT, generator=g, dtype=torch.float64) * 0.7
    bt = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, V, lead, generator=g)
    target.view(-1)[[1, 4]] = IGNORE  # two ignored rows, in different chunks of 3
    return hs, ws, bs, ht, wt, bt, target


COEFFS = {"none": None, "shared": [0.5, -0.3], "per_class": "per_class"}


def coeffs_of(name):
    c = COEFFS[name]
    if c == "per_class":
        return torch.linspace(-0.5, 1.0, 2 * V, dtype=torch.float64).reshape(2, V)
    return None if c is None else torch.tensor(c, dtype=torch.float64)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size,coeffs", [(3, "shared"), (2, "per_class"), (7, "none")])
def test_gradcheck_reduction_none(backend, bias, chunk_size, coeffs):
    hs, ws, bs, ht, wt, bt, target = make(bias)
    eta = coeffs_of(coeffs)
    inputs = (hs.requires_grad_(True), ws.requires_grad_(True)) + ((bs.requires_grad_(True),) if bias else ())

    def fn(h, w, *b):
        return tgtfast.fused_linear_ptloss(h, w, ht, wt, eta, student_bias=b[0] if b else None, teacher_bias=bt,
                                           target=target, ignore_index=IGNORE, reduction="none", kd_weight=0.7,
                                           ce_weight=0.3, temperature=1.7, chunk_size=chunk_size, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size,kd_weight,ce_weight", [(3, 0.7, 0.3), (4, 0.7, 0.0), (3, 1.0, 0.5), (4, 0.0, 1.0),
                                                             (3, 2.5, 0.0)])
def test_random_per_row_incoming_gradient(backend, bias, chunk_size, kd_weight, ce_weight):
    """loss.backward(g) with a random per-row g equals sum_i g_i dL_i/dtheta of the oracle and of autograd
    through the materialised reference."""
    hs, ws, bs, ht, wt, bt, target = make(bias, seed=1)
    eta = torch.tensor([0.8, -0.4, 0.3], dtype=torch.float64)
    kw = dict(teacher_bias=bt, target=target, ignore_index=IGNORE, reduction="none", kd_weight=kd_weight,
              ce_weight=ce_weight, temperature=1.3)
    g_out = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    leaves = [x.detach().clone().requires_grad_(True) for x in (hs, ws) + ((bs,) if bias else ())]
    out = tgtfast.fused_linear_ptloss(leaves[0], leaves[1], ht, wt, eta, student_bias=leaves[2] if bias else None,
                                      chunk_size=chunk_size, backend=backend, **kw)
    out.backward(g_out)
    got = [x.grad for x in leaves]

    truth = fused_linear_oracle(hs, ws, ht, wt, eta, student_bias=bs, grad_output=g_out, **kw)
    assert_close64(out, truth[0], torch.float64, "loss rows")
    for what, a, b in zip(("grad hidden", "grad weight", "grad bias"), got, truth[1:]):
        assert_close64(a, b, torch.float64, what)

    ref_leaves = [x.detach().clone().requires_grad_(True) for x in (hs, ws) + ((bs,) if bias else ())]
    ref = reference.fused_linear_ptloss(ref_leaves[0], ref_leaves[1], ht, wt, eta,
                                        student_bias=ref_leaves[2] if bias else None, **kw)
    ref.backward(g_out)
    for what, a, b in zip(("grad hidden", "grad weight", "grad bias"), got, [x.grad for x in ref_leaves]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=what)
    # ignored rows: no gradient into their hidden states, whatever their incoming gradient
    assert bool((got[0][[1, 4]] == 0).all())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_gradcheck_reduced(backend, reduction):
    hs, ws, bs, ht, wt, bt, target = make(True, seed=3)
    eta = coeffs_of("shared")

    def fn(h, w, b):
        return tgtfast.fused_linear_ptloss(h, w, ht, wt, eta, student_bias=b, teacher_bias=bt, target=target,
                                           ignore_index=IGNORE, reduction=reduction, kd_weight=0.7, ce_weight=0.3,
                                           chunk_size=3, backend=backend) * 1.9

    assert torch.autograd.gradcheck(fn, (hs.requires_grad_(True), ws.requires_grad_(True), bs.requires_grad_(True)),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_three_d_random_incoming_gradient(backend):
    """[B, L, H] hidden states: the incoming gradient [B, L] is flattened in the same row order as the loss."""
    hs, ws, bs, ht, wt, bt, target = make(True, seed=4, lead=(2, 5))
    target[1, 3] = IGNORE
    eta = coeffs_of("shared")
    kw = dict(teacher_bias=bt, target=target, ignore_index=IGNORE, reduction="none", kd_weight=0.6, ce_weight=0.2)
    g_out = torch.randn(2, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h, w, b = (x.detach().clone().requires_grad_(True) for x in (hs, ws, bs))
    out = tgtfast.fused_linear_ptloss(h, w, ht, wt, eta, student_bias=b, chunk_size=3, backend=backend, **kw)
    out.backward(g_out)
    truth = fused_linear_oracle(hs, ws, ht, wt, eta, student_bias=bs, grad_output=g_out, **kw)
    assert_close64(out, truth[0], torch.float64, "loss rows")
    for what, a, c in zip(("grad hidden", "grad weight", "grad bias"), (h.grad, w.grad, b.grad), truth[1:]):
        assert_close64(a, c, torch.float64, what)


@pytest.mark.parametrize("backend", cpu_backends())
def test_float32_random_incoming_gradient(backend):
    hs, ws, bs, ht, wt, bt, target = make(True, seed=6)
    eta = coeffs_of("per_class")
    kw = dict(target=target, ignore_index=IGNORE, reduction="none", kd_weight=0.7, ce_weight=0.3, temperature=0.8)
    g_out = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    h, w, b = (x.detach().float().clone().requires_grad_(True) for x in (hs, ws, bs))
    out = tgtfast.fused_linear_ptloss(h, w, ht.float(), wt.float(), eta.float(), student_bias=b,
                                      teacher_bias=bt.float(), chunk_size=3, backend=backend, **kw)
    out.backward(g_out.float())
    truth = fused_linear_oracle(h, w, ht.float(), wt.float(), eta.float(), student_bias=b, teacher_bias=bt.float(),
                                grad_output=g_out.float(), **kw)
    assert_close64(out, truth[0], torch.float32, "loss rows")
    for what, a, c in zip(("grad hidden", "grad weight", "grad bias"), (h.grad, w.grad, b.grad), truth[1:]):
        assert a.dtype == torch.float32
        assert_close64(a, c, torch.float32, what)


# ------------------------------------------------------------------------------------------------
# properties: random shapes, chunkings, reductions and ignore masks against the float64 oracle

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.mark.parametrize("backend", cpu_backends())
@settings(max_examples=40, derandomize=True, deadline=None)
@given(
    n=st.integers(1, 12), h=st.integers(1, 6), ht=st.integers(1, 5), v=st.integers(1, 15),
    chunk=st.integers(1, 14), reduction=st.sampled_from(["none", "sum", "mean", "batchmean"]),
    ignore_index=st.sampled_from([-100, -1, 0, 7]), ignore_frac=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    kd_weight=st.sampled_from([0.0, 0.7, 1.0, 2.5]), ce_weight=st.sampled_from([0.0, 0.3, 1.0]),
    temperature=st.sampled_from([0.3, 1.0, 4.0]), m=st.integers(0, 3), per_class=st.booleans(),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_property_matches_oracle(backend, n, h, ht, v, chunk, reduction, ignore_index, ignore_frac, kd_weight,
                                 ce_weight, temperature, m, per_class, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64)
    bs = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    hts = torch.randn(n, ht, generator=g, dtype=torch.float64)
    wt = torch.randn(v, ht, generator=g, dtype=torch.float64)
    bt = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    eta = (torch.rand((m, v) if per_class else (m,), generator=g, dtype=torch.float64) * 3 - 1) if m else None
    ignored = torch.rand(n, generator=g) < ignore_frac
    label = torch.randint(0, v, (n,), generator=g)
    label = torch.where(label == ignore_index, (label + 1) % v, label) if v > 1 else label
    if v == 1 and ignore_index == 0:
        ignored[:] = True  # the only class is the ignored label
    target = torch.where(ignored, torch.full((n,), ignore_index), label)
    kw = dict(teacher_bias=bt, target=target, ignore_index=ignore_index, reduction=reduction, kd_weight=kd_weight,
              ce_weight=ce_weight, temperature=temperature)
    g_out = torch.randn(n, generator=g, dtype=torch.float64)
    if reduction != "none":
        g_out = torch.tensor(1.7, dtype=torch.float64)
    leaves = [x.detach().clone().requires_grad_(True) for x in (hs, ws) + ((bs,) if bias else ())]
    out = tgtfast.fused_linear_ptloss(leaves[0], leaves[1], hts, wt, eta, student_bias=leaves[2] if bias else None,
                                      chunk_size=chunk, backend=backend, **kw)
    out.backward(g_out)
    truth = fused_linear_oracle(hs, ws, hts, wt, eta, student_bias=bs, grad_output=g_out, **kw)
    assert_close64(out, truth[0], torch.float64, "loss")
    for what, a, b in zip(("grad hidden", "grad weight", "grad bias"), [x.grad for x in leaves], truth[1:]):
        assert_close64(a, b, torch.float64, what)
    assert bool((leaves[0].grad[ignored] == 0).all())
