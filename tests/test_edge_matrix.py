"""The edge matrix of the fused ops, on every backend the device at hand runs, against float64 truths.

The same tests run on a CPU-only machine (backends ``cpp`` and ``reference``, and ``triton`` under the interpreter at
tiny shapes only) and on a GPU (backends ``cuda`` and ``triton``), so their logic is proven before the first GPU run.
Public entry points only: :func:`tgtfast.ptloss`, :func:`tgtfast.distill_loss` and
:func:`tgtfast.temperature_softmax`. The truths are independent float64 computations on the same (rounded) inputs:
``tests/oracle.py`` (PTLoss from the formulas of docs/design.md), autograd of ``tgtfast.reference.divergence_rows``
in float64 (the divergences, ``tests/test_divergence_cuda.py``'s oracle) and ``torch.softmax`` in float64.

The matrix: class counts 1, 2, 3, 4097 and 32001 on misaligned views (a storage offset that is not a multiple of
16 bytes, rows strided inside a wider buffer); ignored rows and batches where every row is ignored; teacher logits of
``-inf`` with the teacher's gradient requested; PTLoss orders M = 0, 32, 33 (the CUDA kernel takes at most 32, so
automatic selection must route M = 33 elsewhere); bfloat16 probability teachers whose rows do not sum to exactly 1;
a softmax row whose whole first 4096-wide chunk is ``-inf`` and a row that is all ``-inf``; plain KL rows never
reported below 0. On a GPU also: a non-default stream, a second device, and PTLoss at N = 16384, K = 131072 (2**31
elements per tensor, run in a child process so that an out-of-bounds kernel cannot break the rest of the suite).

Tolerances (``oracle.TOL`` via ``assert_close64``, and test_divergence_cuda's loss and gradient checks): losses
accumulate in float32 for float32 and bfloat16 inputs, so they get float32 tolerances; gradients are rounded to
their input's dtype and get a few units of that dtype.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, List, Optional, Tuple

import pytest
import torch
from conftest import assert_close_to_truth, cpu_backends
from oracle import assert_close64, ptloss_oracle
from test_divergence_cuda import assert_close_grad, assert_close_loss
from test_divergence_cuda import reference as divergence_oracle

import tgtfast
from tgtfast.dispatch import Backend, select
from tgtfast.ops.ptloss import CUDA_MAX_ORDERS
from tgtfast.reference import ptloss_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.bfloat16]
NEG_INF = float("-inf")
# The Triton interpreter computes inf - inf on masked lanes; the kernels discard those lanes.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")

# Public divergences checked here: (name, keyword arguments of distill_loss, kernel-order parameters a, b).
DIVERGENCES = [
    ("forward_kl", {}, 0.0, 0.0),
    ("jsd", {"beta": 0.5}, 0.5, 0.0),
    ("tvd", {}, 0.0, 0.0),
    ("ab_divergence", {"alpha": 0.5, "beta": 0.5}, 0.5, 0.5),
]
OPS = ["ptloss"] + [d[0] for d in DIVERGENCES]
COEFFS = [0.6, -0.3, 0.9]  # PTLoss coefficients eta (shared by all classes) of the cases that are not about M
TEMPERATURE = 1.5
DISPATCH_NAME = {"ptloss": "ptloss", "softmax": "temperature_softmax"}


def backends_for(op: str, k: int, rows: int) -> List[str]:
    """Backends of the dispatcher's op `op` ("ptloss", "divergence", "temperature_softmax") that run tensors of this
    device: cuda and triton on a GPU; cpp and reference on the CPU, plus triton (the interpreter, slow) when the
    call is tiny (K <= 64, at most 8 rows)."""
    avail = tgtfast.backends(op)
    if ON_GPU:
        names = ["cuda", "triton"]
    else:
        names = cpu_backends() + (["triton"] if k <= 64 and rows <= 8 else [])
    return [b for b in names if avail[b] == "available"]


def _dispatch_name(op: str) -> str:
    return DISPATCH_NAME.get(op, "divergence")


def _rows_for(k: int) -> int:
    """Rows per case: a few on the CPU for long rows (the float64 truths and the reference are eager), more on a GPU."""
    if ON_GPU:
        return 9 if k >= 4097 else 33
    return 3 if k >= 4097 else 5


def _matrix(ops: List[str], ks: Tuple[int, ...]) -> List:
    """pytest params (op, k, backend) over the backends that run each (op, K) on this device."""
    return [pytest.param(op, k, b, id=f"{op}-K{k}-{b}") for op in ops for k in ks
            for b in backends_for(_dispatch_name(op), k, _rows_for(k))]


def _logits(n: int, k: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    return s.to(DEVICE, dtype), t.to(DEVICE, dtype)


def _place(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf requiring grad that holds x's values in the given memory layout.

    "offset": contiguous, one element past the start of its storage (row starts not 16-byte aligned; reaches the
    kernels as it is). "slice": ``big[:, 1:K+1]`` of a ``[N, K + 3]`` buffer (storage offset one element, row stride
    K + 3). "contiguous": a plain copy."""
    n, k = x.shape
    if layout == "offset":
        out = torch.zeros(n * k + 1, dtype=x.dtype, device=x.device)[1:].view(n, k)
    elif layout == "slice":
        out = torch.zeros(n, k + 3, dtype=x.dtype, device=x.device)[:, 1 : k + 1]
    else:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out.copy_(x)
    return out.detach().requires_grad_(True)  # detach keeps the view's offset and strides


