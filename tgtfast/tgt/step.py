"""Teacher Guided Training: the latent perturb -> decode -> label step and its noise (docs/design.md, "TGT step").

TGT (Sec. 3.2 of the TGT paper) makes new training samples by perturbing the latent code ``z`` of a frozen
teacher generator, decoding it, and labelling the result with the frozen teacher labeler::

    x_new       = decoder(z + sigma * noise)
    soft_labels = softmax(labeler(x_new) / temperature)

The noise comes from a counter-based generator (Philox4x32-10 and Box-Muller, ``csrc/philox.h``): element ``i``
of a draw with ``(seed, offset)`` is a function of ``(seed, offset + i)`` only, so the kernels compute it where
they use it and no noise tensor is stored, every backend (C++ CPU, CUDA, Triton, the eager reference) draws the
same numbers up to float rounding, a run is reproducible from its seeds, and consecutive batches can share one
seed and advance ``offset`` by the number of elements drawn (the stream at offset ``o`` continues the stream at
offset 0).
"""

from __future__ import annotations

import warnings
from numbers import Integral
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from tgtfast import reference
from tgtfast import validation as V
from tgtfast.dispatch import Backend, select
from tgtfast.ops import mlp_chain as _chain_op
from tgtfast.ops import noise as _noise_op
from tgtfast.ops import softmax as _softmax_op
from tgtfast.ops._autodiff import check_no_tangent
from tgtfast.tgt.teacher import (
    Layer,
    TeacherPart,
    _check_device,
    _check_part,
    _from_list,
    _frozen_call,
    _requires_grad,
    _run,
    as_mlp,
)

__all__ = ["latent_noise", "perturb", "temperature_softmax", "perturb_decode_label", "perturb_decode_label_mlp"]

_OUTPUTS = ("probs", "logits")


def _seed_arg(seed: int) -> int:
    """The seed's 64 bits as the signed int64 the ops take (two's complement for seeds >= 2**63)."""
    return seed - V.SEED_LIMIT if seed >= 2**63 else seed


