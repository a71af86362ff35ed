"""The ``noise`` ops: the TGT latent perturbation ``z + sigma * noise(seed, offset)`` (``perturb``) and the noise
fill (``latent_noise_``), drawn from the counter-based generator of docs/design.md, "Noise".

Everything about registering them lives here: the C++/CUDA ops ``tgtfast::perturb`` and ``tgtfast::latent_noise_``
(schemas in csrc/ops.cpp, kernels in csrc/noise/ and csrc/cuda/noise_cuda*), their fake kernels and autograd, the
Triton ops (kernels/noise.py, registered the first time the Triton backend is chosen) and the dispatcher entries
``"perturb"`` and ``"latent_noise"``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from tgtfast import _ext
from tgtfast.dispatch import Backend, register_op
from tgtfast.validation import FLOAT_DTYPES

PERTURB: Dict[str, Callable] = {}       # backend name -> perturb(z, sigma, seed, offset) -> Tensor
LATENT_NOISE: Dict[str, Callable] = {}  # backend name -> latent_noise_(out, seed, offset) -> None


def _perturb_fake(z, sigma, seed, offset):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _perturb_setup_context(ctx, inputs, output):
    pass


def _perturb_backward(ctx, grad):
    # d(z + sigma * noise)/dz is the identity; sigma, seed and offset are not differentiable.
    return grad, None, None, None


def _register(perturb: str, latent_noise: str, backends, fake: bool) -> None:
    if fake:
        torch.library.register_fake(perturb)(_perturb_fake)
        torch.library.register_fake(latent_noise)(lambda out, seed, offset: None)
    torch.library.register_autograd(perturb, _perturb_backward, setup_context=_perturb_setup_context)
    for b in backends:
        PERTURB[b] = getattr(torch.ops.tgtfast, perturb.split("::")[1]).default
        LATENT_NOISE[b] = getattr(torch.ops.tgtfast, latent_noise.split("::")[1]).default


def _load_triton() -> None:
    if "triton" in PERTURB:
        return
    from tgtfast.kernels import noise as kernels

    torch.library.triton_op("tgtfast::perturb_triton", kernels.perturb, mutates_args=())
    torch.library.triton_op("tgtfast::latent_noise_triton_", kernels.latent_noise_, mutates_args={"out"})
    _register("tgtfast::perturb_triton", "tgtfast::latent_noise_triton_", ("triton",), fake=False)


_missing: Dict[Backend, str] = {}
if _ext.ext is not None and hasattr(torch.ops.tgtfast, "perturb"):
    _register("tgtfast::perturb", "tgtfast::latent_noise_", ("cpp", "cuda"), fake=True)
else:
    _missing[Backend.CPP] = _missing[Backend.CUDA] = "the compiled extension has no noise ops"

for _op in ("perturb", "latent_noise"):
    register_op(_op, missing=_missing, dtypes={"cuda": FLOAT_DTYPES, "triton": FLOAT_DTYPES},
                loaders={Backend.TRITON: _load_triton})
