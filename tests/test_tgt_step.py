"""tgtfast.perturb_decode_label and the temperature softmax against the eager composition.

The oracle is ``tgtfast.reference.perturb_decode_label``: ``reference.latent_noise`` for the noise, the same
modules, ``torch.softmax(logits / T)``. Outputs and the gradient with respect to ``z`` are compared; the
generic path (modules that are not MLPs) and the MLP path (fused when the MLP kernels are installed) are both
covered, and the teacher must stay frozen.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn

import tgtfast
from tgtfast import reference

from conftest import cpu_backends, needs_backend

# Triton runs CPU tensors under TRITON_INTERPRET=1 (set by conftest without a GPU), CUDA tensors otherwise
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "cuda"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


# ------------------------------------------------------------------------------------------------
# temperature softmax


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 4, 1000), (2, 5000)])
def test_temperature_softmax_matches_reference(backend, dtype, shape):
    x = (torch.randn(shape) * 4).to(dtype)
    got = tgtfast.temperature_softmax(x, 2.5, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    truth = torch.softmax(x.double() / 2.5, -1)
    same = torch.softmax(x / 2.5, -1)  # the same-dtype torch computation sets the scale of rounding errors
    err = (got.double() - truth).abs()
    bound = 2 * (same.double() - truth).abs() + {torch.float64: 1e-12, torch.float32: 1e-6,
                                                 torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    assert (err <= bound).all(), float(err.max())


@pytest.mark.parametrize("backend", cpu_backends())
def test_temperature_softmax_gradient(backend):
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tgtfast.temperature_softmax(t, 0.7, backend=backend), (x,))
    # against autograd of the reference, with grad_output != 1
    g = torch.randn(4, 11, dtype=torch.float64)
    (gx,) = torch.autograd.grad((tgtfast.temperature_softmax(x, 0.7, backend=backend) * g).sum(), x)
    (want,) = torch.autograd.grad((reference.temperature_softmax(x, 0.7) * g).sum(), x)
    torch.testing.assert_close(gx, want)


@pytest.mark.parametrize("backend", cpu_backends())
def test_temperature_softmax_extremes(backend):
    x = torch.tensor([[1e4, -1e4, 0.0], [-float("inf"), 0.0, 1.0], [float("nan"), 0.0, 1.0]])
    got = tgtfast.temperature_softmax(x, 1.0, backend=backend)
    torch.testing.assert_close(got[:2], torch.softmax(x[:2], -1))
    assert torch.isnan(got[2]).all()  # NaN in a row makes the row NaN, as torch.softmax


@needs_backend("triton")
@pytest.mark.parametrize("shape", [(3, 7), (2, 5000)])  # one tile, and the two-sweep path for long rows
def test_temperature_softmax_triton(shape):
    x = torch.randn(shape) * 3
    got = tgtfast.temperature_softmax(x.to(TRITON_DEVICE), 1.7, backend="triton").cpu()
    torch.testing.assert_close(got, torch.softmax(x / 1.7, -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("temperature,exc", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                             ("2", TypeError)])
def test_temperature_softmax_bad_temperature(temperature, exc):
    with pytest.raises(exc, match="temperature"):
        tgtfast.temperature_softmax(torch.randn(2, 3), temperature)


def test_temperature_softmax_bad_logits():
    with pytest.raises(TypeError, match="logits"):
        tgtfast.temperature_softmax(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        tgtfast.temperature_softmax(torch.ones(2, 0))


# ------------------------------------------------------------------------------------------------
# teachers


class ConvDecoder(nn.Module):
    """A latent [B, d] -> image [B, 1, 8, 8] decoder that is not an MLP."""

    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, 4 * 4 * 4)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, z):
        h = torch.relu(self.fc(z)).view(-1, 4, 4, 4)
        return torch.tanh(self.conv(torch.relu(self.up(h))))


class ConvLabeler(nn.Module):
    def __init__(self, k=5):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 6 * 6, k)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _frozen(m, dtype=torch.float32):
    m = m.to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _mlp(widths, act=nn.GELU, dtype=torch.float32):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return _frozen(nn.Sequential(*layers), dtype)


def _run(fn, z, *args, **kwargs):
    """(x_new, soft_labels, dz) with a non-trivial upstream gradient on both outputs."""
    z = z.detach().clone().requires_grad_(True)
    x_new, soft = fn(z, *args, **kwargs)
    gx = torch.linspace(-1, 1, x_new.numel(), dtype=x_new.dtype, device=x_new.device).reshape(x_new.shape)
    gs = torch.linspace(2, -1, soft.numel(), dtype=soft.dtype, device=soft.device).reshape(soft.shape)
    ((x_new * gx).sum() + (soft * gs).sum() * 3).backward()
    return x_new.detach(), soft.detach(), z.grad


def _compare(got, want, dtype):
    for g, w, what in zip(got, want, ("x_new", "soft_labels", "grad z")):
        torch.testing.assert_close(g.double(), w.double(), **TOL[dtype], msg=lambda m, what=what: f"{what}: {m}")


KW = dict(sigma=0.3, seed=2**63 + 17, offset=5, temperature=2.0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generic_path_conv_modules(backend, dtype):
    dec, lab = _frozen(ConvDecoder(), dtype), _frozen(ConvLabeler(), dtype)
    z = torch.randn(3, 6, dtype=dtype)
    got = _run(tgtfast.perturb_decode_label, z, dec, lab, backend=backend, **KW)
    want = _run(reference.perturb_decode_label, z, dec, lab, **KW)
    assert got[0].shape == (3, 1, 8, 8) and got[1].shape == (3, 5)
    _compare(got, want, dtype)
    torch.testing.assert_close(got[1].sum(-1), torch.ones(3, dtype=dtype))


@pytest.mark.parametrize("backend", cpu_backends())
def test_generic_path_bfloat16(backend):
    dec, lab = _frozen(ConvDecoder(), torch.bfloat16), _frozen(ConvLabeler(), torch.bfloat16)
    z = torch.randn(4, 6, dtype=torch.bfloat16)
    got = _run(tgtfast.perturb_decode_label, z, dec, lab, backend=backend, **KW)
    want = _run(reference.perturb_decode_label, z, dec, lab, **KW)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    _compare(got, want, torch.bfloat16)


@needs_backend("triton")
def test_generic_path_triton():
    dec, lab = _frozen(ConvDecoder()), _frozen(ConvLabeler())
    z = torch.randn(2, 6)
    want = _run(reference.perturb_decode_label, z, dec, lab, **KW)
    d = TRITON_DEVICE
    got = _run(tgtfast.perturb_decode_label, z.to(d), dec.to(d), lab.to(d), backend="triton", **KW)
    _compare([g.cpu() for g in got], want, torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_teacher(backend, dtype):
    """nn.Sequential MLPs: the fused chain when installed, else the generic path; same numbers either way."""
    dec, lab = _mlp([8, 32, 16], dtype=dtype), _mlp([16, 24, 10], act=nn.SiLU, dtype=dtype)
    z = torch.randn(5, 8, dtype=dtype)
    got = _run(tgtfast.perturb_decode_label, z, dec, lab, backend=backend, **KW)
    want = _run(reference.perturb_decode_label, z, dec, lab, **KW)
    _compare(got, want, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_explicit_layer_lists(backend):
    dec_seq, lab_seq = _mlp([4, 12, 6], act=nn.Tanh), _mlp([6, 9, 3], act=nn.ReLU)
    dec = [(dec_seq[0].weight, dec_seq[0].bias, "tanh"), (dec_seq[2].weight, dec_seq[2].bias, None)]
    lab = [(lab_seq[0].weight, lab_seq[0].bias, "relu"), (lab_seq[2].weight, None, "identity")]
    z = torch.randn(7, 4)
    got = _run(tgtfast.perturb_decode_label, z, dec, lab, backend=backend, **KW)
    lab_ref = lambda x: nn.functional.linear(lab_seq[1](lab_seq[0](x)), lab_seq[2].weight)  # noqa: E731
    want = _run(reference.perturb_decode_label, z, dec_seq, lab_ref, **KW)
    _compare(got, want, torch.float32)


def test_plain_callables_and_batch_shapes():
    w = torch.randn(6, 3)
    dec = lambda z: z @ w.T  # noqa: E731
    lab = lambda x: x[..., :4] * 2  # noqa: E731
    z = torch.randn(2, 5, 3)
    x_new, soft = tgtfast.perturb_decode_label(z, dec, lab, **KW)
    want = reference.perturb_decode_label(z, dec, lab, **KW)
    assert x_new.shape == (2, 5, 6) and soft.shape == (2, 5, 4)
    torch.testing.assert_close(x_new, want[0], **TOL[torch.float32])
    torch.testing.assert_close(soft, want[1], **TOL[torch.float32])


def test_reproducible_seed_and_offset():
    dec, lab = _frozen(ConvDecoder()), _frozen(ConvLabeler())
    z = torch.randn(3, 6)
    a = tgtfast.perturb_decode_label(z, dec, lab, sigma=0.5, seed=1, offset=0)
    b = tgtfast.perturb_decode_label(z, dec, lab, sigma=0.5, seed=1, offset=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = tgtfast.perturb_decode_label(z, dec, lab, sigma=0.5, seed=1, offset=z.numel())
    d = tgtfast.perturb_decode_label(z, dec, lab, sigma=0.5, seed=2, offset=0)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # sigma = 0: no noise at all
    e = tgtfast.perturb_decode_label(z, dec, lab, sigma=0.0, seed=1, temperature=3.0)
    torch.testing.assert_close(e[1], torch.softmax(lab(dec(z)) / 3.0, -1))


def test_defaults():
    """offset defaults to 0 and temperature to 1 (defaults are API)."""
    dec, lab = _frozen(ConvDecoder()), _frozen(ConvLabeler())
    z = torch.randn(2, 6)
    x_new, soft = tgtfast.perturb_decode_label(z, dec, lab, sigma=0.2, seed=9)
    want = reference.perturb_decode_label(z, dec, lab, sigma=0.2, seed=9, offset=0, temperature=1.0)
    torch.testing.assert_close(x_new, want[0])
    torch.testing.assert_close(soft, want[1])


# ------------------------------------------------------------------------------------------------
# the frozen teacher


@pytest.mark.parametrize("teacher", ["conv", "mlp"])
def test_teacher_weights_get_no_gradient(teacher):
    if teacher == "conv":
        dec, lab = ConvDecoder().eval(), ConvLabeler().eval()
    else:
        dec, lab = _mlp([6, 10, 8]), _mlp([8, 4])
        for p in list(dec.parameters()) + list(lab.parameters()):
            p.requires_grad_(True)
    z = torch.randn(3, 6)
    if teacher == "conv":
        with pytest.warns(UserWarning, match="frozen"):
            got = _run(tgtfast.perturb_decode_label, z, dec, lab, **KW)
    else:  # the fused MLP chain, when installed, warns once per process: do not depend on test order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _run(tgtfast.perturb_decode_label, z, dec, lab, **KW)
    assert all(p.grad is None for p in list(dec.parameters()) + list(lab.parameters()))
    # z still gets the full gradient through the (detached) teacher
    want = _run(reference.perturb_decode_label, z, dec, lab, **KW)
    _compare(got, want, torch.float32)


def test_no_warning_when_frozen_or_no_grad():
    dec, lab = ConvDecoder().eval(), ConvLabeler().eval()
    z = torch.randn(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            tgtfast.perturb_decode_label(z, dec, lab, sigma=0.1, seed=0)
        tgtfast.perturb_decode_label(z, _frozen(dec), _frozen(lab), sigma=0.1, seed=0)


# ------------------------------------------------------------------------------------------------
# bad input


def _teacher():
    return _mlp([6, 10, 8]), _mlp([8, 4])


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(z=torch.randn(3, 5)), ValueError, "decoder.*latent width 6.*width 5"),
        (dict(labeler="wrong_width"), ValueError, "labeler takes inputs of width 7.*outputs width 8"),
        (dict(sigma=-0.5), ValueError, "sigma"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-2.0), ValueError, "temperature"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(z=torch.ones(3, 6, dtype=torch.int32)), TypeError, "z"),
        (dict(z=torch.randn(3, 6, dtype=torch.float64)), ValueError, "decoder failed on the perturbed latent"),
        (dict(decoder="meta"), ValueError, "decoder has parameters on meta"),
        (dict(labeler=42), TypeError, "labeler"),
        (dict(decoder="bad_activation"), ValueError, r"decoder\[1\].*unsupported activation 'softplus'"),
        (dict(decoder="narrow"), ValueError, "decoder takes latent width 5"),
        (dict(decoder="bad_chain"), ValueError, r"decoder.*takes 9"),
    ],
)
def test_bad_input(change, exc, match):
    dec, lab = _teacher()
    args = dict(z=torch.randn(3, 6), decoder=dec, labeler=lab, sigma=0.1, seed=1, offset=0, temperature=1.0)
    args.update(change)
    if args["labeler"] == "wrong_width":
        args["labeler"] = _mlp([7, 4])
    if args["decoder"] == "meta":
        args["decoder"] = _mlp([6, 8]).to("meta")
    if args["decoder"] == "bad_activation":
        args["decoder"] = [(dec[0].weight, dec[0].bias, "relu"), (dec[2].weight, dec[2].bias, "softplus")]
    if args["decoder"] == "narrow":
        args["decoder"] = _frozen(nn.Sequential(nn.Linear(5, 8), nn.ReLU()))
    if args["decoder"] == "bad_chain":
        args["decoder"] = [(dec[0].weight, dec[0].bias, "relu"), (torch.randn(8, 9), None, "relu")]
    z, d, l = args.pop("z"), args.pop("decoder"), args.pop("labeler")
    with pytest.raises(exc, match=match):
        tgtfast.perturb_decode_label(z, d, l, **args)


def test_bad_input_generic_modules():
    """Shapes the generic path can only check by running: errors name the module that failed."""
    dec, lab = _frozen(ConvDecoder()), _frozen(ConvLabeler())
    with pytest.raises(ValueError, match="decoder failed on the perturbed latent of shape \\(3, 5\\)"):
        tgtfast.perturb_decode_label(torch.randn(3, 5), dec, lab, sigma=0.1, seed=1)
    small = _frozen(nn.Sequential(nn.Linear(6, 7)))
    with pytest.raises(ValueError, match="labeler failed on the decoder output of shape \\(3, 7\\)"):
        tgtfast.perturb_decode_label(torch.randn(3, 6), small, lab, sigma=0.1, seed=1)
    with pytest.raises(TypeError, match="labeler must return a tensor"):
        tgtfast.perturb_decode_label(torch.randn(3, 6), dec, lambda x: x.tolist(), sigma=0.1, seed=1)
    with pytest.raises(ValueError, match="labeler must return floating logits"):
        tgtfast.perturb_decode_label(torch.randn(3, 6), dec, lambda x: x.sum(), sigma=0.1, seed=1)


# ------------------------------------------------------------------------------------------------
# CUDA (skips without a GPU; compares with the CPU reference)


@pytest.mark.skipif(tgtfast.backends()["cuda"] != "available", reason="no CUDA device or no CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_generic_path(dtype):
    dec, lab = _frozen(ConvDecoder(), dtype), _frozen(ConvLabeler(), dtype)
    z = torch.randn(16, 6, dtype=dtype)
    want = _run(reference.perturb_decode_label, z, dec, lab, **KW)
    got = _run(tgtfast.perturb_decode_label, z.cuda(), dec.cuda(), lab.cuda(), backend="cuda", **KW)
    # cuDNN convolutions may use TF32 for float32: compare float32 at a 1e-3 scale
    tol = TOL[torch.bfloat16] if dtype == torch.bfloat16 else dict(atol=1e-3, rtol=1e-3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w.double(), **tol)


@pytest.mark.skipif(tgtfast.backends()["cuda"] != "available", reason="no CUDA device or no CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_temperature_softmax(dtype):
    x = (torch.randn(37, 3001) * 3).to(dtype)
    got = tgtfast.temperature_softmax(x.cuda(), 1.3, backend="cuda").cpu()
    tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    torch.testing.assert_close(got.double(), torch.softmax(x.double() / 1.3, -1), atol=tol, rtol=1e-2)


def test_routing_to_the_fused_mlp_chain(monkeypatch):
    """MLP teachers with a [B, d] float32/bfloat16 latent go to the fused chain (when installed), others do not."""
    from tgtfast.tgt import step as mlp

    calls = []

    def fake(z, dec, lab, sigma, seed, offset, temperature, backend):
        calls.append((len(dec), len(lab), dict(sigma=sigma, seed=seed, offset=offset, temperature=temperature,
                                               backend=backend)))
        return z, z

    monkeypatch.setattr(mlp, "_run_chain", fake)
    dec, lab = _mlp([6, 10, 8]), _mlp([8, 4])
    tgtfast.perturb_decode_label(torch.randn(3, 6), dec, lab, sigma=0.1, seed=5, offset=2, temperature=1.5)
    assert calls == [(2, 1, dict(sigma=0.1, seed=5, offset=2, temperature=1.5, backend=None))]
    # not an MLP, a 3-D latent, a float64 latent: the generic path
    tgtfast.perturb_decode_label(torch.randn(3, 6), _frozen(ConvDecoder()), _frozen(ConvLabeler()), sigma=0.1, seed=5)
    tgtfast.perturb_decode_label(torch.randn(2, 3, 6), dec, lab, sigma=0.1, seed=5)
    tgtfast.perturb_decode_label(torch.randn(3, 6, dtype=torch.float64), _mlp([6, 8], dtype=torch.float64),
                                 _mlp([8, 4], dtype=torch.float64), sigma=0.1, seed=5)
    assert len(calls) == 1
