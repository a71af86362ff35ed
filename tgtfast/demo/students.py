"""The demo's students: one ``64-hidden-10`` MLP per (method, loss, budget, seed), trained through
:class:`tgtfast.TGTTrainer`, and the table's rows and the job list."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from tgtfast.demo.config import LOSSES, METHODS, NUM_CLASSES, NUM_PIXELS, DemoConfig
from tgtfast.demo.models import mlp
from tgtfast.demo.teacher import Teacher


def _distill_loss(name: str, coeffs: Optional[torch.Tensor], temperature: float) -> nn.Module:
    import tgtfast

    if name == "kl":
        return tgtfast.KDLoss(temperature=temperature)
    return tgtfast.PTLoss(coeffs, temperature=temperature)


def train_student(method: str, loss: str, x: torch.Tensor, y: torch.Tensor, teacher: Teacher, cfg: DemoConfig,
                  seed: int, coeffs: Optional[torch.Tensor] = None) -> nn.Sequential:
    """One student ``64-hidden-10`` trained on the labelled ``(x, y)`` by ``method`` with distillation loss
    ``loss`` (``"kl"`` or ``"ptloss"`` with ``coeffs``), through :class:`tgtfast.TGTTrainer`."""
    import tgtfast

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if loss not in LOSSES and not (method == "onehot" and loss == "-"):
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "ptloss" and coeffs is None:
        raise ValueError("loss='ptloss' needs coeffs (e.g. from tgtfast.search_coefficients)")
    torch.manual_seed(seed)
    student = mlp([NUM_PIXELS, cfg.student_hidden, NUM_CLASSES])
    if method == "onehot":
        weights = dict(w_ce=cfg.w_ce, w_kd=0.0, w_tgt=0.0)
        exploration = "none"
    else:
        weights = dict(w_ce=cfg.w_ce, w_kd=cfg.w_kd, w_tgt=cfg.w_tgt if method.startswith("tgt") else 0.0)
        exploration = {"kd": "none", "tgt-random": "random", "tgt-gradient": "gradient"}[method]
    config = tgtfast.TGTConfig(
        exploration=exploration, **weights, sigma=cfg.sigma,
        samples_per_example=max(1, math.ceil(cfg.new_samples_per_step / len(y))),
        explore_steps=cfg.grad_steps, explore_step_size=cfg.grad_step_size, max_steps=cfg.steps,
        batch_size=len(y), optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, device="cpu",
        out_dir=None, progress=False, plot=False,
    )
    trainer = tgtfast.TGTTrainer(student, teacher.labeler, decoder=teacher.vae.decoder, encoder=teacher.vae.encoder,
                                 loss=_distill_loss(loss, coeffs, cfg.temperature), config=config)
    trainer.fit((x, y))
    return student.eval()


def rows(cfg: DemoConfig) -> List[Tuple[str, str]]:
    """The table's rows: ``("onehot", "-")`` and every other method with every loss."""
    out: List[Tuple[str, str]] = []
    for m in cfg.methods:
        if m == "onehot":
            out.append((m, "-"))
        else:
            out.extend((m, lo) for lo in cfg.losses)
    return out


def _jobs(cfg: DemoConfig) -> List[Tuple[str, str, int, int]]:
    # the slow TGT runs first, so that the parallel workers finish together
    cost = {"tgt-gradient": 0, "tgt-random": 1, "kd": 2, "onehot": 3}
    jobs = [(m, lo, b, s) for (m, lo) in rows(cfg) for b in cfg.budgets for s in cfg.seeds]
    return sorted(jobs, key=lambda j: (cost[j[0]], -j[2]))
