"""An independent float64 oracle for the distillation losses (tests only).

Written from the formulas of docs/design.md ("Conventions", "PTLoss", "Fused linear PTLoss"), not from
tgtfast.reference: explicit log-softmax, the loss as a sum of per-class terms, and the closed-form gradients

    dL/ds_k  = [ (q_k - p_k) + q_k (a_k - sum_j a_j q_j) ] / T,    a_j = -p_j h'_j
    dL/dt_k  = (1 - delta) p0_k (g_k - sum_j p0_j g_j) / T         (teacher logits)
    dL/dp0_k = (1 - delta) (g_k + 1)                                (teacher probabilities)

with g_j = log p_j - log q_j + h_j. Everything is computed in float64 (on the CPU) from the (already rounded)
inputs, so a backend is judged against the exact answer for the numbers it was given. Ignored rows are replaced by zeros
before any arithmetic (loss 0, gradient 0 whatever they hold).

Gradients returned are those of ``sum(grad_output * loss)`` for the reduced or per-row ``loss``, i.e. what
``(loss * grad_output).sum().backward()`` leaves in ``.grad``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "log_softmax64",
    "ptloss_rows64",
    "ptloss_oracle",
    "focal_oracle",
    "fused_linear_oracle",
    "closed_form_grads",
    "row_weights",
    "assert_close64",
    "TOL",
]


def log_softmax64(x: torch.Tensor) -> torch.Tensor:
    """log softmax over the last dimension, float64, by its definition x - max - log sum exp(x - max)."""
    x = x.double()
    m = x.max(-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z = x - m
    return z - torch.log(torch.exp(z).sum(-1, keepdim=True))


def _eta(coeffs, k: int) -> Optional[torch.Tensor]:
    if coeffs is None:
        return None
    eta = torch.as_tensor(coeffs, dtype=torch.float64).detach().double().cpu()
    if eta.numel() == 0:
        return None
    if eta.dim() == 1:
        eta = eta[:, None].expand(-1, k)
    return eta


def _parts(s, t, coeffs, temperature, teacher_is_logits, label_smoothing):
    """Per-row pieces of the PTLoss of [N, K] float64 inputs."""
    k = s.shape[-1]
    log_q = log_softmax64(s / temperature)
    q = torch.exp(log_q)
    if teacher_is_logits:
        log_p0 = log_softmax64(t / temperature)
        p0 = torch.exp(log_p0)
    else:
        p0 = t.double()
        log_p0 = torch.log(p0)
    delta = float(label_smoothing)
    if delta > 0:
        p = (1.0 - delta) * p0 + delta / k
        log_p = torch.log(p)
    else:
        p, log_p = p0, log_p0
    x = -torch.expm1(log_q)  # 1 - q, accurate near q = 1
    h = torch.zeros_like(q)
    hp = torch.zeros_like(q)
    eta = _eta(coeffs, k)
    if eta is not None:
        for m in range(1, eta.shape[0] + 1):
            h = h + eta[m - 1] * x**m
            hp = hp + m * eta[m - 1] * x ** (m - 1)
    return dict(q=q, log_q=log_q, p0=p0, p=p, log_p=log_p, h=h, hp=hp)


def ptloss_rows64(s, t, coeffs=None, *, temperature=1.0, teacher_is_logits=True, label_smoothing=0.0):
    """Per-row PTLoss [N] in float64 (0 log 0 = 0)."""
    d = _parts(s.double(), t.double(), coeffs, temperature, teacher_is_logits, label_smoothing)
    p = d["p"]
    zero = torch.zeros_like(p)
    kl = torch.where(p > 0, p * (d["log_p"] - d["log_q"]), zero)
    return (kl + torch.where(p > 0, p * d["h"], zero)).sum(-1)


def closed_form_grads(s, t, coeffs=None, temperature=1.0, label_smoothing=0.0, teacher_is_logits=True):
    """(dL_row/ds, dL_row/dt) of every row's own loss, float64, xlogy convention where p0 == 0."""
    d = _parts(s.double(), t.double(), coeffs, temperature, teacher_is_logits, label_smoothing)
    q, p, p0 = d["q"], d["p"], d["p0"]
    delta = float(label_smoothing)
    a = -p * d["hp"]
    # q sum(p) - p: the derivative of L as written; sum(p) = 1 for a teacher softmax, and given probabilities need
    # not sum to exactly 1 (half precision)
    grad_s = ((q * p.sum(-1, keepdim=True) - p) + q * (a - (a * q).sum(-1, keepdim=True))) / temperature
    g = d["log_p"] - d["log_q"] + d["h"]
    if teacher_is_logits:
        zero = torch.zeros_like(p0)
        p0g = torch.where(p0 == 0, zero, p0 * g)
        grad_t = torch.where(p0 == 0, zero, (1 - delta) * p0 * (g - p0g.sum(-1, keepdim=True)) / temperature)
    else:
        grad_t = (1 - delta) * (g + 1)
    return grad_s, grad_t


