"""Every GPU kernel of tgtfast once, at small shapes, forward and backward: the workload that
``benchmarks/gpu_check.sh`` runs under ``compute-sanitizer`` (memcheck: out-of-bounds and misaligned accesses,
racecheck: shared-memory hazards).

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/gpu_sanitize.py
    python benchmarks/gpu_sanitize.py --device cpu --backends cpp     # the same calls on the CPU (gpu_check --dry-run)

Shapes are chosen to hit the kernels' edges: a class count that is not a multiple of any block (K = 4097, past one
chunk of the row kernels), a misaligned view, ignored rows, and an MLP chain whose widths are not multiples of the
GEMM tiles. Each call's result is checked against the eager reference (loosely: the sanitizer is after memory
errors, the tests after numbers); a failure is printed and the script goes on, exiting 1 at the end.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable, List, Tuple

import torch

import tgtfast
from tgtfast import reference
from tgtfast.tgt.step import perturb_decode_label_mlp


def _grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out.float() * torch.linspace(0.5, 1.5, out.numel(), device=out.device).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=2e-3, atol=2e-3, equal_nan=True, msg=what)


def cases(device: str, backend: str) -> List[Tuple[str, Callable[[], None]]]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    wide_s, wide_t = rnd(6, 4099, scale=3.0), rnd(6, 4099, scale=3.0)
    s, t = wide_s[:, 1:4098], wide_t[:, 1:4098]  # K = 4097, rows 16-byte misaligned
    target = torch.tensor([0, -100, 5, 4096, -100, 7], device=device)
    coeffs = torch.tensor([0.5, -0.2, 1.0, 0.3], device=device)
    out: List[Tuple[str, Callable[[], None]]] = []

    def ptloss():
        got = _grad(lambda x: tgtfast.ptloss(x, t, coeffs, target=target, temperature=1.5, backend=backend), s)
        want = _grad(lambda x: reference.ptloss(x, t, coeffs, target=target, temperature=1.5), s)
        for a, b, w in zip(got, want, ("loss", "grad")):
            _close(a, b, f"ptloss {w}")

    out.append(("ptloss", ptloss))
    for name, kw in (("forward_kl", {}), ("jsd", {"beta": 0.5}), ("tvd", {}), ("ab_divergence",
                                                                              {"alpha": 0.5, "beta": 0.7})):
        def div(name=name, kw=kw):
            got = _grad(lambda x: tgtfast.distill_loss(x, t, name, target=target, temperature=2.0, backend=backend,
                                                       **kw), s)
            want = _grad(lambda x: tgtfast.distill_loss(x, t, name, target=target, temperature=2.0,
                                                        backend="reference", **kw), s)
            for a, b, w in zip(got, want, ("loss", "grad")):
                _close(a, b, f"{name} {w}")

        out.append((f"divergence {name}", div))

    def sparse():
        k = 8
        logp, idx = torch.log_softmax(t.float(), -1).topk(k, dim=-1)
        teacher = tgtfast.SparseTeacher(idx, logp)
        got = _grad(lambda x: tgtfast.distill_loss(x, teacher, "jsd", beta=0.5, target=target, backend=backend), s)
        want = _grad(lambda x: tgtfast.distill_loss(x, teacher, "jsd", beta=0.5, target=target,
                                                    backend="reference"), s)
        for a, b, w in zip(got, want, ("loss", "grad")):
            _close(a, b, f"sparse {w}")

    out.append(("sparse", sparse))

    def softmax():
        x = rnd(5, 8193)
        x[1, :4097] = float("-inf")  # a whole first chunk of -inf
        _close(tgtfast.temperature_softmax(x, 0.7, backend=backend), torch.softmax(x / 0.7, -1), "softmax")

    out.append(("temperature_softmax", softmax))

    def noise():
        z = rnd(37, 19)
        _close(tgtfast.perturb(z, 0.3, seed=11, offset=5, backend=backend),
               z + 0.3 * reference.latent_noise(z.shape, 11, 5).to(device), "perturb")

    out.append(("perturb", noise))

    def mlp_chain():
        def layers(widths, acts):
            return [(rnd(o, i, scale=1.5 / i**0.5), rnd(o, scale=0.3), a)
                    for i, o, a in zip(widths[:-1], widths[1:], acts)]

        dec, lab = layers([19, 67, 33], ["gelu", "sigmoid"]), layers([33, 45, 131], ["silu", "identity"])
        z = rnd(70, 19)
        kw = dict(sigma=0.4, seed=3, temperature=0.7)
        for which in (0, 1):  # through x_new, through the soft labels
            got = _grad(lambda x: perturb_decode_label_mlp(x, dec, lab, backend=backend, **kw)[which], z)
            want = _grad(lambda x: reference.perturb_decode_label_mlp(x, dec, lab, **kw)[which], z)
            for a, b, w in zip(got, want, ("output", "grad")):
                _close(a, b, f"mlp chain {which} {w}")

    out.append(("mlp_chain", mlp_chain))

    def fused_linear():
        h = rnd(37, 24)
        w, ht, wt = rnd(300, 24, scale=0.3), rnd(37, 20), rnd(300, 20, scale=0.3)
        tg = torch.randint(0, 300, (37,), generator=g).to(device)
        got = _grad(lambda x: tgtfast.fused_linear_ptloss(h, x, ht, wt, coeffs[:2], target=tg, ce_weight=0.3,
                                                          chunk_size=8, backend=backend), w)
        want = _grad(lambda x: reference.fused_linear_ptloss(h, x, ht, wt, coeffs[:2], target=tg, ce_weight=0.3), w)
        for a, b, what in zip(got, want, ("loss", "grad weight")):
            _close(a, b, f"fused linear {what}")

    out.append(("fused_linear_ptloss", fused_linear))

    def proxy():
        p = torch.softmax(rnd(9, 5).double(), -1)
        c = torch.tensor([[0.3, -0.1], [0.0, 0.0]], dtype=torch.float64, device=device)
        got = tgtfast.proxy_teacher(p, c, backend=backend)
        want = tgtfast.proxy_teacher(p.cpu(), c.cpu(), backend="reference")
        _close(got.cpu(), want, "proxy teacher")

    out.append(("proxy_teacher", proxy))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to run (default: cuda and triton on a GPU, cpp on the CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    wanted = args.backends or (["cuda", "triton"] if args.device == "cuda" else ["cpp"])
    failed = 0
    for backend in wanted:
        for name, fn in cases(args.device, backend):
            avail = tgtfast.backends(_op_of(name))[backend] if _op_of(name) else "available"
            if avail != "available":
                print(f"{backend:7s} {name:24s} skipped ({avail})")
                continue
            try:
                fn()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                print(f"{backend:7s} {name:24s} ok", flush=True)
            except Exception:  # noqa: BLE001 - report every case, then fail
                failed += 1
                print(f"{backend:7s} {name:24s} FAILED", flush=True)
                traceback.print_exc()
    print(f"gpu_sanitize: {failed} case(s) failed")
    return 1 if failed else 0


def _op_of(case: str):
    """The dispatcher's op name behind a case (for its availability per backend)."""
    return {"ptloss": "ptloss", "temperature_softmax": "temperature_softmax", "perturb": "perturb",
            "mlp_chain": "perturb_decode_label_mlp", "fused_linear_ptloss": "fused_linear_ptloss",
            "proxy_teacher": "proxy_teacher", "sparse": "sparse_coarse"}.get(case, "divergence"
                                                                        if case.startswith("divergence") else None)


if __name__ == "__main__":
    sys.exit(main())
