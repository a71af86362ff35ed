"""Distillation from an imperfect teacher inside the trainer (:mod:`tgtfast.imperfect`; docs/design.md,
"Imperfect teachers"): the teacher's reliability fitted on the labelled validation rows, and the distillation
terms of a step under ``config.imperfect`` and ``config.active_pool``. Every option composes with every
exploration mode.

* ``imperfect="weighted"``: each distilled row (training inputs and new samples) weighted by the teacher's
  estimated accuracy there, ``alpha(x)`` (:func:`tgtfast.imperfect.debiasing_weights`), through the fused forward
  KL of :func:`tgtfast.distill_loss` at the loss's temperature;
* ``imperfect="slam"``: the distillation terms replaced by SLaM's loss (:func:`tgtfast.imperfect.slam_loss`) with
  the teacher's ``alpha(x)`` and ``k(x)``;
* ``active_pool = P > 1``: each step proposes ``P`` times as many new samples as it keeps and keeps
  ``samples_per_example`` per example by robust active selection (:func:`tgtfast.imperfect.select_queries`:
  the student's informativeness, the teacher's estimated correctness on the candidate). The teacher labels every
  candidate in the fused perturb -> decode -> label step; only the kept ones enter the loss.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from tgtfast.train.data import as_dataset, load_batch
from tgtfast.train.exploration import loss_sum
from tgtfast.train.noise import noise_seed

__all__ = ["IMPERFECT", "needs_reliability", "fit_reliability", "distill_term", "select_active"]

IMPERFECT = ("none", "weighted", "slam")


def needs_reliability(config: Any) -> bool:
    """Whether the config's options need the teacher's reliability."""
    return config.imperfect != "none" or config.active_pool > 1


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
    dataset, collate = as_dataset(val, "val")
    logits, labels = [], []
    for i in range(0, len(dataset), 512):
        x, y = load_batch(dataset, collate, batch_fn, list(range(i, min(i + 512, len(dataset)))), device)
        if y is None:
            raise ValueError("val has no labels: the teacher's reliability is fitted on labelled rows")
        logits.append(labeler(x).float())
        labels.append(y)
    return TeacherReliability.fit(torch.cat(logits), torch.cat(labels), bins=bins, temperature=temperature)


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


@torch.no_grad()
def select_active(x_new: torch.Tensor, t_new: torch.Tensor, keep: int, *, student: nn.Module, reliability: Any,
                  seed: int, step: int, micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``keep`` of the candidates ``(x_new, t_new)`` by :func:`tgtfast.imperfect.select_queries` (drawn from the
    step's own stream, ``noise_seed(seed, step, micro, 1)``), in their original order."""
    from tgtfast.imperfect import select_queries, student_informativeness

    was = student.training
    student.eval()
    try:
        scores = student_informativeness(student(x_new).float())
    finally:
        student.train(was)
    g = torch.Generator().manual_seed(noise_seed(seed, step, micro, 1))
    idx = select_queries(scores.cpu(), reliability.accuracy(t_new).cpu(), keep, generator=g).to(x_new.device)
    return x_new[idx], t_new[idx]


def resolve(config: Any, reliability: Optional[Any], labeler: Callable, val: Any,
            batch_fn: Callable, device: torch.device, temperature: float):
    """The reliability a run uses (given, or fitted on ``val``), None when no option needs one."""
    if not needs_reliability(config):
        return None
    return reliability if reliability is not None else fit_reliability(
        labeler, val, batch_fn, device, bins=config.reliability_bins, temperature=temperature)
