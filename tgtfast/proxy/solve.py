"""The Proxy Teacher solve (PTLoss paper Sec. 4.1.2; docs/design.md, "Proxy Teacher"): the float64 reference
solvers, the batched solve over (candidate, row) pairs and its implicit differentiation.

A student trained with PTLoss against a teacher ``p`` (rich student class) converges to

    p_PT = argmin_{q in simplex} L(p, q),
    L(p, q) = sum_j p_j (log p_j - log q_j) + sum_j p_j sum_m eta[m, j] (1 - q_j)^m,

the *proxy teacher*. :func:`proxy_teacher` solves for it, batched over rows and candidate coefficient sets, in
float64 on the CPU (inputs on other devices are copied there: the problem is tiny per row) unless the CUDA
kernel runs it. The implementation is chosen in :mod:`tgtfast.ops.proxy_solve` (``backend=``): the compiled
``torch.ops.tgtfast.proxy_solve`` (``"cpp"``, ``"cuda"``) or the batched PyTorch code of this module
(``"reference"``: the grid flattened into cache-sized blocks of (candidate, row) pairs; the loops are over
blocks, Newton iterations, line-search halvings and 1-D search steps, never over rows or candidates).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from tgtfast import validation
from tgtfast.ops import proxy_solve as _op
from tgtfast.proxy import _checks

__all__ = ["proxy_teacher", "stationarity_residual"]

_F64 = torch.float64
_BLOCK_ELEMS = 1 << 17  # (rows x classes) elements per block: ~1 MiB per float64 temporary, stays in cache
_U_MAX = 700.0  # binary solve works in u = logit(q_0), clamped to +-700 (sigmoid(-700) ~ 1e-304 > 0)


# ---------------------------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------------------------


def _poly(eta: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P(x) = sum_{m=1..M} eta[m-1] x^m`` and its first two derivatives by Horner's rule.

    eta ``[M, *S]`` broadcastable against x ``[*S]``; returns three ``[*S]`` tensors."""
    m = eta.shape[0]
    if m == 0:
        z = torch.zeros_like(x)
        return z, z, z
    b = eta[m - 1] + torch.zeros_like(x)
    d1 = torch.zeros_like(x)
    d2 = torch.zeros_like(x)
    for i in range(m - 1, 0, -1):
        d2 = d2 * x + d1
        d1 = d1 * x + b
        b = b * x + eta[i - 1]
    d2 = d2 * x + d1
    d1 = d1 * x + b
    return b * x, d1, 2.0 * d2


def _mc_state(p, logp, supp, z, eta):
    """Quantities of the multi-class problem at logits z (rows [r, K], eta [M, r, K]).

    Returns (objective [r] without the constant sum p log p, phi = -dL/dq [r, K], lam [r], E = q d2L/dq2 [r, K],
    q [r, K], r_ratio = p/q [r, K])."""
    logq = torch.log_softmax(z, -1)
    q = logq.exp()
    logq_s = torch.where(supp, logq, torch.zeros((), dtype=z.dtype))
    x = -torch.expm1(logq_s)  # 1 - q, accurate when q ~ 1
    x = torch.where(supp, x, torch.ones((), dtype=z.dtype))
    pv, p1, p2 = _poly(eta, x)
    ratio = torch.where(supp, torch.exp(logp - logq_s), torch.zeros((), dtype=z.dtype))
    obj = (p * (pv - logq_s)).sum(-1)
    phi = ratio + p * p1
    lam = (q * phi).sum(-1)
    e = ratio + p * q * p2
    return obj, phi, lam, e, q, ratio


def _mc_objective(p, supp, z, eta):
    logq = torch.log_softmax(z, -1)
    logq_s = torch.where(supp, logq, torch.zeros((), dtype=z.dtype))
    x = torch.where(supp, -torch.expm1(logq_s), torch.ones((), dtype=z.dtype))
    pv = _poly(eta, x)[0] if eta.shape[0] else torch.zeros_like(x)
    return (p * (pv - logq_s)).sum(-1)


