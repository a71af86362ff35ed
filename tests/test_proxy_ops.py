"""The ``proxy_solve`` op's registration (tgtfast/ops/proxy_solve.py): the dispatcher entry ``proxy_teacher``,
the fake kernels of the compiled ops, and the module's independence from tgtfast.proxy."""

import ast
import inspect

import pytest
import torch

import tgtfast
from tgtfast.ops import proxy_solve as op

F64 = torch.float64
needs_cpp = pytest.mark.skipif(tgtfast.backends(op="proxy_teacher")["cpp"] != "available",
                               reason="the compiled extension is not loaded")


def test_dispatcher_entry_keeps_its_name_and_refuses_triton():
    avail = tgtfast.backends(op="proxy_teacher")
    assert avail["reference"] == "available"
    assert avail["triton"].startswith("unavailable") and "Triton" in avail["triton"]
    assert op.OP == "proxy_teacher"
    assert op.solver("reference", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="backend"):
        op.solver("triton", torch.device("cpu"))


def test_module_does_not_import_tgtfast_proxy():
    tree = ast.parse(inspect.getsource(op))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(name.startswith("tgtfast.proxy") for name in imported), imported


def _inputs(c=3, n=5, k=3, m=4):
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=F64) * 2, -1)
    eta = torch.rand(c, m, k, generator=g, dtype=F64) * 11 - 1
    y = torch.randint(0, k, (n,), generator=g)
    return p, eta, y


@needs_cpp
def test_fake_kernels_match_the_real_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p, eta, y = _inputs()
    q, res = torch.ops.tgtfast.proxy_solve(p, eta, 50, 1e-10)
    sums = torch.ops.tgtfast.proxy_deviation_sums(p, eta, y, 50, 1e-10)
    with FakeTensorMode() as mode:
        fp, feta, fy = (mode.from_tensor(t) for t in (p, eta, y))
        fq, fres = torch.ops.tgtfast.proxy_solve(fp, feta, 50, 1e-10)
        fsums = torch.ops.tgtfast.proxy_deviation_sums(fp, feta, fy, 50, 1e-10)
    for real, fake in zip((q, res, *sums), (fq, fres, *fsums)):
        assert fake.shape == real.shape and fake.dtype == real.dtype and fake.device == real.device


@needs_cpp
def test_opcheck_proxy_ops():
    p, eta, y = _inputs()
    torch.library.opcheck(torch.ops.tgtfast.proxy_solve.default, (p, eta, 50, 1e-10),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.tgtfast.proxy_deviation_sums.default, (p, eta, y, 50, 1e-10),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["proxy_teacher", "deviation", "stationarity_residual", "search_coefficients",
                                  "CoefficientSearchResult", "coeffs_main"])
def test_public_names_still_importable(name):
    from tgtfast import proxy

    assert name in proxy.__all__ and getattr(proxy, name) is not None
