"""Robust active distillation (Baykal et al., ICLR 2023; docs/design.md, "Imperfect teachers").

Under a budget of teacher queries, choose in rounds the points whose soft labels to buy: points that are
informative for the student (its uncertainty) and likely to be labelled correctly by the teacher. The selection is
the paper's game: the learner picks inclusion probabilities ``pi`` (``sum pi = budget``, ``0 <= pi_i <= 1``), an
adversary then decides which points the teacher gets wrong, and the learner is paid the informativeness ``g_i`` of
each point it queried and the teacher labelled correctly:

    ``max_pi  min_c  sum_i pi_i g_i (1 - c_i)``,  ``0 <= c_i <= 1``,  ``sum_{i in group b} c_i <= m_b``.

``m_b = sum_{i in b} (1 - q_i)`` is the expected number of the teacher's mistakes among a group of points whose
estimated correctness ``q_i`` is the same (the level sets of the reliability estimate, which is piecewise constant).
With one group (only the teacher's overall accuracy known) this is the paper's setting: the adversary puts the
teacher's mistakes where they hurt most, and the optimum spreads the queries over the top-informative points with
``pi_i`` proportional to ``1 / g_i`` rather than taking the most informative ones, whose labels it could all spoil.
With a distinct ``q_i`` per point every group is one point and the optimum takes the largest ``g_i q_i``. The inner
minimum is dualised (``lambda_b`` per group, ``mu_i`` per point) and the whole is one linear programme, solved
exactly by a bisection on the budget's price (:func:`_max_min_probabilities`, ``O(n log n)``; the programme through
scipy's HiGHS, :func:`_lp_probabilities`, is what it is tested against); the chosen set is then drawn with exactly
these inclusion probabilities (systematic sampling in a random order).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from tgtfast import validation as V

__all__ = ["student_informativeness", "robust_query_probabilities", "select_queries", "RobustActiveSelector"]

_KINDS = ("margin", "entropy", "least_confidence")


def student_informativeness(student_logits: torch.Tensor, *, kind: str = "margin",
                            temperature: float = 1.0) -> torch.Tensor:
    """How much the student would learn from a label, per row of ``student_logits`` ``[..., V]``, in ``[0, 1]``:
    ``"margin"`` is ``1 - (p_1 - p_2)`` (the paper's choice), ``"entropy"`` the entropy over ``log V``,
    ``"least_confidence"`` ``1 - p_1`` (float32, no gradient)."""
    V.tensor("student_logits", student_logits, floating=True, min_dim=1)
    V.choice("kind", kind, _KINDS)
    if student_logits.shape[-1] < 2:
        raise ValueError(f"student_logits must have at least 2 classes, got shape {tuple(student_logits.shape)}")
    x = student_logits.detach().to(torch.float64)
    if bool(torch.isnan(x).any()) or bool((x == float("inf")).any()):
        raise ValueError("student_logits must not contain NaN or +inf")
    logp = torch.log_softmax(x / V.temperature(temperature), dim=-1)
    p = logp.exp()
    if kind == "margin":
        top = p.topk(2, dim=-1).values
        out = 1 - (top[..., 0] - top[..., 1])
    elif kind == "entropy":
        out = -torch.where(p > 0, p * logp, torch.zeros((), dtype=p.dtype)).sum(-1) / np.log(p.shape[-1])
    else:
        out = 1 - p.amax(-1)
    return out.clamp(0, 1).to(torch.float32)


def _vectors(student_scores, correctness_prob) -> Tuple[np.ndarray, np.ndarray]:
    V.tensor("student_scores", student_scores, floating=True, dims=(1,))
    g = student_scores.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(g).all() or (g < 0).any():
        raise ValueError("student_scores must be finite and non-negative (informativeness, higher = more useful)")
    if isinstance(correctness_prob, torch.Tensor):
        V.tensor("correctness_prob", correctness_prob, floating=True, dims=(0, 1))
        q = correctness_prob.detach().to(torch.float64).cpu().numpy().reshape(-1)
        if q.size == 1:
            q = np.full_like(g, q[0])
        if q.shape != g.shape:
            raise ValueError(f"correctness_prob must be a number or hold one value per point ({g.size}), got "
                             f"shape {tuple(correctness_prob.shape)}")
    else:
        q = np.full_like(g, V.real("correctness_prob", correctness_prob))
    if np.isnan(q).any() or (q < 0).any() or (q > 1).any():
        raise ValueError("correctness_prob must be in [0, 1] (the probability the teacher labels a point right)")
    return g, q


def robust_query_probabilities(student_scores: torch.Tensor, correctness_prob: Union[float, torch.Tensor],
                               budget: int) -> torch.Tensor:
    """The max-min inclusion probabilities of the module docstring (float64 ``[n]``, each in ``[0, 1]``, summing
    to ``budget``). ``student_scores``: informativeness ``g_i >= 0``; ``correctness_prob``: ``q_i`` in ``[0, 1]``
    (a number: only the overall accuracy is known); points with equal ``q`` form one group of the adversary."""
    g, q = _vectors(student_scores, correctness_prob)
    n = g.size
    budget = V.integer("budget", budget, low=0)
    if budget > n:
        raise ValueError(f"budget={budget} is larger than the {n} candidate points: there is nothing left to "
                         f"choose from; lower the budget or offer more candidates")
    if budget == 0 or budget == n:
        return torch.full((n,), float(budget > 0), dtype=torch.float64)
    return torch.from_numpy(_exact_budget(_max_min_probabilities(g, q, budget), budget))


def _groups(q: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Group index of each point (equal ``q``) and each group's expected mistakes ``m_b = sum (1 - q_i)``."""
    values, group = np.unique(q, return_inverse=True)
    return group, np.bincount(group, weights=1 - q, minlength=values.size)


def _lagrangian_probabilities(g: np.ndarray, group: np.ndarray, m: np.ndarray, order: np.ndarray,
                              starts: np.ndarray, mu: float) -> np.ndarray:
    """The maximiser of the game's Lagrangian at the budget price ``mu`` (see :func:`_max_min_probabilities`)."""
    gs, gr = g[order], group[order]  # by group, most informative first within a group
    active = gs > mu
    c = np.where(active, 1.0 - mu / np.where(active, gs, 1.0), 0.0)
    total = np.cumsum(c)
    seg = total - (total[starts] - c[starts])[gr]
    within = active & (seg <= m[gr] * (1 + 1e-12) + 1e-15)
    count = np.bincount(gr, weights=within.astype(np.float64), minlength=m.size).astype(np.int64)
    n_active = np.bincount(gr, weights=active.astype(np.float64), minlength=m.size).astype(np.int64)
    lam = np.where(count < n_active, gs[np.minimum(starts + count, gs.size - 1)], 0.0)
    pi_sorted = np.where(active, np.minimum(1.0, lam[gr] / np.where(active, gs, 1.0)), 0.0)
    pi = np.empty_like(pi_sorted)
    pi[order] = pi_sorted
    return pi


def _max_min_probabilities(g: np.ndarray, q: np.ndarray, budget: int) -> np.ndarray:
    """Exact solution of the game, in ``O(n log n)`` per price and a bisection on the price.

    With ``a_i = pi_i g_i`` the adversary removes the ``m_b`` largest ``a_i`` of each group, so the learner maximises
    ``sum_b max_{lambda_b >= 0} [sum_{i in b} min(a_i, lambda_b) - m_b lambda_b]`` over ``sum pi = budget``,
    ``0 <= pi <= 1``. With a price ``mu`` on the budget the groups separate: a point with ``g_i > mu`` is worth
    ``min(1, lambda_b / g_i) (g_i - mu)``, and the best ``lambda_b`` is the ``(j + 1)``-th largest ``g`` of the group,
    ``j`` the most points whose ``sum (1 - mu / g_i)`` stays within ``m_b`` (0 when all of them do); then
    ``pi_i = min(1, lambda_b / g_i)``. The total falls as ``mu`` rises; a bisection finds the price where it crosses
    the budget, and the two maximisers on either side of it are mixed to spend the budget exactly (both maximise
    the Lagrangian there, so the mixture is optimal)."""
    group, m = _groups(q)
    order = np.lexsort((-g, group))
    starts = np.searchsorted(group[order], np.arange(m.size))
    at = lambda mu: _lagrangian_probabilities(g, group, m, order, starts, mu)  # noqa: E731
    lo, hi = 0.0, float(g.max())
    pi_lo, pi_hi = at(lo), np.zeros_like(g)
    if pi_lo.sum() <= budget:  # even at price 0 the budget is not spent: the rest adds no value; fill it
        return _fill(pi_lo, budget)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        pi_mid = at(mid)
        if pi_mid.sum() >= budget:
            lo, pi_lo = mid, pi_mid
        else:
            hi, pi_hi = mid, pi_mid
    s_lo, s_hi = pi_lo.sum(), pi_hi.sum()
    theta = 1.0 if s_lo == s_hi else (budget - s_hi) / (s_lo - s_hi)
    return theta * pi_lo + (1.0 - theta) * pi_hi


def _fill(pi: np.ndarray, budget: int) -> np.ndarray:
    """Raise the probabilities in proportion to their room until they sum to the budget (at price 0 the budget left
    over adds no value, wherever it goes)."""
    room = 1.0 - pi
    gap = budget - pi.sum()
    return pi + room * (gap / room.sum()) if gap > 0 else pi


def _lp_probabilities(g: np.ndarray, q: np.ndarray, budget: int) -> np.ndarray:
    """The same game as one linear programme (scipy's HiGHS): the specification the fast solver is tested
    against."""
    from scipy import sparse
    from scipy.optimize import linprog

    n = g.size
    group, m = _groups(q)
    G = m.size
    # variables: pi (n), mu (n), lambda (G); minimise -sum g pi + sum mu + sum m lambda
    cost = np.concatenate([-g, np.ones(n), m])
    rows = np.arange(n)
    a_ub = sparse.csr_matrix(
        (np.concatenate([g, -np.ones(n), -np.ones(n)]),
         (np.concatenate([rows, rows, rows]), np.concatenate([rows, n + rows, 2 * n + group]))),
        shape=(n, 2 * n + G))
    a_eq = sparse.csr_matrix((np.ones(n), (np.zeros(n, dtype=np.int64), rows)), shape=(1, 2 * n + G))
    bounds = np.array([(0.0, 1.0)] * n + [(0.0, None)] * (n + G), dtype=object)
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[float(budget)], bounds=bounds,
                  method="highs")
    if res.status != 0:  # the programme is always feasible and bounded; a solver failure is not the caller's
        raise RuntimeError(f"the robust selection programme did not solve: {res.message}")
    return res.x[:n]


