"""The Proxy Teacher coefficient search (PTLoss paper Sec. 4.1.3; docs/design.md, "Proxy Teacher").

:func:`deviation` is the paper's Eq. 21 (as written) on a labelled validation set; :func:`search_coefficients`
draws random coefficient sets (plus ``coeffs = 0``, i.e. plain KL), keeps the one with the smallest deviation,
and optionally refines it by gradient descent through the solve (:func:`tgtfast.proxy.proxy_teacher`). With the
compiled backends each candidate's solutions are reduced straight into the Eq. 21 sums
(``torch.ops.tgtfast.proxy_deviation_sums``), so the ``[C, N, K]`` grid is never stored. The validation set may
be sharded across ``torch.distributed`` ranks: the per-candidate sums are all-reduced.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch

from tgtfast import validation
from tgtfast.ops import proxy_solve as _op
from tgtfast.proxy import _checks
from tgtfast.proxy.solve import _block_rows, _solve_flat, global_check, proxy_teacher

__all__ = ["deviation", "search_coefficients", "CoefficientSearchResult"]

_F64 = torch.float64


def _deviation_sums(q: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per candidate: (sum_n ||q_n - y_n||_2, sum_n q_n^T log q_n); q [..., N, K] -> two [...] tensors."""
    norm, negent = _deviation_rows(q, labels)
    return norm.sum(-1), negent.sum(-1)