def _mc_step(phi, lam, e, q, ratio, supp):
    """Constrained Newton step on the simplex, mapped to the logits: dz_j = dq_j / q_j.

    L is separable in q, so its Hessian is diagonal (D_j = E_j / q_j) and the equality-constrained Newton step is
    dq_j = (q_j / E_j)(phi_j - mu), mu = sum(w phi) / sum(w), w = q / E. If the reduced Hessian is not positive
    definite (more than one E_j <= 0, or one with sum(w) >= 0), E is replaced by the KL curvature p/q where it is
    not comfortably positive. Returns (dz [r, K], slope [r] = directional derivative of L along dz, <= 0)."""
    zero = torch.zeros((), dtype=q.dtype)
    neg = (e <= 0) & supp
    nneg = neg.sum(-1)
    w = torch.where(supp, q / torch.where(supp, e, torch.ones((), dtype=q.dtype)), zero)
    sw = w.sum(-1)
    ok = (nneg == 0) | ((nneg == 1) & (sw < -1e-300))
    if not bool(ok.all()):
        e = torch.where(ok[:, None] | (e > 0.01 * ratio), e, ratio)
        w = torch.where(supp, q / torch.where(supp, e, torch.ones((), dtype=q.dtype)), zero)
        sw = w.sum(-1)
    mu = (w * phi).sum(-1) / sw
    dev = torch.where(supp, phi - mu[:, None], zero)
    dz = torch.where(supp, dev / torch.where(supp, e, torch.ones((), dtype=q.dtype)), zero)
    slope = -(w * dev * dev).sum(-1)
    return dz, slope


def _residual_from(phi, lam, q, p):
    active = (p > 0) | (q > 0)
    return torch.where(active, (phi - lam[:, None]).abs(), torch.zeros((), dtype=phi.dtype)).amax(-1)


def _solve_mc_block(p, logp, supp, eta, max_iter: int, tol: float, z0: Optional[torch.Tensor] = None):
    """Damped Newton on the logits for rows [r, K] (eta [M, r, K]) from ``z0`` (default ``log p``); returns
    (z [r, K], residual [r]).

    Rows leave the batch as they converge (residual <= tol) or stall; the state at an accepted trial point is
    reused for the next iteration, so a full step costs one evaluation of the objective and its derivatives."""
    neg_inf = torch.tensor(-math.inf, dtype=_F64)
    z = torch.where(supp, logp if z0 is None else z0, neg_inf)
    r = z.shape[0]
    active = torch.arange(r)
    pa, lpa, sa, ea, za = p, logp, supp, eta, z.clone()
    st = _mc_state(pa, lpa, sa, za, ea)
    res = _residual_from(st[1], st[2], st[4], pa)
    res_out = res.clone()
    for _ in range(max_iter):
        keep = res > tol
        if not bool(keep.any()):
            break
        if not bool(keep.all()):
            z[active] = za
            res_out[active] = res
            active, pa, lpa, sa, ea, za = active[keep], pa[keep], lpa[keep], sa[keep], ea[:, keep], za[keep]
            st = tuple(x[keep] for x in st)
        obj, phi, lam, e, q, ratio = st
        dz, slope = _mc_step(phi, lam, e, q, ratio, sa)
        t = torch.clamp(30.0 / torch.clamp(dz.abs().amax(-1), min=1e-300), max=1.0)
        slack = 1e-14 * (1.0 + obj.abs())
        zt = za + t[:, None] * dz
        st_t = _mc_state(pa, lpa, sa, zt, ea)
        good = st_t[0] <= obj + 1e-4 * t * slope + slack
        stalled = None
        if not bool(good.all()):  # Armijo backtracking on the rows that fail, objective only
            idx = (~good).nonzero()[:, 0]
            tb = t[idx]
            for _bt in range(60):
                tb = tb * 0.5
                zb = za[idx] + tb[:, None] * dz[idx]
                fb = _mc_objective(pa[idx], sa[idx], zb, ea[:, idx])
                ok = fb <= obj[idx] + 1e-4 * tb * slope[idx] + slack[idx]
                zt[idx[ok]] = zb[ok]
                idx, tb = idx[~ok], tb[~ok]
                if idx.numel() == 0:
                    break
            if idx.numel():  # line search failed (round-off level): keep those rows where they are, stop them
                zt[idx] = za[idx]
                stalled = idx
            redo = (~good).nonzero()[:, 0]
            sub = _mc_state(pa[redo], lpa[redo], sa[redo], zt[redo], ea[:, redo])
            for full, part in zip(st_t, sub):
                full[redo] = part
        za, st = zt, st_t
        res = _residual_from(st[1], st[2], st[4], pa)
        if stalled is not None:
            res_out[active[stalled]] = res[stalled]
            res = res.clone()
            res[stalled] = -1.0  # leaves the batch at the next compaction; its residual is recorded
    z[active] = za
    res_out[active] = torch.where(res >= 0, res, res_out[active])
    return z, res_out


