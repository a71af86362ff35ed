"""fused_linear_ptloss under torch.autocast and with mixed hidden/weight dtypes: the products run in the dtype
nn.Linear would use (the autocast dtype; the half dtype of half hidden states with a float32 weight), with float32
accumulation, and every gradient comes back in its input's dtype."""

import pytest
import torch

import tgtfast
from tgtfast import reference


def _inputs(n=9, h=6, v=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5,
            torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5,
            torch.randint(0, v, (n,), generator=g))


def _truth(hs, ws, ht, wt, dtype, **kw):
    """The materialised float64 loss and gradients on operands rounded to `dtype` first (what the products see)."""
    r = [x.detach().to(dtype).double().requires_grad_() for x in (hs, ws)]
    loss = reference.fused_linear_ptloss(r[0], r[1], ht.to(dtype).double(), wt.to(dtype).double(),
                                         torch.tensor([0.4], dtype=torch.float64), **kw)
    return (loss, *torch.autograd.grad(loss, r))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_half_hidden_states_with_float32_weights(half, backend):
    if tgtfast.backends("fused_linear_ptloss")[backend] != "available":
        pytest.skip(backend)
    hs, ws, ht, wt, target = _inputs()
    hs = hs.to(half).requires_grad_()
    ws = ws.requires_grad_()
    kw = dict(target=target, ce_weight=0.5, kd_weight=0.7, temperature=2.0)
    loss = tgtfast.fused_linear_ptloss(hs, ws, ht.to(half), wt, [0.4], chunk_size=4, backend=backend, **kw)
    loss.backward()
    assert hs.grad.dtype == half and ws.grad.dtype == torch.float32
    want, g_hs, g_ws = _truth(hs, ws, ht, wt, half, **kw)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hs.grad.double(), g_hs, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ws.grad.double(), g_ws, rtol=2e-3, atol=2e-4)


def test_autocast_runs_the_products_in_the_autocast_dtype():
    hs, ws, ht, wt, target = _inputs(seed=1)
    hs.requires_grad_()
    ws.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tgtfast.fused_linear_ptloss(hs, ws, ht, wt, [0.4], target=target, ce_weight=0.3, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32 and hs.grad.dtype == torch.float32 and ws.grad.dtype == torch.float32
    want, g_hs, g_ws = _truth(hs, ws, ht, wt, torch.bfloat16, target=target, ce_weight=0.3)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hs.grad.double(), g_hs, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ws.grad.double(), g_ws, rtol=2e-2, atol=2e-3)
    # and it differs from the float32 computation, as nn.Linear under autocast does
    plain = tgtfast.fused_linear_ptloss(hs.detach(), ws.detach(), ht, wt, [0.4], target=target, ce_weight=0.3)
    assert not torch.equal(plain, loss.detach())


def test_float64_with_float32_is_still_refused():
    hs, ws, ht, wt, _ = _inputs()
    with pytest.raises(TypeError, match="student_weight dtype"):
        tgtfast.fused_linear_ptloss(hs.double(), ws, ht, wt)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_ignored_rows_holding_nan_reach_no_gradient(reduction, ce_weight):
    """Padding rows (ignored) may hold NaN/inf hidden states: the loss and every gradient stay finite, and the
    ignored rows' own gradient is 0 (the weight gradient once was NaN: 0 * NaN in the weight product)."""
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(6, 5, generator=g)
    hs[2] = float("nan")
    hs.requires_grad_(True)
    ws = torch.randn(11, 5, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    ht, wt = torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g)
    ht[2] = float("inf")
    target = torch.tensor([1, 2, 7, 4, 5, 6])
    out = tgtfast.fused_linear_ptloss(hs, ws, ht, wt, [0.3], target=target, ignore_index=7, ce_weight=ce_weight,
                                      reduction=reduction, student_bias=bias, chunk_size=4)
    (out.sum() if reduction == "none" else out).backward()
    for x in (out, hs.grad, ws.grad, bias.grad):
        assert torch.isfinite(x).all()
    assert torch.equal(hs.grad[2], torch.zeros(5))
    # the same as dropping the row
    keep = torch.tensor([0, 1, 3, 4, 5])
    ws2 = ws.detach().clone().requires_grad_(True)
    ref = tgtfast.fused_linear_ptloss(hs.detach()[keep], ws2, ht[keep], wt, [0.3], target=target[keep],
                                      ce_weight=ce_weight, reduction=reduction, student_bias=bias.detach(),
                                      chunk_size=4)
    (ref.sum() if reduction == "none" else ref).backward()
    if reduction != "mean":
        torch.testing.assert_close(ws.grad, ws2.grad, rtol=1e-5, atol=1e-6)
