"""``tgtfast demo``: Teacher Guided Training with few labels on scikit-learn's digits, end to end.

What it does (no download: the 8x8 digits ship with scikit-learn):

1. Splits the 1797 images (pixels scaled to ``[0, 1]``) once, stratified and seeded, into teacher-train (60 %),
   validation (15 %) and test (25 %).
2. Trains the teacher, or loads it from the cache: a labeler MLP ``64-128-128-10`` on the labelled teacher-train
   split, and a generator, a small VAE ``64-128-d-128-64`` (sigmoid output), on the teacher-train images without
   their labels. Both are plain ``nn.Sequential`` stacks of ``Linear`` layers and activations; the encoder returns
   the VAE mean.
3. Picks PTLoss coefficients with the Proxy Teacher (:func:`tgtfast.search_coefficients`) on the teacher's
   validation-split probabilities.
4. Trains compact students ``64-32-10`` from ``n`` labelled examples in total (default 20, 50 and 100; drawn
   stratified from teacher-train, a fresh draw per seed) by

   * ``onehot``: cross-entropy on the ``n`` labels only;
   * ``kd``: cross-entropy plus distillation from the labeler on the same ``n`` inputs;
   * ``real-unlabelled`` (control): ``kd`` plus distillation on real teacher-train images without their labels,
     the data TGT is meant to replace;
   * ``input-noise`` (control): ``kd`` plus distillation on the labelled images with Gaussian pixel noise;
   * ``tgt-random``: ``kd`` plus distillation on new inputs ``Dec(Enc(x) + sigma * noise)``;
   * ``tgt-gradient``: ``kd`` plus distillation on inputs found by gradient ascent of the student-teacher
     divergence in the VAE's latent space;

   the distillation loss being KL or PTLoss, over several seeds, through :class:`tgtfast.TGTTrainer`. The four
   methods that label extra inputs spend the same number of teacher labels per step.
5. Prints, per label budget, test accuracy, its paired difference to ``kd`` (same seed, same labelled subset, same
   initial student), ECE and NLL (mean and standard deviation over seeds; the teacher's beside them) and writes
   ``results.json`` and ``results.png`` to ``--out``.
6. Second regime (``--regimes weak``, on by default): an overconfident teacher, the labeler trained on 50 labels
   only (its test accuracy, ECE and mean confidence printed), cached under its own key. Its students
   (``weak_budgets`` labels) distil on their labelled inputs and on TGT random samples; rows: KL at the
   temperature in {1, 2, 4} of the best validation accuracy (``kd``), PTLoss with the Proxy Teacher's
   coefficients from the weak teacher's validation logits, weighted distillation, SLaM and robust active selection
   (:class:`tgtfast.TGTTrainer`'s ``imperfect`` and ``active_pool``, the reliability fitted on the validation
   split), each with its paired difference to that ``kd``, in a second table block, ``results.json``
   (``weak_regime``) and a second row of ``results.png``.

Every hyper-parameter is fixed in :class:`DemoConfig` before any student is trained (the values were checked on
the validation split only); the test split is used for the reported numbers and nothing else.

Layout: :mod:`~tgtfast.demo.config` (:class:`DemoConfig`), :mod:`~tgtfast.demo.data` (splits, few-label
subsets), :mod:`~tgtfast.demo.models` (MLPs, VAE), :mod:`~tgtfast.demo.teacher` (training and cache),
:mod:`~tgtfast.demo.students` (:func:`train_student`), :mod:`~tgtfast.demo.report` (summary, table, plot),
:mod:`~tgtfast.demo.run` (:func:`run_demo`, worker pool); the command line is :mod:`tgtfast.cli.demo`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from tgtfast.demo.config import LOSSES, METHODS, NUM_CLASSES, NUM_PIXELS, DemoConfig
from tgtfast.demo.data import DigitsSplits, few_label_subset, load_digits_splits
from tgtfast.demo.models import TeacherVAE, accuracy, mlp
from tgtfast.demo.report import format_table, plot_results, summarise
from tgtfast.demo.run import run_demo
from tgtfast.demo.students import rows, train_student
from tgtfast.demo.teacher import (
    Teacher,
    default_cache_dir,
    load_or_train_teacher,
    teacher_metrics,
    train_labeler,
    train_vae,
)

__all__ = [
    "DemoConfig",
    "DigitsSplits",
    "load_digits_splits",
    "TeacherVAE",
    "Teacher",
    "load_or_train_teacher",
    "few_label_subset",
    "train_student",
    "run_demo",
    "format_table",
    "demo_main",
]


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tgtfast demo ...``, kept here for old callers: the command line lives in :mod:`tgtfast.cli.demo`."""
    from tgtfast.cli.demo import main

    return main(argv)
