"""The C++ ops' cache of large output blocks (csrc/cpu_buffers.cpp): reuse never leaks old values."""

import os
import subprocess
import sys

import pytest
import torch

import tgtfast
from conftest import needs_backend
from tgtfast import _ext, reference

pytestmark = needs_backend("cpp")

# 80 x 16384 float32 = 5 MiB: above the 4 MiB from which gradients come from the cached blocks.
N, K = 80, 16384
COEFFS = torch.tensor([0.5, -0.3, 0.2])


def _grad(s, t, **kw):
    s = s.detach().clone().requires_grad_(True)
    tgtfast.ptloss(s, t, COEFFS, backend="cpp", **kw).backward()
    return s.grad


def _ref_grad(s, t, **kw):
    s = s.detach().double().requires_grad_(True)
    reference.ptloss(s, t.double(), COEFFS.double(), **kw).backward()
    return s.grad.float()


def test_freed_gradient_is_reused_and_rewritten():
    tgtfast.empty_cpu_cache()
    s1, t1 = torch.randn(N, K) * 3, torch.randn(N, K) * 3
    g1 = _grad(s1, t1)
    ptr = g1.data_ptr()
    del g1
    assert _ext.ext.cached_buffer_bytes() >= N * K * 4
    # Other inputs, and half the rows ignored: the reused block must hold only the new values (zeros there).
    s2, t2 = torch.randn(N, K), torch.randn(N, K)
    target = torch.zeros(N, dtype=torch.long)
    target[::2] = -100
    g2 = _grad(s2, t2, target=target)
    assert g2.data_ptr() == ptr
    assert _ext.ext.cached_buffer_bytes() == 0
    torch.testing.assert_close(g2, _ref_grad(s2, t2, target=target), rtol=1e-4, atol=1e-8)
    assert bool((g2[::2] == 0).all())


def test_empty_cpu_cache_frees_only_unused_blocks():
    tgtfast.empty_cpu_cache()
    s, t = torch.randn(N, K), torch.randn(N, K)
    kept = _grad(s, t)
    _grad(s, t)  # freed at once: cached
    cached = _ext.ext.cached_buffer_bytes()
    assert cached >= N * K * 4
    assert tgtfast.empty_cpu_cache() == cached
    assert _ext.ext.cached_buffer_bytes() == 0
    torch.testing.assert_close(kept, _ref_grad(s, t), rtol=1e-4, atol=1e-8)  # the block in use is untouched
    assert tgtfast.empty_cpu_cache() == 0


def test_at_most_four_blocks_are_kept():
    tgtfast.empty_cpu_cache()
    s, t = torch.randn(N, K), torch.randn(N, K)
    grads = [_grad(s, t) for _ in range(6)]
    del grads
    block = 6 << 20  # 5 MiB rounded up to whole 2 MiB huge pages
    assert _ext.ext.cached_buffer_bytes() == 4 * block
    tgtfast.empty_cpu_cache()


def test_cache_can_be_turned_off(tmp_path):
    code = (
        "import torch, tgtfast\n"
        "from tgtfast import _ext\n"
        "s = torch.randn(80, 16384, requires_grad=True)\n"
        "tgtfast.ptloss(s, torch.randn(80, 16384), backend='cpp').backward()\n"
        "s.grad = None\n"
        "print(_ext.ext.cached_buffer_bytes())\n"
    )
    env = dict(os.environ, TGTFAST_CPU_CACHE_MB="0")
    # cwd outside the checkout: the child must import the installed package, not the source tree
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_reuse_across_dtypes_of_the_same_size(dtype):
    """A block freed by a float32 gradient serves a gradient of another dtype with the same byte size."""
    tgtfast.empty_cpu_cache()
    g32 = _grad(torch.randn(N, K), torch.randn(N, K))
    ptr = g32.data_ptr()
    del g32
    rows = 2 * N if dtype == torch.bfloat16 else N // 2
    s, t = torch.randn(rows, K).to(dtype), torch.randn(rows, K).to(dtype)
    g = _grad(s, t)
    assert g.data_ptr() == ptr and g.dtype == dtype
    tol = dict(rtol=2e-2, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(g.float(), _ref_grad(s.float(), t.float()), **tol)


def test_tgt_samples_and_labels_reuse_blocks():
    """x_new and the soft labels of the fused MLP step (each 4 MiB or more) come from the cache and hold only
    the new call's values."""
    from tgtfast import _mlp

    tgtfast.empty_cpu_cache()
    g = torch.Generator().manual_seed(0)
    dec = [(torch.randn(16, 8, generator=g) * 0.3, None, "relu"), (torch.randn(2048, 16, generator=g) * 0.3, None,
                                                                    "sigmoid")]
    lab = [(torch.randn(8, 2048, generator=g) * 0.05, None, "relu"), (torch.randn(2048, 8, generator=g), None,
                                                                       "identity")]
    z = torch.randn(520, 8, generator=g)  # 520 x 2048 float32 = 4.06 MiB, on 6 MiB blocks
    kw = dict(sigma=0.5, temperature=1.5, backend="cpp")
    x, s = _mlp.perturb_decode_label_mlp(z, dec, lab, seed=1, **kw)
    del x, s
    assert _ext.ext.cached_buffer_bytes() == 2 * (6 << 20)
    x, s = _mlp.perturb_decode_label_mlp(z, dec, lab, seed=2, **kw)
    assert _ext.ext.cached_buffer_bytes() == 0  # both blocks taken again
    x_ref, s_ref = reference.perturb_decode_label_mlp(z, dec, lab, seed=2, sigma=0.5, temperature=1.5)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-7)
    tgtfast.empty_cpu_cache()
