"""The counter-based latent noise and the fused perturbation against the eager specification.

``tgtfast.reference.latent_noise`` is the specification (Philox4x32-10 + Box-Muller, csrc/philox.h); every
backend must give its numbers within float rounding (the backends use different ``log`` / ``sin`` / ``cos``
implementations: libm, libdevice, torch's vectorised ones), and a backend must be bit-for-bit reproducible
with itself: same ``(seed, offset)``, same bits, however the work is split.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import tgtfast
from tgtfast import reference

from conftest import cpu_backends, needs_backend

SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 + 5, 2**64 - 1]
# Triton runs CPU tensors under TRITON_INTERPRET=1 (set by conftest without a GPU), CUDA tensors otherwise
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
# different log / sin / cos implementations: a few float32 ulps of values of order 1 (|n| <= 5.7)
NOISE_TOL = dict(atol=4e-6, rtol=4e-6)


def _cuda_ok(op: str) -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"tgtfast::{op}", "CUDA")


requires_cuda_kernels = pytest.mark.skipif(
    not (tgtfast.backends()["cuda"] == "available" and _cuda_ok("perturb")),
    reason="no CUDA device or the extension was built without the CUDA kernels",
)


# ------------------------------------------------------------------------------------------------
# the specification itself


@pytest.mark.parametrize(
    "counter,key,expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    """Random123's known-answer vectors for Philox4x32-10."""
    out = reference.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert [int(v) for v in out[0]] == list(expected)


