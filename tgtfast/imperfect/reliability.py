"""How often an imperfect teacher is right, as a function of how sure it is (docs/design.md, "Imperfect teachers").

:class:`TeacherReliability` is fitted once on a labelled validation split from the teacher's logits there. It maps a
score of the teacher's output (its top-1 probability, ``score="confidence"``, or the gap between its two largest
probabilities, ``score="margin"``) to the probability ``alpha(x)`` that the teacher's top-1 class is the true one,
with a non-decreasing curve: isotonic regression (pool-adjacent-violators) or equal-count bins made monotone the
same way. The three methods of :mod:`tgtfast.imperfect` share it: weighted distillation's weights, SLaM's
``alpha(x)`` and ``k(x)``, and the correctness the robust active selection trades against informativeness.

The same monotone fit of a 0/1 outcome against a score is :class:`MonotoneCurve`; it also serves to estimate the
teacher's correctness from a cheap score (the student's margin) where the teacher has not been queried yet.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from tgtfast import metrics
from tgtfast import validation as V

__all__ = ["MIN_PER_BIN", "MonotoneCurve", "TeacherReliability", "teacher_scores", "pav"]

MIN_PER_BIN = 25
"""Labelled examples needed per bin: a bin's accuracy then has a standard error of at most
``sqrt(0.25 / 25) = 0.1`` (the worst case, accuracy 0.5). A fit with ``bins`` bins needs ``MIN_PER_BIN * bins``."""

_METHODS = ("isotonic", "binned")
_SCORES = ("margin", "confidence")


def pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to ``y`` in weighted least squares."""
    vals, wts, sizes = [], [], []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            vals[-2] = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            wts[-2] = wsum
            sizes[-2] += sizes[-1]
            del vals[-1], wts[-1], sizes[-1]
    return np.repeat(np.asarray(vals, dtype=np.float64), sizes)


class MonotoneCurve:
    """A non-decreasing map from a score to a probability, fitted to 0/1 outcomes.

    ``method="isotonic"``: isotonic regression of the outcomes on the scores (tied scores pooled first),
    evaluated by linear interpolation between the fitted scores and held constant outside them (as
    scikit-learn's ``IsotonicRegression(out_of_bounds="clip")`` predicts). ``method="binned"``: ``bins``
    equal-count bins of the sorted scores, each bin's mean outcome, made non-decreasing by pool-adjacent-violators
    (weighted by the bins' counts), evaluated as a step function."""

    def __init__(self, method: str, knots: np.ndarray, values: np.ndarray) -> None:
        self.method = method
        self.knots = np.asarray(knots, dtype=np.float64)  # isotonic: fitted scores; binned: inner bin edges
        self.values = np.asarray(values, dtype=np.float64)

    @classmethod
    def fit(cls, scores: np.ndarray, outcomes: np.ndarray, *, method: str = "isotonic", bins: int = 10) -> "MonotoneCurve":
        """Fit to ``scores`` (float, ``[n]``) and ``outcomes`` (0/1, ``[n]``); no size check here."""
        order = np.argsort(scores, kind="stable")
        x, y = scores[order], outcomes[order].astype(np.float64)
        if method == "isotonic":
            knots, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
            means = np.bincount(inverse, weights=y) / counts
            return cls(method, knots, pav(means, counts.astype(np.float64)))
        chunks = np.array_split(np.arange(len(x)), bins)
        means = np.array([y[c].mean() for c in chunks])
        counts = np.array([len(c) for c in chunks], dtype=np.float64)
        edges = np.array([(x[a[-1]] + x[b[0]]) / 2 for a, b in zip(chunks[:-1], chunks[1:])])
        return cls(method, edges, pav(means, counts))

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """The curve at ``scores`` (any shape), in their dtype and on their device."""
        knots = torch.as_tensor(self.knots, dtype=scores.dtype, device=scores.device)
        values = torch.as_tensor(self.values, dtype=scores.dtype, device=scores.device)
        if self.method == "binned":
            return values[torch.searchsorted(knots, scores.contiguous(), right=True)]
        if knots.numel() == 1:
            return values.expand(scores.shape).clone()
        x = scores.clamp(knots[0], knots[-1])
        hi = torch.searchsorted(knots, x.contiguous(), right=True).clamp(1, knots.numel() - 1)
        x0, x1, y0, y1 = knots[hi - 1], knots[hi], values[hi - 1], values[hi]
        return y0 + (y1 - y0) * ((x - x0) / (x1 - x0))


