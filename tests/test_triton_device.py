"""Triton launch wrappers: the device guard, and the online softmax of the MLP chain with -inf logits.

Every public launch wrapper of ``tgtfast.kernels`` (``noise.perturb``, ``noise.latent_noise_``,
``softmax.temperature_softmax``, ``ptloss.ptloss_fwd``, ``mlp_chain.mlp_chain_fwd``) launches its kernels inside
``noise.launch_guard(tensor)``: ``torch.cuda.device`` of the tensor's device, so that tensors on ``cuda:1`` are
processed on ``cuda:1`` while ``cuda:0`` is current. Here (no GPU) the tests check the helper itself and, under
the interpreter, that every kernel launch of every wrapper happens inside the guard of its input; with two GPUs
or more, that the wrappers give the right results for tensors on ``cuda:1`` while ``cuda:0`` is current.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tgtfast import reference
from tgtfast.kernels import mlp_chain, noise, ptloss, softmax

ON_GPU = torch.cuda.is_available()


# --- the helper ---------------------------------------------------------------------------------------------

def test_launch_guard_is_a_null_context_for_cpu_tensors():
    g = noise.launch_guard(torch.zeros(2))
    assert isinstance(g, contextlib.nullcontext)
    assert isinstance(noise.launch_guard(torch.device("cpu")), contextlib.nullcontext)
    with g:  # usable, and touches no GPU
        pass


def test_launch_guard_is_the_cuda_device_of_a_cuda_device():
    # built without touching a GPU: torch.cuda.device only records the index until entered
    g = noise.launch_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    g0 = noise.launch_guard(torch.device("cuda", 0))
    assert isinstance(g0, torch.cuda.device) and g0.idx == 0
    assert noise.launch_guard(torch.device("meta")).__class__ is contextlib.nullcontext


def test_every_wrapper_module_uses_the_one_helper():
    for mod in (softmax, ptloss, mlp_chain):
        assert mod.launch_guard is noise.launch_guard, mod.__name__


# --- every launch of every wrapper happens inside the guard of its input (interpreter) ------------------------

class _Spy:
    def __init__(self):
        self.guarded = []  # devices the guard was entered for
        self.depth = 0
        self.launches = []  # (kernel name, inside a guard)


class _KernelProxy:
    """Stands for a launched kernel: ``proxy[grid](...)`` records whether a guard is active, then launches."""

    def __init__(self, spy, name, launch):
        self._spy, self._name, self._launch = spy, name, launch

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self._spy.launches.append((self._name, self._spy.depth > 0))
            return self._launch[grid](*args, **kwargs)
        return run


@pytest.fixture
def spy(monkeypatch):
    s = _Spy()
    real_guard = noise.launch_guard

    @contextlib.contextmanager
    def guard(t):
        s.guarded.append(t.device if isinstance(t, torch.Tensor) else torch.device(t))
        s.depth += 1
        try:
            with real_guard(t):
                yield
        finally:
            s.depth -= 1

    for mod in (noise, softmax, ptloss, mlp_chain):
        monkeypatch.setattr(mod, "launch_guard", guard)  # raising=True: the wrapper modules must have it
    real_wrap = torch.library.wrap_triton
    monkeypatch.setattr(torch.library, "wrap_triton", lambda k: _KernelProxy(s, k.__name__, real_wrap(k)))
    for name in ("_linear_kernel", "_chain_kernel", "_softmax_kernel"):
        monkeypatch.setattr(mlp_chain, name, _KernelProxy(s, name, getattr(mlp_chain, name)))
    return s


def _check(spy, n_launches):
    assert spy.guarded and all(d.type == "cpu" for d in spy.guarded)
    assert len(spy.launches) >= n_launches, spy.launches
    unguarded = [name for name, inside in spy.launches if not inside]
    assert not unguarded, f"launched outside the device guard: {unguarded}"


def test_noise_wrappers_launch_inside_the_guard(spy):
    z = torch.randn(5, 3)
    noise.perturb(z, 0.5, 7, 0)
    out = torch.empty(6)
    noise.latent_noise_(out, 7, 0)
    _check(spy, 2)


def test_softmax_wrapper_launches_inside_the_guard(spy):
    softmax.temperature_softmax(torch.randn(3, 10), 1.5)
    _check(spy, 1)


def test_ptloss_wrapper_launches_inside_the_guard(spy):
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    ptloss.ptloss_fwd(s, t, torch.tensor([0.1]), None, 1.0, 0.0, True, True, False)
    _check(spy, 1)


@pytest.mark.parametrize("widths, n_dec", [([4, 16, 12, 9, 5], 2), ([4, 13, 16, 11, 9, 600], 3)])
def test_mlp_chain_wrapper_launches_inside_the_guard(spy, widths, n_dec):
    """The one-kernel chain, and the per-layer path with its separate row softmax (K > 512)."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g) * i ** -0.5 for i, o in zip(widths[:-1], widths[1:])]
    mlp_chain.mlp_chain_fwd(torch.randn(3, widths[0], generator=g), ws, [None] * len(ws), [1] * (len(ws) - 1) + [0],
                            n_dec, 0.5, 3, 0, 1.0, True)
    expected = ["_chain_kernel"] if n_dec == 2 else ["_linear_kernel"] * (len(ws)) + ["_softmax_kernel"]
    assert [name for name, _ in spy.launches] == expected
    _check(spy, len(expected))


