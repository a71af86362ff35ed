"""Property tests of the TGT step ``perturb_decode_label`` with small MLP teachers.

* the C++ backend (the fused MLP chain for float32 ``z``, the generic path for float64) against the reference
  backend and against the float64 eager composition ``tgtfast.reference.perturb_decode_label`` (outputs and the
  gradient wrt ``z`` under a random upstream gradient);
* per-example offsets: row ``p`` of a batch ``z [B, d]`` drawn at ``offset`` equals that row computed alone
  at ``offset + p * d`` (the noise stream is row-major), on every CPU backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import cpu_backends, needs_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import tgtfast
from tgtfast import reference

SETTINGS = dict(derandomize=True, deadline=None)
ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
        "identity": nn.Identity}
seeds = st.one_of(st.sampled_from([0, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


def mlp(widths, act, seed, dtype):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(ACTS[act]())
    m = nn.Sequential(*layers).to(dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def run(fn, z, dec, lab, g_x, g_s, **kw):
    z = z.detach().clone().requires_grad_(True)
    x_new, soft = fn(z, dec, lab, **kw)
    ((x_new * g_x.to(x_new.dtype)).sum() + (soft * g_s.to(soft.dtype)).sum()).backward()
    return x_new.detach(), soft.detach(), z.grad


teachers = st.fixed_dictionaries(dict(
    b=st.integers(1, 6), d=st.integers(1, 6), hidden=st.integers(1, 12), width=st.integers(1, 8),
    k=st.integers(1, 9), dec_act=st.sampled_from(sorted(ACTS)), lab_act=st.sampled_from(sorted(ACTS)),
    sigma=st.sampled_from([0.0, 0.5, 2.0]), temperature=st.sampled_from([0.2, 1.0, 5.0]),
    offset=st.integers(0, 2**40), seed=seeds, wseed=st.integers(0, 1000)))


def build(p, dtype):
    dec = mlp([p["d"], p["hidden"], p["width"]], p["dec_act"], p["wseed"], dtype)
    lab = mlp([p["width"], p["hidden"], p["k"]], p["lab_act"], p["wseed"] + 1, dtype)
    g = torch.Generator().manual_seed(p["wseed"])
    z = torch.randn(p["b"], p["d"], generator=g, dtype=torch.float64).to(dtype)
    g_x = torch.randn(p["b"], p["width"], generator=g, dtype=torch.float64)
    g_s = torch.randn(p["b"], p["k"], generator=g, dtype=torch.float64)
    kw = dict(sigma=p["sigma"], seed=p["seed"], offset=p["offset"], temperature=p["temperature"])
    return dec, lab, z, g_x, g_s, kw


@needs_backend("cpp")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=25, **SETTINGS)
@given(p=teachers)
def test_cpp_matches_reference(dtype, p):
    dec, lab, z, g_x, g_s, kw = build(p, dtype)
    got = run(tgtfast.perturb_decode_label, z, dec, lab, g_x, g_s, backend="cpp", **kw)
    ref = run(tgtfast.perturb_decode_label, z, dec, lab, g_x, g_s, backend="reference", **kw)
    dec64, lab64 = dec.double(), lab.double()
    truth = run(reference.perturb_decode_label, z.double(), dec64, lab64, g_x, g_s, **kw)
    # the noise is float32 in every dtype (docs/design.md, "Noise"), and backends may differ in its last ulps
    # (libm vs torch's log / sin / cos): float64 outputs agree to the noise's accuracy times sigma
    spread = (1 + p["sigma"]) / min(p["temperature"], 1.0)
    tol = dict(rtol=1e-4, atol=2e-5 * spread) if dtype == torch.float32 else dict(rtol=2e-5, atol=1e-5 * spread)
    for what, a, b, c in zip(("x_new", "soft labels", "grad z"), got, ref, truth):
        assert a.dtype == dtype and a.shape == c.shape, what
        torch.testing.assert_close(a.double(), c, **tol, msg=lambda m, w=what: f"cpp {w} vs float64: {m}")
        torch.testing.assert_close(b.double(), c, **tol, msg=lambda m, w=what: f"reference {w} vs float64: {m}")
    torch.testing.assert_close(got[1].double().sum(-1), torch.ones(p["b"], dtype=torch.float64), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=15, **SETTINGS)
@given(p=teachers)
def test_row_p_is_the_row_alone_at_offset_p_times_d(backend, dtype, p):
    dec, lab, z, g_x, g_s, kw = build(p, dtype)
    d = p["d"]
    x_new, soft = tgtfast.perturb_decode_label(z, dec, lab, backend=backend, **kw)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for row in range(p["b"]):
        alone = dict(kw, offset=kw["offset"] + row * d)
        x1, s1 = tgtfast.perturb_decode_label(z[row:row + 1], dec, lab, backend=backend, **alone)
        torch.testing.assert_close(x1[0], x_new[row], **tol)
        torch.testing.assert_close(s1[0], soft[row], **tol)
    if p["sigma"] > 0 and p["b"] > 1 and torch.equal(z[0], z[1]) is False:
        # the same latent in two rows gets different noise (different stream positions)
        twice = z[:1].expand(2, d).contiguous()
        x2, _ = tgtfast.perturb_decode_label(twice, dec, lab, backend=backend, **kw)
        pert = tgtfast.perturb(twice, kw["sigma"], kw["seed"], kw["offset"], backend=backend)
        assert not torch.equal(pert[0], pert[1])
        x_again, _ = tgtfast.perturb_decode_label(twice[1:], dec, lab, backend=backend,
                                                  **dict(kw, offset=kw["offset"] + d))
        torch.testing.assert_close(x_again[0], x2[1], **tol)
