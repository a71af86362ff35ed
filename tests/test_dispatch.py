"""The one dispatch point: backend limits on a call's sizes, lazily loaded backends, forced backends."""

import pytest
import torch

import tgtfast
from tgtfast import dispatch
from tgtfast.dispatch import Backend
from tgtfast.ops import ptloss as ptloss_op


@pytest.fixture
def test_op():
    yield "_test_limits_op"
    dispatch._OPS.pop("_test_limits_op", None)
    dispatch._LOADERS.pop("_test_limits_op", None)
    dispatch._LIMITS.pop("_test_limits_op", None)


@pytest.mark.skipif(tgtfast.backends()["cpp"] != "available", reason="needs the C++ backend")
def test_auto_selection_passes_over_a_backend_whose_limit_refuses_the_call(test_op):
    dispatch.register_op(test_op, limits={"cpp": lambda call: None if call["orders"] <= 4 else "at most 4 orders"})
    cpu = torch.device("cpu")
    assert dispatch.select(None, cpu, torch.float32, op=test_op, orders=4) is Backend.CPP
    assert dispatch.select(None, cpu, torch.float32, op=test_op, orders=5) is Backend.REFERENCE
    with pytest.raises(ValueError, match="backend='cpp' cannot run this call: at most 4 orders"):
        dispatch.select("cpp", cpu, torch.float32, op=test_op, orders=5)


def test_ptloss_cuda_limit_is_the_kernels_order_limit():
    limit = ptloss_op._LIMITS[Backend.CUDA]
    assert limit({"orders": ptloss_op.CUDA_MAX_ORDERS}) is None
    assert "at most 32 orders" in limit({"orders": 33})
    # the compiled constant and the Python one agree
    import pathlib

    header = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "ptloss_cuda.h"
    if header.exists():
        assert f"kMaxOrders = {ptloss_op.CUDA_MAX_ORDERS};" in header.read_text()


def test_a_failing_loader_marks_the_backend_unavailable_with_the_reason(test_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def broken():
        raise ImportError("no kernels here")

    if dispatch._PROBED[Backend.TRITON] is not None:
        pytest.skip(f"triton: {dispatch._PROBED[Backend.TRITON]}")
    dispatch.register_op(test_op, loaders={"triton": broken})
    assert tgtfast.backends(test_op)["triton"] == "unavailable: kernels failed to load (ImportError: no kernels here)"
    with pytest.raises(ValueError, match="kernels failed to load"):
        dispatch.select("triton", torch.device("cpu"), torch.float32, op=test_op)


def test_import_tgtfast_loads_no_triton_and_no_dynamo():
    import subprocess
    import sys

    code = ("import sys, tgtfast; bad = [m for m in ('triton', 'torch._inductor', 'torch._dynamo') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
