"""The demo's students: one ``64-hidden-10`` MLP per (method, loss, budget, seed), trained through
:class:`tgtfast.TGTTrainer`, and the table's rows and the job list."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from tgtfast.demo.config import LOSSES, METHODS, NUM_CLASSES, NUM_PIXELS, WEAK_METHODS, WEAK_ROWS, DemoConfig
from tgtfast.demo.models import mlp
from tgtfast.demo.teacher import Teacher


def _distill_loss(name: str, coeffs: Optional[torch.Tensor], temperature: float) -> nn.Module:
    import tgtfast

    if name == "kl":
        return tgtfast.KDLoss(temperature=temperature)
    return tgtfast.PTLoss(coeffs, temperature=temperature)


def samples_per_example(cfg: DemoConfig, n: int) -> int:
    """New inputs per labelled example and step for the methods that label extra inputs: about
    ``cfg.new_samples_per_step`` per step whatever the budget ``n``, so each spends the same number of teacher
    labels."""
    return max(1, math.ceil(cfg.new_samples_per_step / n))


def train_student(method: str, loss: str, x: torch.Tensor, y: torch.Tensor, teacher: Teacher, cfg: DemoConfig,
                  seed: int, coeffs: Optional[torch.Tensor] = None, pool: Optional[torch.Tensor] = None
                  ) -> nn.Sequential:
    """One student ``64-hidden-10`` trained on the labelled ``(x, y)`` by ``method`` with distillation loss
    ``loss`` (``"kl"`` or ``"ptloss"`` with ``coeffs``), through :class:`tgtfast.TGTTrainer`.

    Every method but ``onehot`` adds ``l_d(f(x), h(x))`` on the labelled inputs; those that label extra inputs
    label ``S = samples_per_example(cfg, n)`` per labelled example and step (the same teacher-label budget):
    ``tgt-random`` / ``tgt-gradient`` decode them from the VAE's latent space, ``input-noise`` adds Gaussian noise
    of ``cfg.input_sigma`` to the pixels, and ``real-unlabelled`` draws ``S * n`` real images per step from
    ``pool`` (the teacher-train images, without labels): every batch holds the ``n`` labelled examples and
    ``S * n`` pool images, distilled with weight ``w_kd + w_tgt`` (the total distillation weight of TGT)."""
    import tgtfast

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if loss not in LOSSES and not (method == "onehot" and loss == "-"):
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss == "ptloss" and coeffs is None:
        raise ValueError("loss='ptloss' needs coeffs (e.g. from tgtfast.search_coefficients)")
    if method == "real-unlabelled" and pool is None:
        raise ValueError("method='real-unlabelled' needs pool, the unlabelled images")
    torch.manual_seed(seed)
    student = mlp([NUM_PIXELS, cfg.student_hidden, NUM_CLASSES])
    n, S = len(y), samples_per_example(cfg, len(y))
    extra = dict(exploration="none", batch_size=n)
    if method == "onehot":
        weights = dict(w_ce=cfg.w_ce, w_kd=0.0, w_tgt=0.0)
    elif method == "real-unlabelled":
        weights = dict(w_ce=cfg.w_ce, w_kd=cfg.w_kd + cfg.w_tgt, w_tgt=0.0)
        extra = dict(exploration="none", batch_size=n + S * n, labelled_per_batch=n)
    else:
        weights = dict(w_ce=cfg.w_ce, w_kd=cfg.w_kd, w_tgt=0.0 if method == "kd" else cfg.w_tgt)
        mode = {"kd": "none", "input-noise": "input", "tgt-random": "random", "tgt-gradient": "gradient"}[method]
        extra = dict(exploration=mode, batch_size=n)
    config = tgtfast.TGTConfig(
        **weights, **extra, sigma=cfg.input_sigma if method == "input-noise" else cfg.sigma,
        samples_per_example=S, explore_steps=cfg.grad_steps, explore_step_size=cfg.grad_step_size,
        max_steps=cfg.steps, optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, device="cpu",
        out_dir=None, progress=False, plot=False,
    )
    trainer = tgtfast.TGTTrainer(student, teacher.labeler, decoder=teacher.vae.decoder, encoder=teacher.vae.encoder,
                                 loss=_distill_loss(loss, coeffs, cfg.temperature), config=config)
    trainer.fit((x, y), unlabelled=pool if method == "real-unlabelled" else None)
    return student.eval()


def train_weak_student(method: str, loss: str, x: torch.Tensor, y: torch.Tensor, teacher: Teacher,
                       cfg: DemoConfig, seed: int, *, temperature: float, val: Tuple[torch.Tensor, torch.Tensor],
                       coeffs: Optional[torch.Tensor] = None) -> nn.Sequential:
    """A student of the second regime (``teacher``: the overconfident labeler with the shared VAE): CE on the
    labelled ``(x, y)`` plus distillation at ``temperature`` on them and on TGT random samples (``S`` per example
    and step, as in the first regime), by ``method``: ``kd`` (plain, with ``loss`` ``"kl"`` or ``"ptloss"``),
    ``weighted`` / ``slam`` (:class:`tgtfast.TGTTrainer`'s ``imperfect`` option) or ``active``
    (``active_pool``); the teacher's reliability is fitted on ``val``."""
    import tgtfast

    if method not in WEAK_METHODS or (method, loss) not in WEAK_ROWS:
        raise ValueError(f"(method, loss) must be one of {WEAK_ROWS}, got {(method, loss)!r}")
    if loss == "ptloss" and coeffs is None:
        raise ValueError("loss='ptloss' needs coeffs (e.g. from tgtfast.search_coefficients)")
    torch.manual_seed(seed)
    student = mlp([NUM_PIXELS, cfg.student_hidden, NUM_CLASSES])
    n = len(y)
    config = tgtfast.TGTConfig(
        w_ce=cfg.w_ce, w_kd=cfg.w_kd, w_tgt=cfg.w_tgt, exploration="random", batch_size=n, sigma=cfg.sigma,
        samples_per_example=samples_per_example(cfg, n), max_steps=cfg.steps, optimizer="adam", lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=seed, device="cpu", out_dir=None, progress=False, plot=False,
        imperfect=method if method in ("weighted", "slam") else "none",
        active_pool=cfg.active_pool if method == "active" else 1, reliability_bins=cfg.reliability_bins,
    )
    trainer = tgtfast.TGTTrainer(student, teacher.labeler, decoder=teacher.vae.decoder, encoder=teacher.vae.encoder,
                                 loss=_distill_loss(loss, coeffs, temperature), config=config)
    trainer.fit((x, y), val=val if method in ("weighted", "slam", "active") else None)
    return student.eval()


def rows(cfg: DemoConfig, regime: str = "strong") -> List[Tuple[str, str]]:
    """The table's rows of a regime: for ``"strong"``, ``("onehot", "-")`` and every other method with every
    loss; for ``"weak"``, :data:`~tgtfast.demo.config.WEAK_ROWS`."""
    if regime == "weak":
        return list(WEAK_ROWS)
    out: List[Tuple[str, str]] = []
    for m in cfg.methods:
        if m == "onehot":
            out.append((m, "-"))
        else:
            out.extend((m, lo) for lo in cfg.losses)
    return out


def _jobs(cfg: DemoConfig) -> List[Dict[str, Any]]:
    """The first regime's runs, and the second regime's KL runs at every candidate temperature (its other rows
    wait for the temperature picked from these); the slow ones first, so that the workers finish together."""
    cost = {"tgt-gradient": 0, "tgt-random": 1, "real-unlabelled": 2, "input-noise": 2, "kd": 3, "onehot": 4}
    jobs: List[Dict[str, Any]] = []
    if "weak" in cfg.regimes:
        jobs += [dict(regime="weak", method="kd", loss="kl", budget=b, seed=s, temperature=float(t))
                 for t in cfg.weak_temperatures for b in cfg.weak_budgets for s in cfg.seeds]
    if "strong" in cfg.regimes:
        strong = [dict(regime="strong", method=m, loss=lo, budget=b, seed=s, temperature=cfg.temperature)
                  for (m, lo) in rows(cfg) for b in cfg.budgets for s in cfg.seeds]
        jobs += sorted(strong, key=lambda j: (cost[j["method"]], -j["budget"]))
    return jobs


def weak_jobs(cfg: DemoConfig, temperature: float) -> List[Dict[str, Any]]:
    """The second regime's rows other than its KL runs, at the picked ``temperature`` (active first: slowest)."""
    order = {"active": 0, "slam": 1, "weighted": 1, "kd": 2}
    jobs = [dict(regime="weak", method=m, loss=lo, budget=b, seed=s, temperature=temperature)
            for (m, lo) in WEAK_ROWS if (m, lo) != ("kd", "kl") for b in cfg.weak_budgets for s in cfg.seeds]
    return sorted(jobs, key=lambda j: order[j["method"]])
