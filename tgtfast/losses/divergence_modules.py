"""One ``nn.Module`` per divergence of :func:`tgtfast.distill_loss`.

Each holds its parameters and conventions (temperature, reduction, logit transforms, vocabulary handling) and is
called as ``loss_fn(student_logits, teacher_logits, target=None, num_items_in_batch=None, weight=None)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tgtfast.losses import divergence as D

__all__ = [
    "DistillLoss",
    "ForwardKLLoss",
    "ReverseKLLoss",
    "JSDLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "SymmetricKLLoss",
    "ABDivergenceLoss",
    "TAIDLoss",
]


class DistillLoss(nn.Module):
    """:func:`tgtfast.distill_loss` as a module: ``DistillLoss("jsd", beta=0.5, temperature=2.0)``.

    The arguments are checked here, once; the call takes ``(student_logits, teacher_logits, target=None, *,
    num_items_in_batch=None, weight=None)`` (``weight``: per-row loss weights, see :func:`tgtfast.distill_loss`).
    The per-divergence classes below fix ``divergence``."""

    def __init__(
        self,
        divergence: str = "forward_kl",
        *,
        beta: Optional[float] = None,
        alpha: Optional[float] = None,
        lam: Optional[float] = None,
        t: Optional[float] = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "batchmean",
        t2_scaling: bool = False,
        logit_scale: D.Pair = None,
        logit_softcap: D.Pair = None,
        vocab_mismatch: Optional[str] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.params = {k: v for k, v in dict(beta=beta, alpha=alpha, lam=lam, t=t).items() if v is not None}
        if divergence != "taid" or t is not None:
            D.resolve(divergence, **self.params)
        elif divergence not in D.DIVERGENCES:
            raise ValueError(f"divergence must be one of {D.DIVERGENCES}, got {divergence!r}")
        self.divergence = divergence
        self.kwargs = dict(
            temperature=D.V.temperature(temperature), ignore_index=D.V.integer("ignore_index", ignore_index),
            reduction=D.V.choice("reduction", reduction, D._REDUCTIONS), t2_scaling=D.V.boolean("t2_scaling", t2_scaling),
            logit_scale=logit_scale, logit_softcap=logit_softcap, vocab_mismatch=vocab_mismatch, backend=backend,
        )
        D._pair("logit_scale", logit_scale)
        D._pair("logit_softcap", logit_softcap)
        if vocab_mismatch is not None:
            D.V.choice("vocab_mismatch", vocab_mismatch, ("slice", "pad"))

    def _params(self) -> dict:
        return self.params

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, *, num_items_in_batch=None,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return D.distill_loss(student_logits, teacher_logits, self.divergence, target=target,
                              num_items_in_batch=num_items_in_batch, weight=weight, **self._params(), **self.kwargs)

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self._params().items())
        return (f"divergence={self.divergence!r}{params}, temperature={self.kwargs['temperature']}, "
                f"reduction={self.kwargs['reduction']!r}")


def _fixed(name: str, divergence: str, doc: str, *params: str):
    """A DistillLoss subclass for one divergence whose constructor takes `params` (keyword or positional)."""

    def __init__(self, *args, **kwargs):
        if len(args) > len(params):
            raise TypeError(f"{name}() takes at most {len(params)} positional arguments ({', '.join(params)})")
        for key, value in zip(params, args):
            if key in kwargs:
                raise TypeError(f"{name}() got multiple values for argument {key!r}")
            kwargs[key] = value
        DistillLoss.__init__(self, divergence, **kwargs)

    return type(name, (DistillLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


ForwardKLLoss = _fixed("ForwardKLLoss", "forward_kl", "Forward KL ``KL(p || q)``: ``ForwardKLLoss(temperature=...)``.")
ReverseKLLoss = _fixed("ReverseKLLoss", "reverse_kl", "Reverse KL ``KL(q || p)``: ``ReverseKLLoss(temperature=...)``.")
JSDLoss = _fixed("JSDLoss", "jsd", "Generalised JSD(beta) as TRL's GKD and Liger define it: ``JSDLoss(beta=0.5)``.",
                 "beta")
SkewKLLoss = _fixed("SkewKLLoss", "skew_kl", "DistiLLM's skew KL ``KL(p || alpha p + (1 - alpha) q)``: "
                    "``SkewKLLoss(alpha=0.1)``.", "alpha")
SkewReverseKLLoss = _fixed("SkewReverseKLLoss", "skew_reverse_kl", "DistiLLM's skew reverse KL "
                           "``KL(q || (1 - alpha) p + alpha q)``: ``SkewReverseKLLoss(alpha=0.1)``.", "alpha")
TVDLoss = _fixed("TVDLoss", "tvd", "Total variation distance ``sum |p - q| / 2``: ``TVDLoss()``.")
SymmetricKLLoss = _fixed("SymmetricKLLoss", "symmetric_kl", "torchtune's symmetric KL "
                         "``(1 - lam) KL(p || q) + lam KL(q || p)``: ``SymmetricKLLoss(lam=0.5)``.", "lam")
ABDivergenceLoss = _fixed("ABDivergenceLoss", "ab_divergence", "ABKD's alpha-beta divergence: "
                          "``ABDivergenceLoss(alpha=0.2, beta=0.7)`` (limit forms at 0 included).", "alpha", "beta")


class TAIDLoss(DistillLoss):
    """TAID's interpolated distillation ``KL(r || q)``, ``r = softmax((1 - t) stopgrad(s) / T + t z_t / T)``.

    Either a fixed ``t`` in ``[0, 1]``, or a ``schedule`` (:class:`tgtfast.TAIDSchedule`) whose current ``t`` is
    read at every call; advance it with ``schedule.step(loss)`` once per optimiser step. The schedule is not a
    sub-module: save it with its own ``state_dict()``.
    """

    def __init__(self, t: Optional[float] = None, *, schedule=None, **kwargs) -> None:
        if (t is None) == (schedule is None):
            raise ValueError("TAIDLoss needs exactly one of t=... (fixed) or schedule=TAIDSchedule(...)")
        if schedule is not None and not hasattr(schedule, "t"):
            raise TypeError(f"schedule must have a `t` attribute (a TAIDSchedule), got {type(schedule).__name__}")
        super().__init__("taid", t=t, **kwargs)
        self.schedule = schedule

    def _params(self) -> dict:
        return {"t": float(self.schedule.t)} if self.schedule is not None else self.params
