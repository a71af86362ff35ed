"""The optimiser and learning-rate schedule of a :class:`~tgtfast.train.TGTTrainer` run."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(config: Any, factory: Optional[Callable[[Any], torch.optim.Optimizer]], params
                   ) -> torch.optim.Optimizer:
    """``factory(params)`` when given (checked to be an optimiser), else ``config.optimizer`` with its fields."""
    c = config
    if factory is not None:
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
        return opt
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=c.lr, weight_decay=c.weight_decay)


def make_scheduler(config: Any, opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``config.warmup_steps``, then ``config.lr_schedule`` (constant, cosine or linear to 0)
    over the rest of the ``total`` steps."""
    c = config

    def factor(step: int) -> float:
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / (c.warmup_steps + 1)
        if c.lr_schedule == "constant":
            return 1.0
        span = max(total - c.warmup_steps, 1)
        frac = min(max(step - c.warmup_steps, 0) / span, 1.0)
        return 0.5 * (1 + math.cos(math.pi * frac)) if c.lr_schedule == "cosine" else 1.0 - frac

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
