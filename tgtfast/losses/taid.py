"""TAID's schedule of the interpolation parameter ``t`` (Shing et al., ICLR 2025).

TAID distils towards ``r = softmax((1 - t) stopgrad(s) + t z_t)``, an intermediate distribution that moves from
the student's own (``t = 0``) to the teacher's (``t = 1``) during training; :func:`tgtfast.distill_loss` with
``divergence="taid"`` computes the loss for a given ``t``. :class:`TAIDSchedule` moves ``t``: a linear floor from
``t_start`` to ``t_end`` over the training, and faster while the loss keeps falling.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Dict, Optional

import torch

from tgtfast import validation as V

__all__ = ["TAIDSchedule"]

_HPARAMS = ("total_steps", "t_start", "t_end", "alpha", "beta", "disable_adaptive")
_STATE = ("t", "momentum", "prev_loss", "num_steps")


def _loss_value(loss: Any) -> float:
    """The loss as a Python float: a real number or a one-element tensor (detached here)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (a 0-dim tensor or a number), got a tensor of shape "
                             f"{tuple(loss.shape)}")
        if loss.is_complex() or loss.dtype == torch.bool:
            raise TypeError(f"loss must be a real number, got a {loss.dtype} tensor")
        value = float(loss.detach().reshape(()).item())
    elif isinstance(loss, bool) or not isinstance(loss, Real):
        raise TypeError(f"loss must be a real number or a 0-dim tensor, got {type(loss).__name__}")
    else:
        value = float(loss)
    if not math.isfinite(value):
        raise ValueError(f"loss must be finite, got {value}: a non-finite loss would corrupt the schedule's "
                         "momentum for the rest of the training; do not call step() for that step")
    return value