def _run(fn: Callable, s: torch.Tensor, t: torch.Tensor, **kw):
    """(loss, grad of s, grad of t) of ``fn(s, t, **kw)`` with ``(loss.sum() * 2).backward()`` on the given leaves
    (their layouts kept, unlike conftest.run_loss, which copies)."""
    loss = fn(s, t, **kw)
    (loss.sum() * 2).backward()
    return loss.detach(), s.grad, t.grad


def _ptloss(backend: Optional[str], coeffs=COEFFS, **kw) -> Callable:
    return lambda s, t, **more: tgtfast.ptloss(s, t, coeffs, backend=backend, **kw, **more)


def _distill(name: str, backend: Optional[str], **kw) -> Callable:
    params = next(d[1] for d in DIVERGENCES if d[0] == name)
    return lambda s, t, **more: tgtfast.distill_loss(s, t, name, **params, backend=backend, **kw, **more)


def check_ptloss(out, s, t, coeffs=COEFFS, what="", **kw) -> None:
    """Loss and both gradients (of 2 * loss) of tgtfast.ptloss against tests/oracle.py's float64 truth."""
    loss, gs, gt = out
    c = None if coeffs is None else torch.as_tensor(coeffs, dtype=torch.float32)  # the accumulation dtype
    truth = ptloss_oracle(s, t, c, grad_output=2.0, **kw)
    assert loss.dtype == torch.float32 and loss.shape == truth[0].shape
    assert_close64(loss, truth[0], torch.float32, f"{what} loss")
    assert_close64(gs, truth[1], s.dtype, f"{what} grad student")
    if gt is not None:
        assert_close64(gt, truth[2], t.dtype, f"{what} grad teacher")


def check_distill(out, s, t, name: str, temperature: float = TEMPERATURE, target=None, reduction="batchmean") -> None:
    """Loss and both gradients (of 2 * loss) of tgtfast.distill_loss against autograd of the float64 reference."""
    loss, gs, gt = out
    a, b = next(d[2:] for d in DIVERGENCES if d[0] == name)
    valid = None if target is None else (target != -100).reshape(-1).cpu()
    count = s.shape[0] if valid is None else int(valid.sum())
    weight = 2.0 / max(count, 1) if reduction in ("mean", "batchmean") else 2.0
    scale = 1.0 / temperature
    rows, ts, tt = divergence_oracle(s, t, (name, a, b), valid, scales=(scale, scale), grad_scale=weight)
    truth = rows if reduction == "none" else rows.sum() / (max(count, 1) if reduction != "sum" else 1)
    assert_close_loss(loss.cpu(), truth)
    assert_close_grad(gs.cpu(), ts, s.dtype, f"{name} grad student")
    if gt is not None:
        assert_close_grad(gt.cpu(), tt, t.dtype, f"{name} grad teacher")


