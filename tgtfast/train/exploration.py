"""New samples from the teacher's latent space (TGT paper Sec. 3.2): random perturbation of ``Enc(x)`` or
gradient ascent on the student-teacher divergence, decoded and labelled through
:func:`tgtfast.perturb_decode_label` (fused kernels when the decoder and labeler are MLPs)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from tgtfast.train.noise import noise_seed

__all__ = ["explore", "new_samples", "teacher_rows", "loss_sum", "loss_option", "autocast", "perturb_decode_label_fn"]


def perturb_decode_label_fn() -> Callable:
    """The package's :func:`tgtfast.perturb_decode_label`, looked up at every call (so that it can be wrapped)."""
    import tgtfast

    return tgtfast.perturb_decode_label


def autocast(bf16: bool, device: torch.device):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def loss_option(loss: Callable, name: str, default: Any) -> Any:
    """A setting of the loss (``reduction``, ``temperature``): its attribute, or its entry in the keyword
    arguments a :class:`tgtfast.DistillLoss` keeps, else ``default``."""
    if hasattr(loss, name):
        return getattr(loss, name)
    kwargs = getattr(loss, "kwargs", None)
    return kwargs.get(name, default) if isinstance(kwargs, dict) else default


def loss_sum(loss: Callable, s: torch.Tensor, t: Any) -> torch.Tensor:
    """Sum over rows of ``loss(s, t)`` (the loss is called once, on the whole block; ``t``: teacher logits or a
    :class:`tgtfast.SparseTeacher`)."""
    out = loss(s, t)
    red = loss_option(loss, "reduction", "batchmean")
    if red == "sum":
        return out
    if red == "none" or out.dim() > 0:
        return out.sum()
    return out * s.shape[0]


def teacher_rows(config: Any, rows: int, *, label: bool = True) -> int:
    """Rows the labeler evaluates when :func:`explore` makes ``rows`` new samples: the ascent steps of
    ``"gradient"`` exploration label every candidate at every step, and ``label`` adds the final labels."""
    ascent = config.explore_steps * rows if config.exploration == "gradient" else 0
    return ascent + (rows if label else 0)


def explore(z0: torch.Tensor, *, config: Any, step: int, micro: int, start: int, student: nn.Module,
            decoder: Callable, labeler: Callable, loss: Callable, temperature: float, label: bool = True
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """New samples ``x'`` and teacher logits ``h(x')`` for the latent codes ``z0`` ([n, d]) of a rank's share
    of micro-batch ``micro`` of step ``step``, whose first example sits at position ``start`` of the global
    micro-batch (see :mod:`tgtfast.train.noise` for the streams). With ``exploration="input"``, ``z0`` holds the
    inputs themselves and ``x' = x + sigma * noise`` (the same streams, over the flattened inputs).

    ``label=False`` returns ``(x', None)``: the samples are made without asking the labeler for their labels
    (``"random"``: the perturbation and the decoder, ``"input"``: the noise only; ``"gradient"`` still labels the
    candidates during its ascent steps, which need the teacher, but not the final samples), so that a selection
    can decide which of them the teacher labels (:func:`teacher_rows` counts the labeler's rows)."""
    c = config
    S = c.samples_per_example
    z = z0.repeat_interleave(S, dim=0) if S > 1 else z0
    d = z[0].numel()
    pdl = perturb_decode_label_fn()
    offset = start * S * d
    T = temperature
    if c.exploration == "input":
        import tgtfast

        with torch.no_grad():
            flat = z.reshape(z.shape[0], d)
            x_new = tgtfast.perturb(flat, c.sigma, noise_seed(c.seed, step, micro, 0), offset).view_as(z)
            return x_new, (labeler(x_new).float() if label else None)
    if c.exploration == "random":
        with torch.no_grad():
            if not label:
                import tgtfast

                return decoder(tgtfast.perturb(z, c.sigma, noise_seed(c.seed, step, micro, 0), offset)), None
            x_new, h = pdl(z, decoder, labeler, sigma=c.sigma, seed=noise_seed(c.seed, step, micro, 0),
                           offset=offset, temperature=T, output="logits")
        return x_new.detach(), h.detach()
    # gradient exploration
    import tgtfast

    anchor = z.detach()
    if c.sigma > 0:
        seed0 = noise_seed(c.seed, step, micro, 0)
        if hasattr(tgtfast, "perturb"):
            z = tgtfast.perturb(anchor, c.sigma, seed0, offset)
        else:
            from tgtfast import reference

            z = anchor + c.sigma * reference.latent_noise(tuple(anchor.shape), seed0, offset, device=anchor.device,
                                                          dtype=anchor.dtype)
    z = z.detach()
    was_training = student.training
    student.eval()  # no dropout draws, no batch-norm statistics updates while exploring
    try:
        for _ in range(c.explore_steps):
            z.requires_grad_(True)
            with torch.enable_grad():
                x_new, h = pdl(z, decoder, labeler, sigma=0.0, seed=0, offset=0, temperature=T, output="logits")
                with autocast(c.bf16, z.device):
                    s = student(x_new)
                div = loss_sum(loss, s.float(), h.float())
                (g,) = torch.autograd.grad(div, z)
            with torch.no_grad():
                if c.explore_normalize:
                    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                z = z.detach() + c.explore_step_size * g
                if c.explore_radius is not None:
                    delta = z - anchor
                    norm = delta.norm(dim=1, keepdim=True)
                    z = anchor + delta * (c.explore_radius / norm.clamp_min(c.explore_radius))
    finally:
        student.train(was_training)
    with torch.no_grad():
        if not label:
            return decoder(z.detach()), None
        x_new, h = pdl(z.detach(), decoder, labeler, sigma=0.0, seed=0, offset=0, temperature=T, output="logits")
    return x_new.detach(), h.detach()


def new_samples(src: torch.Tensor, nx: int, *, config: Any, explore_config: Any, step: int, micro: int, start: int,
                student: nn.Module, decoder: Callable, labeler: Callable, loss: Callable, temperature: float,
                correctness: Any = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The new samples of a micro-batch share of ``nx`` examples (``src``: their latent codes, or the inputs for
    ``"input"`` exploration), their teacher logits, and the rows the labeler evaluated. With
    ``config.active_pool = P > 1``, ``explore_config`` (``samples_per_example * P``) makes ``P`` times as many
    candidates without labels, and only the ``nx * samples_per_example`` chosen by
    :func:`tgtfast.train.imperfect.select_active` (with ``correctness``) are sent to the labeler."""
    from tgtfast.train.imperfect import select_active

    c = config
    S, P = c.samples_per_example, c.active_pool
    common = dict(step=step, micro=micro, start=start, student=student, decoder=decoder, labeler=labeler,
                  loss=loss, temperature=temperature)
    if P == 1:
        x_new, t_new = explore(src, config=c, **common)
        return x_new, t_new, teacher_rows(c, nx * S)
    candidates, _ = explore(src, config=explore_config, label=False, **common)
    keep = select_active(candidates, nx * S, student=student, correctness=correctness, seed=c.seed, step=step,
                         micro=micro)
    x_new = candidates[keep]
    with torch.no_grad():
        t_new = labeler(x_new).float()
    return x_new, t_new, teacher_rows(c, nx * S * P, label=False) + nx * S
