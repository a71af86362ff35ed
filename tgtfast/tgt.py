"""Teacher Guided Training: the latent perturb -> decode -> label step (DESIGN.md section 3).

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

import math
import warnings
from numbers import Integral, Real
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from tgtfast import _ops, reference
from tgtfast.dispatch import Backend, select

__all__ = ["latent_noise", "perturb", "temperature_softmax", "perturb_decode_label"]

_SEED_LIMIT = 2**64
_STREAM_LIMIT = 2**63 - 1  # offset + numel must stay below it (the ops take int64)
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

Layer = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[str]]
TeacherPart = Union[nn.Module, Callable[[torch.Tensor], torch.Tensor], Sequence[Layer]]

# activations an explicit layer list may name (None means the identity)
_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
_ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


# ------------------------------------------------------------------------------------------------
# argument checks


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _check_offset(offset: object, numel: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, Integral):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset + numel > _STREAM_LIMIT:
        raise ValueError(f"offset + number of elements must be < 2**63, got offset {offset} and {numel} elements")
    return offset


def _check_real(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float32, float64, bfloat16 or float16 tensor, got {x.dtype}")
    return x


def _seed_arg(seed: int) -> int:
    """The seed's 64 bits as the signed int64 the ops take (two's complement for seeds >= 2**63)."""
    return seed - _SEED_LIMIT if seed >= 2**63 else seed


# ------------------------------------------------------------------------------------------------
# ops


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
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float64, bfloat16, float16, got {dtype!r}")
    seed = _check_seed(seed)
    out = torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=device)
    offset = _check_offset(offset, out.numel())
    chosen = select(backend, out.device, dtype, op="latent_noise", kernels=_ops.LATENT_NOISE)
    if chosen is Backend.REFERENCE:
        return reference.latent_noise(out.shape, seed, offset, device=out.device, dtype=dtype)
    _ops.LATENT_NOISE[chosen.value](out, _seed_arg(seed), offset)
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
    z = _check_float_tensor("z", z)
    sigma = _check_real("sigma", sigma, positive=False)
    seed = _check_seed(seed)
    offset = _check_offset(offset, z.numel())
    chosen = select(backend, z.device, z.dtype, op="perturb", kernels=_ops.PERTURB)
    if chosen is Backend.REFERENCE:
        return reference.perturb(z, sigma, seed, offset)
    return _ops.PERTURB[chosen.value](z, sigma, _seed_arg(seed), offset)


def temperature_softmax(logits: torch.Tensor, temperature: float = 1.0, *, backend: Optional[str] = None) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension, in one fused pass.

    Computed in float32 (float64 for float64 logits) and returned in the logits' dtype. Differentiable with
    respect to ``logits``: the backward recomputes from the saved output,
    ``dx = y * (g - sum_k g_k y_k) / temperature``.
    """
    logits = _check_float_tensor("logits", logits)
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the classes are the last one)")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty class dimension (K = 0)")
    temperature = _check_real("temperature", temperature, positive=True)
    chosen = select(backend, logits.device, logits.dtype, op="temperature_softmax", kernels=_ops.TEMPERATURE_SOFTMAX)
    if chosen is Backend.REFERENCE:
        return reference.temperature_softmax(logits, temperature)
    return _ops.TEMPERATURE_SOFTMAX[chosen.value](logits, temperature)


# ------------------------------------------------------------------------------------------------
# teacher parts: explicit layer lists, nn.Sequential MLPs, anything else


def _is_layer_list(part: object) -> bool:
    return isinstance(part, (list, tuple)) and not isinstance(part, nn.Module)