def run_and_check(op: str, backend: Optional[str], s, t, *, target=None, reduction="batchmean", **kw):
    """Run `op` ("ptloss" or a divergence name) on the leaves s, t and judge it; returns (loss, grad s, grad t)."""
    if op == "ptloss":
        out = _run(_ptloss(backend, temperature=TEMPERATURE, **kw), s, t, target=target, reduction=reduction)
        check_ptloss(out, s.detach(), t.detach(), temperature=TEMPERATURE, target=target, reduction=reduction,
                     what=f"{backend}", **kw)
    else:
        out = _run(_distill(op, backend, temperature=TEMPERATURE, **kw), s, t, target=target, reduction=reduction)
        check_distill(out, s.detach(), t.detach(), op, target=target, reduction=reduction)
    return out


# ------------------------------------------------------------------------------------------------------------------
# 1. Class counts from 1 to 32001 on misaligned views


def _views_matrix() -> List:
    """(op, k, backend, dtype, layout) for the views test: every combination on a GPU; on the CPU the long rows
    (K >= 4097) take float32 with the contiguous offset view and bfloat16 with the strided slice only."""
    params = []
    for op, k, b in ((p.values[0], p.values[1], p.values[2]) for p in _matrix(OPS, (1, 2, 3, 4097, 32001))):
        for dtype in DTYPES:
            for layout in ("offset", "slice"):
                if not ON_GPU and k >= 4097 and (dtype == torch.float32) != (layout == "offset"):
                    continue
                params.append(pytest.param(op, k, b, dtype, layout, id=f"{op}-K{k}-{b}-{str(dtype)[6:]}-{layout}"))
    return params


@pytest.mark.parametrize("op,k,backend,dtype,layout", _views_matrix())
def test_class_counts_on_misaligned_views(op, k, backend, dtype, layout):
    """PTLoss and four divergences at K = 1, 2, 3, 4097, 32001 on inputs whose storage offset is one element (not a
    multiple of 16 bytes), contiguous ("offset") or rows strided in a wider buffer ("slice"): loss, student and
    teacher gradients match the float64 truth, and the gradients come back in the inputs' shape and dtype."""
    n = _rows_for(k)
    s0, t0 = _logits(n, k, dtype, seed=k)
    s, t = _place(s0, layout), _place(t0, layout)
    assert s.storage_offset() == 1 and s.is_contiguous() == (layout == "offset")
    loss, gs, gt = run_and_check(op, backend, s, t)
    assert gs.shape == (n, k) and gs.dtype == dtype and gt.shape == (n, k) and gt.dtype == dtype
    assert torch.isfinite(loss).all()


