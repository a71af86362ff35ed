"""The trainer's data: datasets and their batching, the order of the examples over the steps, and the batch
sampler that lets DataLoader workers load the batches in that order."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from tgtfast.train.noise import mix

__all__ = ["TensorPairs", "Joined", "as_dataset", "default_batch_fn", "load_batch", "check_teacher", "take_teacher",
           "cat_teachers", "run_length", "StepPlan", "StepSampler"]

Batch = Tuple[int, List[int], int, int]  # micro index, local example indices, first local position, global size


class TensorPairs(torch.utils.data.Dataset):
    """Rows of equally long tensors ``(x, y, ...)`` as a dataset (batches are gathered, not collated)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        n = tensors[0].shape[0]
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"train/val tuple element {i} must be a tensor, got {type(t).__name__}")
            if t.shape[0] != n:
                raise ValueError(f"train/val tensors disagree on the number of examples: {n} vs {t.shape[0]}")
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, i: int):
        return tuple(t[i] for t in self.tensors)


def as_dataset(data: Any, name: str) -> Tuple[torch.utils.data.Dataset, Callable]:
    """A map-style dataset and the collate function to batch it."""
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data._utils.collate import default_collate

    if isinstance(data, DataLoader):
        return as_dataset(data.dataset, name)[0], data.collate_fn or default_collate
    if isinstance(data, torch.Tensor):
        return TensorPairs([data]), default_collate
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return TensorPairs(list(data)), default_collate
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if isinstance(data, torch.utils.data.IterableDataset):
            raise TypeError(f"{name} must be a map-style dataset (indexable, with a length), not an IterableDataset")
        return data, default_collate
    raise TypeError(
        f"{name} must be a map-style Dataset, a DataLoader over one, or a tuple of tensors (x, y), "
        f"got {type(data).__name__}"
    )


def default_batch_fn(batch: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(
        f"a batch is a {type(batch).__name__}; the default batch_fn takes (x, y) or (x,) batches: pass "
        f"batch_fn=lambda batch: (inputs, labels) to TGTTrainer"
    )


def load_batch(dataset, collate, batch_fn: Callable, indices: Sequence[int], device: torch.device,
               batch: Any = None, *, teacher: bool = False) -> Tuple[Any, ...]:
    """``(inputs, labels)`` of the examples ``indices`` on ``device`` (``batch``: already collated by a worker);
    with ``teacher=True``, ``(inputs, labels, teacher)``: the cached teacher ``batch_fn`` returned as its third
    element (dense logits ``[N, K]`` or a :class:`tgtfast.SparseTeacher` ``[N, k]``), or None."""
    if isinstance(dataset, Joined) and batch is None:
        out = dataset.load(batch_fn, indices, device)
        return out if teacher else out[:2]
    if batch is not None:  # collated by a DataLoader worker
        pass
    elif isinstance(dataset, TensorPairs):  # rows of tensors: one gather instead of a per-example collate
        ii = torch.as_tensor(list(indices), dtype=torch.long)
        batch = tuple(t[ii] for t in dataset.tensors)
    else:
        batch = collate([dataset[int(i)] for i in indices])
    out = batch_fn(batch)
    if not (isinstance(out, (tuple, list)) and len(out) in (2, 3)):
        raise TypeError(f"batch_fn must return (inputs, labels) or (inputs, labels, teacher), got "
                        f"{type(out).__name__}{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''}")
    x, y = out[0], out[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch_fn must return inputs as a tensor, got {type(x).__name__}")
    x = x.to(device)
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError("batch_fn must return labels as an integer tensor (class indices) or None")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(y.shape)}")
        y = y.to(device=device, dtype=torch.long)
    if not teacher:
        return x, y
    return x, y, check_teacher(out[2] if len(out) == 3 else None, x.shape[0], device)


def check_teacher(t: Any, n: int, device: torch.device) -> Any:
    """A cached teacher from ``batch_fn`` for ``n`` inputs, on ``device``: None, float32 logits ``[n, K]`` or a
    :class:`tgtfast.SparseTeacher` of leading shape ``[n]``."""
    from tgtfast.losses.sparse import SparseTeacher

    if t is None:
        return None
    if isinstance(t, SparseTeacher):
        if tuple(t.shape) != (n,):
            raise ValueError(f"batch_fn's teacher must be a SparseTeacher of leading shape [{n}] (one row per input, "
                             f"[N, k]), got leading shape {tuple(t.shape)}")
        return t.to(device)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise TypeError("batch_fn's third element (the teacher) must be floating logits [N, K], a "
                        f"tgtfast.SparseTeacher or None, got {type(t).__name__}"
                        f"{'' if not isinstance(t, torch.Tensor) else ' of dtype ' + str(t.dtype)}")
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"batch_fn's teacher logits must have shape [{n}, K], got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def take_teacher(t: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of a dense or sparse teacher (None stays None)."""
    from tgtfast.losses.sparse import SparseTeacher

    if isinstance(t, SparseTeacher):
        return SparseTeacher(t.indices[index], t.logprobs[index], tail=t.tail, temperature=t.temperature)
    return None if t is None else t[index]


def cat_teachers(parts: Sequence[Any]) -> Any:
    """Dense or sparse teachers stacked by rows (all None: None; a mix of None and teachers: an error)."""
    from tgtfast.losses.sparse import SparseTeacher

    if all(t is None for t in parts):
        return None
    if any(t is None for t in parts):
        raise ValueError("batch_fn returned a teacher for some examples of a batch and none for others: the "
                         "training set and the unlabelled stream must both carry one, or neither")
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(t, SparseTeacher) for t in parts):
        first = parts[0]
        if any((t.k, t.tail, t.temperature) != (first.k, first.tail, first.temperature) for t in parts):
            raise ValueError("the sparse teachers of a batch differ in k, tail or temperature")
        return SparseTeacher(torch.cat([t.indices for t in parts]), torch.cat([t.logprobs for t in parts]),
                             tail=first.tail, temperature=first.temperature)
    if any(isinstance(t, SparseTeacher) for t in parts):
        raise ValueError("batch_fn returned dense teacher logits for some examples and a SparseTeacher for others")
    return torch.cat(list(parts))


