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
from tgtfast.dispatch import Backend, register_op, select

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
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
_MLP_DTYPES = (torch.float32, torch.bfloat16)  # what the fused MLP chain takes for z (z is [B, d])


def _declare_ops() -> None:
    """Tell the dispatcher which backends have kernels for the ops of this module (tables in tgtfast._ops)."""
    for op, table in (("perturb", _ops.PERTURB), ("latent_noise", _ops.LATENT_NOISE),
                      ("temperature_softmax", _ops.TEMPERATURE_SOFTMAX)):
        missing = {}
        for b in ("cpp", "cuda"):
            if b not in table:
                missing[b] = f"the compiled extension has no {op} op"
        if "triton" not in table:
            missing["triton"] = f"Triton kernels failed to load ({_ops.tgt_triton_error})"
        register_op(op, missing=missing, dtypes={"cuda": _FLOAT_DTYPES, "triton": _FLOAT_DTYPES})


_declare_ops()


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
    chosen = select(backend, out.device, dtype, op="latent_noise")
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
    chosen = select(backend, z.device, z.dtype, op="perturb")
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
    chosen = select(backend, logits.device, logits.dtype, op="temperature_softmax")
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


def _sequential_layers(part: nn.Sequential) -> Optional[List[Tuple[torch.Tensor, Optional[torch.Tensor], str]]]:
    """An nn.Sequential of nn.Linear, each optionally followed by one supported activation, as layers; else None."""
    layers: List[list] = []
    for m in part:
        if isinstance(m, nn.Linear):
            layers.append([m.weight, m.bias, "identity", False])
            continue
        if isinstance(m, nn.GELU):
            act = {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate)
        else:
            act = _ACTIVATION_MODULES.get(type(m))
        if act is None or not layers or layers[-1][3]:
            if act == "identity":
                continue
            return None
        if act != "identity":
            layers[-1][2], layers[-1][3] = act, True
    return [(w, b, act) for w, b, act, _ in layers] or None


def _as_layers(part: object, name: str, mlp) -> Optional[List[Tuple[torch.Tensor, Optional[torch.Tensor], str]]]:
    """`part` as ``[(weight, bias, activation name), ...]`` when it is an MLP, else None. Uses the fused MLP
    module's reading (`mlp.as_mlp`) when it is installed; a bad explicit list raises naming `name`."""
    if mlp is not None:
        return mlp.as_mlp(part, name=name)
    if _is_layer_list(part):
        return _check_layers(part, name)
    if isinstance(part, nn.Sequential):
        return _sequential_layers(part)
    return None


def _tensors_of(part: object) -> List[torch.Tensor]:
    if _is_layer_list(part):
        return [t for w, b, _ in part for t in (w, b) if t is not None]
    if isinstance(part, nn.Module):
        return list(part.parameters()) + list(part.buffers())
    return []


def _check_part(part: object, name: str) -> None:
    if not (_is_layer_list(part) or callable(part)):
        raise TypeError(f"{name} must be an nn.Module, a callable or a list of (weight, bias, activation), "
                        f"got {type(part).__name__}")


def _check_device(part: object, layers, name: str, device: torch.device) -> None:
    """Every tensor of `part` on `device`: those of its MLP `layers` when it is one (all an MLP has), else
    every parameter and buffer."""
    tensors = [t for w, b, _ in layers for t in (w, b) if t is not None] if layers is not None else _tensors_of(part)
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{name} has parameters on {t.device} but z is on {device}")


def _frozen_call(part: object, layers) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable running `part` (its normalised `layers` for an explicit list) with its parameters detached."""
    if _is_layer_list(part):
        layers = [(w.detach(), None if b is None else b.detach(), _ACTIVATIONS[a]) for w, b, a in layers]

        def run_layers(x: torch.Tensor) -> torch.Tensor:
            for w, b, act in layers:
                x = act(F.linear(x, w, b))
            return x

        return run_layers
    if isinstance(part, nn.Module):
        params = {k: v.detach() for k, v in part.named_parameters()}
        return lambda x: torch.func.functional_call(part, params, (x,))
    return part


def _load_mlp():
    """The fused MLP chain module (tgtfast._mlp), or None when this build has none."""
    try:
        from tgtfast import _mlp
    except ImportError:
        return None
    return _mlp


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
    _check_part(decoder, "decoder")
    _check_part(labeler, "labeler")
    mlp = _load_mlp()
    dec_layers, lab_layers = _as_layers(decoder, "decoder", mlp), _as_layers(labeler, "labeler", mlp)
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
    if mlp is not None and dec_layers is not None and lab_layers is not None and z.dim() == 2 and z.dtype in _MLP_DTYPES:
        return mlp.perturb_decode_label_mlp(
            z, dec_layers, lab_layers, sigma=sigma, seed=seed, offset=offset, temperature=temperature, backend=backend
        )

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
    return x_new, temperature_softmax(logits, temperature, backend=backend)