def _deviation_rows(q: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: (||q_n - y_n||_2, q_n^T log q_n); q [..., N, K], labels [N] -> two [..., N] tensors."""
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    one = torch.ones((), dtype=q.dtype, device=q.device)
    y = torch.nn.functional.one_hot(labels, q.shape[-1]).to(q.dtype)
    sq = ((q - y) ** 2).sum(-1)
    pos = sq > 0
    norm = torch.where(pos, torch.sqrt(torch.where(pos, sq, one)), zero)
    qpos = q > 0
    negent = torch.where(qpos, q * torch.log(torch.where(qpos, q, one)), zero).sum(-1)
    return norm, negent


def deviation(proxy_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 21 of the paper, as written, per candidate:

    ``D = (mean_n ||p_PT(x_n) - y_n||_2)^2 + (mean_n p_PT(x_n)^T log p_PT(x_n))^2`` (``0 log 0 = 0``), with
    ``y_n`` the one-hot label. proxy_probs ``[N, K]`` -> scalar, or ``[C, N, K]`` -> ``[C]``; labels ``[N]``
    integer class indices. Differentiable in ``proxy_probs`` (finite gradients at one-hot rows). This is the
    local computation; :func:`search_coefficients` all-reduces the two sums across ranks."""
    q = _checks.as_tensor(proxy_probs, "proxy_probs")
    if not q.is_floating_point():
        raise TypeError(f"proxy_probs must be a floating tensor, got {q.dtype}")
    if q.dim() not in (2, 3):
        raise ValueError(f"proxy_probs must have shape [N, K] or [C, N, K], got {tuple(q.shape)}")
    n, k = q.shape[-2:]
    _checks.probs(q.detach().reshape(-1, k), "proxy_probs")
    labels = _checks.labels(labels, n, k).to(q.device)
    s1, s2 = _deviation_sums(q, labels)
    cnt = max(n, 1)
    return (s1 / cnt) ** 2 + (s2 / cnt) ** 2


@dataclass
class CoefficientSearchResult:
    """What :func:`search_coefficients` found.

    coeffs: the chosen coefficients, ``[M]`` (shared) or ``[M, K]`` (per class), float64 on the CPU, ready for
        ``tgtfast.PTLoss(result.coeffs)``. deviation: its Eq. 21 deviation. candidate_deviations: ``[C]`` with
        ``C = num_candidates + 1``; index 0 is plain KL (``coeffs = 0``), indices 1.. the random draws (in
        ``candidates``, ``[C, M]`` or ``[C, M, K]``). kl_deviation: D of plain KL (``<= deviation`` never fails
        the other way: ``deviation <= kl_deviation``). refined_from: D of the best random candidate before
        ``refine`` (None without refine); refine keeps every coefficient in the sampling box ``[low, high]``
        (widened to contain 0, where plain KL lies). inputs: ``"probs"`` or ``"logits"``, how the teacher was
        given. global_check: whether the proxy teacher of ``coeffs`` is the global minimiser of the loss on the
        validation rows (see :func:`tgtfast.proxy.solve.global_check`: ``rows``, ``starts``, ``not_global``,
        ``argmax_differs``, ``worst_gap``; None when not checked); a warning is raised when it is not."""

    coeffs: torch.Tensor
    deviation: float
    candidate_deviations: torch.Tensor
    kl_deviation: float
    seed: int
    best_index: int
    candidates: torch.Tensor
    order: int
    per_class: bool
    num_classes: int
    low: float
    high: float
    temperature: float
    refined_from: Optional[float] = None
    refine_steps: int = 0
    inputs: str = "probs"
    global_check: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "coeffs": self.coeffs.tolist(),
            "deviation": self.deviation,
            "kl_deviation": self.kl_deviation,
            "refined_from": self.refined_from,
            "refine_steps": self.refine_steps,
            "best_index": self.best_index,
            "seed": self.seed,
            "order": self.order,
            "per_class": self.per_class,
            "num_classes": self.num_classes,
            "num_candidates": int(self.candidate_deviations.numel()) - 1,
            "low": self.low,
            "high": self.high,
            "temperature": self.temperature,
            "inputs": self.inputs,
            "global_check": self.global_check,
            "candidate_deviations": self.candidate_deviations.tolist(),
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        """JSON text with a ``"coeffs"`` key (what ``tgtfast.PTLoss(path)`` reads) and the search's record."""
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w") as fh:
            fh.write(self.to_json() + "\n")


def _dist_group_active(distributed: Optional[bool]) -> bool:
    import torch.distributed as dist

    avail = dist.is_available() and dist.is_initialized()
    if distributed and not avail:
        raise ValueError("distributed=True but torch.distributed is not initialised")
    return avail if distributed is None else bool(distributed)


def _all_reduce(t: torch.Tensor, like: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    dev = like
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    buf = t.detach().to(dev).clone()
    dist.all_reduce(buf)
    return buf.to(t.device)


def _search_sums(p64: torch.Tensor, labels: torch.Tensor, eta: torch.Tensor, max_iter: int, tol: float,
                 backend: Optional[str] = None, device: torch.device = torch.device("cpu")):
    """(sum_n ||q - y||, sum_n q log q) per candidate, eta [C, M, K]; blocks of the flattened grid, no grad."""
    n, k = p64.shape
    c = eta.shape[0]
    solver = _op.solver(backend, device)
    if solver != "reference":
        s1, s2, worst_c = _op.compiled_solve(solver, device, p64, eta, labels, max_iter, tol)
        worst = float(worst_c.max()) if worst_c.numel() else 0.0
        if worst > 1e-6:
            warnings.warn(f"search_coefficients: stationarity residual {worst:.3g} > 1e-6 on some rows")
        return s1, s2
    s1 = torch.zeros(c, dtype=_F64)
    s2 = torch.zeros(c, dtype=_F64)
    zero_c = (eta == 0).flatten(1).all(1) if eta.numel() else torch.ones(c, dtype=torch.bool)
    bs = _block_rows(k)
    worst = 0.0
    with torch.no_grad():
        for s in range(0, c * n, bs):
            e = min(s + bs, c * n)
            q, res, _ = _solve_flat(p64, eta, max_iter, tol, s, e)
            i = torch.arange(s, e)
            ci, ni = i // n, i % n
            q = torch.where(zero_c[ci][:, None], p64[ni], q)
            if res is not None and res.numel():
                worst = max(worst, float(torch.where(zero_c[ci], 0.0, res).max()))
            a, b = _deviation_rows(q, labels[ni])
            s1.index_add_(0, ci, a)
            s2.index_add_(0, ci, b)
    if worst > 1e-6:
        warnings.warn(f"search_coefficients: stationarity residual {worst:.3g} > 1e-6 on some rows")
    return s1, s2


def search_coefficients(
    teacher: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    order: int = 5,
    num_candidates: int = 100,
    low: float = -1.0,
    high: float = 10.0,
    per_class: bool = True,
    temperature: float = 1.0,
    teacher_is_logits: bool = False,
    seed: int = 0,
    refine: bool = False,
    backend: Optional[str] = None,
    refine_steps: int = 20,
    distributed: Optional[bool] = None,
    check_global: bool = True,
) -> CoefficientSearchResult:
    """Random search of PTLoss coefficients by the Proxy Teacher deviation (paper Sec. 4.1.3, Eq. 21).

    The teacher comes in one of two ways, the same two that :func:`tgtfast.ptloss` takes:

    * ``teacher_logits=`` ``[N, K]`` logits (what the losses take by default): ``p = softmax(logits /
      temperature)``, the teacher distribution a ``PTLoss(coeffs, temperature=T)`` distils from; pass the
      temperature you train with. (``search_coefficients(logits, labels, teacher_is_logits=True)`` is the older
      spelling of the same.)
    * ``teacher`` ``[N, K]`` probabilities (the first positional argument), used as given, as
      ``PTLoss(..., teacher_is_logits=False)`` uses them: not tempered, so a ``temperature`` other than 1 with
      probabilities is an error (temper the logits instead, or pass ``teacher_logits=``).

    Args:
        teacher: ``[N, K]`` validation-set teacher probabilities (or logits with ``teacher_is_logits=True``).
        labels: ``[N]`` integer labels in ``[0, K)`` (required).
        teacher_logits: ``[N, K]`` validation-set teacher logits, instead of ``teacher``.
        order: M, the number of perturbation orders. num_candidates: random draws (the paper uses 100).
        low, high: each coefficient is drawn uniformly in ``[low, high]`` (paper: ``[-1, 10]``) from a
            ``torch.Generator`` seeded with ``seed`` (same draws on every machine and rank).
        per_class: draw ``[M, K]`` coefficients (else shared ``[M]``).
        temperature: of the logits (see above).
        refine: continue from the best candidate with ``refine_steps`` steps of projected gradient descent on D
            (gradient by implicit differentiation of the solve, backtracking so D never increases), keeping every
            coefficient in ``[min(low, 0), max(high, 0)]``; ``refined_from`` reports D before.
        backend: ``None``/``"auto"``, ``"cpp"`` or ``"reference"`` (see the module docstring).
        distributed: None = all-reduce across ranks if ``torch.distributed`` is initialised (the validation set
            may be sharded: the per-candidate sums and the row count are all-reduced, so every rank returns what
            one process returns on the whole set; every rank must call this).
        check_global: check that the chosen coefficients' proxy teacher is the global minimiser of the loss on
            this rank's validation rows (``result.global_check``; a ``UserWarning`` when it is not on some row).
            The multi-class solve finds the minimum reached from the teacher; where the loss is non-convex a
            student trained with PTLoss can end in a lower minimum that predicts another class, and the deviation
            then describes a teacher the student does not learn. Costs ``min(K, 10)`` more solves per row.

    Plain KL (``coeffs = 0``) is always candidate 0, so ``result.deviation <= result.kl_deviation``; ties keep the
    earliest candidate.
    """
    order = validation.integer("order", order, low=1)
    num_candidates = validation.integer("num_candidates", num_candidates, low=1)
    refine_steps = validation.integer("refine_steps", refine_steps, low=0)
    low, high = validation.real("low", low), validation.real("high", high)
    if low > high:
        raise ValueError(f"low must be <= high, got low={low} > high={high}")
    temperature = validation.temperature(temperature, _F64)
    seed = validation.integer("seed", seed, low=-(2**63), high=2**64 - 1)  # what torch.Generator.manual_seed takes
    if (teacher is None) == (teacher_logits is None):
        raise TypeError("pass the teacher once: teacher (probabilities, positional) or teacher_logits=")
    if labels is None:
        raise TypeError("labels is required: [N] integer class indices of the validation rows")
    if teacher_logits is not None:
        if teacher_is_logits:
            raise TypeError("teacher_is_logits applies to the positional teacher; teacher_logits= is logits already")
        teacher, teacher_is_logits = teacher_logits, True
    t = _checks.as_tensor(teacher, "teacher_logits" if teacher_logits is not None else "teacher")
    _op.solver(backend, t.device)  # an unknown or unusable backend is refused before any work
    if teacher_is_logits:
        _checks.logits(t, "teacher_logits" if teacher_logits is not None else "teacher")
        p64 = torch.softmax(t.detach().to("cpu", _F64) / temperature, -1)
    else:
        if temperature != 1.0:
            raise ValueError(
                f"temperature={temperature:g} with teacher probabilities: probabilities are used as given (as "
                "PTLoss(..., teacher_is_logits=False) uses them), so a temperature would be ignored; pass the "
                "logits as teacher_logits= to search at that temperature, or temper the probabilities yourself")
        p64 = _checks.probs(t, "teacher").detach().to("cpu", _F64)
        p64 = p64 / p64.sum(-1, keepdim=True) if p64.numel() else p64
    n, k = p64.shape
    labels = _checks.labels(labels, n, k).cpu()
    use_dist = _dist_group_active(distributed)

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (num_candidates, order, k) if per_class else (num_candidates, order)
    draws = low + (high - low) * torch.rand(shape, generator=gen, dtype=_F64)
    cands = torch.cat([torch.zeros((1,) + shape[1:], dtype=_F64), draws])
    eta = cands if per_class else cands[:, :, None].expand(-1, -1, k)

    s1, s2 = _search_sums(p64, labels, eta, 100, 1e-10, backend, t.device)
    cnt = torch.tensor([float(n)], dtype=_F64)
    if use_dist:
        red = _all_reduce(torch.cat([s1, s2, cnt]), t.device)
        c = s1.numel()
        s1, s2, cnt = red[:c], red[c : 2 * c], red[2 * c :]
    total = float(cnt[0])
    if total <= 0:
        raise ValueError("teacher and labels are empty (no validation rows on any rank)")
    devs = (s1 / total) ** 2 + (s2 / total) ** 2
    best = int(torch.argmin(devs))  # first minimum: KL (index 0) wins ties
    best_coeffs = cands[best].clone()
    best_dev = float(devs[best])
    result = CoefficientSearchResult(
        coeffs=best_coeffs, deviation=best_dev, candidate_deviations=devs, kl_deviation=float(devs[0]),
        seed=int(seed), best_index=best, candidates=cands, order=order, per_class=bool(per_class),
        num_classes=k, low=low, high=high, temperature=temperature,
        inputs="logits" if teacher_is_logits else "probs",
    )
    if refine and refine_steps > 0:
        # the refine solves the CPU copies (and differentiates through them): where the search ran the CUDA
        # kernel, a CPU implementation takes over (forcing backend="cuda" on the CPU copies would be refused)
        box = (min(low, 0.0), max(high, 0.0))
        coeffs, d_new, steps = _refine(p64, labels, best_coeffs, best_dev, total, refine_steps, box,
                                       use_dist, t.device, _op.cpu_solver(backend, t.device))
        result.refined_from = best_dev
        result.coeffs, result.deviation, result.refine_steps = coeffs, d_new, steps
    if check_global:
        result.global_check = _check_global(p64, result.coeffs, k, backend, t.device)
    return result


def _check_global(p64, coeffs, k, backend, dev) -> Dict[str, Any]:
    """:func:`global_check` of the chosen coefficients on the local rows, with a warning when it fails."""
    eta = coeffs if coeffs.dim() == 2 else coeffs[:, None].expand(-1, k)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = proxy_teacher(p64, eta, batched=False, backend=_op.cpu_solver(backend, dev))
    out = global_check(p64, eta, q)
    if out["not_global"]:
        warnings.warn(
            f"search_coefficients: on {out['not_global']} of {out['rows']} validation rows the proxy teacher of the "
            f"chosen coefficients is not the global minimiser of the loss (a lower minimum, up to "
            f"{out['worst_gap']:.3g} lower, that predicts another class on {out['argmax_differs']} rows): a student "
            "trained with them can learn other predictions than the Proxy Teacher's. A narrower [low, high] (or no "
            "refine) avoids such coefficients; see result.global_check", UserWarning, stacklevel=3)
    return out


def _global_dev(p64, labels, coeffs, total, use_dist, dev, grad: bool, backend=None):
    """D for one coefficient set (all-reduced); with grad=True also dD/dcoeffs (all-reduced)."""
    if not grad:
        with torch.no_grad():
            q = proxy_teacher(p64, coeffs, batched=False, backend=backend)
            s1, s2 = _deviation_sums(q, labels)
        s = torch.stack([s1, s2])
        if use_dist:
            s = _all_reduce(s, dev)
        return float((s[0] / total) ** 2 + (s[1] / total) ** 2), None
    eta = coeffs.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = proxy_teacher(p64, eta, batched=False, backend=backend)
    s1, s2 = _deviation_sums(q, labels)
    s = torch.stack([s1, s2]).detach()
    if use_dist:
        s = _all_reduce(s, dev)
    # dD/deta = 2 (S1/n) dS1/deta / n + 2 (S2/n) dS2/deta / n, with this rank's share of dS/deta
    surrogate = 2 * (s[0] / total) * s1 / total + 2 * (s[1] / total) * s2 / total
    (g,) = torch.autograd.grad(surrogate, eta)
    if use_dist:
        g = _all_reduce(g, dev)
    return float((s[0] / total) ** 2 + (s[1] / total) ** 2), g


def _refine(p64, labels, coeffs, d0, total, steps, box, use_dist, dev, backend=None):
    """Projected gradient descent with backtracking on D from the best candidate, every coefficient kept in
    ``box = (low, high)``; D never increases."""
    low, high = box
    cur, d_cur = coeffs.clone(), d0
    step = 0.1 * max(high - low, 1.0)  # largest coefficient move per step
    done = 0
    for _ in range(steps):
        _, g = _global_dev(p64, labels, cur, total, use_dist, dev, grad=True, backend=backend)
        if g is not None:  # coefficients at a bound that the step would push out stay there
            g = torch.where(((cur <= low) & (g > 0)) | ((cur >= high) & (g < 0)), torch.zeros_like(g), g)
        gmax = float(g.abs().max()) if g is not None and g.numel() else 0.0
        if not math.isfinite(gmax) or gmax == 0.0:
            break
        improved = False
        for _bt in range(20):
            trial = (cur - (step / gmax) * g).clamp(low, high)
            d_trial, _ = _global_dev(p64, labels, trial, total, use_dist, dev, grad=False, backend=backend)
            if math.isfinite(d_trial) and d_trial < d_cur:
                cur, d_cur, improved = trial, d_trial, True
                step *= 1.5
                break
            step *= 0.5
        if not improved:
            break
        done += 1
    return cur, d_cur, done

