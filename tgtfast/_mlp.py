"""The fully fused perturb -> decode -> label chain for MLP teachers.

When the decoder and the labeler of a TGT teacher are plain MLPs, the whole chain

    x_new = decoder(z + sigma * noise(seed, offset))          soft = softmax(labeler(x_new) / temperature)

runs as a fused kernel chain that draws the noise in place (the counter-based generator of
:func:`tgtfast.reference.latent_noise`); no noise tensor and no logits tensor is materialised.

* CPU (C++): blocks of 64 rows in parallel; the block's hidden activations stay in two per-thread buffers that
  live in cache, and only ``x_new`` and ``soft`` are written to memory. On AVX2 processors the GEMMs are the
  package's own kernel on weights copied once per call into its panel layout (elsewhere ``at::mm_out``).
* GPU (CUDA and Triton): one launch per layer, each a tiled GEMM with bias and activation fused in its epilogue,
  the noise fused into the first layer's input loads and the softmax into the last layer (or a row kernel);
  the float32 hidden activations of a chunk of at most 16384 rows pass through global memory (L2) between
  launches.

* :func:`as_mlp` turns a module or an explicit list of layers into ``[(weight, bias, activation), ...]``, or
  says (``None``) that the module cannot be fused.
* :func:`perturb_decode_label_mlp` runs the chain on the backend :func:`tgtfast.dispatch.select` picks, and is
  differentiable with respect to ``z``.

Gradients. The backward pass recomputes the chain from the perturbed latent (``[B, d]``) block by block, so its
extra memory is one block of hidden activations, never ``[B, hidden]``: on the CPU in C++
(``tgtfast::mlp_chain_bwd``, blocks of 64 rows in parallel), on the GPU with torch ops on chunks of about 2**20
hidden values. For float32 on the CPU the forward also keeps its two outputs (which the caller holds anyway) for
the backward, which then skips recomputing the decoder's last layer (when its activation is the identity, ReLU,
sigmoid or tanh, whose derivative follows from the output) and the labeler's last layer (when it has no
activation): modifying ``x_new`` or the soft labels in place before ``backward`` is then an autograd error.
The teacher is frozen: the weights and biases are constants of the op and never receive a gradient. If one of
them requires grad while grad mode is on, a ``UserWarning`` says so once and the weights are still treated as
constants (``.grad`` stays ``None``); to train a teacher through this chain, call the modules eagerly instead.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgtfast import _ext, dispatch, reference
from tgtfast.dispatch import Backend

__all__ = ["ACTIVATIONS", "Layer", "as_mlp", "why_not_mlp", "perturb_decode_label_mlp"]

OP = "perturb_decode_label_mlp"

# Activation name -> code understood by every kernel (csrc/mlp_cpu_kernel.h, csrc/cuda/mlp_cuda.h, kernels/mlp.py).
ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5, "sigmoid": 6}

Layer = Tuple[Tensor, Optional[Tensor], str]

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


# --- the op -------------------------------------------------------------------------------------------------

_FWD: dict = {}  # backend name -> forward with the mlp_chain_fwd schema
_BWD: dict = {}  # backend name -> backward with the mlp_chain_bwd schema (others: _chunked_backward)
_missing: dict = {}
if _ext.ext is not None and hasattr(torch.ops.tgtfast, "mlp_chain_fwd"):

    @torch.library.register_fake("tgtfast::mlp_chain_fwd")
    def _mlp_chain_fwd_fake(z, weights, biases, activations, num_decoder_layers, sigma, seed, offset,
                            temperature, need_perturbed):
        x_new = z.new_empty((z.shape[0], weights[num_decoder_layers - 1].shape[0]))
        soft = z.new_empty((z.shape[0], weights[-1].shape[0]))
        pert = z.new_empty(z.shape, dtype=torch.float32) if need_perturbed else z.new_empty((0,))
        return x_new, soft, pert

    _FWD["cpp"] = _FWD["cuda"] = torch.ops.tgtfast.mlp_chain_fwd.default
    if hasattr(torch.ops.tgtfast, "mlp_chain_bwd"):

        @torch.library.register_fake("tgtfast::mlp_chain_bwd")
        def _mlp_chain_bwd_fake(perturbed, weights, biases, activations, num_decoder_layers, temperature, grad_x,
                                grad_soft, x_new=None, soft=None):
            return torch.empty_like(perturbed)

        _BWD["cpp"] = torch.ops.tgtfast.mlp_chain_bwd.default
    if _ext.built_with_cuda() and not torch._C._dispatch_has_kernel_for_dispatch_key("tgtfast::mlp_chain_fwd", "CUDA"):
        _missing[Backend.CUDA] = "the extension has no CUDA kernel for this op"
else:
    _missing[Backend.CPP] = _missing[Backend.CUDA] = "the compiled extension has no mlp_chain_fwd op"
try:
    from tgtfast.kernels import mlp as _triton_mlp

    _FWD["triton"] = _triton_mlp.mlp_chain_fwd
except Exception as exc:  # triton missing or broken
    _missing[Backend.TRITON] = f"Triton kernels failed to load ({type(exc).__name__}: {exc})"

_MLP_DTYPES = (torch.float32, torch.bfloat16)
dispatch.register_op(OP, missing=_missing, dtypes={b: _MLP_DTYPES for b in Backend if b is not Backend.AUTO})

# Rows recomputed at once in backward: about this many floats of hidden activations per chunk.
_BACKWARD_CHUNK_FLOATS = 1 << 20


def _layers_f32(layers: Sequence[Layer]):
    return [(w.detach().to(torch.float32).contiguous(),
             None if b is None else b.detach().to(torch.float32).contiguous(), a) for w, b, a in layers]


def _chain(zp: Tensor, dec: Sequence[Layer], lab: Sequence[Layer], temperature: float) -> Tuple[Tensor, Tensor]:
    x = reference.mlp_forward(zp, dec)
    return x, torch.softmax(reference.mlp_forward(x, lab) / temperature, dim=-1)


def _chunked_backward(pert, dec, lab, temperature, g_x, g_soft):
    """Gradient to the perturbed latent with torch ops, recomputing the chain chunk by chunk."""
    widest = max(w.shape[0] for w, _, _ in list(dec) + list(lab))
    chunk = max(1, _BACKWARD_CHUNK_FLOATS // widest)
    grad = torch.empty_like(pert)
    for start in range(0, pert.shape[0], chunk):
        rows = slice(start, start + chunk)
        zc = pert[rows].detach().requires_grad_(True)
        with torch.enable_grad():
            x, soft = _chain(zc, dec, lab, temperature)
        outs, grads = [], []
        for out, g in ((x, g_x), (soft, g_soft)):
            if g is not None:
                outs.append(out)
                grads.append(g[rows])
        (grad[rows],) = torch.autograd.grad(outs, zc, grads)
    return grad


class _MlpChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, backend, dec, lab, sigma, seed, offset, temperature):
        layers = list(dec) + list(lab)
        weights = [w for w, _, _ in layers]
        biases = [b for _, b, _ in layers]
        acts = [ACTIVATIONS[a] for _, _, a in layers]
        signed_seed = seed - (1 << 64) if seed >= (1 << 63) else seed
        need = bool(ctx.needs_input_grad[0])
        x_new, soft, pert = _FWD[backend](z, weights, biases, acts, len(dec), float(sigma), signed_seed, int(offset),
                                          float(temperature), need)
        ctx.dec, ctx.lab, ctx.temperature, ctx.z_dtype, ctx.backend = dec, lab, temperature, z.dtype, backend
        # the C++ backward takes the float32 outputs too and skips recomputing the layers that made them
        ctx.with_outputs = need and backend in _BWD and z.dtype == torch.float32
        if ctx.with_outputs:
            ctx.save_for_backward(pert, x_new, soft)
        elif need:
            ctx.save_for_backward(pert)
        ctx.set_materialize_grads(False)
        return x_new, soft

    @staticmethod
    def backward(ctx, g_x, g_soft):
        if g_x is None and g_soft is None:
            return (None,) * 8
        pert, *outputs = ctx.saved_tensors
        g_x, g_soft = (None if g is None else g.to(torch.float32).contiguous() for g in (g_x, g_soft))
        bwd = _BWD.get(ctx.backend)
        if bwd is not None:
            layers = list(ctx.dec) + list(ctx.lab)
            x_new, soft = outputs if outputs else (None, None)
            grad = bwd(pert, [w for w, _, _ in layers], [b for _, b, _ in layers],
                       [ACTIVATIONS[a] for _, _, a in layers], len(ctx.dec), float(ctx.temperature), g_x, g_soft,
                       x_new, soft)
        else:
            grad = _chunked_backward(pert, ctx.dec, ctx.lab, ctx.temperature, g_x, g_soft)
        return grad.to(ctx.z_dtype), None, None, None, None, None, None, None


def _check_number(value, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"perturb_decode_label_mlp: {what} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"perturb_decode_label_mlp: {what} must be finite{' and > 0' if positive else ''}, "
                         f"got {value}")
    return value


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
    global _warned_grad
    if not isinstance(z, Tensor):
        raise TypeError(f"perturb_decode_label_mlp: z must be a tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"perturb_decode_label_mlp: z must be 2-D [B, d], got shape {tuple(z.shape)}")
    if z.dtype not in _MLP_DTYPES:
        raise TypeError(f"perturb_decode_label_mlp: z must be float32 or bfloat16, got {z.dtype}")
    dec = _check_layers(dec_layers, "decoder", z.device)
    lab = _check_layers(lab_layers, "labeler", z.device)
    if dec[0][0].shape[1] != z.shape[1]:
        raise ValueError(f"decoder: its first layer takes {dec[0][0].shape[1]} features, z has {z.shape[1]}")
    if lab[0][0].shape[1] != dec[-1][0].shape[0]:
        raise ValueError(f"labeler: its first layer takes {lab[0][0].shape[1]} features, the decoder gives "
                         f"{dec[-1][0].shape[0]}")
    sigma = _check_number(sigma, "sigma")
    temperature = _check_number(temperature, "temperature", positive=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
        raise ValueError(f"perturb_decode_label_mlp: seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 1 << 63:
        raise ValueError(f"perturb_decode_label_mlp: offset must be an int in [0, 2**63), got {offset!r}")
    if torch.is_grad_enabled() and not _warned_grad and any(
        t is not None and t.requires_grad for layer in dec + lab for t in layer[:2]
    ):
        _warned_grad = True
        warnings.warn("perturb_decode_label_mlp: teacher weights that require grad are treated as frozen "
                      "constants and get no gradient", UserWarning, stacklevel=2)
    chosen = dispatch.select(backend, z.device, z.dtype, op=OP)
    dec, lab = _layers_f32(dec), _layers_f32(lab)
    if chosen is Backend.REFERENCE:
        return reference.perturb_decode_label_mlp(z, dec, lab, sigma=sigma, seed=seed, offset=offset,
                                                  temperature=temperature)
    return _MlpChain.apply(z.contiguous(), chosen.value, dec, lab, sigma, seed, offset, temperature)