def row_weights(valid: torch.Tensor, reduction: str, grad_output) -> torch.Tensor:
    """d(reduced loss)/d(row loss) times the incoming gradient, float64 [N] (0 on ignored rows)."""
    n = valid.numel()
    go = torch.as_tensor(grad_output, dtype=torch.float64).detach().cpu()
    if reduction == "none":
        w = go.reshape(-1).double() if go.numel() == n else go.double().expand(n)
    elif reduction == "sum":
        w = go.double().expand(n)
    else:
        w = go.double().expand(n) / max(int(valid.sum()), 1)
    return torch.where(valid, w, torch.zeros_like(w))


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str, lead) -> torch.Tensor:
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / max(int(valid.sum()), 1)


def _valid(target, ignore_index, lead, n):
    if target is None:
        return torch.ones(n, dtype=torch.bool)
    assert tuple(target.shape) == tuple(lead)
    return (target.reshape(-1) != ignore_index).cpu()


def ptloss_oracle(s, t, coeffs=None, *, temperature=1.0, teacher_is_logits=True, label_smoothing=0.0,
                  reduction="batchmean", ignore_index=-100, target=None, grad_output=2.0):
    """(loss, grad_student, grad_teacher) of tgtfast.ptloss in float64, gradients of sum(grad_output * loss)
    (default 2, the convention of conftest.run_loss)."""
    k = s.shape[-1]
    lead = s.shape[:-1]
    s2 = s.detach().double().cpu().reshape(-1, k)
    t2 = t.detach().double().cpu().reshape(-1, k)
    valid = _valid(target, ignore_index, lead, s2.shape[0])
    keep = valid[:, None]
    s2 = torch.where(keep, s2, torch.zeros_like(s2))
    t2 = torch.where(keep, t2, torch.zeros_like(t2) if teacher_is_logits else torch.full_like(t2, 1.0 / k))
    rows = ptloss_rows64(s2, t2, coeffs, temperature=temperature, teacher_is_logits=teacher_is_logits,
                         label_smoothing=label_smoothing)
    gs, gt = closed_form_grads(s2, t2, coeffs, temperature, label_smoothing, teacher_is_logits)
    w = row_weights(valid, reduction, grad_output)[:, None]
    gs = torch.where(keep, gs * w, torch.zeros_like(gs))
    gt = torch.where(keep, gt * w, torch.zeros_like(gt))
    return _reduce(rows, valid, reduction, lead), gs.reshape(s.shape), gt.reshape(t.shape)


def focal_oracle(s, t, *, gamma=2.0, temperature=1.0, teacher_is_logits=True, reduction="batchmean",
                 ignore_index=-100, target=None, grad_output=2.0):
    """(loss, grad_student) of focal distillation sum_j p_j (1 - q_j)^gamma (-log q_j), float64; the student
    gradient by autograd of this explicit formula on the masked rows."""
    k = s.shape[-1]
    lead = s.shape[:-1]
    s2 = s.detach().double().cpu().reshape(-1, k)
    t2 = t.detach().double().cpu().reshape(-1, k)
    valid = _valid(target, ignore_index, lead, s2.shape[0])
    keep = valid[:, None]
    s2 = torch.where(keep, s2, torch.zeros_like(s2)).requires_grad_(True)
    t2 = torch.where(keep, t2, torch.zeros_like(t2) if teacher_is_logits else torch.full_like(t2, 1.0 / k))
    with torch.enable_grad():
        log_q = log_softmax64(s2 / temperature)
        p = torch.exp(log_softmax64(t2 / temperature)) if teacher_is_logits else t2
        rows = (p * (1 - torch.exp(log_q)) ** gamma * (-log_q)).sum(-1)
        w = row_weights(valid, reduction, grad_output)
        (g,) = torch.autograd.grad((rows * w).sum(), s2)
    g = torch.where(keep, g, torch.zeros_like(g))
    return _reduce(rows.detach(), valid, reduction, lead), g.reshape(s.shape)


