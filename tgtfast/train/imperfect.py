"""Distillation from an imperfect teacher inside the trainer (:mod:`tgtfast.imperfect`; docs/design.md,
"Imperfect teachers"): the teacher's reliability fitted on the labelled validation rows, and the distillation
terms of a step under ``config.imperfect`` and ``config.active_pool``. Every option composes with every
exploration mode.

* ``imperfect="weighted"``: each distilled row (training inputs and new samples) weighted by the teacher's
  estimated accuracy there, ``alpha(x)`` (:func:`tgtfast.imperfect.debiasing_weights`), through the fused forward
  KL of :func:`tgtfast.distill_loss` at the loss's temperature;
* ``imperfect="slam"``: the distillation terms replaced by SLaM's loss (:func:`tgtfast.imperfect.slam_loss`) with
  the teacher's ``alpha(x)`` and ``k(x)``;
* ``active_pool = P > 1``: each step proposes ``P`` times as many new samples as it keeps, without labelling them,
  and keeps ``n * samples_per_example`` of the ``n * samples_per_example * P`` candidates of a micro-batch share
  (``samples_per_example`` per example on average) by robust active selection
  (:func:`tgtfast.imperfect.select_queries`): the student's informativeness against the teacher's correctness
  estimated from the student's margin (:class:`ActiveCorrectness`, fitted on val's labelled rows, refitted every
  ``active_refit_every`` steps), so that only the kept candidates are sent to the labeler. ``"gradient"``
  exploration still labels every candidate during its ascent steps (they follow the teacher's gradient).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from tgtfast.train.data import as_dataset, load_batch
from tgtfast.train.exploration import loss_sum
from tgtfast.train.noise import noise_seed

__all__ = ["IMPERFECT", "needs_reliability", "fit_reliability", "distill_term", "ActiveCorrectness", "select_active"]

IMPERFECT = ("none", "weighted", "slam")


def needs_reliability(config: Any) -> bool:
    """Whether the config's options need the teacher's reliability (``active_pool`` needs
    :class:`ActiveCorrectness` instead)."""
    return config.imperfect != "none"


def check_options(config: Any, loss: Callable) -> None:
    """Refuse combinations that have no meaning, naming the field."""
    import tgtfast

    if config.imperfect == "weighted" and type(loss) is not tgtfast.KDLoss:
        raise ValueError("config.imperfect='weighted' weights the forward KL of tgtfast.KDLoss (its temperature is "
                         f"used); the loss is {type(loss).__name__}")
    if config.imperfect == "slam" and not isinstance(loss, tgtfast.KDLoss):
        raise ValueError("config.imperfect='slam' replaces the distillation loss by SLaM's at the loss's "
                         f"temperature; pass loss=tgtfast.KDLoss(temperature=T), not {type(loss).__name__}")
    if config.active_pool > 1 and config.exploration == "none":
        raise ValueError("config.active_pool > 1 selects among new samples; it needs exploration 'random', "
                         "'gradient' or 'input'")


@torch.no_grad()
def fit_reliability(labeler: Callable, val: Any, batch_fn: Callable, device: torch.device, *, bins: int,
                    temperature: float):
    """:meth:`tgtfast.imperfect.TeacherReliability.fit` on the labeler's logits over the labelled rows of ``val``
    (the validation set given to :meth:`TGTTrainer.fit`)."""
    from tgtfast.imperfect import TeacherReliability

    if val is None:
        raise ValueError("config.imperfect / config.active_pool estimate the teacher's reliability on labelled "
                         "validation rows: pass val= to fit (or reliability= to TGTTrainer)")
    x, y = _labelled_rows(val, batch_fn, device)
    return TeacherReliability.fit(_labeler_logits(labeler, x), y, bins=bins, temperature=temperature)


def distill_term(kind: str, loss: Callable, reliability: Any, temperature: float
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(student_logits, teacher_logits) -> sum over rows`` of the distillation term for ``config.imperfect``."""
    if kind == "none":
        return lambda s, t: loss_sum(loss, s, t)
    from tgtfast import distill_loss
    from tgtfast.imperfect import debiasing_weights, slam_loss

    if kind == "weighted":
        return lambda s, t: distill_loss(s, t, "forward_kl", temperature=temperature, reduction="sum",
                                         weight=debiasing_weights(t, reliability).to(s.device))
    return lambda s, t: slam_loss(s, t, reliability.accuracy(t).to(s.device), reliability.k(t).to(s.device),
                                  temperature=temperature, reduction="sum")


