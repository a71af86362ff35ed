"""What a run records: :class:`TGTHistory`, the metrics lines, the progress bar and :func:`plot_history`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List

from tgtfast.train.checkpoint import atomic_write

__all__ = ["TGTHistory", "plot_history", "append_jsonl", "progress"]


@dataclass
class TGTHistory:
    """What :meth:`TGTTrainer.fit` returns: one record per logged step (``train``) and per evaluation (``val``).

    Train records hold ``step``, ``epoch``, ``lr``, ``loss`` and its terms ``ce``, ``kd``, ``tgt`` (each the
    unweighted normalised term; ``kd`` and ``tgt`` are 0, not computed, when their weight is 0), ``acc`` (on the
    labelled examples of the step), ``examples_per_s`` and ``samples_per_s`` (examples plus generated samples),
    ``teacher_queries`` (the rows the labeler evaluated in that step, over all processes: training inputs whose
    labels are not cached, new samples, the candidates of gradient exploration's ascent steps).
    ``teacher_queries`` of the history is the run's total: every step's plus the training set labelled once
    when the teacher is cached (validation rows are not counted).
    Val records hold ``step``, ``val_acc``, ``val_nll`` (``val_ce`` is the same number under its older name),
    ``val_ece`` (see :meth:`TGTTrainer.evaluate`) and ``val_kd``."""

    train: List[Dict[str, float]] = field(default_factory=list)
    val: List[Dict[str, float]] = field(default_factory=list)
    steps: int = 0
    teacher_queries: int = 0

    def column(self, name: str) -> List[float]:
        """The values of one metric over the records that have it (train records first, then val)."""
        return [r[name] for r in self.train + self.val if name in r]

    @property
    def final(self) -> Dict[str, float]:
        """The last train record merged with the last val record."""
        out: Dict[str, float] = {}
        if self.train:
            out.update(self.train[-1])
        if self.val:
            out.update(self.val[-1])
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"train": self.train, "val": self.val, "steps": self.steps, "teacher_queries": self.teacher_queries}


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def plot_history(history: TGTHistory, path: str) -> bool:
    """Plot the loss terms and accuracies against the step as a PNG (matplotlib, Agg). Returns False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in history.train]
    for key in ("loss", "ce", "kd", "tgt"):
        ax1.plot(steps, [r[key] for r in history.train], label=key)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(steps, [r["acc"] for r in history.train], label="train acc (labelled)")
    if history.val:
        ax2.plot([r["step"] for r in history.val], [r["val_acc"] for r in history.val], "o-", label="val acc")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), binary=True)
    plt.close(fig)
    return True


def progress(iterable, enabled: bool, **kw):
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kw)