def fused_linear_oracle(hs, ws, ht, wt, coeffs=None, *, student_bias=None, teacher_bias=None, temperature=1.0,
                        target=None, ignore_index=-100, reduction="batchmean", kd_weight=1.0, ce_weight=0.0,
                        grad_output=2.0):
    """(loss, grad_hidden, grad_weight, grad_bias) of tgtfast.fused_linear_ptloss in float64:
    ``kd_weight * PTLoss(s, t) + ce_weight * CE(s, target)`` with ``s = hs ws^T + bs``, ``t = ht wt^T + bt``;
    the logit gradient ``G`` in closed form, then ``dh = G ws``, ``dW = G^T hs``, ``db = sum_rows G``."""
    lead = hs.shape[:-1]
    h2 = hs.detach().double().cpu().reshape(-1, hs.shape[-1])
    ht2 = ht.detach().double().cpu().reshape(-1, ht.shape[-1])
    w64, wt64 = ws.detach().double().cpu(), wt.detach().double().cpu()
    s = h2 @ w64.T + (0 if student_bias is None else student_bias.detach().double().cpu())
    t = ht2 @ wt64.T + (0 if teacher_bias is None else teacher_bias.detach().double().cpu())
    n, v = s.shape
    valid = _valid(target, ignore_index, lead, n)
    keep = valid[:, None]
    s = torch.where(keep, s, torch.zeros_like(s))
    t = torch.where(keep, t, torch.zeros_like(t))
    rows = kd_weight * ptloss_rows64(s, t, coeffs, temperature=temperature)
    gkd, _ = closed_form_grads(s, t, coeffs, temperature, 0.0, True)
    g = kd_weight * gkd
    if ce_weight != 0:
        tgt = torch.where(valid, target.reshape(-1).long().cpu(), torch.zeros(n, dtype=torch.long))
        log_q = log_softmax64(s)
        rows = rows + ce_weight * (-log_q.gather(1, tgt[:, None]).squeeze(1))
        onehot = torch.zeros_like(s).scatter_(1, tgt[:, None], 1.0)
        g = g + ce_weight * (torch.exp(log_q) - onehot)
    g = torch.where(keep, g * row_weights(valid, reduction, grad_output)[:, None], torch.zeros_like(g))
    dh = (g @ w64).reshape(*lead, hs.shape[-1])
    dw = g.T @ h2
    db = None if student_bias is None else g.sum(0)
    return _reduce(rows, valid, reduction, lead), dh, dw, db


# Honest tolerances against the float64 truth, per dtype of the inputs: |got - truth| <= rtol |truth| +
# atol * max|truth| + floor (the floor: round-off of sums that are exactly 0, e.g. KL of identical rows).
# The kernels accumulate the loss in float32 for float32/bf16 inputs (judge their loss with the float32 entry);
# gradients are rounded to their input's dtype.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10, floor=1e-13),
    torch.float32: dict(rtol=1e-5, atol=1e-5, floor=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2, floor=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3, floor=1e-4),
}


def assert_close64(got, truth, dtype=torch.float32, what="", rtol=None, atol=None):
    """|got - truth| <= rtol |truth| + atol max|truth| + floor elementwise, in float64 (equal infinities pass)."""
    tol = TOL[dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    got = torch.as_tensor(got).detach().double().cpu()
    truth = torch.as_tensor(truth).detach().double().cpu()
    assert got.shape == truth.shape, f"{what}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    scale = truth.abs().max().item() if truth.numel() else 0.0
    if not math.isfinite(scale):
        scale = truth[torch.isfinite(truth)].abs().max().item() if torch.isfinite(truth).any() else 0.0
    same_inf = torch.isinf(truth) & (got == truth)
    err = (got - truth).abs()
    bound = rtol * truth.abs() + atol * scale + tol["floor"]  # floor: round-off around an exact 0
    bad = ~((err <= bound) | same_inf)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max err "
        f"{err[bad].max().item():.3e} (truth scale {scale:.3e}, rtol {rtol}, atol {atol}); "
        f"first bad got={got[bad].flatten()[0].item()!r} truth={truth[bad].flatten()[0].item()!r}"
    )
