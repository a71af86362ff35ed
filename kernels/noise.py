"""
Counter-based normal noise and the fused latent perturbation
=============================================================

``normal_at(seed, j)`` is a ``@triton.jit`` function that returns, for an ``int64`` tensor of stream
indices ``j``, the standard normals every tgtfast backend draws (``csrc/philox.h`` is the definition,
``tgtfast.reference.latent_noise`` the eager specification)::

    g = j // 4,  r = j % 4
    (x0, x1, x2, x3) = Philox4x32-10(counter = (lo32(g), hi32(g), 0, 0), key = (lo32(seed), hi32(seed)))
    (a, b) = (x0, x1) if r < 2 else (x2, x3)
    u1 = ((a >> 8) + 0.5) * 2^-24,  u2 = ((b >> 8) + 0.5) * 2^-24
    n  = sqrt(-2 log u1) * (cos(2 pi u2) if r is even else sin(2 pi u2))

Any element is computed on its own from ``(seed, j)``, so a kernel can draw exactly the noise it needs for
the tile it holds (the fused MLP kernels import ``normal_at`` for their first layer) and the noise never
exists in memory. ``seed`` is a scalar integer holding the seed's 64 bits (pass seeds ``>= 2^63`` as their
two's complement ``seed - 2^64``; :func:`tgtfast.tgt.step._seed_arg` does this).

On the GPU the logarithm and the sine/cosine come from libdevice (accurate to about one ulp, like the CPU's
libm): the fast hardware approximations are not accurate enough near ``u1 = 1``, where ``log u1`` is tiny.
The interpreter (``TRITON_INTERPRET=1``) evaluates ``tl.log`` / ``tl.sin`` / ``tl.cos`` with numpy.

``perturb`` writes ``z + sigma * noise`` (``z`` read once, the result written once) and ``latent_noise_``
fills a tensor with the noise; both walk the flat tensor in blocks of ``BLOCK`` elements.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

try:  # libdevice: Triton >= 3.0 on CUDA; unusable (and unused) under the interpreter
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the Triton build
    libdevice = None

_LIBDEVICE = tl.constexpr(libdevice is not None and os.environ.get("TRITON_INTERPRET", "0") != "1")

_BLOCK = 1024


def launch_guard(t):
    """The context every Triton launch wrapper of ``tgtfast.kernels`` runs its launches in: ``torch.cuda.device``
    of the tensor's (or ``torch.device``'s) device when it is a CUDA device, so that a kernel given tensors on
    ``cuda:1`` launches on ``cuda:1`` whatever the current device is; a null context otherwise (CPU tensors
    under ``TRITON_INTERPRET=1``) and while ``torch.compile`` traces (Inductor emits its own device guard)."""
    device = t.device if isinstance(t, torch.Tensor) else torch.device(t)
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, seed):
    """Philox4x32-10 of uint32 counter words under the 64-bit key ``seed`` (an integer scalar)."""
    # ``seed`` is an i32/i64 scalar tensor, or a constexpr when the launcher specialised it (seed == 1): adding
    # it to an int64 zero gives an int64 scalar in every case (Triton 3.6 has no tl.to_tensor).
    s = tl.full((), 0, tl.int64) + seed
    k0 = s & 0xFFFFFFFF
    k1 = (s >> 32) & 0xFFFFFFFF
    for r in tl.static_range(10):
        # round keys in int64 (no uint32 wrap-around needed): (k + r * weyl) mod 2^32
        rk0 = ((k0 + r * 0x9E3779B9) & 0xFFFFFFFF).to(tl.uint32)
        rk1 = ((k1 + r * 0xBB67AE85) & 0xFFFFFFFF).to(tl.uint32)
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ rk0, lo1, hi0 ^ c3 ^ rk1, lo0
    return c0, c1, c2, c3


@triton.jit
def normal_at(seed, j):
    """Standard normal of stream index ``j`` (int64 tensor, ``>= 0``) under ``seed``, as float32."""
    g = j >> 2
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    x0, x1, x2, x3 = _philox4x32_10(c0, c1, zero, zero, seed)
    second = (j & 2) != 0
    a = tl.where(second, x2, x0)
    b = tl.where(second, x3, x1)
    u1 = ((a >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u2 = ((b >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    theta = 6.283185307179586 * u2
    odd = (j & 1) != 0
    if _LIBDEVICE:
        radius = tl.sqrt_rn(-2.0 * libdevice.log(u1))
        trig = tl.where(odd, libdevice.sin(theta), libdevice.cos(theta))
    else:
        radius = tl.sqrt(-2.0 * tl.log(u1))
        trig = tl.where(odd, tl.sin(theta), tl.cos(theta))
    return radius * trig


@triton.jit
def _perturb_kernel(z_ptr, out_ptr, numel, sigma, seed, offset,
                    HAS_Z: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    n = normal_at(seed, offset + idx)
    if F64:
        v = sigma.to(tl.float64) * n.to(tl.float64)
        if HAS_Z:
            v = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float64) + v
    else:
        v = sigma * n
        if HAS_Z:
            v = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32) + v
    tl.store(out_ptr + idx, v.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(z, out: torch.Tensor, sigma: float, seed: int, offset: int) -> None:
    numel = out.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, _BLOCK),)
    with launch_guard(out):
        torch.library.wrap_triton(_perturb_kernel)[grid](
            z if z is not None else out, out, numel, float(sigma), int(seed), int(offset),
            HAS_Z=z is not None, F64=out.dtype == torch.float64, BLOCK=_BLOCK,
        )


def perturb(z: torch.Tensor, sigma: float, seed: int, offset: int) -> torch.Tensor:
    """``z + sigma * noise(seed, offset)`` (the ``tgtfast::perturb`` op contract); ``z`` any float dtype.

    ``seed`` is the seed's 64 bits as a signed int64, ``offset >= 0`` the stream index of element 0.
    """
    zc = z.contiguous()
    out = torch.empty_like(zc, memory_format=torch.contiguous_format)
    _launch(zc, out, sigma, seed, offset)
    return out


def latent_noise_(out: torch.Tensor, seed: int, offset: int) -> None:
    """Fill the contiguous tensor ``out`` with the noise of ``(seed, offset)`` (``tgtfast::latent_noise_``)."""
    _launch(None, out, 1.0, seed, offset)
