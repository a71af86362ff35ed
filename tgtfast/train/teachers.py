"""Where the teacher's labels of the training inputs come from: the labeler (cached once before training, or run
on every batch) or a cached teacher that ``batch_fn`` returns with each batch (offline teachers: dense logits
``[N, K]`` or a :class:`tgtfast.SparseTeacher` ``[N, k]``, e.g. read from a :class:`tgtfast.TeacherCache`)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from tgtfast.losses.sparse import SparseTeacher

__all__ = ["check_labeler", "check_batch_teacher", "accepts_sparse"]


def check_labeler(labeler: Optional[Callable], config: Any, reliability: Any) -> None:
    """A labeler may be None only when nothing but the batches' own cached teacher is needed."""
    if labeler is not None:
        return
    if config.exploration != "none":
        raise ValueError(
            f"labeler is None but exploration={config.exploration!r} makes new samples that the labeler must label "
            "(a cached teacher from batch_fn covers only the batch's own inputs): pass the labeler, or use "
            "exploration='none'")
    if config.imperfect != "none" and reliability is None:
        raise ValueError(
            f"labeler is None but config.imperfect={config.imperfect!r} fits the teacher's reliability with the "
            "labeler on val: pass the labeler, or a fitted reliability= to TGTTrainer")


def accepts_sparse(loss: Callable) -> bool:
    """Whether ``loss`` can take a :class:`tgtfast.SparseTeacher`: the package's :class:`tgtfast.DistillLoss`
    modules can, its other losses (KDLoss, PTLoss, ...) cannot; a callable of the user's is trusted."""
    from tgtfast.losses.divergence_modules import DistillLoss

    if isinstance(loss, DistillLoss):
        return True
    return not type(loss).__module__.startswith("tgtfast.")


def check_batch_teacher(teacher: Any, labeler: Optional[Callable], loss: Callable, config: Any) -> None:
    """Checks on the cached teacher of the first batch (None: the batches carry none) before training."""
    if teacher is None:
        if labeler is None:
            raise ValueError("labeler is None, so batch_fn must return (inputs, labels, teacher) with the cached "
                             "teacher of the batch (logits [N, K] or a tgtfast.SparseTeacher); it returned no teacher")
        return
    if isinstance(teacher, SparseTeacher):
        if not accepts_sparse(loss):
            raise TypeError(
                f"batch_fn returned a tgtfast.SparseTeacher, which the loss {type(loss).__name__} does not take: use "
                "tgtfast.DistillLoss('forward_kl', temperature=T) (KDLoss's divergence) or another DistillLoss, "
                "or give dense teacher logits")
        if config.imperfect != "none":
            raise ValueError(f"config.imperfect={config.imperfect!r} reads the teacher's full distribution; "
                             "batch_fn returned a tgtfast.SparseTeacher (top-k): give dense teacher logits")


def missing_teacher_error(step: int) -> ValueError:
    """The error for a batch without a cached teacher in a run whose first batch had one."""
    return ValueError(f"batch_fn returned no teacher for a batch of step {step + 1}, but the first batch had one: "
                      "every batch must carry its cached teacher (or none may)")