def test_reference_box_muller_by_hand():
    """Element j of the reference is the documented transform of the Philox words, computed in float64 here."""
    seed, offset = 2**40 + 3, 13
    n = reference.latent_noise((8,), seed, offset)
    for i in range(8):
        j = offset + i
        words = reference.philox4x32_10(
            torch.tensor([[(j // 4) & 0xFFFFFFFF, (j // 4) >> 32, 0, 0]], dtype=torch.int64),
            (seed & 0xFFFFFFFF, seed >> 32),
        )[0].tolist()
        a, b = (words[0], words[1]) if j % 4 < 2 else (words[2], words[3])
        u1, u2 = ((a >> 8) + 0.5) * 2.0**-24, ((b >> 8) + 0.5) * 2.0**-24
        radius = math.sqrt(-2 * math.log(u1))
        want = radius * (math.cos(2 * math.pi * u2) if j % 2 == 0 else math.sin(2 * math.pi * u2))
        assert abs(float(n[i]) - want) <= 1e-5 * (1 + abs(want))


# ------------------------------------------------------------------------------------------------
# every backend against the specification


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,offset", [((1,), 0), ((7,), 3), ((5, 131), 6), ((3, 4, 513), 2**33 + 1)])
def test_latent_noise_matches_reference(backend, seed, shape, offset):
    got = tgtfast.latent_noise(shape, seed, offset, backend=backend)
    want = reference.latent_noise(shape, seed, offset)
    assert got.shape == torch.Size(shape) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **NOISE_TOL)


@needs_backend("triton")
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 7, 2**64 - 1])
@pytest.mark.parametrize("shape,offset", [((7,), 3), ((3, 37), 2**33 + 2)])
def test_latent_noise_triton(seed, shape, offset):
    got = tgtfast.latent_noise(shape, seed, offset, device=TRITON_DEVICE, backend="triton")
    torch.testing.assert_close(got.cpu(), reference.latent_noise(shape, seed, offset), **NOISE_TOL)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_latent_noise_dtypes(backend, dtype):
    got = tgtfast.latent_noise((3, 50), 99, 5, dtype=dtype, backend=backend)
    assert got.dtype == dtype
    # the float32 stream rounded once to dtype: equal up to one rounding step of dtype
    want = reference.latent_noise((3, 50), 99, 5)
    tol = {torch.float64: 4e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", cpu_backends())
def test_latent_noise_reproducible_and_split_invariant(backend):
    a = tgtfast.latent_noise((4, 3001), 7, 0, backend=backend)
    assert torch.equal(a, tgtfast.latent_noise((4, 3001), 7, 0, backend=backend))
    flat = a.reshape(-1)
    # offset continuation: the stream at offset o is the tail of the stream at 0, bit for bit
    for o in (1, 2, 3, 4, 5, 511, 4099):
        tail = tgtfast.latent_noise((flat.numel() - o,), 7, o, backend=backend)
        assert torch.equal(tail, flat[o:]), f"offset {o}"
    # a shape is only a view of the flat stream
    assert torch.equal(tgtfast.latent_noise((12003,), 7, 0, backend=backend), flat[:12003])
    assert not torch.equal(a, tgtfast.latent_noise((4, 3001), 8, 0, backend=backend))


def test_latent_noise_across_backends_same_seed():
    outs = [tgtfast.latent_noise((2, 33), 2024, 11, backend=b) for b in cpu_backends()]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **NOISE_TOL)


def test_latent_noise_empty_and_int_shape():
    assert tgtfast.latent_noise((0, 5), 1).shape == (0, 5)
    assert tgtfast.latent_noise(6, 1).shape == (6,)
    assert tgtfast.latent_noise(torch.Size([2, 3]), 1).shape == (2, 3)


# ------------------------------------------------------------------------------------------------
# statistics (fast backend, 2^17 samples per stream)

N_STAT = 2**17


def _stream(seed, offset=0):
    return tgtfast.latent_noise((N_STAT,), seed, offset).double()


@pytest.mark.parametrize("seed", [0, 3, 2**63 + 11])
def test_noise_moments_and_normality(seed):
    scipy_stats = pytest.importorskip("scipy.stats")
    x = _stream(seed)
    n = x.numel()
    assert torch.isfinite(x).all()
    # mean 0 (sd 1/sqrt(n)), variance 1 (sd sqrt(2/n)), skewness 0, excess kurtosis 0: 5 sigma bounds
    assert abs(float(x.mean())) < 5 / math.sqrt(n)
    assert abs(float(x.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((x**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    assert scipy_stats.kstest(x.numpy(), "norm").pvalue > 1e-4
    # even and odd (cos and sin) elements, and each of the four slots of a Philox call, are normal too
    for part in (x[0::2], x[1::2], x[2::4], x[3::4]):
        assert scipy_stats.kstest(part.numpy(), "norm").pvalue > 1e-4
    # the tails: P(|n| > 3) = 0.0027
    tail = float((x.abs() > 3).double().mean())
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_noise_independence():
    n = N_STAT
    bound = 5 / math.sqrt(n)
    x = _stream(1)
    # neighbours (the Box-Muller partner, the other pair of the same Philox call, the next call)
    for lag in (1, 2, 3, 4, 5):
        assert abs(_corr(x[:-lag], x[lag:])) < bound, f"lag {lag}"
    # squares of Box-Muller partners: independent normals have uncorrelated squares
    assert abs(_corr(x[0::2] ** 2, x[1::2] ** 2)) < 5 / math.sqrt(n // 2)
    # other seeds (adjacent and far) and other offsets (streams that do not overlap)
    for other in (_stream(2), _stream(1 + 2**32), _stream(2**63 + 1), _stream(1, offset=N_STAT), _stream(1, offset=2**40)):
        assert abs(_corr(x, other)) < bound


# ------------------------------------------------------------------------------------------------
# perturb


def _perturb_truth(z, sigma, seed, offset):
    noise = reference.latent_noise(z.shape, seed, offset, dtype=torch.float64)
    return z.double() + sigma * noise


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_perturb_matches_reference(backend, dtype):
    z = torch.randn(6, 129).to(dtype)
    got = tgtfast.perturb(z, 0.7, 31337, 9, backend=backend)
    want = reference.perturb(z, 0.7, 31337, 9)
    assert got.dtype == dtype and got.shape == z.shape
    # one rounding to dtype of a float32 (float64) sum: allow one step of dtype plus the noise tolerance
    eps = {torch.float32: 4e-6, torch.float64: 4e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    truth = _perturb_truth(z, 0.7, 31337, 9)
    assert ((got.double() - truth).abs() <= eps * (1 + truth.abs())).all()
    torch.testing.assert_close(got.double(), want.double(), atol=eps * 2, rtol=eps * 2)


@needs_backend("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_triton(dtype):
    z = torch.randn(3, 41).to(dtype)
    got = tgtfast.perturb(z.to(TRITON_DEVICE), 1.5, 2**64 - 3, 6, backend="triton").cpu()
    eps = 4e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), reference.perturb(z, 1.5, 2**64 - 3, 6).double(), atol=2 * eps, rtol=2 * eps)


@pytest.mark.parametrize("backend", cpu_backends())
def test_perturb_noncontiguous_and_sigma_zero(backend):
    z = torch.randn(20, 30).t()  # not contiguous: element i is the row-major index of the logical tensor
    got = tgtfast.perturb(z, 0.25, 5, 0, backend=backend)
    torch.testing.assert_close(got, z + 0.25 * reference.latent_noise(z.shape, 5, 0), **NOISE_TOL)
    same = tgtfast.perturb(z, 0.0, 5, 0, backend=backend)
    assert torch.equal(same, z)
    assert tgtfast.perturb(torch.empty(0, 3), 1.0, 5, backend=backend).shape == (0, 3)


@pytest.mark.parametrize("backend", cpu_backends())
def test_perturb_gradient_is_identity(backend):
    z = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    out = tgtfast.perturb(z, 0.5, 3, 1, backend=backend)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    assert torch.equal(z.grad, g)
    assert torch.autograd.gradcheck(lambda t: tgtfast.perturb(t, 0.5, 3, 1, backend=backend), (z.detach().requires_grad_(),))


@needs_backend("cpp")
def test_perturb_under_torch_compile():
    def f(z):
        return tgtfast.perturb(z, 0.3, 17, 4) * 2

    z = torch.randn(5, 8, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(z)
    torch.testing.assert_close(out, f(z))
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 2.0))


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=True), TypeError, "seed"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(offset=2**63 - 5), ValueError, "offset"),
        (dict(offset=0.5), TypeError, "offset"),
        (dict(shape=(2, -1)), TypeError, "shape"),
        (dict(shape="ab"), TypeError, "shape"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_latent_noise_bad_input(kwargs, exc, match):
    args = dict(shape=(2, 3), seed=1, offset=0)
    args.update(kwargs)
    shape, seed, offset = args.pop("shape"), args.pop("seed"), args.pop("offset")
    with pytest.raises(exc, match=match):
        tgtfast.latent_noise(shape, seed, offset, **args)


@pytest.mark.parametrize(
    "z,sigma,seed,offset,exc,match",
    [
        (torch.zeros(3), -0.1, 0, 0, ValueError, "sigma"),
        (torch.zeros(3), float("nan"), 0, 0, ValueError, "sigma"),
        (torch.zeros(3), float("inf"), 0, 0, ValueError, "sigma"),
        (torch.zeros(3), "1", 0, 0, TypeError, "sigma"),
        (torch.zeros(3, dtype=torch.int64), 1.0, 0, 0, TypeError, "z"),
        ([0.0, 1.0], 1.0, 0, 0, TypeError, "z"),
        (torch.zeros(3), 1.0, -3, 0, ValueError, "seed"),
        (torch.zeros(3), 1.0, 0, -3, ValueError, "offset"),
        (torch.zeros(3), 1.0, 0, 2**63 - 2, ValueError, "offset"),
    ],
)
def test_perturb_bad_input(z, sigma, seed, offset, exc, match):
    with pytest.raises(exc, match=match):
        tgtfast.perturb(z, sigma, seed, offset)


def test_forced_backend_that_cannot_run():
    if tgtfast.backends()["cuda"] != "available":
        with pytest.raises(ValueError, match="backend='cuda'"):
            tgtfast.perturb(torch.zeros(3), 1.0, 0, backend="cuda")


# ------------------------------------------------------------------------------------------------
# CUDA (skips without a GPU; compares the device kernels with the CPU specification)


@requires_cuda_kernels
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,offset", [((1,), 0), ((7,), 3), ((33, 1025), 6), ((3, 4, 513), 2**33 + 1)])
def test_cuda_latent_noise(seed, shape, offset):
    got = tgtfast.latent_noise(shape, seed, offset, device="cuda", backend="cuda")
    torch.testing.assert_close(got.cpu(), reference.latent_noise(shape, seed, offset), **NOISE_TOL)
    tail = tgtfast.latent_noise((got.numel() - 5,), seed, offset + 5, device="cuda", backend="cuda")
    assert torch.equal(tail, got.reshape(-1)[5:])


@requires_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_perturb(dtype):
    z = torch.randn(64, 300).to(dtype)
    got = tgtfast.perturb(z.cuda(), 0.7, 2**63 + 9, 13, backend="cuda")
    eps = {torch.float32: 4e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    want = reference.perturb(z, 0.7, 2**63 + 9, 13)
    torch.testing.assert_close(got.cpu().double(), want.double(), atol=2 * eps, rtol=2 * eps)
    zg = z.float().cuda().requires_grad_()
    tgtfast.perturb(zg, 0.7, 1, backend="cuda").sum().backward()
    assert torch.equal(zg.grad, torch.ones_like(zg))


@requires_cuda_kernels
def test_cuda_triton_agree():
    if tgtfast.backends()["triton"] != "available":
        pytest.skip("triton unavailable")
    a = tgtfast.latent_noise((17, 1000), 77, 3, device="cuda", backend="cuda")
    b = tgtfast.latent_noise((17, 1000), 77, 3, device="cuda", backend="triton")
    torch.testing.assert_close(a, b, **NOISE_TOL)


try:  # a Triton kernel of another module that draws the stream through kernels/noise.py's normal_at
    import triton
    import triton.language as tl

    from tgtfast.kernels.noise import normal_at

    @triton.jit
    def _scaled_noise(out_ptr, n, seed, offset, scale, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(out_ptr + idx, scale * normal_at(seed, offset + idx), mask=idx < n)

except ImportError:  # no triton: the test below skips
    _scaled_noise = None


@needs_backend("triton")
def test_triton_normal_at_is_reusable():
    """kernels/noise.py's normal_at can be called from another Triton kernel (as the fused MLP chain may)."""
    out = torch.empty(50, device=TRITON_DEVICE)
    _scaled_noise[(2,)](out, 50, -3, 7, 2.0, BLOCK=32)  # seed -3: the int64 bits of 2**64 - 3
    torch.testing.assert_close(out.cpu(), 2.0 * reference.latent_noise((50,), 2**64 - 3, 7), **NOISE_TOL)