def _check_layers(layers: Sequence, name: str) -> List[Tuple[torch.Tensor, Optional[torch.Tensor], str]]:
    """Validate an explicit ``[(weight [out, in], bias [out] or None, activation), ...]`` list."""
    if len(layers) == 0:
        raise ValueError(f"{name} is an empty list of layers")
    checked = []
    for i, layer in enumerate(layers):
        where = f"{name}[{i}]"
        if not isinstance(layer, (list, tuple)) or len(layer) != 3:
            raise TypeError(f"{where} must be a (weight, bias, activation) tuple, got {type(layer).__name__}")
        weight, bias, act = layer
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise TypeError(f"{where}: weight must be a 2-D floating tensor [out_features, in_features]")
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"{where}: bias must be None or a tensor of shape [{weight.shape[0]}]")
        act_name = "identity" if act is None else act
        if not isinstance(act_name, str) or act_name.lower() not in _ACTIVATIONS:
            raise ValueError(
                f"{where}: unsupported activation {act!r}; expected one of {sorted(_ACTIVATIONS)} or None"
            )
        if i > 0 and weight.shape[1] != checked[-1][0].shape[0]:
            raise ValueError(
                f"{where}: weight takes {weight.shape[1]} inputs but {name}[{i - 1}] gives {checked[-1][0].shape[0]}"
            )
        checked.append((weight, bias, act_name.lower()))
    return checked


def _widths(part: object, name: str) -> Optional[Tuple[int, int, torch.dtype]]:
    """(input width, output width, weight dtype) of an explicit layer list or an nn.Sequential whose first and
    last width-changing layers are nn.Linear; None when that cannot be read before running."""
    if _is_layer_list(part):
        layers = _check_layers(part, name)
        return layers[0][0].shape[1], layers[-1][0].shape[0], layers[0][0].dtype
    if isinstance(part, nn.Sequential) and len(part) > 0:
        mods = list(part)
        if not all(isinstance(m, (nn.Linear,) + _ACTIVATION_MODULES) for m in mods):
            return None
        linears = [m for m in mods if isinstance(m, nn.Linear)]
        if not linears:
            return None
        return linears[0].in_features, linears[-1].out_features, linears[0].weight.dtype
    return None


def _tensors_of(part: object) -> List[torch.Tensor]:
    if _is_layer_list(part):
        return [t for w, b, _ in part for t in (w, b) if t is not None]
    if isinstance(part, nn.Module):
        return list(part.parameters()) + list(part.buffers())
    return []


def _check_part(part: object, name: str, device: torch.device) -> None:
    if not (_is_layer_list(part) or callable(part)):
        raise TypeError(f"{name} must be an nn.Module, a callable or a list of (weight, bias, activation), "
                        f"got {type(part).__name__}")
    for t in _tensors_of(part):
        if t.device != device:
            raise ValueError(f"{name} has parameters on {t.device} but z is on {device}")