# ------------------------------------------------------------------------------------------------------------------
# 2. Ignored rows


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("op,k,backend", _matrix(OPS, (3, 4097)))
def test_ignored_rows_are_not_read(op, k, backend, reduction):
    """Rows whose target is -100 hold NaN and +inf: they get loss 0 and gradient 0, the other rows match the
    float64 truth, and the mean divides by the rows kept."""
    n = _rows_for(k)
    s, t = _logits(n, k, torch.float32, seed=k + 1)
    target = torch.arange(n, device=DEVICE) % k
    target[1] = target[n - 1] = -100
    s[1], t[n - 1] = float("nan"), float("inf")
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    loss, gs, gt = run_and_check(op, backend, s, t, target=target, reduction=reduction)
    ignored = target == -100
    assert bool((gs[ignored] == 0).all()) and bool((gt[ignored] == 0).all())
    if reduction == "none":
        assert bool((loss[ignored] == 0).all())


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("op,k,backend", _matrix(OPS, (3, 4097)))
def test_all_rows_ignored(op, k, backend, reduction):
    """Every row ignored (and holding NaN): the loss is 0 (the mean of no rows is 0, docs/design.md), both gradients
    are 0, nothing is NaN."""
    n = _rows_for(k)
    s, t = _logits(n, k, torch.float32, seed=k + 2)
    s[0, 0] = t[-1, -1] = float("nan")
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    target = torch.full((n,), -100, device=DEVICE)
    loss, gs, gt = run_and_check(op, backend, s, t, target=target, reduction=reduction)
    assert bool((loss == 0).all()) and loss.shape == ((n,) if reduction == "none" else ())
    assert bool((gs == 0).all()) and bool((gt == 0).all())


# ------------------------------------------------------------------------------------------------------------------
# 3. Teacher logits of -inf with the teacher's gradient requested