def teacher_scores(logits: torch.Tensor, score: str = "margin", temperature: float = 1.0) -> torch.Tensor:
    """The teacher's certainty per row of ``logits`` ``[..., V]``: ``"margin"`` (largest minus second largest
    probability of ``softmax(logits / T)``, 1 when ``V == 1``) or ``"confidence"`` (the largest probability)."""
    p = torch.softmax(logits.detach().to(torch.float64) / temperature, dim=-1)
    if score == "confidence" or p.shape[-1] == 1:
        return p.amax(-1) if score == "confidence" else torch.ones_like(p[..., 0])
    top = p.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def _flat_checked(teacher_logits, labels, ignore_index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    V.tensor("teacher_logits", teacher_logits, floating=True, min_dim=2)
    if teacher_logits.shape[-1] < 2:
        raise ValueError(f"teacher_logits must have at least 2 classes, got shape {tuple(teacher_logits.shape)}")
    x = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    if labels is not None:
        V.target(labels, teacher_logits.shape[:-1], "teacher_logits'", "teacher_logits", teacher_logits.device,
                 name="labels")
        labels = labels.reshape(-1)
        keep = labels != ignore_index
        x, labels = x[keep], labels[keep]
        bad = (labels < 0) | (labels >= x.shape[-1])
        if bool(bad.any()):
            raise ValueError(f"labels must be class indices in [0, {x.shape[-1]}) or ignore_index={ignore_index}; "
                             f"found {int(labels[bad][0])}")
    if bool(torch.isnan(x).any()) or bool((x == float("inf")).any()):
        raise ValueError("teacher_logits must not contain NaN or +inf")
    if bool(torch.isneginf(x).all(-1).any()):
        raise ValueError("teacher_logits has a row that is -inf everywhere (no class has probability)")
    return x, labels


class TeacherReliability:
    """The teacher's accuracy as a non-decreasing function of its margin or confidence, from a labelled split.

    Fit with :meth:`fit`; :meth:`accuracy` gives ``alpha(x)`` for new teacher logits, :meth:`k` SLaM's ``k(x)``,
    :attr:`ece` the teacher's own expected calibration error on the split and :attr:`num_examples` its size.
    """

    def __init__(self, curve: MonotoneCurve, topk_curves: Tuple[MonotoneCurve, ...], *, score: str, method: str,
                 bins: int, temperature: float, coverage: float, ece: float, num_examples: int,
                 accuracy_mean: float) -> None:
        self.curve = curve
        self.topk_curves = topk_curves  # topk_curves[j]: P(label in the teacher's top-(j + 1)) against the score
        self.score = score
        self.method = method
        self.bins = bins
        self.temperature = temperature
        self.coverage = coverage
        self.ece = ece
        self.num_examples = num_examples
        self.accuracy_mean = accuracy_mean

    @classmethod
    def fit(
        cls,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        method: str = "isotonic",
        score: str = "margin",
        bins: int = 10,
        temperature: float = 1.0,
        max_k: int = 10,
        coverage: float = 0.9,
        ignore_index: int = -100,
    ) -> "TeacherReliability":
        """Fit on a labelled validation split.

        Args:
            teacher_logits: ``[N, V]`` (or ``[..., V]``) the teacher's logits on the split.
            labels: the true classes, the logits' leading shape; rows equal to ``ignore_index`` are left out.
            method: ``"isotonic"`` or ``"binned"`` (equal-count bins, then made monotone).
            score: ``"margin"`` (top-1 minus top-2 probability) or ``"confidence"`` (top-1 probability).
            bins: bins of the binned curve and of the ECE; the split needs ``MIN_PER_BIN * bins`` examples
                (25 per bin: a bin's accuracy then has a standard error of at most 0.1) whatever the method.
            temperature: the temperature of the teacher's softmax (that of the labels it gives).
            max_k: the largest ``k(x)`` SLaM may use (clipped to ``V``).
            coverage: ``k(x)`` is the smallest ``k >= 2`` whose estimated top-k accuracy at ``x`` reaches it.

        Returns:
            The fitted estimate.
        """
        V.choice("method", method, _METHODS)
        V.choice("score", score, _SCORES)
        bins = V.integer("bins", bins, low=1)
        temperature = V.temperature(temperature)
        max_k = V.integer("max_k", max_k, low=2)
        coverage = V.real("coverage", coverage, low=0.0, high=1.0, low_inclusive=False, high_inclusive=True)
        x, y = _flat_checked(teacher_logits, labels, V.integer("ignore_index", ignore_index))
        n, need = x.shape[0], MIN_PER_BIN * bins
        if n < need:
            raise ValueError(
                f"a reliability estimate with bins={bins} needs at least {need} labelled examples ({MIN_PER_BIN} "
                f"per bin, so that each bin's accuracy has a standard error of at most 0.1); got {n}. Use more "
                f"labelled examples or fewer bins (bins={max(n // MIN_PER_BIN, 1)} fits {n} examples)"
                if n >= MIN_PER_BIN else
                f"a reliability estimate needs at least {need} labelled examples ({MIN_PER_BIN} per bin x bins={bins};"
                f" at least {MIN_PER_BIN} even with bins=1); got {n}"
            )
        s = teacher_scores(x, score, temperature).cpu().numpy()
        p = torch.softmax(x.to(torch.float64) / temperature, dim=-1)
        kmax = min(max_k, x.shape[-1])
        rank_of_label = (p > p.gather(-1, y.unsqueeze(-1))).sum(-1).cpu().numpy()  # 0 = the label is top-1
        curves = tuple(MonotoneCurve.fit(s, rank_of_label < j, method=method, bins=bins) for j in range(1, kmax + 1))
        correct = rank_of_label == 0
        return cls(curves[0], curves, score=score, method=method, bins=bins, temperature=temperature,
                   coverage=coverage, ece=metrics.expected_calibration_error(p, y, num_bins=bins), num_examples=n,
                   accuracy_mean=float(correct.mean()))

    def scores(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The score (margin or confidence) the curves read, per row of ``teacher_logits`` (float64)."""
        x, _ = _flat_checked(teacher_logits, None, -100)
        return teacher_scores(x, self.score, self.temperature).reshape(teacher_logits.shape[:-1])

    def accuracy(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``alpha(x)``: the estimated probability that the teacher's top-1 class is right, per row (float32,
        the logits' leading shape and device; no gradient)."""
        return self.curve(self.scores(teacher_logits)).to(torch.float32)

    def topk_accuracy(self, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
        """The estimated probability that the true class is among the teacher's top ``k``, per row."""
        k = V.integer("k", k, low=1, high=len(self.topk_curves))
        return self.topk_curves[k - 1](self.scores(teacher_logits)).to(torch.float32)

    def k(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """SLaM's ``k(x)`` per row (int64): the smallest ``k >= 2`` whose estimated top-k accuracy at ``x``
        reaches ``coverage``, else the largest ``k`` fitted."""
        s = self.scores(teacher_logits)
        kmax = len(self.topk_curves)
        out = torch.full(s.shape, kmax, dtype=torch.int64, device=s.device)
        for k in range(kmax - 1, 1, -1):  # the smallest qualifying k wins: walk down, overwrite
            out = torch.where(self.topk_curves[k - 1](s) >= self.coverage, torch.full_like(out, k), out)
        return out

    def __repr__(self) -> str:
        return (f"TeacherReliability(method={self.method!r}, score={self.score!r}, num_examples={self.num_examples}, "
                f"accuracy={self.accuracy_mean:.4f}, ece={self.ece:.4f})")