def _frozen_call(part: object, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running `part` with its parameters detached (the teacher is frozen)."""
    if _is_layer_list(part):
        layers = [(w.detach(), None if b is None else b.detach(), _ACTIVATIONS[a]) for w, b, a in _check_layers(part, name)]

        def run_layers(x: torch.Tensor) -> torch.Tensor:
            for w, b, act in layers:
                x = act(F.linear(x, w, b))
            return x

        return run_layers
    if isinstance(part, nn.Module):
        params = {k: v.detach() for k, v in part.named_parameters()}
        return lambda x: torch.func.functional_call(part, params, (x,))
    return part


def _requires_grad(part: object) -> bool:
    return any(t.requires_grad for t in _tensors_of(part))


def _run(fn: Callable, x: torch.Tensor, name: str, what: str) -> torch.Tensor:
    try:
        out = fn(x)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:  # shape / dtype mismatches inside the user's module
        raise ValueError(
            f"{name} failed on {what} of shape {tuple(x.shape)} ({x.dtype}, {x.device}): {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
    return out


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """TGT random exploration: new samples and their teacher soft labels from perturbed latent codes.

    Returns ``(x_new, soft_labels)`` with ``x_new = decoder(z + sigma * noise)`` and
    ``soft_labels = softmax(labeler(x_new) / temperature)``, the noise being
    ``latent_noise(z.shape, seed, offset)`` (drawn inside the kernels, never stored).

    * When both ``decoder`` and ``labeler`` are MLPs (``nn.Sequential`` of ``nn.Linear`` and ReLU / GELU /
      SiLU / Tanh / Sigmoid / Identity, or explicit lists of ``(weight [out, in], bias [out] or None,
      activation)`` with activation one of ``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``, ``"sigmoid"``,
      ``"identity"`` or ``None``) and the fused MLP kernels are installed, the whole chain runs fused.
    * Otherwise the fused perturbation runs before the decoder and the fused temperature softmax after the
      labeler, with the given modules (any ``nn.Module`` or callable) in between.

    Gradients: both outputs are differentiable with respect to ``z`` (gradient-based exploration). The teacher
    is frozen: its parameters are used detached and never receive a gradient, on any path; a ``UserWarning``
    says so when one of them requires grad. (A plain callable that is not an ``nn.Module`` is called as is.)

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

    Raises:
        TypeError / ValueError naming the argument: ``z`` not a floating tensor, negative ``sigma``,
        non-positive ``temperature``, a bad ``seed`` / ``offset``, a latent width that does not match the
        decoder, a decoder output that does not match the labeler input, an unsupported layer of an explicit
        list, teacher parameters on another device than ``z``.
    """
    z = _check_float_tensor("z", z)
    if z.dim() == 0:
        raise ValueError("z must have at least one dimension (the latent width is the last one)")
    sigma = _check_real("sigma", sigma, positive=False)
    temperature = _check_real("temperature", temperature, positive=True)
    seed = _check_seed(seed)
    offset = _check_offset(offset, z.numel())
    _check_part(decoder, "decoder", z.device)
    _check_part(labeler, "labeler", z.device)
    dec_w, lab_w = _widths(decoder, "decoder"), _widths(labeler, "labeler")
    if dec_w is not None:
        if dec_w[0] != z.shape[-1]:
            raise ValueError(f"decoder takes latent width {dec_w[0]} but z has width {z.shape[-1]} (last dimension)")
        if dec_w[2] != z.dtype:
            raise ValueError(f"decoder weights are {dec_w[2]} but z is {z.dtype}")
    if dec_w is not None and lab_w is not None and dec_w[1] != lab_w[0]:
        raise ValueError(f"labeler takes inputs of width {lab_w[0]} but the decoder outputs width {dec_w[1]}")
    if torch.is_grad_enabled() and (_requires_grad(decoder) or _requires_grad(labeler)):
        warnings.warn(
            "perturb_decode_label: the teacher (decoder and labeler) is frozen; its parameters that require grad "
            "receive no gradient (only z does)",
            UserWarning,
            stacklevel=2,
        )

    try:
        from tgtfast import _mlp
    except ImportError:
        _mlp = None
    if _mlp is not None:
        dec_layers = _mlp.as_mlp(decoder, name="decoder")
        lab_layers = _mlp.as_mlp(labeler, name="labeler") if dec_layers is not None else None
        if dec_layers is not None and lab_layers is not None:
            return _mlp.perturb_decode_label_mlp(
                z, dec_layers, lab_layers, sigma=sigma, seed=seed, offset=offset, temperature=temperature,
                backend=backend,
            )

    z_new = perturb(z, sigma, seed, offset, backend=backend)
    x_new = _run(_frozen_call(decoder, "decoder"), z_new, "decoder", "the perturbed latent")
    logits = _run(_frozen_call(labeler, "labeler"), x_new, "labeler", "the decoder output")
    if logits.dim() == 0 or not logits.is_floating_point():
        raise ValueError(
            f"labeler must return floating logits [..., K], got {logits.dtype} of shape {tuple(logits.shape)}"
        )
    return x_new, temperature_softmax(logits, temperature, backend=backend)