class ActiveCorrectness:
    """The teacher's correctness on a candidate it has not labelled, estimated from the student's margin there.

    The labeler is run once on the labelled rows of ``val`` (``right``: its top-1 class is the label); every
    :meth:`refit` fits a :class:`tgtfast.imperfect.MonotoneCurve` (``bins`` equal-count bins, made monotone) of
    "teacher right" against the current student's margin on those rows; :meth:`__call__` reads it at the
    candidates' student margins. The curve is piecewise constant, so the candidates fall into at most ``bins``
    groups of equal estimated correctness (the adversary's groups of the robust selection). Without ``val`` but
    with a given reliability, the correctness is the teacher's overall accuracy on its split (one group)."""

    def __init__(self, x: Optional[torch.Tensor], right: Optional[torch.Tensor], bins: int,
                 constant: Optional[float] = None) -> None:
        self.x, self.right, self.bins, self.constant = x, right, bins, constant
        self.curve = None
        self.fitted_at = -1

    @classmethod
    @torch.no_grad()
    def build(cls, labeler: Callable, val: Any, batch_fn: Callable, device: torch.device, *, bins: int,
              reliability: Any = None) -> "ActiveCorrectness":
        """From the labelled rows of ``val`` (``MIN_PER_BIN * bins`` of them at least); without ``val``, the
        given ``reliability``'s accuracy as a constant."""
        from tgtfast.imperfect import MIN_PER_BIN

        if val is None:
            if reliability is None:
                raise ValueError("config.active_pool estimates the teacher's correctness on unlabelled candidates "
                                 "from the student's margin, fitted on labelled validation rows: pass val= to fit "
                                 "(or reliability= to TGTTrainer, whose overall accuracy is then used)")
            return cls(None, None, bins, float(reliability.accuracy_mean))
        x, y = _labelled_rows(val, batch_fn, device)
        need = MIN_PER_BIN * bins
        if x.shape[0] < need:
            raise ValueError(f"config.active_pool fits the teacher's correctness against the student's margin in "
                             f"config.reliability_bins={bins} bins of {MIN_PER_BIN} labelled val rows each ({need}); "
                             f"val has {x.shape[0]}: use fewer bins (bins={max(x.shape[0] // MIN_PER_BIN, 1)}) or "
                             "more labelled validation rows")
        return cls(x, _labeler_logits(labeler, x).argmax(-1) == y, bins)

    @torch.no_grad()
    def refit(self, student: nn.Module, step: int) -> None:
        """Fit the curve to the student as it is now (in eval mode) and remember ``step``."""
        from tgtfast.imperfect import MonotoneCurve
        from tgtfast.imperfect.reliability import teacher_scores

        if self.x is None:
            return
        margins = teacher_scores(_eval_logits(student, self.x), "margin").cpu().numpy()
        self.curve = MonotoneCurve.fit(margins, self.right.cpu().numpy(), method="binned", bins=self.bins)
        self.fitted_at = step

    def refit_if_due(self, student: nn.Module, step: int, every: int) -> None:
        """:meth:`refit` before the first step, then at every multiple of ``every`` steps (0: never again)."""
        if self.fitted_at < 0 or (every and step % every == 0 and self.fitted_at != step):
            self.refit(student, step)

    def __call__(self, student_logits: torch.Tensor) -> torch.Tensor:
        """The estimated probability that the teacher labels each candidate right (float64, on the CPU)."""
        from tgtfast.imperfect.reliability import teacher_scores

        if self.constant is not None:
            return torch.full((student_logits.shape[0],), self.constant, dtype=torch.float64)
        return self.curve(teacher_scores(student_logits, "margin").cpu()).clamp(0.0, 1.0)

    def state(self) -> Optional[Dict[str, Any]]:
        """The fitted curve as tensors (for a checkpoint), or None."""
        if self.curve is None:
            return None
        return {"knots": torch.as_tensor(self.curve.knots), "values": torch.as_tensor(self.curve.values),
                "step": self.fitted_at}

    def load(self, state: Optional[Dict[str, Any]]) -> None:
        """Restore a curve written by :meth:`state` (a checkpoint)."""
        from tgtfast.imperfect import MonotoneCurve

        if state is None or self.x is None:
            return
        self.curve = MonotoneCurve("binned", state["knots"].numpy(), state["values"].numpy())
        self.fitted_at = int(state["step"])


def _labelled_rows(val: Any, batch_fn: Callable, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    dataset, collate = as_dataset(val, "val")
    xs, ys = [], []
    for i in range(0, len(dataset), 512):
        x, y = load_batch(dataset, collate, batch_fn, list(range(i, min(i + 512, len(dataset)))), device)
        if y is None:
            raise ValueError("val has no labels: the teacher's correctness is fitted on labelled rows")
        keep = y != -100
        xs.append(x[keep])
        ys.append(y[keep])
    return torch.cat(xs), torch.cat(ys)


def _labeler_logits(labeler: Callable, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([labeler(x[i:i + 512]).float() for i in range(0, x.shape[0], 512)])


def _eval_logits(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = student.training
    student.eval()  # no dropout draws, no batch-norm statistics updates
    try:
        return torch.cat([student(x[i:i + 1024]).float() for i in range(0, x.shape[0], 1024)])
    finally:
        student.train(was)


@torch.no_grad()
def select_active(candidates: torch.Tensor, keep: int, *, student: nn.Module, correctness: ActiveCorrectness,
                  seed: int, step: int, micro: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` candidates the teacher is asked to label, by
    :func:`tgtfast.imperfect.select_queries`: the student's informativeness (``1 -`` its margin, in eval mode)
    against the teacher's estimated correctness (``correctness``, from the same student logits), drawn from the
    step's own stream ``noise_seed(seed, step, micro, 1)``. The teacher is not queried."""
    from tgtfast.imperfect import select_queries, student_informativeness

    logits = _eval_logits(student, candidates)
    g = torch.Generator().manual_seed(noise_seed(seed, step, micro, 1))
    idx = select_queries(student_informativeness(logits).cpu(), correctness(logits), keep, generator=g)
    return idx.to(candidates.device)


def resolve(config: Any, reliability: Optional[Any], labeler: Callable, val: Any,
            batch_fn: Callable, device: torch.device, temperature: float):
    """The reliability a run uses: given, or fitted on ``val`` when an option needs one (else None)."""
    if not needs_reliability(config):
        return reliability
    return reliability if reliability is not None else fit_reliability(
        labeler, val, batch_fn, device, bins=config.reliability_bins, temperature=temperature)