def latent_noise(
    shape: Union[int, Sequence[int], torch.Size],
    seed: int,
    offset: int = 0,
    *,
    device: Union[torch.device, str, None] = None,
    dtype: torch.dtype = torch.float32,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Standard normal noise of the counter-based generator the fused TGT kernels use.

    Element ``i`` (row-major) is ``n(seed, offset + i)`` with, for stream index ``j``::

        (x0, x1, x2, x3) = Philox4x32-10(counter = (j // 4 mod 2^32, j // 2^34, 0, 0),
                                         key = (seed mod 2^32, seed // 2^32))
        (a, b) = (x0, x1) if j % 4 < 2 else (x2, x3)
        u1 = (floor(a / 2^8) + 1/2) 2^-24,  u2 = (floor(b / 2^8) + 1/2) 2^-24          (both in (0, 1))
        n  = sqrt(-2 log u1) * (cos(2 pi u2) if j is even else sin(2 pi u2))            (Box-Muller)

    computed in float32 (then cast to ``dtype``). The same ``(seed, offset)`` gives the same numbers on every
    backend within float rounding, and ``latent_noise((n,), seed, o)`` equals
    ``latent_noise((o + n,), seed, 0)[o:]``. ``tgtfast.reference.latent_noise`` is the eager specification.

    Args:
        shape: the output shape (an int or a sequence of non-negative ints).
        seed: an int in ``[0, 2**64)``.
        offset: the stream index of element 0, ``>= 0``; ``offset + numel`` must be below ``2**63``.
        device: output device (default: torch's default device).
        dtype: output dtype, a floating dtype (float32, float64, bfloat16, float16).
        backend: ``None`` / ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        A tensor of ``shape`` and ``dtype`` on ``device``.
    """
    if isinstance(shape, Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        shape = tuple(shape)
        ok = all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 0 for s in shape)
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"shape must be an int or a sequence of non-negative ints, got {shape!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float64, bfloat16, float16, got {dtype!r}")
    seed = V.seed(seed)
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=device)
    offset = V.offset(offset, out.numel())
    chosen = select(backend, out.device, dtype, op="latent_noise")
    if chosen is Backend.REFERENCE:
        return reference.latent_noise(out.shape, seed, offset, device=out.device, dtype=dtype)
    _noise_op.LATENT_NOISE[chosen.value](out, _seed_arg(seed), offset)
    return out


def perturb(z: torch.Tensor, sigma: float, seed: int, offset: int = 0, *, backend: Optional[str] = None) -> torch.Tensor:
    """``z + sigma * latent_noise(z.shape, seed, offset)`` in one pass, without storing the noise.

    The sum is formed in float32 (float64 for float64 ``z``) and returned in ``z``'s dtype, contiguous.
    Differentiable with respect to ``z`` (the gradient is the identity); ``sigma``, ``seed`` and ``offset``
    are not differentiable.

    Args:
        z: latent codes, any shape, float32 / float64 / bfloat16 / float16.
        sigma: noise scale, finite and ``>= 0`` (0 returns a copy of ``z``).
        seed: an int in ``[0, 2**64)``.
        offset: stream index of ``z``'s element 0 (row-major), ``>= 0``.
        backend: ``None`` / ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``.
    """
    z = V.float_tensor("z", z)
    sigma = V.real("sigma", sigma, low=0.0)
    seed = V.seed(seed)
    offset = V.offset(offset, z.numel())
    chosen = select(backend, z.device, z.dtype, op="perturb")
    if chosen is Backend.REFERENCE:
        return reference.perturb(z, sigma, seed, offset)
    check_no_tangent("tgtfast.perturb", z)
    return _noise_op.PERTURB[chosen.value](z, sigma, _seed_arg(seed), offset)


def temperature_softmax(logits: torch.Tensor, temperature: float = 1.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension, in one fused pass.

    Computed in float32 (float64 for float64 logits) and returned in the logits' dtype. Differentiable with
    respect to ``logits``: the backward recomputes from the saved output,
    ``dx = y * (g - sum_k g_k y_k) / temperature``.
    """
    logits = V.float_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the classes are the last one)")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty class dimension (K = 0)")
    temperature = V.temperature(temperature)
    chosen = select(backend, logits.device, logits.dtype, op="temperature_softmax")
    if chosen is Backend.REFERENCE:
        return reference.temperature_softmax(logits, temperature)
    check_no_tangent("tgtfast.temperature_softmax", logits)
    return _softmax_op.IMPL[chosen.value](logits, temperature)


def perturb_decode_label(
    z: torch.Tensor,
    decoder: TeacherPart,
    labeler: TeacherPart,
    *,
    sigma: float,
    seed: int,
    offset: int = 0,
    temperature: float = 1.0,
    backend: Optional[str] = None,
    output: str = "probs",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TGT random exploration: new samples and their teacher soft labels from perturbed latent codes.

    Returns ``(x_new, soft_labels)`` with ``x_new = decoder(z + sigma * noise)`` and
    ``soft_labels = softmax(labeler(x_new) / temperature)``, the noise being
    ``latent_noise(z.shape, seed, offset)`` (drawn inside the kernels, never stored).

    * When both ``decoder`` and ``labeler`` are MLPs (``nn.Sequential`` of ``nn.Linear`` and ReLU / GELU /
      SiLU / Tanh / Sigmoid / Identity, or explicit lists of ``(weight [out, in], bias [out] or None,
      activation)`` with activation one of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"tanh"``,
      ``"sigmoid"``, ``"identity"`` or ``None``), ``z`` is ``[B, d]`` float32 or bfloat16 and the fused MLP
      kernels are installed, the whole chain runs fused.
    * Otherwise the fused perturbation runs before the decoder and the fused temperature softmax after the
      labeler, with the given modules (any ``nn.Module`` or callable; explicit lists run as ``F.linear`` and
      the activation) in between.

    Gradients: both outputs are differentiable with respect to ``z`` (gradient-based exploration). The teacher
    is frozen: its parameters are used detached and never receive a gradient, on any path (``.grad`` stays
    ``None``); a ``UserWarning`` says so when one of them requires grad (the fused MLP path says it once per
    process). A plain callable that is not an ``nn.Module`` is called as is.

    Args:
        z: latent codes ``[..., d]`` (float32, float64, bfloat16, float16).
        decoder: the frozen generator's decoder ``R^d -> X``.
        labeler: the frozen teacher labeler ``X -> R^K`` (logits).
        sigma: noise scale, finite and ``>= 0``.
        seed: an int in ``[0, 2**64)``.
        offset: stream index of ``z``'s element 0, ``>= 0`` (advance it by ``z.numel()`` per batch to draw
            fresh noise from one seed).
        temperature: ``> 0``, divides the labeler's logits.
        backend: ``None`` / ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"``, for the fused
            parts.
        output: what the second output is: ``"probs"`` (default), the soft labels ``softmax(h / T)``; or
            ``"logits"``, teacher logits for a distillation loss that applies its own temperature ``T`` (pass the
            same one): the labeler's logits ``h`` on the generic path, and on the fused MLP chain, which writes
            only probabilities, ``T * log softmax(h / T) = h - c`` with ``c`` a per-row constant that no
            softmax-based loss sees (entries whose probability underflows float32 are clamped at
            ``T * log(1.2e-38)``). Both are float32 or the labeler's dtype.

    Raises:
        TypeError / ValueError naming the argument: ``z`` not a floating tensor, negative ``sigma``,
        non-positive ``temperature``, a bad ``seed`` / ``offset``, a latent width that does not match the
        decoder, a decoder output that does not match the labeler input, an unsupported layer of an explicit
        list, teacher parameters on another device than ``z``.
    """
    z = V.float_tensor("z", z)
    if z.dim() == 0:
        raise ValueError("z must have at least one dimension (the latent width is the last one)")
    sigma = V.real("sigma", sigma, low=0.0)
    temperature = V.temperature(temperature)
    seed = V.seed(seed)
    offset = V.offset(offset, z.numel())
    output = V.choice("output", output, _OUTPUTS)
    _check_part(decoder, "decoder")
    _check_part(labeler, "labeler")
    dec_layers, lab_layers = as_mlp(decoder, name="decoder"), as_mlp(labeler, name="labeler")
    _check_device(decoder, dec_layers, "decoder", z.device)
    _check_device(labeler, lab_layers, "labeler", z.device)
    if dec_layers is not None and dec_layers[0][0].shape[1] != z.shape[-1]:
        raise ValueError(
            f"decoder takes latent width {dec_layers[0][0].shape[1]} but z has width {z.shape[-1]} (last dimension)"
        )
    if dec_layers is not None and lab_layers is not None and dec_layers[-1][0].shape[0] != lab_layers[0][0].shape[1]:
        raise ValueError(
            f"labeler takes inputs of width {lab_layers[0][0].shape[1]} but the decoder outputs width "
            f"{dec_layers[-1][0].shape[0]}"
        )
    if dec_layers is not None and lab_layers is not None and z.dim() == 2 and z.dtype in _chain_op.MLP_DTYPES:
        x_new, soft = _run_chain(z, dec_layers, lab_layers, sigma, seed, offset, temperature, backend)
        if output == "logits":  # T log softmax(h / T) = h - (a per-row constant): the chain writes no logits
            return x_new, torch.log(soft.float().clamp_min(torch.finfo(torch.float32).tiny)) * temperature
        return x_new, soft

    if torch.is_grad_enabled() and (_requires_grad(decoder) or _requires_grad(labeler)):
        warnings.warn(
            "perturb_decode_label: the teacher (decoder and labeler) is frozen; its parameters that require grad "
            "receive no gradient (only z does)",
            UserWarning,
            stacklevel=2,
        )
    z_new = perturb(z, sigma, seed, offset, backend=backend)
    x_new = _run(_frozen_call(decoder, dec_layers), z_new, "decoder", "the perturbed latent")
    logits = _run(_frozen_call(labeler, lab_layers), x_new, "labeler", "the decoder output")
    if logits.dim() == 0 or not logits.is_floating_point():
        raise ValueError(
            f"labeler must return floating logits [..., K], got {logits.dtype} of shape {tuple(logits.shape)}"
        )
    if output == "logits":
        return x_new, logits
    return x_new, temperature_softmax(logits, temperature, backend=backend)


def _check_layers(layers, what: str, device: torch.device) -> List[Layer]:
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"perturb_decode_label_mlp: {what} must be a list of (weight, bias, activation), "
                        f"got {type(layers).__name__} (as_mlp turns modules into one)")
    layers = _from_list(layers, what)
    for i, (w, b, _) in enumerate(layers):
        if w.device != device:
            raise ValueError(f"perturb_decode_label_mlp: {what}[{i}] weight is on {w.device}, z on {device}")
    return layers


_warned_grad = False


def perturb_decode_label_mlp(
    z: Tensor,
    dec_layers: Sequence[Layer],
    lab_layers: Sequence[Layer],
    *,
    sigma: float,
    seed: int,
    offset: int = 0,
    temperature: float = 1.0,
    backend: Union[str, Backend, None] = None,
) -> Tuple[Tensor, Tensor]:
    """Fused ``x_new = decoder(z + sigma * noise)``, ``soft_labels = softmax(labeler(x_new) / temperature)``.

    Args:
        z: latent codes ``[B, d]``, float32 or bfloat16 (bfloat16: the math runs in float32 and the outputs are
            rounded to bfloat16 once). Differentiable: the gradient to ``z`` flows through both outputs.
        dec_layers, lab_layers: decoder and labeler as lists of ``(weight, bias, activation)`` (see
            :func:`as_mlp`), on z's device, any floating dtype (used in float32). The decoder's output width is
            the labeler's input width.
        sigma: noise scale. seed: 64-bit key of the noise in ``[0, 2**64)``. offset: first stream index
            (``>= 0``); element ``i`` of the ``[B, d]`` noise is ``latent_noise`` element ``offset + i``.
        temperature: softmax temperature ``> 0``.
        backend: ``None``/``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (eager).

    Returns:
        ``(x_new [B, d_x], soft_labels [B, K])`` in z's dtype.

    The weights are frozen constants: they never get a gradient (see the module docstring).
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"perturb_decode_label_mlp: z must be a tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"perturb_decode_label_mlp: z must be 2-D [B, d], got shape {tuple(z.shape)}")
    if z.dtype not in _chain_op.MLP_DTYPES:
        raise TypeError(f"perturb_decode_label_mlp: z must be float32 or bfloat16, got {z.dtype}")
    dec = _check_layers(dec_layers, "decoder", z.device)
    lab = _check_layers(lab_layers, "labeler", z.device)
    if dec[0][0].shape[1] != z.shape[1]:
        raise ValueError(f"decoder: its first layer takes {dec[0][0].shape[1]} features, z has {z.shape[1]}")
    if lab[0][0].shape[1] != dec[-1][0].shape[0]:
        raise ValueError(f"labeler: its first layer takes {lab[0][0].shape[1]} features, the decoder gives "
                         f"{dec[-1][0].shape[0]}")
    sigma = V.real("sigma", sigma)
    temperature = V.temperature(temperature)
    seed = V.seed(seed)
    offset = V.offset(offset, z.numel())
    return _run_chain(z, dec, lab, sigma, seed, offset, temperature, backend)


def _run_chain(z: Tensor, dec: List[Layer], lab: List[Layer], sigma: float, seed: int, offset: int,
               temperature: float, backend) -> Tuple[Tensor, Tensor]:
    """The chain on arguments already checked (by :func:`perturb_decode_label_mlp` or
    :func:`perturb_decode_label`)."""
    global _warned_grad
    if torch.is_grad_enabled() and not _warned_grad and any(
        t is not None and t.requires_grad for layer in dec + lab for t in layer[:2]
    ):
        _warned_grad = True
        warnings.warn("perturb_decode_label_mlp: teacher weights that require grad are treated as frozen "
                      "constants and get no gradient", UserWarning, stacklevel=2)
    chosen = select(backend, z.device, z.dtype, op=_chain_op.OP)
    dec, lab = _chain_op._layers_f32(dec), _chain_op._layers_f32(lab)
    if chosen is Backend.REFERENCE:
        return reference.perturb_decode_label_mlp(z, dec, lab, sigma=sigma, seed=seed, offset=offset,
                                                  temperature=temperature)
    check_no_tangent("tgtfast.perturb_decode_label", z)
    return _chain_op.MlpChain.apply(z.contiguous(), chosen.value, dec, lab, sigma, seed, offset, temperature)
