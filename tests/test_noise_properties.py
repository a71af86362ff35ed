"""Property tests of the counter-based latent noise (docs/design.md, "Noise").

* offset continuation: ``latent_noise((n,), seed, o) == latent_noise((o + n,), seed, 0)[o:]`` bit for bit on every
  CPU backend, and any split of a stream into consecutive pieces gives the same bits (offsets up to 2**62);
* the C++ kernels against the eager specification for seeds anywhere in [0, 2**64) (including 2**63 and up,
  which travel as negative int64) and large offsets, within a few float32 ulps;
* row-major shapes: a [r, c] draw is the flat draw reshaped; ``perturb(z) == z + sigma * latent_noise``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends, needs_backend
from hypothesis import example, given, settings
from hypothesis import strategies as st

import tgtfast
from tgtfast import reference

SETTINGS = dict(derandomize=True, deadline=None)
NOISE_TOL = dict(atol=4e-6, rtol=4e-6)  # different libm log / sin / cos: a few float32 ulps of |n| <= 5.9
BACKENDS = cpu_backends()
seeds = st.one_of(st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, **SETTINGS)
@given(n=st.integers(0, 40), offset=st.integers(0, 3000), seed=seeds)
@example(n=5, offset=3, seed=2**64 - 1)
@example(n=1, offset=4095, seed=2**63)
def test_offset_continuation(backend, n, offset, seed):
    part = tgtfast.latent_noise((n,), seed, offset, backend=backend)
    whole = tgtfast.latent_noise((offset + n,), seed, 0, backend=backend)
    assert torch.equal(part, whole[offset:])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, **SETTINGS)
@given(offset=st.one_of(st.integers(0, 2**62), st.sampled_from([2**32 - 3, 2**34 - 2, 2**62 - 1])),
       cuts=st.lists(st.integers(0, 23), max_size=4), seed=seeds)
def test_split_stream_is_the_same_stream(backend, offset, cuts, seed):
    """Consecutive pieces drawn at advancing offsets give the bits of one draw (group boundaries anywhere,
    the 32-bit word of the counter carrying at 2**34)."""
    n = 23
    whole = tgtfast.latent_noise((n,), seed, offset, backend=backend)
    bounds = [0, *sorted(cuts), n]
    pieces = [tgtfast.latent_noise((b - a,), seed, offset + a, backend=backend) for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(pieces), whole)


@needs_backend("cpp")
@settings(max_examples=40, **SETTINGS)
@given(n=st.integers(1, 64), offset=st.one_of(st.integers(0, 2**62), st.integers(0, 100)), seed=seeds)
@example(n=8, offset=2**34 - 3, seed=2**64 - 1)
@example(n=8, offset=0, seed=2**63)
def test_cpp_matches_reference(n, offset, seed):
    got = tgtfast.latent_noise((n,), seed, offset, backend="cpp")
    want = reference.latent_noise((n,), seed, offset)
    torch.testing.assert_close(got, want, **NOISE_TOL)
    assert bool((got.abs() <= 5.9).all())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, **SETTINGS)
@given(rows=st.integers(1, 6), cols=st.integers(1, 9), offset=st.integers(0, 2**40), seed=seeds,
       dtype=st.sampled_from([torch.float32, torch.float64]), sigma=st.sampled_from([0.0, 0.3, 2.0]))
def test_shapes_and_perturb(backend, rows, cols, offset, seed, dtype, sigma):
    flat = tgtfast.latent_noise((rows * cols,), seed, offset, dtype=dtype, backend=backend)
    grid = tgtfast.latent_noise((rows, cols), seed, offset, dtype=dtype, backend=backend)
    assert torch.equal(grid, flat.reshape(rows, cols))
    z = torch.randn(rows, cols, dtype=dtype)
    got = tgtfast.perturb(z, sigma, seed, offset, backend=backend)
    want = z + sigma * reference.latent_noise((rows, cols), seed, offset, dtype=dtype)
    torch.testing.assert_close(got, want, atol=4e-6 * (1 + sigma), rtol=4e-6)
    # row p of a batch is the row drawn alone at offset p * cols
    for p in range(rows):
        alone = tgtfast.perturb(z[p:p + 1], sigma, seed, offset + p * cols, backend=backend)
        assert torch.equal(alone[0], got[p])