class TAIDSchedule:
    r"""The interpolation parameter ``t`` of TAID, advanced once per optimisation step from the loss.

    TAID (Shing, Misaki, Bao, Yokoi, Akiba: "TAID: Temporally Adaptive Interpolated Distillation for Efficient
    Knowledge Transfer in Language Models", ICLR 2025, Section 3.2 and Algorithm 1) raises ``t`` from ``t_start``
    to ``t_end`` over the ``N = total_steps`` optimisation steps. At step ``n = 1, 2, ...`` with loss ``J_n``
    (the TAID objective at the current ``t_n``):

    .. code-block:: text

        delta_n  = (J_{n-1} - J_n) / (J_{n-1} + eps)              relative decrease of the loss (eps = 1e-15)
        m_n      = beta m_{n-1} + (1 - beta) delta_n               momentum, m_0 = 0
        Delta_t  = alpha * sigmoid(m_n) * (1 - t_n)                adaptive increment
        t_lin(n) = t_start + (t_end - t_start) * min(n, N) / N     linear floor
        t_{n+1}  = min(t_end, max(t_lin(n), t_n + Delta_t))

    so ``t`` never decreases, never exceeds ``t_end``, is at least the linear floor, and reaches ``t_end`` after
    ``N`` steps at the latest; it moves faster while the loss falls quickly (large ``m``) and at the floor's pace
    when it stalls. With ``disable_adaptive=True``, ``t_{n+1} = t_lin(n)`` (the linear schedule alone).

    Defaults are the paper's and the authors' code's: ``t_start = 0.4``, ``t_end = 1.0``, ``alpha = 5e-4`` (the
    learning rate of ``t``), ``beta = 0.99`` (the momentum coefficient); the paper's runs also use
    ``t_start = 0.2``.

    Where the authors' code (github SakanaAI/TAID, ``src/distil_losses/taid.py``, ``TAID.update_t``) differs:

    * Step 1 has no previous loss. The code starts from ``prev_loss = inf`` and its first call only records the
      loss. Here too, step 1 leaves the momentum at 0 and adds no adaptive increment, but the linear floor
      applies from step 1.
    * The code's floor at its ``n``-th call is ``t_start + (t_end - t_start) (n - 1) / N`` (Lightning's
      ``global_step`` counts the steps already taken); here it is ``t_lin(n)`` above, one step ahead, so that
      ``t = t_end`` after ``N`` steps.
    * The code updates ``t`` whenever the loss module runs: once per micro-batch under gradient accumulation, and
      in validation steps too. Here ``t`` moves only when :meth:`step` is called: call it once per optimiser
      step, with the training loss of that step.
    * The code feeds its loss in cross-entropy form, ``-sum r log q`` (DistiLLM's ``forward_kl``), which is
      ``KL(r || q)`` plus the entropy of ``r``; ``tgtfast.distill_loss(..., "taid")`` returns ``KL(r || q)`` (same
      gradient). The relative change, and so ``t``, differ slightly with the two; to replay the code's schedule
      exactly, pass it the cross-entropy form.
    * The code keeps ``t`` and the momentum in float32 tensors; here they are Python floats (float64).

    Args:
        total_steps: ``N``, the number of optimisation steps of the training (an int >= 1).
        t_start: ``t`` at the start, in ``[0, 1]``.
        t_end: ``t`` at the end, in ``[t_start, 1]``.
        alpha: the step size of the adaptive increment, in ``[0, 1]``.
        beta: the momentum coefficient, in ``[0, 1]``.
        disable_adaptive: follow the linear floor only.

    The current value is :attr:`t`. :meth:`step` takes a finite loss (a number or a one-element tensor, read
    without gradient) and raises ``ValueError`` for NaN or infinity: skip the call for such a step. Steps past
    ``total_steps`` keep the floor at ``t_end``. :meth:`state_dict` / :meth:`load_state_dict` hold plain numbers
    (the hyper-parameters and the state), so a training resumes exactly.
    """

    EPS = 1e-15  # the authors' code's epsilon in the relative change

    def __init__(
        self,
        total_steps: int,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        disable_adaptive: bool = False,
    ) -> None:
        self._set_hparams(total_steps=total_steps, t_start=t_start, t_end=t_end, alpha=alpha, beta=beta,
                          disable_adaptive=disable_adaptive)
        self._t = self.t_start
        self._momentum = 0.0
        self._prev_loss: Optional[float] = None
        self._num_steps = 0

    def _set_hparams(self, *, total_steps, t_start, t_end, alpha, beta, disable_adaptive) -> None:
        total_steps = V.integer("total_steps", total_steps, low=1)
        t_start = V.real("t_start", t_start, low=0.0, high=1.0, high_inclusive=True)
        t_end = V.real("t_end", t_end, low=0.0, high=1.0, high_inclusive=True)
        if t_start > t_end:
            raise ValueError(f"t_start must be <= t_end, got t_start={t_start} > t_end={t_end}")
        alpha = V.real("alpha", alpha, low=0.0, high=1.0, high_inclusive=True)
        beta = V.real("beta", beta, low=0.0, high=1.0, high_inclusive=True)
        disable_adaptive = V.boolean("disable_adaptive", disable_adaptive)
        self.total_steps, self.t_start, self.t_end = total_steps, t_start, t_end
        self.alpha, self.beta, self.disable_adaptive = alpha, beta, disable_adaptive

    @property
    def t(self) -> float:
        """The current interpolation parameter (a float in ``[t_start, t_end]``)."""
        return self._t

    @property
    def momentum(self) -> float:
        """The momentum ``m_n`` of the relative loss decrease."""
        return self._momentum

    @property
    def num_steps(self) -> int:
        """How many times :meth:`step` has been called."""
        return self._num_steps

    def floor(self, n: int) -> float:
        """The linear floor ``t_lin(n) = t_start + (t_end - t_start) * min(n, N) / N``."""
        if n >= self.total_steps:  # exactly t_end, whatever the rounding of the line
            return self.t_end
        return self.t_start + (self.t_end - self.t_start) * (n / self.total_steps)

    def step(self, loss: Any) -> float:
        """Advance one optimisation step with this step's loss (a number or a 0-dim tensor); returns the new ``t``."""
        value = _loss_value(loss)
        n = self._num_steps + 1
        floor = self.floor(n)
        increment = 0.0
        if self._prev_loss is not None:  # the momentum is kept up to date with the adaptive step off too
            delta = (self._prev_loss - value) / (self._prev_loss + self.EPS)
            self._momentum = self.beta * self._momentum + (1.0 - self.beta) * delta
            increment = self.alpha * _sigmoid(self._momentum) * (1.0 - self._t)
        t = floor if self.disable_adaptive else min(self.t_end, max(floor, self._t + increment))
        self._t = t
        self._prev_loss = value
        self._num_steps = n
        return t

    def state_dict(self) -> Dict[str, Any]:
        """The hyper-parameters and the state, as plain Python numbers (``prev_loss`` is None before step 1)."""
        return {
            "total_steps": self.total_steps,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "alpha": self.alpha,
            "beta": self.beta,
            "disable_adaptive": self.disable_adaptive,
            "t": self._t,
            "momentum": self._momentum,
            "prev_loss": self._prev_loss,
            "num_steps": self._num_steps,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (hyper-parameters included), checking every entry."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in _HPARAMS + _STATE if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict misses {missing}")
        unknown = sorted(set(state_dict) - set(_HPARAMS + _STATE))
        if unknown:
            raise ValueError(f"state_dict has unknown entries {unknown}")
        self._set_hparams(**{k: state_dict[k] for k in _HPARAMS})
        t = V.real("state_dict['t']", state_dict["t"], low=self.t_start, high=self.t_end, high_inclusive=True)
        momentum = V.real("state_dict['momentum']", state_dict["momentum"])
        prev = state_dict["prev_loss"]
        prev = None if prev is None else V.real("state_dict['prev_loss']", prev)
        num_steps = V.integer("state_dict['num_steps']", state_dict["num_steps"], low=0)
        if (prev is None) != (num_steps == 0):
            raise ValueError("state_dict['prev_loss'] must be None exactly when state_dict['num_steps'] is 0, got "
                             f"prev_loss={prev!r} with num_steps={num_steps}")
        self._t, self._momentum, self._prev_loss, self._num_steps = t, momentum, prev, num_steps

    def __repr__(self) -> str:
        return (f"TAIDSchedule(total_steps={self.total_steps}, t_start={self.t_start}, t_end={self.t_end}, "
                f"alpha={self.alpha}, beta={self.beta}, disable_adaptive={self.disable_adaptive}; "
                f"t={self._t:.6g} after {self._num_steps} steps)")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