def _teacher_without_mass(n: int, k: int, dtype: torch.dtype, seed: int):
    """Logits where the teacher gives some classes no mass: every third class, the whole first half of row 1 (for
    K = 4097 its whole first 4096-wide chunk) and all classes of row 2 but the last (a one-hot teacher)."""
    s, t = _logits(n, k, dtype, seed)
    t[:, ::3] = NEG_INF
    t[1, : max(k // 2, 1) if k < 4097 else 4096] = NEG_INF
    t[2, :-1] = NEG_INF
    return s, t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,k,backend", _matrix(OPS, (3, 4097)))
def test_teacher_minus_inf_with_teacher_gradient(op, k, backend, dtype):
    """Teacher logits of -inf (classes without mass) with the teacher requiring grad: rows stay finite, loss and
    both gradients match the float64 truth, and the teacher's gradient at a -inf logit is exactly 0."""
    n = _rows_for(k)
    s, t = _teacher_without_mass(n, k, dtype, seed=k + 3)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    loss, gs, gt = run_and_check(op, backend, s, t)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert bool((gt[t.detach() == NEG_INF] == 0).all())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("op,k,backend", _matrix(["ptloss"], (3, 4097)))
def test_ptloss_absent_classes_and_smoothing(op, k, backend, label_smoothing):
    """PTLoss with -inf teacher logits, smoothed or not; without smoothing the student is also -inf on one class the
    teacher gives no mass (an absent class, finite by docs/design.md "Conventions"). Loss and both gradients match
    the oracle, no NaN, and the teacher's gradient at a -inf logit is 0 (the xlogy convention)."""
    n = _rows_for(k)
    s, t = _teacher_without_mass(n, k, torch.float32, seed=k + 4)
    if label_smoothing == 0:
        s[0, 0] = NEG_INF  # t[0, 0] is -inf too
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    loss, gs, gt = run_and_check(op, backend, s, t, label_smoothing=label_smoothing)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert bool((gt[t.detach() == NEG_INF] == 0).all())


# ------------------------------------------------------------------------------------------------------------------
# 4. PTLoss orders M = 0, 32, 33


def _coeffs(m: int, k: int, per_class: bool) -> Optional[torch.Tensor]:
    if m == 0:
        return None
    g = torch.Generator().manual_seed(m)
    shape = (m, k) if per_class else (m,)
    return (torch.rand(shape, generator=g) * 0.4 - 0.1).to(DEVICE)


@pytest.mark.parametrize("m,per_class", [(0, False)] + [(m, c) for m in (CUDA_MAX_ORDERS, CUDA_MAX_ORDERS + 1)
                                                          for c in (False, True)])
@pytest.mark.parametrize("op,k,backend", _matrix(["ptloss"], (37, 4097)))
def test_ptloss_orders(op, k, backend, m, per_class):
    """PTLoss with M = 0, 32 and 33 orders, shared or per class, against the oracle; a forced backend whose kernels
    cannot take M (CUDA beyond 32) is a ValueError naming the orders, never a wrong number."""
    n = _rows_for(k)
    s, t = _logits(n, k, torch.float32, seed=m + k, scale=1.5)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    coeffs = _coeffs(m, k, per_class)
    if backend == "cuda" and m > CUDA_MAX_ORDERS:
        with pytest.raises(ValueError, match="orders"):
            tgtfast.ptloss(s, t, coeffs, backend=backend)
        return
    out = _run(_ptloss(backend, coeffs, temperature=TEMPERATURE), s, t)
    check_ptloss(out, s.detach(), t.detach(), None if coeffs is None else coeffs.cpu(), temperature=TEMPERATURE,
                 what=f"{backend} M={m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [CUDA_MAX_ORDERS, CUDA_MAX_ORDERS + 1])
def test_ptloss_automatic_backend_routes_around_the_order_limit(m, dtype):
    """backend=None with M = 32 and 33 on this device: the dispatcher never picks a backend whose kernels refuse
    the call (CUDA beyond 32 orders), and the result matches the oracle."""
    k = 4097
    n = _rows_for(k)
    chosen = select(None, torch.device(DEVICE), dtype, op="ptloss", orders=m)
    if m > CUDA_MAX_ORDERS:
        assert chosen is not Backend.CUDA
    s, t = _logits(n, k, dtype, seed=m, scale=1.5)
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    coeffs = _coeffs(m, k, per_class=True)
    out = _run(_ptloss(None, coeffs, temperature=TEMPERATURE), s, t)
    check_ptloss(out, s.detach(), t.detach(), coeffs.cpu(), temperature=TEMPERATURE, what=f"auto ({chosen.value})")


# ------------------------------------------------------------------------------------------------------------------
# 5. bfloat16 probability teachers whose rows do not sum to exactly 1

# docs/design.md ("PTLoss"): the student gradient of given probabilities is that of L as written, with q sum(p) - p
# in the place of q - p (a bfloat16 row sums to 1 only up to rounding; the API accepts |sum - 1| <= 2e-2 in half
# precision, judged in the teacher's own dtype), on every backend; and plain KL rows are clamped at 0 in value
# ("Range").


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("k,backend", [pytest.param(k, b, id=f"K{k}-{b}") for k in (5, 4097)
                                       for b in backends_for("ptloss", k, _rows_for(k))])
def test_bf16_probability_teacher_gradient_contract(k, backend, label_smoothing):
    """bfloat16 teacher probabilities (rounded from a confident float64 softmax, rows summing to 1 +- ~1e-3) and a
    bfloat16 student close to the teacher (a trained student, where q - p is small and the sum(p) - 1 term shows):
    every backend follows one contract, docs/design.md's (plain KD, smoothed or not): each row's loss as written,
    clamped at 0 in value (a row summing below 1 can dip under 0), dL/ds with q sum(p) - p,
    dL/dp0 = (1 - delta) (g + 1)."""
    n = _rows_for(k)
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    logits[:, 0] += 12.0  # a confident teacher: p_0 near 0.85-1, where bfloat16's step is 2**-8
    p64 = torch.softmax(logits, -1)
    t = p64.to(torch.bfloat16)
    off = (t.double().sum(-1) - 1).abs()
    assert float(off.max()) > 5e-4 and float(off.max()) < 2e-2  # accepted by the API, visibly not normalised
    near = ((1 - label_smoothing) * p64 + label_smoothing / k).log()  # the student's optimum
    s = (near + 0.02 * torch.randn(n, k, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    s, t = s.to(DEVICE).requires_grad_(True), t.to(DEVICE).requires_grad_(True)
    kw = dict(temperature=1.0, teacher_is_logits=False, label_smoothing=label_smoothing)
    loss, gs, gt = _run(_ptloss(backend, None, reduction="none", **kw), s, t)
    s, t = s.detach().cpu(), t.detach().cpu()
    truth = ptloss_oracle(s, t, None, reduction="none", grad_output=2.0, **kw)
    same_dtype = ptloss_rows(s.float(), t.float(), **kw).clamp_min(0)  # float32 torch, the kernels' accumulation
    assert_close_to_truth(loss.cpu(), same_dtype, truth[0].clamp_min(0), torch.float32, f"{backend} loss rows")
    assert_close64(gs, truth[1], torch.bfloat16, f"{backend} grad student")
    assert_close64(gt, truth[2], torch.bfloat16, f"{backend} grad teacher")


@pytest.mark.parametrize("op,k,backend", _matrix(["ptloss", "forward_kl"], (7, 300)))
def test_plain_kl_rows_are_never_negative(op, k, backend):
    """Plain KL (PTLoss without coefficients, and distill_loss's forward_kl) of a student almost equal to its teacher
    at T = 0.05, where float32 cancellation puts computed rows just under 0: no backend reports a negative row
    (docs/design.md, "Range"), and every row is within float32 accuracy of the float64 truth."""
    n = _rows_for(k) * 8
    g = torch.Generator().manual_seed(k)
    s = torch.randn(n, k, generator=g) * 5
    t = s + 1e-6 * torch.randn(n, k, generator=g)
    s, t = s.to(DEVICE), t.to(DEVICE)
    if op == "ptloss":
        rows = tgtfast.ptloss(s, t, None, temperature=0.05, reduction="none", backend=backend)
        truth = ptloss_oracle(s, t, None, temperature=0.05, reduction="none")[0]
        same_dtype = ptloss_rows(s.cpu(), t.cpu(), temperature=0.05).clamp_min(0)
    else:
        rows = tgtfast.distill_loss(s, t, op, temperature=0.05, reduction="none", backend=backend)
        truth = divergence_oracle(s, t, (op, 0.0, 0.0), scales=(20.0, 20.0))[0]
        same_dtype = torch.nn.functional.kl_div(torch.log_softmax(s.cpu() / 0.05, -1),
                                                torch.log_softmax(t.cpu() / 0.05, -1), reduction="none",
                                                log_target=True).sum(-1).clamp_min(0)
    assert bool((rows >= 0).all()), f"{op} {backend}: {int((rows < 0).sum())} of {n} rows below 0, min {rows.min()}"
    assert_close_to_truth(rows.cpu(), same_dtype, truth, torch.float32, f"{op} {backend} rows")


# ------------------------------------------------------------------------------------------------------------------
# 6. temperature_softmax with -inf chunks


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,k,backend", _matrix(["softmax"], (5, 8193)))
def test_softmax_minus_inf_chunks(op, k, backend, dtype, temperature):
    """Rows: the first 4097 entries -inf (K = 8193: the whole first 4096-wide chunk and one more; K = 5: all but
    the last), all -inf, ordinary, and -inf but for the last entry. Output and gradient match float64
    torch.softmax and its autograd: NaN exactly in the all -inf row (as torch.softmax gives), 0 at every -inf entry,
    nothing leaking into the other rows."""
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(4, k, generator=g, dtype=torch.float64) * 3).to(dtype)
    x[0, : min(4097, k - 1)] = NEG_INF
    x[1] = NEG_INF
    x[3, :-1] = NEG_INF
    x = x.to(DEVICE).requires_grad_(True)
    w = torch.randn(4, k, generator=g, dtype=torch.float64)
    y = tgtfast.temperature_softmax(x, temperature, backend=backend)
    (y * w.to(DEVICE, dtype)).sum().backward()
    x64 = x.detach().cpu().double().requires_grad_(True)
    want = torch.softmax(x64 / temperature, -1)
    (want * w.to(dtype).double()).sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    for got, truth, what in ((y.detach(), want.detach(), "softmax"), (x.grad, x64.grad, "gradient")):
        got = got.cpu()
        nan = truth.isnan()
        assert torch.equal(got.isnan(), nan), f"{what}: NaN where torch.softmax has {int(nan.sum())} NaN"
        assert_close64(got[~nan], truth[~nan], dtype, f"{backend} {what}")
    assert bool((y.detach()[x.detach() == NEG_INF].nan_to_num(0.0) == 0).all())
    assert bool((y.detach()[0] >= 0).all()) and abs(float(y.detach()[0].double().sum()) - 1) < 1e-2


# ------------------------------------------------------------------------------------------------------------------
# 7. GPU only: a non-default stream, a second device

STREAM_OPS = ["ptloss", "forward_kl", "softmax"]


def _call(op: str, backend: str, s: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
    """Outputs of one op call and its backward (fresh leaves from s, t): what must not depend on the stream."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    if op == "softmax":
        y = tgtfast.temperature_softmax(s, TEMPERATURE, backend=backend)
        (y * t).sum().backward()
        return [y.detach(), s.grad]
    fn = _ptloss(backend, temperature=TEMPERATURE) if op == "ptloss" else _distill(op, backend, temperature=TEMPERATURE)
    loss = fn(s, t, reduction="none")
    (loss * 2).sum().backward()
    return [loss.detach(), s.grad, t.grad]


def _gpu_matrix(ops: List[str]) -> List:
    return [pytest.param(op, b, id=f"{op}-{b}") for op in ops for b in backends_for(_dispatch_name(op), 5000, 64)]


@requires_gpu
@pytest.mark.parametrize("op,backend", _gpu_matrix(STREAM_OPS))
def test_non_default_stream(op, backend):
    """Each op on a side stream whose inputs are written there behind a long sleep: a kernel launched on another
    stream would read the NaN the buffers held before; the results equal those of the default stream."""
    s0, t0 = _logits(64, 5000, torch.float32, seed=7)
    expected = _call(op, backend, s0, t0)
    s_buf, t_buf = torch.full_like(s0, float("nan")), torch.full_like(t0, float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    assert side != torch.cuda.current_stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of work queued ahead on the side stream only
        s_buf.copy_(s0)
        t_buf.copy_(t0)
        got = [x.clone() for x in _call(op, backend, s_buf, t_buf)]
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b, what in zip(got, expected, ("output", "grad student", "grad teacher")):
        assert torch.equal(a, b), f"{op} {backend} {what}: side stream differs (max {(a - b).abs().max().item()})"


@requires_gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("op,backend", _gpu_matrix(STREAM_OPS))
def test_second_device_while_first_is_current(op, backend):
    """Tensors on cuda:1 while cuda:0 is the current device: results match the float64 truth (a kernel launched on
    the current device, or on its stream, would fail or read the wrong memory)."""
    torch.cuda.set_device(0)
    s, t = (x.to("cuda:1") for x in _logits(16, 5000, torch.float32, seed=8))
    out = _call(op, backend, s, t)
    assert torch.cuda.current_device() == 0 and all(x.device == torch.device("cuda:1") for x in out)
    s, t = s.cpu(), t.cpu()
    if op == "softmax":
        x64 = s.double().requires_grad_(True)
        want = torch.softmax(x64 / TEMPERATURE, -1)
        (want * t.double()).sum().backward()
        assert_close64(out[0], want, torch.float32, "softmax")
        assert_close64(out[1], x64.grad, torch.float32, "softmax gradient")
    elif op == "ptloss":
        check_ptloss(out, s, t, temperature=TEMPERATURE, reduction="none", what=backend)
    else:
        check_distill(out, s, t, op, reduction="none")


# ------------------------------------------------------------------------------------------------------------------
# 8. GPU only: PTLoss at N = 16384, K = 131072 (2**31 elements per tensor)

BIG_N, BIG_K = 16384, 131072


def big_ptloss_check(backend: str, dtype_name: str, n: int = BIG_N, k: int = BIG_K, device: str = "cuda") -> None:
    """PTLoss on [n, k] logits (by default [16384, 131072] on the GPU) of `dtype_name` with `backend`: every row's
    loss finite, and the last row's loss and student gradient equal to a float64 computation of that row alone.
    Raises AssertionError otherwise."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device).manual_seed(0)
    s = torch.randn(n, k, device=device, dtype=dtype, generator=gen).mul_(3).requires_grad_(True)
    t = torch.randn(n, k, device=device, dtype=dtype, generator=gen).mul_(3)
    rows = tgtfast.ptloss(s, t, COEFFS, temperature=2.0, reduction="none", backend=backend)
    rows.sum().backward()  # each row's gradient is that of its own loss (copy-free)
    assert bool(torch.isfinite(rows).all()), f"{int((~torch.isfinite(rows)).sum())} rows not finite"
    loss64, gs64, _ = ptloss_oracle(s.detach()[-1:].cpu(), t[-1:].cpu(), torch.tensor(COEFFS, dtype=torch.float32),
                                    temperature=2.0, reduction="none", grad_output=1.0)
    assert_close64(rows[-1:].detach(), loss64, torch.float32, f"{backend} {dtype_name} last row loss")
    assert_close64(s.grad[-1:], gs64, dtype, f"{backend} {dtype_name} last row grad student")
    assert bool(torch.isfinite(s.grad[0]).all()) and bool(torch.isfinite(s.grad[-1]).all())


def _gpu_bytes() -> int:
    return torch.cuda.get_device_properties(0).total_memory if ON_GPU else 0


@requires_gpu
@pytest.mark.skipif(_gpu_bytes() < 48 * 2**30, reason="needs a GPU with 48 GiB")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", backends_for("ptloss", BIG_K, BIG_N) if ON_GPU else ["cuda", "triton"])
def test_ptloss_two_to_the_31_elements(backend, dtype):
    """:func:`big_ptloss_check` (2**31 elements per tensor, past 32-bit element offsets) in a child process, so that
    a kernel writing out of bounds cannot leave this process's CUDA context broken for the rest of the suite."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import test_edge_matrix as m; "
            f"m.big_ptloss_check({backend!r}, {str(dtype)[6:]!r}); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=here)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-4000:]


@pytest.mark.parametrize("backend", backends_for("ptloss", 1000, 64))
def test_big_check_at_a_small_size(backend, monkeypatch):
    """The check the 2**31-element test runs in its child process, at [64, 1000] on this device: it passes on a
    correct backend, and a last row 1% off makes it fail."""
    big_ptloss_check(backend, "bfloat16", n=64, k=1000, device=DEVICE)
    fused, ramp = tgtfast.ptloss, torch.linspace(1, 1.01, 64, device=DEVICE)
    monkeypatch.setattr(tgtfast, "ptloss", lambda *a, **kw: fused(*a, **kw) * ramp)
    with pytest.raises(AssertionError, match="last row loss"):
        big_ptloss_check(backend, "bfloat16", n=64, k=1000, device=DEVICE)


def test_backends_for_lists_this_devices_backends():
    """The matrix's backend lists: only backends that run tensors of this device, none missing that is available."""
    avail = tgtfast.backends("ptloss")
    big, tiny = backends_for("ptloss", 4097, 3), backends_for("ptloss", 3, 3)
    if ON_GPU:
        assert set(big) == {b for b in ("cuda", "triton") if avail[b] == "available"} == set(tiny)
    else:
        assert set(big) == {b for b in ("cpp", "reference") if avail[b] == "available"}
        assert set(tiny) - set(big) == ({"triton"} if avail["triton"] == "available" else set())