# --- the chunked softmax of the MLP chain with a first chunk of -inf logits (interpreter) ---------------------

def _chain_with_masked_classes(widths, n_dec, masked, rows=3):
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(o, i, generator=g) * i ** -0.5 for i, o in zip(widths[:-1], widths[1:])]
    bs = [torch.randn(o, generator=g) * 0.1 for o in widths[1:]]
    bs[-1][:masked] = -math.inf  # the labeler never predicts the first `masked` classes
    acts = [1] * (len(ws) - 1) + [0]  # relu, identity logits
    z = torch.randn(rows, widths[0], generator=g)
    x, soft, _ = mlp_chain.mlp_chain_fwd(z, ws, bs, acts, n_dec, 0.5, 3, 0, 1.3, False)
    # float64 softmax of the labeler applied to the kernel's own x_new
    h = x.double()
    for l in range(n_dec, len(ws)):
        h = h @ ws[l].double().T + bs[l].double()
        if l < len(ws) - 1:
            h = torch.relu(h)
    want = torch.softmax(h / 1.3, dim=-1)
    return soft, want


def test_fused_chain_softmax_first_chunk_all_minus_inf():
    """K = 200 over 128-class chunks, the first chunk all -inf: the running max starts at -inf (was NaN)."""
    widths = [4, 16, 12, 9, 200]
    assert mlp_chain.chain_path(widths, 2) == "fused"
    masked = 128  # the class chunk of the 16-wide configuration
    cfg = mlp_chain.fused_launch_config(widths)
    assert cfg["BLOCK_K"] == masked and not cfg["ONE_PASS"]
    soft, want = _chain_with_masked_classes(widths, 2, masked)
    assert not torch.isnan(soft).any()
    assert torch.all(soft[:, :masked] == 0)
    torch.testing.assert_close(soft.double(), want, rtol=1e-5, atol=1e-6)


def test_per_layer_row_softmax_first_chunk_all_minus_inf():
    """A 3-layer decoder takes the per-layer path; K = 1100 > 512 goes through the row softmax in chunks of
    1024, the first all -inf."""
    widths = [4, 13, 16, 11, 9, 1100]
    assert mlp_chain.chain_path(widths, 3) == "per_layer"
    masked = 1024
    assert mlp_chain._ROW_SOFTMAX_BLOCK == masked
    soft, want = _chain_with_masked_classes(widths, 3, masked, rows=2)
    assert not torch.isnan(soft).any()
    assert torch.all(soft[:, :masked] == 0)
    torch.testing.assert_close(soft.double(), want, rtol=1e-5, atol=1e-6)


# --- with two GPUs: tensors on cuda:1 while cuda:0 is current -----------------------------------------------

needs_two_gpus = pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2,
                                    reason="needs at least 2 CUDA devices")


@needs_two_gpus
def test_wrappers_on_the_second_gpu_while_the_first_is_current():
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(2)

    z = torch.randn(64, 33, generator=g)
    got = noise.perturb(z.to(dev), 0.5, 11, 3)
    assert got.device == dev and torch.cuda.current_device() == 0
    want = z + 0.5 * reference.latent_noise(z.shape, 11, 3, dtype=torch.float32)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)

    x = torch.randn(5, 300, generator=g)
    torch.testing.assert_close(softmax.temperature_softmax(x.to(dev), 1.5).cpu(), torch.softmax(x / 1.5, -1),
                               rtol=1e-5, atol=1e-6)

    s, t = torch.randn(8, 50, generator=g), torch.randn(8, 50, generator=g)
    coeffs = torch.tensor([0.2, -0.1])
    loss1, gs1, _ = ptloss.ptloss_fwd(s.to(dev), t.to(dev), coeffs.to(dev), None, 2.0, 0.0, True, True, False)
    loss0, gs0, _ = ptloss.ptloss_fwd(s.cuda(0), t.cuda(0), coeffs.cuda(0), None, 2.0, 0.0, True, True, False)
    torch.testing.assert_close(loss1.cpu(), loss0.cpu())
    torch.testing.assert_close(gs1.cpu(), gs0.cpu())

    for widths, n_dec in (([8, 32, 20, 16, 10], 2), ([8, 32, 20, 16, 10, 700], 3)):
        ws = [torch.randn(o, i, generator=g) * i ** -0.5 for i, o in zip(widths[:-1], widths[1:])]
        acts = [1] * (len(ws) - 1) + [0]
        zz = torch.randn(40, widths[0], generator=g)
        out1 = mlp_chain.mlp_chain_fwd(zz.to(dev), [w.to(dev) for w in ws], [None] * len(ws), acts, n_dec, 0.5, 3, 0,
                                       1.0, True)
        out0 = mlp_chain.mlp_chain_fwd(zz.cuda(0), [w.cuda(0) for w in ws], [None] * len(ws), acts, n_dec, 0.5, 3,
                                       0, 1.0, True)
        for a, b in zip(out1, out0):
            assert a.device == dev
            torch.testing.assert_close(a.cpu(), b.cpu())
    torch.cuda.synchronize(dev)
    assert torch.cuda.current_device() == 0