def _exact_budget(pi: np.ndarray, budget: int) -> np.ndarray:
    """Clip the solver's probabilities to [0, 1] and move its rounding error so that they sum to the budget."""
    pi = np.clip(pi, 0.0, 1.0)
    gap = budget - pi.sum()
    if gap > 0:
        room = 1 - pi
        pi = pi + room * (gap / room.sum())
    elif gap < 0:
        pi = pi * (budget / pi.sum())
    return np.clip(pi, 0.0, 1.0)


def _systematic(pi: np.ndarray, budget: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``budget`` distinct indices, index ``i`` included with probability ``pi[i]`` (systematic sampling over a
    random order of the points)."""
    n = pi.size
    order = torch.randperm(n, generator=generator).numpy()
    cum = np.cumsum(pi[order])
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    hits = np.searchsorted(cum, u + np.arange(budget), side="right").clip(max=n - 1)
    chosen = list(dict.fromkeys(order[hits].tolist()))  # a float tie can repeat a point: keep it once
    if len(chosen) < budget:  # then fill with the most probable points left
        rest = [i for i in np.argsort(-pi, kind="stable").tolist() if i not in set(chosen)]
        chosen += rest[: budget - len(chosen)]
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def select_queries(student_scores: torch.Tensor, correctness_prob: Union[float, torch.Tensor], budget: int, *,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Choose ``budget`` distinct points to send to the teacher: drawn with the inclusion probabilities of
    :func:`robust_query_probabilities` (int64 indices, ascending). ``budget`` larger than the number of points is a
    ``ValueError``."""
    pi = robust_query_probabilities(student_scores, correctness_prob, budget).numpy()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return _systematic(pi, int(budget), generator).to(student_scores.device)


Correctness = Union[float, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class RobustActiveSelector:
    """A budget of teacher queries spent in rounds, with :func:`select_queries` each round.

    ``budget`` queries in all over ``rounds`` rounds (the round sizes differ by at most one). Each round, call
    :meth:`select_from_pool` with the student's informativeness over a fixed unlabelled pool (points queried in an
    earlier round are left out; the indices returned are the pool's), or :meth:`select_generated` with a callable
    producing fresh candidates (TGT's generated inputs) and one scoring them. ``correctness`` is the teacher's
    estimated correctness per point: a number (its accuracy), a tensor, or a callable of the candidates' student
    logits (e.g. a :class:`~tgtfast.imperfect.MonotoneCurve` of the teacher's correctness against the student's
    margin, fitted on the labelled split, since the teacher has not labelled the candidates yet)."""

    def __init__(self, budget: int, rounds: int = 1, *, generator: Optional[torch.Generator] = None) -> None:
        self.budget = V.integer("budget", budget, low=1)
        self.rounds = V.integer("rounds", rounds, low=1, high=self.budget)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.round = 0
        self.spent = 0
        self.queried = torch.empty(0, dtype=torch.int64)  # pool indices chosen so far

    @property
    def done(self) -> bool:
        """Whether every round has been run."""
        return self.round >= self.rounds

    def next_round_size(self) -> int:
        """Queries of the next round: what is left spread evenly over the rounds left."""
        if self.done:
            raise RuntimeError(f"all {self.rounds} rounds have been run ({self.spent} queries of {self.budget})")
        return (self.budget - self.spent) // (self.rounds - self.round)

    def _take(self, scores: torch.Tensor, correctness: Union[float, torch.Tensor]) -> torch.Tensor:
        size = self.next_round_size()
        idx = select_queries(scores, correctness, size, generator=self.generator)
        self.round += 1
        self.spent += size
        return idx

    def select_from_pool(self, student_scores: torch.Tensor, correctness: Correctness, *,
                         student_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This round's queries from a fixed pool: ``student_scores`` ``[n]`` (informativeness of every pool
        point, e.g. :func:`student_informativeness`), ``correctness`` as in the class docstring (a callable gets
        ``student_logits``). Returns pool indices not returned before. The whole budget larger than the pool is a
        ``ValueError`` at the first round."""
        V.tensor("student_scores", student_scores, floating=True, dims=(1,))
        n = student_scores.shape[0]
        if self.round == 0 and self.budget > n:
            raise ValueError(f"budget={self.budget} is larger than the pool of {n} points")
        left = torch.ones(n, dtype=torch.bool)
        left[self.queried] = False
        keep = left.nonzero().squeeze(1)
        if isinstance(correctness, torch.Tensor) and correctness.dim() == 1:
            correctness = correctness[keep.to(correctness.device)]
        if callable(correctness):
            if student_logits is None:
                raise ValueError("a callable correctness needs student_logits=... (the pool's student logits)")
            correctness = correctness(student_logits[keep.to(student_logits.device)])
        idx = keep[self._take(student_scores[keep.to(student_scores.device)].cpu(), correctness).cpu()]
        self.queried = torch.cat([self.queried, idx])
        return idx.to(student_scores.device)

    def select_generated(self, propose: Callable[[int], torch.Tensor],
                         score: Callable[[torch.Tensor], Tuple[torch.Tensor, Union[float, torch.Tensor]]],
                         num_candidates: int) -> torch.Tensor:
        """This round's queries among ``num_candidates`` fresh candidates: ``propose(num_candidates)`` returns
        them (a tensor, one per row); ``score(candidates)`` returns ``(informativeness [n], correctness)``.
        Returns the chosen candidates' rows."""
        num_candidates = V.integer("num_candidates", num_candidates, low=1)
        size = self.next_round_size()
        if size > num_candidates:
            raise ValueError(f"this round queries {size} points but only num_candidates={num_candidates} are "
                             f"proposed; propose at least as many candidates as the round's budget")
        candidates = propose(num_candidates)
        if not isinstance(candidates, torch.Tensor) or candidates.shape[0] != num_candidates:
            raise ValueError(f"propose({num_candidates}) must return a tensor with {num_candidates} rows")
        info, correctness = score(candidates)
        idx = self._take(info, correctness)
        return candidates[idx.to(candidates.device)]