def _log_sigmoid(u):
    """``log sigmoid(u) = min(u, 0) - log1p(exp(-|u|))``, exact in float64 for every u (+-inf included).
    Spelled out because ``torch.nn.functional.logsigmoid`` was measured at ~7-17 ms per call on [2, 67] float64
    CPU tensors (torch 2.13, 2 threads; this form: ~15 us), which made the 1-D search of a few rows take 0.7 s."""
    return torch.clamp(u, max=0) - torch.log1p(torch.exp(-u.abs()))


def _bin_f(u, p0, p1, e0, e1, c):
    """Binary objective (constant c = sum p log p included) at u = logit(q_0); all [r, G] with e* [M, r, 1]."""
    lq0 = _log_sigmoid(u)
    lq1 = _log_sigmoid(-u)
    q0, q1 = lq0.exp(), lq1.exp()
    return c - p0 * lq0 - p1 * lq1 + p0 * _poly(e0, q1)[0] + p1 * _poly(e1, q0)[0]


def _bin_derivs(u, p0, p1, e0, e1):
    """d f / du and d2 f / du2 of the binary objective."""
    q0, q1 = torch.sigmoid(u), torch.sigmoid(-u)
    s = q0 * q1
    _, a1, a2 = _poly(e0, q1)
    _, b1, b2 = _poly(e1, q0)
    tt = p1 * b1 - p0 * a1
    lin = torch.where(q0 < 0.5, q0 - p0, p1 - q1)
    fu = lin + s * tt
    fuu = s + s * (q1 - q0) * tt + s * s * (p1 * b2 + p0 * a2)
    return fu, fuu


