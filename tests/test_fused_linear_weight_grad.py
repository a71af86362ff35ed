"""The student weight's gradient of the fused linear losses for half-precision weights: held in the weight's dtype,
with no float32 ``[V, H]`` accumulator (tgtfast/losses/chunked.py, ``_WeightGrad``).

The rows' products are added a group of chunks at a time and the vocabulary a slab at a time; the tests shrink
both budgets so that a small problem crosses several groups and slabs, judge the result against the float64
oracle, and count the bytes the call holds at its peak with a dispatch mode that follows every tensor storage."""

from __future__ import annotations

import pytest
import torch

import tgtfast
from conftest import cpu_backends
from oracle import fused_linear_oracle
from tgtfast import reference
from tgtfast.bench.memory import LiveBytes
from tgtfast.losses import chunked


def _inputs(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h, generator=g).to(dtype)
    ws = (torch.randn(v, h, generator=g) * 0.6).to(dtype)
    ht = torch.randn(n, h, generator=g).to(dtype)
    wt = (torch.randn(v, h, generator=g) * 0.6).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[::7] = -100
    return hs, ws, ht, wt, target


def _grads(hs, ws, ht, wt, target, backend, **kw):
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = tgtfast.fused_linear_ptloss(h, w, ht, wt, [0.4, -0.1], target=target, ce_weight=0.3, backend=backend,
                                       **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groups_and_slabs_match_the_oracle(monkeypatch, backend, dtype):
    n, h, v, chunk = 61, 24, 300, 8
    hs, ws, ht, wt, target = _inputs(n, h, v, dtype)
    # 16 rows (2 chunks) per group -> 4 roundings of the result; slabs of 64 vocabulary rows
    monkeypatch.setattr(chunked, "_GROUP_BYTES", 16 * v * 4)
    monkeypatch.setattr(chunked, "_SLAB_BYTES", 64 * h * 4)
    loss, g_h, g_w = _grads(hs, ws, ht, wt, target, backend, chunk_size=chunk)
    assert g_w.dtype == dtype
    want = fused_linear_oracle(hs, ws, ht, wt, torch.tensor([0.4, -0.1]), target=target, ce_weight=0.3,
                               grad_output=1.0)
    truth = want[2]
    groups = -(-n // 16)
    eps = torch.finfo(dtype).eps
    err = (g_w.double() - truth).abs()
    # each group's sum is rounded once to the weight's dtype: at most `groups` roundings of partial sums no larger
    # than the sum of absolute contributions
    bound = groups * eps * _abs_contributions(hs, ws, ht, wt, target) + 1e-12
    assert bool((err <= bound).all()), float((err - bound).max())
    # not a rounding away from float32 accumulation: the same call with everything in one group
    monkeypatch.setattr(chunked, "_GROUP_BYTES", 1 << 30)
    one = _grads(hs, ws, ht, wt, target, backend, chunk_size=chunk)[2]
    assert float((one.double() - truth).abs().max()) <= float(err.max()) + eps * float(truth.abs().max())
    torch.testing.assert_close(g_h.double(), want[1], rtol=2 * eps, atol=2 * eps * float(want[1].abs().max()))


def _abs_contributions(hs, ws, ht, wt, target):
    """sum_r |G[r, v]| |h[r, k]| for the logit gradient G of the same loss in float64 (from the reference, with the
    logits as the weight of an identity input so that d loss / d weight = G^T): what a rounding of a partial sum of
    grad_W[v, k] can be proportional to."""
    h64 = hs.double()
    s64 = (h64 @ ws.double().T).T.contiguous().requires_grad_(True)
    loss = reference.fused_linear_ptloss(torch.eye(hs.shape[0], dtype=torch.float64), s64, ht.double(),
                                         wt.double(), torch.tensor([0.4, -0.1], dtype=torch.float64),
                                         target=target, ce_weight=0.3)
    (g_t,) = torch.autograd.grad(loss, s64)
    return g_t.abs() @ h64.abs()


def test_no_float32_weight_sized_accumulator(monkeypatch):
    """bf16 weights on the CPU: the peak holds the weight's float32 copy (the CPU path's GEMM operand), the bf16
    gradient, one group and one slab, and the chunk buffers; no float32 accumulator of the weight's size."""
    n, h, v, chunk = 256, 2048, 2048, 64
    hs, ws, ht, wt, target = _inputs(n, h, v, torch.bfloat16, seed=1)
    monkeypatch.setattr(chunked, "_GROUP_BYTES", 128 * v * 4)  # 2 chunks (the default would take every row)
    monkeypatch.setattr(chunked, "_SLAB_BYTES", 256 * h * 4)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    tgtfast.fused_linear_ptloss(hs, ws, ht, wt, target=target, chunk_size=chunk, backend="reference").backward()
    hs.grad = ws.grad = None
    mode = LiveBytes()
    with mode:
        loss = tgtfast.fused_linear_ptloss(hs, ws, ht, wt, target=target, chunk_size=chunk, backend="reference")
        loss.backward()
    f32_weight = v * h * 4
    group, _ = chunked.weight_grad_plan(v, h, n, chunk, torch.bfloat16, torch.float32, torch.float32)
    assert group == 128  # two chunks: several groups
    expected = (2 * f32_weight  # the float32 copies of both weights (CPU path)
                + v * h * 2  # the bf16 weight gradient
                + group * (v + h) * 4 + 256 * h * 4  # one group of logit gradients and hidden rows, one slab
                + 2 * chunk * v * 4 + n * h * 2)  # the chunk's logits buffers, the hidden-state gradient
    slack = 12 * chunk * v * 4 + (1 << 20)  # the reference row loss's temporaries, bias, bookkeeping
    assert mode.peak <= expected + slack, (mode.peak, expected)
    assert mode.peak < expected + f32_weight  # a float32 accumulator would add the weight's size again