class Joined:
    """The training set followed by an unlabelled stream, indexed as one: ``0 .. n_train - 1`` are ``train``,
    ``n_train ..`` the unlabelled examples. Each part is loaded with its own collate function; the unlabelled
    part's labels (if ``batch_fn`` returns any) are replaced by -100."""

    def __init__(self, train: Any, train_collate: Callable, unlabelled: Any, unlabelled_collate: Callable) -> None:
        self.parts = ((train, train_collate), (unlabelled, unlabelled_collate))
        self.n_train = len(train)

    def __len__(self) -> int:
        return self.n_train + len(self.parts[1][0])

    def load(self, batch_fn: Callable, indices: Sequence[int], device: torch.device
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """``(inputs, labels, teacher)`` of the joined examples ``indices`` in that order (labels -100 where
        unknown; teacher: what ``batch_fn`` returned for them, or None)."""
        idx = [int(i) for i in indices]
        first = [i for i in idx if i < self.n_train]
        second = [i - self.n_train for i in idx if i >= self.n_train]
        xs, ys, ts = [], [], []
        for part, sel in zip(self.parts, (first, second)):
            if not sel:
                continue
            x, y, t = load_batch(part[0], part[1], batch_fn, sel, device, teacher=True)
            if y is None or part is self.parts[1]:
                y = torch.full((x.shape[0],), -100, dtype=torch.long, device=device)
            xs.append(x)
            ys.append(y)
            ts.append(t)
        if len(xs) == 1:
            return xs[0], ys[0], ts[0]
        if xs[0].shape[1:] != xs[1].shape[1:]:
            raise ValueError(f"unlabelled inputs {tuple(xs[1].shape[1:])} are not shaped like the training inputs "
                             f"{tuple(xs[0].shape[1:])}")
        x, y = torch.cat([xs[0], xs[1].to(xs[0].dtype)]), torch.cat(ys)
        # row r of (x, y) belongs at position loaded_at[r] of indices
        loaded_at = ([j for j, i in enumerate(idx) if i < self.n_train]
                     + [j for j, i in enumerate(idx) if i >= self.n_train])
        where = torch.empty(len(idx), dtype=torch.long)
        where[torch.tensor(loaded_at, dtype=torch.long)] = torch.arange(len(idx))
        where = where.to(device)
        return x[where], y[where], take_teacher(cat_teachers(ts), where)


def run_length(config: Any, steps_per_epoch: int) -> Tuple[int, str]:
    """Optimiser steps of a run and where the number comes from: ``"max_steps"``, ``"epochs"`` (times
    ``steps_per_epoch``) or ``"default"`` (:data:`~tgtfast.train.config.DEFAULT_MAX_STEPS`)."""
    from tgtfast.train.config import DEFAULT_MAX_STEPS

    if config.max_steps is not None:
        return config.max_steps, "max_steps"
    if config.epochs is not None:
        return config.epochs * steps_per_epoch, "epochs"
    return DEFAULT_MAX_STEPS, "default"


class StepPlan:
    """How ``n`` examples are cut into steps: micro-batches per epoch, optimiser steps per epoch and in all, and
    the micro-batches of this rank at every step (an epoch's order is a permutation seeded by (seed, epoch))."""

    def __init__(self, config: Any, n: int, rank: int = 0, world_size: int = 1) -> None:
        c = self.config = config
        self.n, self.rank, self.world_size = n, rank, world_size
        if c.batch_size < world_size:
            raise ValueError(f"config.batch_size ({c.batch_size}) is the global micro-batch and must be at least the "
                             f"number of processes ({world_size})")
        full, rest = divmod(n, c.batch_size)
        self.micro = full + (1 if rest and not c.drop_last and rest >= world_size else 0)
        if self.micro == 0:
            raise ValueError(
                f"the training set ({n} examples) gives no micro-batch of batch_size={c.batch_size} "
                f"(drop_last={c.drop_last}, {world_size} processes)"
            )
        self.steps_per_epoch = math.ceil(self.micro / c.grad_accum_steps)
        self.total, self.length_from = run_length(c, self.steps_per_epoch)
        self._perm: Optional[Tuple[int, torch.Tensor]] = None  # (epoch, its example order)

    def fresh(self) -> "StepPlan":
        """An identical plan with its own cached order (for a sampler that runs ahead of the loop)."""
        return StepPlan(self.config, self.n, self.rank, self.world_size)

    def warn_if_short(self) -> None:
        """A :class:`~tgtfast.train.config.ShortRunWarning` when the run is counted in epochs and has fewer than
        :data:`~tgtfast.train.config.SHORT_RUN_STEPS` optimiser steps."""
        from tgtfast.train.config import SHORT_RUN_STEPS, ShortRunWarning

        if self.length_from == "epochs" and self.total < SHORT_RUN_STEPS:
            c = self.config
            warnings.warn(
                f"this run has only {self.total} optimiser step{'s' if self.total != 1 else ''}: epochs={c.epochs} "
                f"x {self.steps_per_epoch} step{'s' if self.steps_per_epoch != 1 else ''} per epoch ({self.n} "
                f"examples, batch_size={c.batch_size}, grad_accum_steps={c.grad_accum_steps}); fewer than "
                f"{SHORT_RUN_STEPS} steps rarely trains a model. Set max_steps to the number of steps you want "
                "(or more epochs)", ShortRunWarning, stacklevel=4)

    def batches(self, step: int) -> Tuple[int, List[Batch]]:
        """Epoch and this rank's micro-batches of optimiser step ``step``: (micro index, local example indices,
        position of the first local example in the global micro-batch, global micro-batch size)."""
        c, n = self.config, self.n
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix(c.seed, epoch, 0x5EED))
            self._perm = (epoch, torch.randperm(n, generator=g))
        perm = self._perm[1]
        out = []
        for m in range(k * c.grad_accum_steps, min((k + 1) * c.grad_accum_steps, self.micro)):
            pos = perm[m * c.batch_size:min((m + 1) * c.batch_size, n)]
            size = pos.numel()
            base, extra = divmod(size, self.world_size)
            start = self.rank * base + min(self.rank, extra)
            count = base + (1 if self.rank < extra else 0)
            out.append((m - k * c.grad_accum_steps, pos[start:start + count].tolist(), start, size))
        return epoch, out


class StepSampler:
    """The batch sampler of the DataLoader used with ``num_workers > 0``: this rank's micro-batches of the steps
    ``start .. total - 1``, in the order the training loop consumes them."""

    def __init__(self, plan: StepPlan, start: int, total: int) -> None:
        # A plan of its own: the sampler runs ahead of the loop and must not move the loop's cached order.
        self.plan = plan.fresh()
        self.start, self.total = start, total

    def __iter__(self):
        for step in range(self.start, self.total):
            for _, idx, _, _ in self.plan.batches(step)[1]:
                yield idx