def _solve_bin_block(p, eta, k_min: int = 3, golden_iters: int = 44, newton_iters: int = 5):
    """Global minimiser in u = logit(q_0) for rows p [r, 2], eta [M, r, 2]; returns u [r] (may be +-inf)."""
    r = p.shape[0]
    p0, p1 = p[:, 0:1], p[:, 1:2]
    e0, e1 = eta[:, :, 0:1], eta[:, :, 1:2]
    c = torch.xlogy(p0, p0) + torch.xlogy(p1, p1)
    # all minima lie in [p0 / (1 + B), 1 - p1 / (1 + B)], B = max_j sum_m m |eta[m, j]| (|P'| <= B on [0, 1])
    mm = torch.arange(1, eta.shape[0] + 1, dtype=_F64).view(-1, 1, 1)
    bnd = (mm * eta.abs()).sum(0).amax(-1, keepdim=True)  # [r, 1]
    lo, hi_c = p0 / (1 + bnd), p1 / (1 + bnd)  # q0 >= lo, q1 >= hi_c
    u_lo = torch.clamp(torch.log(lo) - torch.log1p(-lo), -_U_MAX, _U_MAX)
    u_hi = torch.clamp(torch.log1p(-hi_c) - torch.log(hi_c), -_U_MAX, _U_MAX)
    t_lin = torch.linspace(0, 1, 41, dtype=_F64)[None]
    q_lin = lo + (1 - lo - hi_c) * t_lin
    u_lin = torch.clamp(torch.log(q_lin) - torch.log1p(-q_lin), -_U_MAX, _U_MAX)
    u_log = u_lo + (u_hi - u_lo) * torch.linspace(0, 1, 27, dtype=_F64)[1:-1][None]  # ends are in u_lin
    u_teacher = torch.clamp(torch.log(p0) - torch.log(p1), -_U_MAX, _U_MAX)
    grid = torch.sort(torch.cat([u_lin, u_log, u_teacher], 1), dim=1).values  # [r, G]
    g = grid.shape[1]
    fg = _bin_f(grid, p0, p1, e0, e1, c)
    inf = torch.tensor(math.inf, dtype=_F64)
    # neighbours are the nearest *distinct* grid values (grids can share points, e.g. the ends)
    prev = torch.searchsorted(grid, grid, right=False) - 1
    nxt = torch.searchsorted(grid, grid, right=True)
    left = torch.where(prev >= 0, fg.gather(1, prev.clamp(min=0)), inf)
    right = torch.where(nxt < g, fg.gather(1, nxt.clamp(max=g - 1)), inf)
    is_min = (fg <= left) & (fg <= right)
    kk = min(k_min, g)
    _, best = torch.topk(torch.where(is_min, fg, inf), kk, dim=1, largest=False)  # [r, kk]
    a = grid.gather(1, prev.gather(1, best).clamp(min=0))
    b = grid.gather(1, nxt.gather(1, best).clamp(max=g - 1))
    u0 = grid.gather(1, best)
    f0 = fg.gather(1, best)
    # golden-section search in [a, b] (contains a local minimum: f(u0) <= f at both neighbours)
    gr = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = b - gr * (b - a), a + gr * (b - a)
    f1, f2 = _bin_f(x1, p0, p1, e0, e1, c), _bin_f(x2, p0, p1, e0, e1, c)
    lo_b, hi_b = a.clone(), b.clone()
    for _ in range(golden_iters):
        lft = f1 <= f2
        hi_b = torch.where(lft, x2, hi_b)
        lo_b = torch.where(lft, lo_b, x1)
        xn = torch.where(lft, hi_b - gr * (hi_b - lo_b), lo_b + gr * (hi_b - lo_b))
        fn = _bin_f(xn, p0, p1, e0, e1, c)
        x1, x2, f1, f2 = (
            torch.where(lft, xn, x2),
            torch.where(lft, x1, xn),
            torch.where(lft, fn, f2),
            torch.where(lft, f1, fn),
        )
    u = torch.where(f1 <= f2, x1, x2)
    fu_val = torch.minimum(f1, f2)
    u = torch.where(f0 < fu_val, u0, u)
    fu_val = torch.minimum(f0, fu_val)
    # Newton polish inside the bracket, accepted only where it decreases |f'| without increasing f
    for _ in range(newton_iters):
        d1, d2 = _bin_derivs(u, p0, p1, e0, e1)
        step = torch.where(d2 > 0, -d1 / torch.where(d2 > 0, d2, torch.ones((), dtype=_F64)), torch.zeros((), dtype=_F64))
        un = torch.minimum(torch.maximum(u + step, a), b)
        fn = _bin_f(un, p0, p1, e0, e1, c)
        dn, _ = _bin_derivs(un, p0, p1, e0, e1)
        acc = (fn <= fu_val + 1e-15 * (1 + fu_val.abs())) & (dn.abs() <= d1.abs())
        u = torch.where(acc, un, u)
        fu_val = torch.where(acc, fn, fu_val)
    pick = fu_val.argmin(1, keepdim=True)
    u = u.gather(1, pick)[:, 0]
    fbest = fu_val.gather(1, pick)[:, 0]
    # exact boundary when a class has zero teacher mass (there the objective is finite at q = 0 / q = 1)
    f_lo = (c[:, 0] + p1[:, 0] * _poly(e1[:, :, 0], torch.zeros(r, dtype=_F64))[0])  # q0 = 0 (needs p0 = 0)
    f_hi = (c[:, 0] + p0[:, 0] * _poly(e0[:, :, 0], torch.zeros(r, dtype=_F64))[0])  # q0 = 1 (needs p1 = 0)
    u = torch.where((p0[:, 0] == 0) & (f_lo <= fbest), -inf, u)
    u = torch.where((p1[:, 0] == 0) & (f_hi <= fbest), inf, u)
    return u


def _bin_probs(u: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sigmoid(u), torch.sigmoid(-u)], -1)


def _gather_rows(p64, logp, supp, eta64, start, end, n):
    """Rows [start, end) of the flattened (candidate, row) grid."""
    i = torch.arange(start, end)
    ci, ni = i // n, i % n
    return p64[ni], logp[ni], supp[ni], eta64[ci].permute(1, 0, 2), ci, ni


