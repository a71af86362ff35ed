"""Every op registered under ``torch.ops.tgtfast`` passes ``torch.library.opcheck``: its schema, fake kernel,
autograd registration and AOT dispatch agree with the real kernel.

The walk is over the ops the dispatcher actually holds, so an op added without a sample below fails
``test_every_registered_op_has_a_sample``: a new op must bring its sample inputs here.
"""

import pytest
import torch

import tgtfast
from tgtfast import dispatch

# Load every lazily registered backend (the Triton ops register on first use).
for _op in list(dispatch._OPS):
    tgtfast.backends(_op)


def _registered():
    return sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("tgtfast::"))


def _mlp_args():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 4, generator=g), torch.randn(6, 8, generator=g), torch.randn(5, 6, generator=g)]
    bs = [torch.randn(8, generator=g), None, torch.randn(5, generator=g)]
    return ws, bs, [1, 6, 0]


def _samples(device):
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    n, k = 5, 7
    probs = torch.softmax(torch.randn(n, 3, generator=g, dtype=torch.float64), -1)
    eta = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    ws, bs, acts = _mlp_args()
    z = torch.randn(6, 4, generator=g)
    out = {
        "ptloss_fwd": [
            (rnd(n, k, grad=True), rnd(n, k, grad=True), torch.tensor([0.3, -0.1]), None, 2.0, 0.0, True, True, True,
             0.2),
            (rnd(n, k, dtype=torch.float64, grad=True), torch.softmax(rnd(n, k, dtype=torch.float64), -1),
             torch.zeros(0, dtype=torch.float64), torch.tensor([True, False, True, True, False]), 1.0, 0.1, False,
             True, False, 1.0),
        ],
        "perturb": [(rnd(3, 10, dtype=torch.float64, grad=True), 0.5, -7, 3), (rnd(2, 5), 0.0, 11, 0)],
        "latent_noise_": [(torch.empty(2, 9), 11, 2)],
        "temperature_softmax": [(rnd(4, 7, dtype=torch.float64, grad=True), 2.0)],
        "mlp_chain_fwd": [(z, ws, bs, acts, 2, 0.4, 123, 5, 1.5, True), (z, ws, bs, acts, 2, 0.4, 123, 5, 1.5, False)],
        "mlp_chain_bwd": [(z, ws, bs, acts, 2, 1.5, torch.randn(6, 6, generator=g), torch.randn(6, 5, generator=g)),
                          (z, ws, bs, acts, 2, 1.5, None, torch.randn(6, 5, generator=g))],
        "divergence_fwd": [
            (rnd(n, k, grad=True), rnd(n, k, grad=True), None, 2, 0.3, 0.0, 0.5, 0.5, True, True, 0.2),
            (rnd(n, k, dtype=torch.float64, grad=True), rnd(n, k, dtype=torch.float64),
             torch.tensor([True, False, True, True, False]), 7, 0.4, -0.2, 1.0, 2.0, True, False, 1.0),
        ],
        "sparse_coarse_fwd": [
            (rnd(n, k, grad=True), torch.tensor([[0, 3], [1, 2], [6, 5], [4, 0], [2, 1]]), None, 0.5),
            (rnd(n, k, dtype=torch.float64, grad=True), torch.tensor([[0, 3, 6], [1, 2, 5], [6, 5, 4], [4, 0, 1],
                                                                      [2, 1, 0]]),
             torch.tensor([True, False, True, True, False]), 1.5),
        ],
        "sparse_coarse_bwd": [
            (rnd(n, k), torch.tensor([[0, 3], [1, 2], [6, 5], [4, 0], [2, 1]]), rnd(n, 3), rnd(n, 3), None, 0.5),
        ],
        "sparse_divergence_fwd": [
            (rnd(n, k, grad=True), torch.tensor([[0, 3], [1, 2], [6, 5], [4, 0], [2, 1]]),
             torch.log_softmax(rnd(n, k, dtype=torch.float64), -1)[:, :2].contiguous(), None, True, 1e-9, 2, 0.3, 0.0,
             0.5, 2.0, True, 0.2),
            (rnd(n, k, dtype=torch.float64, grad=True), torch.tensor([[0, 3, 6], [1, 2, 5], [6, 5, 4], [4, 0, 1],
                                                                      [2, 1, 0]]),
             torch.log_softmax(rnd(n, 3, dtype=torch.float64), -1), torch.tensor([True, False, True, True, False]),
             False, 1e-9, 0, 0.0, 0.0, 1.5, 1.0, True, 1.0),
        ],
        "sparse_topk": [(rnd(n, k), None, 3, 1.5), (rnd(n, k, dtype=torch.float64), torch.tensor([4, 0, 0]), 7, 1.0)],
        "proxy_solve": [(probs, eta, 50, 1e-10)],
        "proxy_deviation_sums": [(probs, eta, torch.tensor([0, 2, 1, 1, 0]), 50, 1e-10)],
    }
    for name in ("ptloss_fwd", "divergence_fwd", "sparse_coarse_fwd", "sparse_coarse_bwd", "perturb", "latent_noise_",
                 "temperature_softmax"):
        out[name + ("triton_" if name.endswith("_") else "_triton")] = [
            tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float64 and name != "latent_noise_"
                  else a for a in args) for args in out[name]
        ]
    return out


def test_every_registered_op_has_a_sample():
    missing = set(_registered()) - set(_samples("cpu")) - {"_math_eval"}
    assert not missing, f"ops without an opcheck sample in tests/test_ops.py: {sorted(missing)}"


@pytest.mark.parametrize("name", _registered())
def test_opcheck(name):
    if name == "_math_eval":
        pytest.skip("test-only entry point of the fast-math helpers (tests/test_cpu_math.py)")
    samples = _samples("cpu").get(name)
    assert samples, f"no sample for tgtfast::{name}"
    op = getattr(torch.ops.tgtfast, name).default
    if name == "divergence_fwd" and tgtfast.backends("divergence")["cpp"] != "available":
        pytest.skip("the extension was built without the divergence kernel")
    if name.startswith("sparse_") and tgtfast.backends("sparse_coarse")["cpp"] != "available":
        pytest.skip("the extension was built without the sparse kernels")
    kw = {}
    if name.endswith("_triton") or name.endswith("triton_"):
        if not torch.cuda.is_available():  # the interpreter cannot run a kernel on fake tensors
            kw["test_utils"] = ("test_schema", "test_autograd_registration")
    for args in samples:
        if name.endswith("_triton") or name.endswith("triton_"):
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float64 else a for a in args)
        torch.library.opcheck(op, args, **kw)
