"""Distillation from an imperfect teacher on unlabelled and generated data (docs/design.md, "Imperfect teachers").

* :class:`TeacherReliability`: the teacher's accuracy ``alpha(x)`` as a non-decreasing function of its margin or
  confidence, fitted on a labelled validation split (isotonic or binned), its ECE, and SLaM's ``k(x)``;
  :class:`MonotoneCurve` is the same fit for any score and 0/1 outcome.
* Weighted distillation (Iliopoulos et al. 2022): :func:`debiasing_weights`, :func:`weighted_distill_loss`,
  :class:`WeightedDistillLoss` (through :func:`tgtfast.distill_loss`'s per-row ``weight``).
* SLaM (Kontonis et al. 2023): :func:`slam_loss`, :func:`slam_mix`, :class:`SLaMLoss`.
* Robust active distillation (Baykal et al. 2023): :func:`student_informativeness`,
  :func:`robust_query_probabilities`, :func:`select_queries`, :class:`RobustActiveSelector`.
"""

from tgtfast.imperfect.active import (
    RobustActiveSelector,
    robust_query_probabilities,
    select_queries,
    student_informativeness,
)
from tgtfast.imperfect.reliability import MIN_PER_BIN, MonotoneCurve, TeacherReliability
from tgtfast.imperfect.slam import SLaMLoss, slam_loss, slam_mix
from tgtfast.imperfect.weighted import WeightedDistillLoss, debiasing_weights, weighted_distill_loss

__all__ = [
    "MIN_PER_BIN",
    "MonotoneCurve",
    "TeacherReliability",
    "debiasing_weights",
    "weighted_distill_loss",
    "WeightedDistillLoss",
    "slam_loss",
    "slam_mix",
    "SLaMLoss",
    "student_informativeness",
    "robust_query_probabilities",
    "select_queries",
    "RobustActiveSelector",
]