def _block_rows(k: int) -> int:
    return max(1, _BLOCK_ELEMS // max(k, 1))


def _solve_flat(p64, eta64, max_iter, tol, start, end):
    """Solve rows [start, end) of the flattened grid (no grad). Returns (q [r, K], residual [r] or None, aux)."""
    n, k = p64.shape
    supp = p64 > 0
    logp = torch.where(supp, torch.log(torch.where(supp, p64, torch.ones((), dtype=_F64))), torch.zeros((), dtype=_F64))
    pr, lpr, sr, er, ci, ni = _gather_rows(p64, logp, supp, eta64, start, end, n)
    if k == 1:
        return torch.ones_like(pr), torch.zeros(pr.shape[0], dtype=_F64), None
    if k == 2:
        u = _solve_bin_block(pr, er)
        return _bin_probs(u), None, u
    z, res = _solve_mc_block(pr, lpr, sr, er, max_iter, tol)
    return torch.softmax(z, -1), res, z


def _diff_step(p_rows, eta_rows, aux, k):
    """One differentiable Newton step from the (detached) solution: value unchanged at convergence, gradient equal
    to implicit differentiation of the stationarity condition (the Newton map's Jacobian in z vanishes there).
    p_rows [r, K], eta_rows [M, r, K] may require grad; returns q [r, K]."""
    one = torch.ones((), dtype=_F64)
    zero = torch.zeros((), dtype=_F64)
    if k == 2:
        u = aux
        fin = torch.isfinite(u)
        us = torch.where(fin, u, zero)
        d1, d2 = _bin_derivs(us[:, None], p_rows[:, 0:1], p_rows[:, 1:2], eta_rows[:, :, 0:1], eta_rows[:, :, 1:2])
        d1, d2 = d1[:, 0], d2[:, 0]
        okr = fin & (d2 > 0)
        step = torch.where(okr, -d1 / torch.where(okr, d2, one), zero)
        return _bin_probs(torch.where(fin, us + step, u))
    z = aux
    supp = p_rows.detach() > 0
    logp = torch.where(supp, torch.log(torch.where(supp, p_rows, one)), zero)
    zs = torch.where(supp, z, zero)
    logq = torch.where(supp, torch.log_softmax(z, -1), zero)  # constant
    q = torch.where(supp, logq.exp(), zero)
    x = torch.where(supp, -torch.expm1(logq), one)
    _, d1, d2 = _poly(eta_rows, x)
    ratio = torch.where(supp, torch.exp(logp - logq), zero)
    phi = ratio + p_rows * d1
    e = ratio + p_rows * q * d2
    pos = (e > 0) | ~supp
    okr = pos.all(-1)
    es = torch.where(supp & pos, e, one)
    w = torch.where(supp, q / es, zero)
    mu = (w * phi).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    dz = torch.where(supp & okr[:, None], (phi - mu) / es, zero)
    return torch.softmax(torch.where(supp, zs + dz, z), -1)


def _aux_from_q(q: torch.Tensor, k: int) -> torch.Tensor:
    """The solver's own variable recovered from its solution: u = logit(q_0) (K = 2) or logits z = log q."""
    with torch.no_grad():
        if k == 2:
            return torch.log(q[:, 0]) - torch.log(q[:, 1])
        return torch.log(q)


def _maybe_concave(eta: torch.Tensor) -> torch.Tensor:
    """Per class (``eta`` ``[M, K]``): whether ``-log q + h(1 - q)`` may be non-convex on ``(0, 1]``, i.e. whether
    ``1 / q^2 + h''(1 - q)`` drops to 0 or below on a grid of 1000 points in ``[1e-3, 1]`` (below ``1e-3``,
    ``1 / q^2 >= 1e6`` dominates any coefficients of a sane size). ``L`` is separable, so it is convex on the
    simplex when no class is."""
    qg = torch.linspace(1e-3, 1.0, 1000, dtype=_F64)
    _, _, d2 = _poly(eta[:, :, None], (1 - qg)[None, :])  # [K, G]
    return ((1.0 / qg**2)[None] + d2).amin(1) <= 0


def global_check(p64: torch.Tensor, eta: torch.Tensor, q: torch.Tensor, *, max_starts: int = 10,
                 max_iter: int = 30, tol: float = 1e-8, max_elements: int = 1 << 18) -> Dict[str, Any]:
    """Is ``q`` (``[N, K]``, the proxy teacher of ``p64`` for the coefficients ``eta`` ``[M, K]``) the global
    minimiser of ``L(p, .)`` on every row? ``L`` can be non-convex (large or negative coefficients), and the
    multi-class solve finds the local minimum reached from the teacher.

    ``L`` is separable in ``q``, so it is convex (and ``q`` global) when every class's term is; that is checked
    first, on the coefficients alone. Otherwise, for each row, damped Newton is run again from ``0.9 e_j + 0.1 p``
    for the ``min(K, max_starts)`` classes ``j`` of largest teacher probability (the vertices, where a non-convex
    perturbation pulls ``L`` down); a start that ends lower than ``q`` by more than ``1e-9 (1 + |L|)`` shows that
    ``q`` is not the global minimum. Only the first rows are checked when ``rows x starts x K`` would exceed
    ``max_elements``.

    Returns ``rows`` (N), ``convex`` (no check needed), ``checked_rows``, ``starts`` per row, ``not_global`` (rows
    with a lower minimum), ``argmax_differs`` (those of them whose lower minimum predicts another class than
    ``q``) and ``worst_gap`` (the largest ``L(p, q) - L(p, q_lower)``). ``K <= 2`` needs no check (the binary solve
    is global)."""
    n, k = p64.shape
    out: Dict[str, Any] = {"rows": n, "checked_rows": 0, "starts": 0, "convex": True, "not_global": 0,
                           "argmax_differs": 0, "worst_gap": 0.0}
    if k <= 2 or n == 0 or not bool(_maybe_concave(eta.to("cpu", _F64)).any()):
        return out
    out["convex"] = False
    s = min(k, max_starts)
    n = min(n, max(1, max_elements // (s * k)))  # the first rows, within the work budget
    p64, q = p64[:n], q[:n]
    out["starts"], out["checked_rows"] = s, n
    supp = p64 > 0
    one = torch.ones((), dtype=_F64)
    logp = torch.where(supp, torch.log(torch.where(supp, p64, one)), torch.zeros((), dtype=_F64))
    q = q.to("cpu", _F64)
    zq = torch.where(supp, torch.log(torch.where(q > 0, q, one)), torch.tensor(-math.inf, dtype=_F64))
    e_rows = eta.to("cpu", _F64)[:, None, :]
    f_q = _mc_objective(p64, supp, zq, e_rows.expand(-1, n, -1))
    best_f = f_q.clone()
    best_arg = q.argmax(1)
    top = p64.topk(s, dim=1).indices  # [n, s]
    rows_per_block = max(1, _block_rows(k) // s)
    for lo in range(0, n, rows_per_block):
        hi = min(lo + rows_per_block, n)
        r = hi - lo
        pr = p64[lo:hi].repeat_interleave(s, 0)
        lpr, sr = logp[lo:hi].repeat_interleave(s, 0), supp[lo:hi].repeat_interleave(s, 0)
        start = 0.1 * pr + 0.9 * torch.nn.functional.one_hot(top[lo:hi].flatten(), k).to(_F64)
        z0 = torch.log(torch.where(sr, start, one))
        er = e_rows.expand(-1, r * s, -1)
        z, _ = _solve_mc_block(pr, lpr, sr, er, max_iter, tol, z0=z0)
        f = _mc_objective(pr, sr, z, er).view(r, s)
        f_min, which = f.min(1)
        arg = z.view(r, s, k).argmax(2).gather(1, which[:, None])[:, 0]
        lower = f_min < best_f[lo:hi]
        best_f[lo:hi] = torch.where(lower, f_min, best_f[lo:hi])
        best_arg[lo:hi] = torch.where(lower, arg, best_arg[lo:hi])
    gap = f_q - best_f
    bad = gap > 1e-9 * (1 + f_q.abs())
    out["not_global"] = int(bad.sum())
    out["argmax_differs"] = int((bad & (best_arg != q.argmax(1))).sum())
    out["worst_gap"] = float(gap.clamp_min(0).max())
    return out


# ---------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------


def proxy_teacher(
    teacher_probs: torch.Tensor,
    coeffs: Any,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
    batched: Optional[bool] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The proxy teacher ``argmin_{q in simplex} L(p, q)`` for each row and each candidate coefficient set.

    ``L(p, q) = sum_j p_j (log p_j - log q_j) + sum_j p_j sum_m eta[m, j] (1 - q_j)^m`` (the PTLoss of
    :func:`tgtfast.reference.ptloss_rows` as a function of the student's probabilities ``q``).

    Args:
        teacher_probs: ``[N, K]`` teacher probabilities (non-negative, rows summing to 1 within 1e-4; they are
            renormalised in float64).
        coeffs: ``[M]`` (shared) or ``[M, K]`` (per class), or a batch of candidates ``[C, M]`` / ``[C, M, K]``.
            A 2-D tensor is ``[M, K]`` if its last dimension is ``K``, else ``[C, M]``; pass ``batched=True``
            for ``[C, M]`` with ``M == K``.
        max_iter: Newton iterations (multi-class).
        tol: stationarity residual at which a row stops iterating (multi-class).
        backend: ``None``/``"auto"``, ``"cpp"`` or ``"reference"`` (see the module docstring).

    Returns:
        ``[N, K]`` (or ``[C, N, K]`` for a candidate batch) in ``teacher_probs.dtype``.

    Which minimiser:
        * ``K = 2``: the **global** minimiser of the one-dimensional problem in ``q_0`` (it can be non-convex):
          every minimum lies in ``[p_0 / (1 + B), 1 - p_1 / (1 + B)]`` with ``B = max_j sum_m m |eta[m, j]|``;
          the best three local minima of a 66-point grid there (uniform in ``q_0`` and in ``logit q_0``) are
          refined by golden-section search and safeguarded Newton in ``u = logit q_0``, float64, and the
          lowest is kept (the boundary ``q_0 = 0`` / ``1`` is included when ``p_0 = 0`` / ``p_1 = 0``).
        * ``K >= 3``: the **local minimiser reached from the teacher**: damped Newton on the logits
          ``z`` (``q = softmax(z)``) started at ``z = log p``, all rows and candidates batched. The Hessian of
          ``L`` in ``q`` is diagonal, so the equality-constrained Newton step costs O(K); it is mapped to the
          logits (``dz_j = dq_j / q_j``), replaced by a KL-curvature step where the reduced Hessian is not positive
          definite, and Armijo backtracking makes every accepted step decrease ``L``. Hence
          ``L(p, q*) <= L(p, p)`` (up to float64 round-off) and, at return, the stationarity residual
          ``max_j |p_j / q_j + p_j sum_m m eta[m, j] (1 - q_j)^(m-1) - lambda|`` (``lambda`` the ``q``-weighted
          mean of the first two terms, i.e. the multiplier of ``sum q = 1``) is below ``tol`` (a warning is raised
          if any row ends above 1e-6; see :func:`stationarity_residual`). Classes with ``p_j = 0`` get
          ``q_j = 0``: ``L`` does not depend on them and the student's gradient on their logit is
          ``q_j * lambda``, which drives them to 0 when ``lambda > 0`` (always so for non-negative coefficients,
          where ``lambda >= 1``; strongly negative coefficients can make ``lambda < 0``, and then the returned point
          is stationary on the face spanned by the teacher's support but not a KKT point of the whole simplex).

    ``coeffs = 0`` (a candidate whose coefficients are all zero) returns the teacher itself. Gradients: if
    ``teacher_probs`` or ``coeffs`` require grad, the solve runs without autograd and one differentiable Newton
    step is taken from the solution, which gives exactly the implicit-function-theorem derivative.
    """
    p_in = _checks.probs(teacher_probs, "teacher_probs")
    max_iter = validation.integer("max_iter", max_iter, low=0)
    tol = validation.real("tol", tol, low=0.0, low_inclusive=False)
    n, k = p_in.shape
    eta_in, is_batched = _checks.coeffs(coeffs, k, batched)
    c = eta_in.shape[0]
    dev = p_in.device
    p_raw = p_in.detach().to("cpu", _F64)
    p64 = p_raw / p_raw.sum(-1, keepdim=True)
    eta64 = eta_in.detach().to("cpu", _F64)
    out = torch.empty(c * n, k, dtype=_F64)
    need_grad = torch.is_grad_enabled() and (p_in.requires_grad or eta_in.requires_grad)
    auxes = []
    worst = 0.0
    bs = _block_rows(k)
    with torch.no_grad():
        solver = _op.solver(backend, dev)
        if solver != "reference" and k >= 2:
            q, res = _op.compiled_solve(solver, dev, p64, eta64, max_iter, tol)
            out = q.view(c * n, k)
            worst = float(res.max()) if res.numel() else 0.0
            if need_grad:
                auxes = [_aux_from_q(out[s : min(s + bs, c * n)], k) for s in range(0, c * n, bs)]
        else:
            for s in range(0, c * n, bs):
                e = min(s + bs, c * n)
                q, res, aux = _solve_flat(p64, eta64, max_iter, tol, s, e)
                out[s:e] = q
                if res is not None and res.numel():
                    worst = max(worst, float(res.max()))
                if need_grad:
                    auxes.append(aux)
    if worst > 1e-6:
        warnings.warn(f"proxy_teacher: stationarity residual {worst:.3g} > 1e-6 on some rows (raise max_iter?)")
    out = out.view(c, n, k)
    zero_c = (eta64 == 0).flatten(1).all(1) if eta64.numel() else torch.ones(c, dtype=torch.bool)
    out = torch.where(zero_c[:, None, None], p_raw[None], out)  # coeffs = 0: the teacher itself, as given
    if need_grad and k >= 2:
        p_g = p_in.to(_F64)
        p_g = p_g / p_g.sum(-1, keepdim=True)
        eta_g = eta_in.to(_F64).to(dev)
        pieces = []
        for (s, aux) in zip(range(0, c * n, bs), auxes):
            e = min(s + bs, c * n)
            i = torch.arange(s, e, device=dev)
            ci, ni = i // n, i % n
            pieces.append(_diff_step(p_g[ni].cpu() if dev.type != "cpu" else p_g[ni],
                                     eta_g[ci].permute(1, 0, 2).cpu() if dev.type != "cpu" else eta_g[ci].permute(1, 0, 2),
                                     aux, k))
        diff = torch.cat(pieces).view(c, n, k)
        out = torch.where(zero_c[:, None, None], p_g.cpu()[None], diff)
    out = out.to(dev, p_in.dtype)
    return out if is_batched else out[0]


def stationarity_residual(teacher_probs: torch.Tensor, proxy_probs: torch.Tensor, coeffs: Any,
                          *, batched: Optional[bool] = None) -> torch.Tensor:
    """``max_j |p_j / q_j + p_j sum_m m eta[m, j] (1 - q_j)^(m-1) - lambda|`` per row, ``lambda = sum_j q_j (...)``.

    The max runs over classes with ``p_j > 0`` or ``q_j > 0``. teacher_probs ``[N, K]``, proxy_probs ``[N, K]`` or
    ``[C, N, K]``, coeffs as in :func:`proxy_teacher`; returns ``[N]`` or ``[C, N]`` (float64).

    A subnormal ``q_j`` is only known to within half the smallest subnormal (2.5e-324), so on a row whose teacher
    has a subnormal entry the residual can be O(1) at the solver's (correct) answer: ``p_j = 5e-324`` gives
    ``q_j = 5e-324`` or ``0`` where the exact value is ``0.76e-324`` or ``0.3e-324``."""
    p = _checks.probs(teacher_probs, "teacher_probs").detach().to("cpu", _F64)
    n, k = p.shape
    eta, is_b = _checks.coeffs(coeffs, k, batched)
    eta = eta.detach().to("cpu", _F64)
    proxy_probs = _checks.as_tensor(proxy_probs, "proxy_probs")
    if not proxy_probs.is_floating_point():
        raise TypeError(f"proxy_probs must be a floating tensor, got {proxy_probs.dtype}")
    q = proxy_probs.detach().to("cpu", _F64)
    if q.dim() == 2:
        q = q[None]
    if q.shape[1:] != (n, k) or q.shape[0] != eta.shape[0]:
        raise ValueError(f"proxy_probs has shape {tuple(proxy_probs.shape)}, expected [{n}, {k}] per candidate")
    zero = torch.zeros((), dtype=_F64)
    pos = q > 0
    logq = torch.log(torch.where(pos, q, torch.ones((), dtype=_F64)))
    x = 1 - q
    _, d1, _ = _poly(eta.permute(1, 0, 2)[:, :, None, :], x)
    ratio = torch.where(p[None] > 0, torch.exp(torch.log(torch.where(p > 0, p, 1.0))[None] - logq), zero)
    phi = ratio + p[None] * d1
    lam = (q * phi).sum(-1, keepdim=True)
    active = (p[None] > 0) | pos
    res = torch.where(active, (phi - lam).abs(), zero).amax(-1)
    return res if (is_b or proxy_probs.dim() == 3) else res[0]

