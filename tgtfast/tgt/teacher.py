"""The frozen TGT teacher as the step sees it: one parser for decoders and labelers.

* :func:`as_mlp` reads an ``nn.Sequential`` MLP or an explicit ``[(weight, bias, activation), ...]`` list into
  layers the fused chain (``tgtfast/ops/mlp_chain.py``) runs; :func:`why_not_mlp` names the layer that keeps a
  module off the fused path.
* The helpers below run any other part (an ``nn.Module`` or callable) with its parameters detached.

Activations come from the one table, :data:`tgtfast.reference.ACTIVATIONS` (name -> function); its order gives
the code each kernel knows an activation by (:data:`ACTIVATIONS`, name -> code).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgtfast import reference
from tgtfast.ops.mlp_chain import ACTIVATIONS

__all__ = ["ACTIVATIONS", "Layer", "TeacherPart", "as_mlp", "why_not_mlp"]

# ACTIVATIONS: activation name -> code understood by every kernel (the position in the reference's table)

Layer = Tuple[Tensor, Optional[Tensor], str]
TeacherPart = Union[nn.Module, Callable[[Tensor], Tensor], Sequence[Layer]]

# Module types and functions accepted as activations (besides the names of ACTIVATIONS).
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
_ACT_FUNCTIONS = {
    torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.silu: "silu", F.gelu: "gelu",
}
_ACT_ALIASES = {"linear": "identity", "none": "identity", "swish": "silu", "gelu_erf": "gelu"}


def _activation_name(act) -> Optional[str]:
    """The ACTIVATIONS name of `act` (a name, a supported module or function, or None for identity)."""
    if act is None:
        return "identity"
    if isinstance(act, str):
        key = act.strip().lower()
        key = _ACT_ALIASES.get(key, key)
        return key if key in ACTIVATIONS else None
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if isinstance(act, nn.Module):
        return _ACT_MODULES.get(type(act))
    try:
        return _ACT_FUNCTIONS.get(act)
    except TypeError:  # unhashable callable
        return None


def _flatten(module: nn.Module, out: List[nn.Module]) -> None:
    if isinstance(module, nn.Sequential):
        for child in module:
            _flatten(child, out)
    else:
        out.append(module)


def _parse_module(module: nn.Module, name: str) -> Tuple[Optional[List[Layer]], Optional[str]]:
    """(layers, None), or (None, why the module cannot be fused, naming the layer)."""
    mods: List[nn.Module] = []
    _flatten(module, mods)
    layers: List[list] = []
    for i, m in enumerate(mods):
        where = f"{name}: layer {i} ({type(m).__name__})"
        if isinstance(m, nn.Linear):  # after another Linear, that one keeps the identity activation
            layers.append([m.weight, m.bias, "identity", "linear"])
            continue
        if isinstance(m, nn.Dropout):
            if not m.training or m.p == 0:
                continue  # the identity in eval mode
            return None, f"{where} is a Dropout in training mode"
        act = _activation_name(m)
        if act is None:
            return None, (f"{where} is neither nn.Linear nor a supported activation "
                          f"(ReLU, GELU, SiLU, Tanh, Sigmoid, Identity, Dropout in eval mode)")
        if act == "identity":
            continue
        if not layers or layers[-1][3] != "linear":
            return None, f"{where} is an activation that does not follow an nn.Linear"
        layers[-1][2], layers[-1][3] = act, "act"
    if not layers:
        return None, f"{name}: has no nn.Linear layer"
    out = [(w, b, act) for w, b, act, _ in layers]
    _check_chain(out, name)
    return out, None


def why_not_mlp(module_or_layers, *, name: str) -> Optional[str]:
    """None if :func:`as_mlp` can fuse `module_or_layers`, else a sentence naming the layer that prevents it
    (for messages of callers that fall back to the generic path or refuse a forced fused call)."""
    if isinstance(module_or_layers, nn.Module):
        return _parse_module(module_or_layers, name)[1]
    if isinstance(module_or_layers, (list, tuple)):
        _from_list(module_or_layers, name)  # raises on a bad entry
        return None
    return f"{name}: a {type(module_or_layers).__name__} is neither an nn.Module nor a list of layers"


def _check_chain(layers: Sequence[Layer], name: str) -> None:
    for i in range(1, len(layers)):
        if layers[i][0].shape[1] != layers[i - 1][0].shape[0]:
            raise ValueError(
                f"{name}: widths do not chain: layer {i - 1} gives {layers[i - 1][0].shape[0]} features, "
                f"layer {i} takes {layers[i][0].shape[1]}"
            )


def _from_list(items: Sequence, name: str) -> List[Layer]:
    if len(items) == 0:
        raise ValueError(f"{name}: the list of layers is empty")
    out: List[Layer] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"{where}: expected a (weight, bias, activation) tuple, got {type(item).__name__}")
        w, b, act = item
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"{where}: weight must be a 2-D floating tensor [out, in], got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if b is not None and (not isinstance(b, Tensor) or b.dim() != 1 or b.shape[0] != w.shape[0]):
            raise ValueError(f"{where}: bias must be None or a 1-D tensor of {w.shape[0]} elements, got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        if b is not None and b.device != w.device:
            raise ValueError(f"{where}: bias is on {b.device}, weight on {w.device}")
        act_name = _activation_name(act)
        if act_name is None:
            raise ValueError(f"{where}: unsupported activation {act!r}; expected one of {sorted(ACTIVATIONS)} "
                             "or nn.ReLU/GELU/SiLU/Tanh/Sigmoid/Identity, torch.relu/tanh/sigmoid, F.silu/gelu")
        out.append((w, b, act_name))
    _check_chain(out, name)
    return out


def as_mlp(module_or_layers: Union[nn.Module, Sequence, None], *, name: str) -> Optional[List[Layer]]:
    """The layers of an MLP as ``[(weight [out, in], bias [out] or None, activation), ...]``, or None.

    Accepted:

    * an ``nn.Sequential`` (nested ones too) of ``nn.Linear`` layers, each optionally followed by one activation
      module: ``nn.ReLU``, ``nn.GELU`` (``"gelu"``, exact erf; ``approximate="tanh"`` gives ``"gelu_tanh"``),
      ``nn.SiLU``, ``nn.Tanh``, ``nn.Sigmoid``; ``nn.Identity`` and ``nn.Dropout`` in eval mode are skipped, and a
      Linear followed directly by another Linear gets the ``"identity"`` activation. A bare ``nn.Linear`` is a
      one-layer MLP. Returns None (use the generic path) for anything else: other layers (Conv, LayerNorm,
      custom modules), Dropout in train mode, an activation before the first Linear or two activations in a row;
      :func:`why_not_mlp` names the layer.
    * an explicit list of ``(weight, bias, activation)`` tuples; ``activation`` is a name of :data:`ACTIVATIONS`
      (also ``"linear"``/``"none"`` for identity, ``"swish"`` for silu), ``None`` (identity), one of the modules
      above, or one of ``torch.relu``, ``torch.tanh``, ``torch.sigmoid``, ``F.relu``, ``F.tanh``, ``F.sigmoid``,
      ``F.silu``, ``F.gelu`` (exact). A bad entry raises ``ValueError`` naming ``name[i]``.

    Widths that do not chain raise ``ValueError`` naming `name`. The tensors are returned as they are (not
    copied, not detached).
    """
    if isinstance(module_or_layers, nn.Module):
        return _parse_module(module_or_layers, name)[0]
    if isinstance(module_or_layers, (list, tuple)):
        return _from_list(module_or_layers, name)
    return None



# --- any teacher part ----------------------------------------------------------------------------------


def _is_layer_list(part: object) -> bool:
    return isinstance(part, (list, tuple)) and not isinstance(part, nn.Module)


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
        layers = [(w.detach(), None if b is None else b.detach(), reference.ACTIVATIONS[a]) for w, b, a in layers]

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


