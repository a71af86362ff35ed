"""What the trainer does before its first step: run the models once on two examples (shape errors surface
before anything is written), check every label of the training set, and cache the teacher's ``Enc(x)`` and
``h(x)`` of the training set (one pass does both)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from tgtfast.train.data import load_batch
from tgtfast.train.distributed import all_min, gather_rows
from tgtfast.train.records import progress as progress_bar

__all__ = ["probe", "first_bad_label", "label_error", "scan_training_set"]

Widths = Tuple[Tuple[int], Tuple[int, torch.dtype]]  # ((K,), (d, dtype of the latent codes))


def first_bad_label(y: Optional[torch.Tensor], num_classes: int) -> int:
    """Position of the first label of ``y`` outside ``[0, num_classes)`` and not -100, or -1."""
    if y is None or y.numel() == 0:
        return -1
    bad = ((y >= num_classes) | ((y < 0) & (y != -100))).nonzero()
    return int(bad[0, 0]) if bad.numel() else -1


def label_error(index: int, label: int, num_classes: int) -> ValueError:
    return ValueError(f"labels must be in [0, {num_classes}) or -100 (unlabelled): training example {index} has "
                      f"label {label}")


def probe(student: nn.Module, labeler: Optional[Callable], encoder: Optional[Callable],
          decoder: Optional[Callable], exploration: str, x: torch.Tensor, y: Optional[torch.Tensor],
          teacher: Any = None) -> Widths:
    """Run the models on the first training examples ``x`` (labels ``y``, the cached ``teacher`` that
    ``batch_fn`` returned for them or None) and check every shape the training relies on; returns the widths of
    the teacher's outputs."""
    was_training = student.training
    student.eval()  # no dropout draws, no batch-norm statistics updates
    try:
        with torch.no_grad():
            return _probe(student, labeler, encoder, decoder, exploration, x, y, teacher)
    finally:
        student.train(was_training)


def _probe(student, labeler, encoder, decoder, exploration, x, y, teacher) -> Widths:
    from tgtfast.losses.sparse import SparseTeacher

    s = student(x)
    if labeler is not None:
        t, name = labeler(x), "labeler"
    elif isinstance(teacher, SparseTeacher):  # top-k classes only: the width is the student's
        t, name = s, "student"
    else:
        t, name = teacher, "batch_fn's teacher"
    for who, out in ((name, t), ("student", s)):
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{who} must map a batch of {x.shape[0]} inputs to logits [N, K], got {shape}")
    widths: Widths = ((t.shape[1],), (0, torch.float32))
    if s.shape[1] != t.shape[1]:
        raise ValueError(
            f"the student's output width ({s.shape[1]}) differs from the {name}'s ({t.shape[1]}): both "
            "must produce logits over the same classes"
        )
    if isinstance(teacher, SparseTeacher) and bool((teacher.indices >= s.shape[1]).any()):
        raise ValueError(f"batch_fn's SparseTeacher holds class indices >= the student's {s.shape[1]} classes")
    bad = first_bad_label(y, s.shape[1])
    if bad >= 0:
        raise label_error(bad, int(y[bad]), s.shape[1])
    if exploration not in ("random", "gradient"):  # no latent space
        return widths
    z = encoder(x)
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"encoder must map a batch of {x.shape[0]} inputs to latent codes [N, d], got {shape}")
    widths = ((t.shape[1],), (z.shape[1], z.dtype))
    try:
        xd = decoder(z)
    except Exception as exc:
        raise ValueError(f"decoder cannot take the encoder's latent codes {tuple(z.shape)}: {exc}") from exc
    if not isinstance(xd, torch.Tensor) or xd.shape[1:] != x.shape[1:]:
        shape = tuple(xd.shape) if isinstance(xd, torch.Tensor) else type(xd).__name__
        raise ValueError(
            f"the decoder's output {shape} is not shaped like the inputs {tuple(x.shape)}: the student "
            "and labeler could not take the decoded samples"
        )
    try:
        sd = student(xd)
    except Exception as exc:
        raise ValueError(f"the student cannot take the decoder's output {tuple(xd.shape)}: {exc}") from exc
    if not isinstance(sd, torch.Tensor) or sd.shape != s.shape:
        raise ValueError("the student's output on decoded samples is not shaped like its output on inputs")
    return widths


def scan_training_set(dataset, collate, batch_fn: Callable, device: torch.device, *, labeler: Callable,
                      encoder: Optional[Callable], widths: Widths, explore: bool, cache: bool, check_labels: bool,
                      batch_size: int, rank: int = 0, world_size: int = 1, show_progress: bool = False,
                      label: bool = True
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over the training set (each rank a contiguous shard): every label is checked (a bad one is a
    ``ValueError`` naming the example, raised on every rank) and, with ``cache``, ``Enc(x)`` and ``h(x)`` of
    every example are computed (index order, all-gathered over the ranks; ``h(x)`` only with ``label``: not when
    the batches carry their cached teacher). Returns ``(z, t, labelled)``: ``z`` is None without exploration,
    ``t`` without ``label``, ``z`` and ``t`` are None without ``cache``; ``labelled`` ``[n]`` bool marks the
    examples whose label is not -100 (None when labels are not checked)."""
    n = len(dataset)
    (k,), (d, z_dtype) = widths
    if not cache and not check_labels:
        return None, None, None
    per = math.ceil(n / world_size)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    bs = max(batch_size, 256)
    zs, ts, marks = [], [], []
    bad = n
    bar = progress_bar(range(lo, hi, bs), show_progress and cache, desc="teacher cache",
                       total=math.ceil((hi - lo) / bs))
    with torch.no_grad():
        for i in bar:
            x, y = load_batch(dataset, collate, batch_fn, list(range(i, min(i + bs, hi))), device)
            if bad == n:
                j = first_bad_label(y, k)
                bad = i + j if j >= 0 else n
            if check_labels:
                marks.append(y != -100 if y is not None else torch.zeros(x.shape[0], dtype=torch.bool, device=device))
            if cache and label:
                ts.append(labeler(x).float())
                if explore:
                    zs.append(encoder(x))
    bad = all_min(bad, device, world_size)
    if bad < n:
        _, y = load_batch(dataset, collate, batch_fn, [bad], device)
        raise label_error(bad, int(y[0]), k)
    labelled = None
    if check_labels:
        labelled = torch.cat(marks) if marks else torch.zeros(0, dtype=torch.bool, device=device)
        if world_size > 1:
            labelled = gather_rows(labelled.to(torch.uint8), per, n, world_size).bool()
        labelled = labelled.cpu()
    if not cache:
        return None, None, labelled
    t = (torch.cat(ts) if ts else torch.zeros(0, k, device=device)) if label else None
    z = (torch.cat(zs) if zs else torch.zeros(0, d, dtype=z_dtype, device=device)) if explore else None
    if world_size > 1:
        t = gather_rows(t, per, n, world_size) if label else None
        z = gather_rows(z, per, n, world_size) if explore else None
    return z, t, labelled
