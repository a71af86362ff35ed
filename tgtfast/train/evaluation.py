"""The trainer's evaluation: accuracy, NLL and ECE of the student on the labelled examples of a dataset (through
:mod:`tgtfast.metrics`) and its distillation loss to the labeler on all of them."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from tgtfast.train.data import as_dataset, load_batch
from tgtfast.train.exploration import autocast, loss_sum

__all__ = ["evaluate_student"]


@torch.no_grad()
def evaluate_student(student: nn.Module, labeler: Optional[Callable], loss: Callable, config: Any,
                     batch_fn: Callable, data: Any) -> Dict[str, float]:
    """``val_acc``, ``val_nll`` (= ``val_ce``), ``val_ece`` on the labelled examples of ``data`` and ``val_kd`` on
    all of them (see :meth:`tgtfast.TGTTrainer.evaluate`); the student is evaluated in eval mode. ``val_kd`` is
    taken against the cached teacher ``batch_fn`` returns with a batch, else the labeler's logits (NaN with
    neither)."""
    from tgtfast.metrics import ClassificationMeter

    dataset, collate = as_dataset(data, "val")
    n = len(dataset)
    if n == 0:
        raise ValueError("val is empty")
    device = next(student.parameters()).device
    was = student.training
    student.eval()
    meter = ClassificationMeter(config.ece_bins)
    kd = 0.0
    try:
        bs = max(config.batch_size, 256)
        for i in range(0, n, bs):
            x, y, t = load_batch(dataset, collate, batch_fn, list(range(i, min(i + bs, n))), device, teacher=True)
            with autocast(config.bf16, device):
                s = student(x)
            s = s.float()
            if t is None and labeler is not None:
                t = labeler(x).float()
            kd += float(loss_sum(loss, s, t)) if t is not None else float("nan")
            if y is not None:
                keep = y != -100
                meter.update(y[keep], logits=s[keep])
    finally:
        student.train(was)
    m = meter.compute()
    return {"val_acc": m["accuracy"], "val_nll": m["nll"], "val_ece": m["ece"], "val_ce": m["nll"], "val_kd": kd / n}
