"""Labelled and unlabelled examples in every batch: the training set joined with a separate unlabelled stream
(:class:`Joined`, what ``TGTTrainer.fit(train, unlabelled=...)`` trains on) and the step plan that draws each
global micro-batch from both pools (:class:`MixedPlan`, used when ``config.labelled_per_batch`` is set or an
unlabelled stream is given).

Each pool is an endless sequence of permutations ("cycles") of its examples, cycle ``c`` of pool ``s`` drawn
from a generator seeded by ``(seed, c, s)``. Global micro-batch ``g`` (counted over the whole run) takes the
next ``b_l = labelled_per_batch`` positions of the labelled sequence followed by the next ``batch_size - b_l``
of the unlabelled one, so every micro-batch is full and holds exactly ``b_l`` labelled examples, whatever the
pools' sizes. An epoch is one pass over the unlabelled pool (over the labelled pool when ``b_l = batch_size``).
Ranks take contiguous shares of the global micro-batch exactly as with :class:`~tgtfast.train.data.StepPlan`,
so the noise an example gets and the weights of a ``torchrun`` run follow the same rules.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from tgtfast.train.data import Batch, Joined, StepPlan, run_length
from tgtfast.train.noise import mix

__all__ = ["Joined", "MixedPlan", "make_plan"]


class MixedPlan:
    """The step plan of :mod:`this module <tgtfast.train.streams>`: ``labelled_per_batch`` labelled examples
    (from ``labelled``, indices into the training set) and the rest from ``unlabelled`` in every global
    micro-batch. Same interface as :class:`~tgtfast.train.data.StepPlan`."""

    def __init__(self, config: Any, labelled: torch.Tensor, unlabelled: torch.Tensor, labelled_per_batch: int,
                 rank: int = 0, world_size: int = 1) -> None:
        c = self.config = config
        self.labelled, self.unlabelled = labelled.long().cpu(), unlabelled.long().cpu()
        self.n = self.labelled.numel() + self.unlabelled.numel()
        self.rank, self.world_size = rank, world_size
        self.b_l = labelled_per_batch
        self.b_u = c.batch_size - labelled_per_batch
        if c.batch_size < world_size:
            raise ValueError(f"config.batch_size ({c.batch_size}) is the global micro-batch and must be at least the "
                             f"number of processes ({world_size})")
        if self.labelled.numel() == 0:
            raise ValueError("labelled batches need labelled examples, but train has none (every label is -100 or "
                             "batch_fn returns no labels)")
        if self.b_u > 0 and self.unlabelled.numel() == 0:
            raise ValueError(f"config.labelled_per_batch={self.b_l} leaves {self.b_u} places per batch for unlabelled "
                             "examples, but there are none: pass fit(..., unlabelled=...), label some examples -100, "
                             "or set labelled_per_batch to batch_size")
        pool, per = (self.unlabelled.numel(), self.b_u) if self.b_u > 0 else (self.labelled.numel(), self.b_l)
        self.micro = math.ceil(pool / per)  # micro-batches per epoch (one pass over the pool)
        self.steps_per_epoch = math.ceil(self.micro / c.grad_accum_steps)
        self.total, self.length_from = run_length(c, self.steps_per_epoch)
        self._cycles: Dict[Tuple[int, int], torch.Tensor] = {}

    warn_if_short = StepPlan.warn_if_short

    def fresh(self) -> "MixedPlan":
        """An identical plan with its own caches (for a sampler that runs ahead of the loop)."""
        return MixedPlan(self.config, self.labelled, self.unlabelled, self.b_l, self.rank, self.world_size)

    def _cycle(self, pool: torch.Tensor, stream: int, cycle: int) -> torch.Tensor:
        key = (stream, cycle)
        if key not in self._cycles:
            if len(self._cycles) > 8:
                self._cycles.clear()
            g = torch.Generator().manual_seed(mix(self.config.seed, cycle, 0x5EED + stream))
            self._cycles[key] = pool[torch.randperm(pool.numel(), generator=g)]
        return self._cycles[key]

    def _take(self, pool: torch.Tensor, stream: int, start: int, count: int) -> List[int]:
        out: List[int] = []
        n = pool.numel()
        while count > 0:
            cycle, at = divmod(start, n)
            part = self._cycle(pool, stream, cycle)[at:at + count].tolist()
            out += part
            start += len(part)
            count -= len(part)
        return out

    def batches(self, step: int) -> Tuple[int, List[Batch]]:
        """Epoch and this rank's micro-batches of optimiser step ``step`` (as :meth:`StepPlan.batches`)."""
        c = self.config
        out = []
        for m in range(c.grad_accum_steps):
            g = step * c.grad_accum_steps + m
            pos = self._take(self.labelled, 1, g * self.b_l, self.b_l) + self._take(self.unlabelled, 2, g * self.b_u,
                                                                                     self.b_u)
            size = len(pos)
            base, extra = divmod(size, self.world_size)
            start = self.rank * base + min(self.rank, extra)
            count = base + (1 if self.rank < extra else 0)
            out.append((m, pos[start:start + count], start, size))
        return step // self.steps_per_epoch, out


def make_plan(config: Any, n: int, labelled: Optional[torch.Tensor], joined: bool, rank: int = 0,
              world_size: int = 1):
    """The plan of a run over ``n`` examples: a :class:`MixedPlan` when ``config.labelled_per_batch`` is set or
    the training set is :class:`Joined` with an unlabelled stream (``labelled``: the ``[n]`` mask of labelled
    examples from the label scan), else the :class:`~tgtfast.train.data.StepPlan` that draws batches from all
    examples alike."""
    b_l = config.labelled_per_batch
    if b_l is None and not joined:
        if labelled is not None and rank == 0:
            n_lab = int(labelled.sum())
            if 0 < n_lab < n and config.batch_size * n_lab / n < 1:
                warnings.warn(
                    f"train mixes {n_lab} labelled and {n - n_lab} unlabelled examples and batches of "
                    f"{config.batch_size} are drawn from both alike, so most batches hold no labelled example: set "
                    "config.labelled_per_batch (or pass the unlabelled examples as fit(..., unlabelled=...))",
                    UserWarning, stacklevel=4)
        return StepPlan(config, n, rank, world_size)
    if labelled is None:
        labelled = torch.zeros(n, dtype=torch.bool)
    n_lab = int(labelled.sum())
    if b_l is None:  # the pools' proportion, at least one labelled example per batch
        b_l = min(config.batch_size, max(1, round(config.batch_size * n_lab / max(n, 1))))
    if b_l > config.batch_size:
        raise ValueError(f"config.labelled_per_batch ({b_l}) must be at most config.batch_size ({config.batch_size})")
    return MixedPlan(config, labelled.nonzero().flatten(), (~labelled).nonzero().flatten(), b_l, rank, world_size)
