import os
import sys

# The tests exercise the installed package (with its compiled extension), never the source tree that
# `python -m pytest` would put first on sys.path.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _REPO]

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tgtfast  # noqa: E402

if os.environ.get("TGTFAST_REQUIRE_EXT") == "1" and tgtfast.backends()["cpp"] != "available":
    raise RuntimeError(f"TGTFAST_REQUIRE_EXT=1 but the C++ backend is {tgtfast.backends()['cpp']}")
from tgtfast import reference


def cpu_backends():
    """Backends that can run CPU tensors here (Triton only under TRITON_INTERPRET=1, tested separately)."""
    avail = tgtfast.backends()
    return [b for b in ("cpp", "reference") if avail[b] == "available"]


def needs_backend(name):
    avail = tgtfast.backends()[name]
    return pytest.mark.skipif(avail != "available", reason=f"{name} backend {avail}")


# Error allowed relative to the float64 ground truth: the kernel's error may be at most twice the error of the
# same-dtype PyTorch computation, plus an absolute floor per dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}


def assert_close_to_truth(out, same_dtype_ref, truth, dtype, what):
    out, same_dtype_ref, truth = (x.detach().double() for x in (out, same_dtype_ref, truth))
    ref_err = (same_dtype_ref - truth).abs()
    err = (out - truth).abs()
    bound = 2 * ref_err + ATOL[dtype] * (1 + truth.abs())
    bad = ~(err <= bound)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max err {err.max().item():.3e}, "
        f"same-dtype torch err {ref_err.max().item():.3e}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_loss(fn, s, t, **kw):
    """Loss and gradients of fn(s, t, **kw) * 2 (grad_output != 1 on purpose)."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fn(s, t, **kw)
    (loss.sum() * 2).backward()
    return loss.detach(), s.grad, t.grad


__all__ = ["cpu_backends", "needs_backend", "assert_close_to_truth", "run_loss", "reference", "os"]
