"""Fused linear PTLoss against the materialised path: time and peak memory of forward+backward.

Variants, on the same inputs (student hidden states and weight with gradients, a frozen teacher):

* ``eager``: the materialised path with autograd, ``tgtfast.reference.fused_linear_ptloss`` (both logits
  ``[N, V]``, then the PTLoss reference);
* ``compile``: ``torch.compile`` of that same function;
* ``fused``: ``tgtfast.fused_linear_ptloss`` (chunked, never ``[N, V]``).

Each variant runs in its own subprocess: one forward+backward at the real shape as warm-up (it also compiles),
then the peak resident set size is reset (``/proc/self/clear_refs``) and the next forward+backward gives the
peak memory above the inputs (``VmHWM`` minus the RSS before it; on a GPU ``torch.cuda.max_memory_allocated``
above the allocation before it) and the first timing; further repeats give the median. The loss and slices of
the gradients are compared with the eager variant's.

    python benchmarks/bench_fused_linear.py                       # the issue's CPU shape (slow: minutes)
    python benchmarks/bench_fused_linear.py --n 512 --v 8000      # a quick look
    python benchmarks/bench_fused_linear.py --device cuda --n 8192 --h 4096 --v 128256 --dtype bfloat16

Targets (issue 7): CPU, N=4096 H=1024 V=32000 float32: fused peak <= 20% of eager's and time <= 1.2x compile's;
GPU, N=8192 H=4096 V=128256 bfloat16: fused peak <= 10% of eager's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

import tgtfast
from tgtfast.bench import _sync
from tgtfast.bench.memory import measure_pass  # the package's own measurement
from tgtfast import reference

VARIANTS = ("eager", "compile", "fused", "chunked_eager", "liger", "matmuls")
_PARAM_NAMES = ("beta", "alpha", "lam", "t")
_SLICE = 256  # rows of the gradients compared across variants


def make_inputs(n: int, h: int, v: int, m: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = h ** -0.5

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    inputs = {
        "hs": rand(n, h).requires_grad_(True),
        "ws": rand(v, h, s=3 * scale).requires_grad_(True),
        "ht": rand(n, h),
        "wt": rand(v, h, s=3 * scale),
    }
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.1] = -100
    coeffs = torch.linspace(-0.5, 2.0, m) if m else None
    return inputs, target.to(device), None if coeffs is None else coeffs.to(device)


def _divergence_params(args) -> Dict[str, float]:
    return {k: getattr(args, k) for k in _PARAM_NAMES if getattr(args, k) is not None}


def _kernel_order(divergence: str, params: Dict[str, float]):
    """The divergence's parameters as the reference takes them (param_a, param_b), through the public checks."""
    from tgtfast.losses.divergence import resolve

    div = resolve(divergence, **params)
    return div.name, div.param_a, div.param_b


def _chunked_eager(x, target, divergence, params, temperature, ce_weight, chunk):
    """Eager PyTorch done chunk by chunk as a careful user would write it: per chunk, the logits, the loss and its
    gradients by autograd (the chunk's logits freed before the next); the gradients handed to backward."""
    name, a, b = _kernel_order(divergence, params)
    hs, ws = x["hs"], x["ws"]
    n = hs.shape[0]
    count = max(int((target != -100).sum()), 1)

    class _Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w):
            grad_h, grad_w, total = torch.empty_like(h), torch.zeros_like(w), h.new_zeros(())
            for start in range(0, n, chunk):
                hc = h[start:start + chunk].detach().requires_grad_(True)
                wd = w.detach().requires_grad_(True)
                tc = target[start:start + chunk]
                with torch.enable_grad():
                    loss = reference.fused_linear_distill_loss(
                        hc, wd, x["ht"][start:start + chunk], x["wt"], name, param_a=a, param_b=b, target=tc,
                        temperature=temperature, ce_weight=ce_weight, reduction="sum") / count
                    gh, gw = torch.autograd.grad(loss, (hc, wd))
                grad_h[start:start + chunk] = gh
                grad_w += gw
                total += loss.detach()
            ctx.save_for_backward(grad_h, grad_w)
            return total

        @staticmethod
        def backward(ctx, g):
            grad_h, grad_w = ctx.saved_tensors
            return grad_h * g, grad_w * g

    return _Fn.apply(hs, ws)


def _liger_step(divergence, params, target, temperature, ce_weight, chunk_size):
    """Liger-Kernel's chunked fused linear JSD (torch.compile'd chunks): JSD(beta), beta = 0 forward KL."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    if divergence not in ("jsd", "forward_kl", "reverse_kl"):
        raise ValueError(f"Liger's fused linear loss has JSD (and KL as its endpoints), not {divergence!r}")
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, params.get("beta", 0.5))
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=ce_weight, weight_soft_loss=1.0, beta=beta, temperature=temperature,
                                 chunk_size=chunk_size or 1024)
    return lambda x: fn(x["hs"], x["ws"], x["ht"], x["wt"], target)


def _matmul_step(chunk_size: Optional[int]):
    """The four products a fused linear loss cannot avoid, chunk by chunk as tgtfast runs them: both logits, the
    hidden-state gradient and the weight gradient (the 'gradient' is a constant buffer, the loss a dummy)."""
    from tgtfast.losses.chunked import default_chunk_size

    def step(x):
        hs, ws, ht, wt = x["hs"].detach(), x["ws"].detach(), x["ht"], x["wt"]
        n, v = hs.shape[0], ws.shape[0]
        chunk = chunk_size or default_chunk_size(v)
        s_buf = torch.empty((min(chunk, n), v), dtype=torch.float32, device=hs.device)
        t_buf = torch.empty_like(s_buf)
        grad_h = torch.empty_like(hs)
        grad_w = torch.zeros_like(ws, dtype=torch.float32)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            s, t = s_buf[: end - start], t_buf[: end - start]
            torch.mm(hs[start:end], ws.t(), out=s)
            torch.mm(ht[start:end], wt.t(), out=t)
            torch.mm(s, ws, out=grad_h[start:end])
            grad_w.addmm_(s.t(), hs[start:end])
        return (grad_h.sum() + grad_w.sum()) * 0 + x["hs"].sum() * 0 + x["ws"].sum() * 0

    return step


def _sparse_step(x, args, target):
    """tgtfast.fused_linear_distill_loss from the teacher's top-k log-probabilities (a SparseTeacher), computed from
    its logits block by block so that the dense teacher logits are never held whole."""
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, args.n, 512):
            lp = torch.log_softmax((x["ht"][start:start + 512] @ x["wt"].t()).float(), -1)
            v, i = lp.topk(args.sparse_k, -1)
            values.append(v)
            indices.append(i.int())
    teacher = tgtfast.SparseTeacher(torch.cat(indices), torch.cat(values))
    div = args.divergence or "forward_kl"
    return lambda x: tgtfast.fused_linear_distill_loss(x["hs"], x["ws"], teacher, div, target=target,
                                                       temperature=args.temperature, ce_weight=args.ce_weight,
                                                       chunk_size=args.chunk_size, **_divergence_params(args))


def make_step(variant: str, coeffs, target, temperature: float, ce_weight: float, chunk_size: Optional[int],
              divergence: Optional[str] = None, params: Optional[Dict[str, float]] = None):
    kw = dict(target=target, temperature=temperature, ce_weight=ce_weight)
    params = params or {}
    if variant == "matmuls":
        return _matmul_step(chunk_size)
    if variant == "liger":
        return _liger_step(divergence or "forward_kl", params, target, temperature, ce_weight, chunk_size)
    if variant == "chunked_eager":
        from tgtfast.losses.chunked import default_chunk_size

        return lambda x: _chunked_eager(x, target, divergence or "forward_kl", params, temperature, ce_weight,
                                        chunk_size or default_chunk_size(x["ws"].shape[0]))
    if divergence is not None:
        name, a, b = _kernel_order(divergence, params)
        if variant == "fused":
            return lambda x: tgtfast.fused_linear_distill_loss(x["hs"], x["ws"], x["ht"], x["wt"], divergence,
                                                               chunk_size=chunk_size, **params, **kw)
        fn = reference.fused_linear_distill_loss
        fn = torch.compile(fn) if variant == "compile" else fn
        return lambda x: fn(x["hs"], x["ws"], x["ht"], x["wt"], name, param_a=a, param_b=b, **kw)
    if variant == "eager":
        return lambda x: reference.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"], coeffs, **kw)
    if variant == "compile":
        fn = torch.compile(reference.fused_linear_ptloss)
        return lambda x: fn(x["hs"], x["ws"], x["ht"], x["wt"], coeffs, **kw)
    if variant == "fused":
        return lambda x: tgtfast.fused_linear_ptloss(x["hs"], x["ws"], x["ht"], x["wt"], coeffs,
                                                     chunk_size=chunk_size, **kw)
    raise ValueError(f"unknown variant {variant!r}")


def _fwd_bwd(step, x) -> torch.Tensor:
    x["hs"].grad = None
    x["ws"].grad = None
    loss = step(x)
    loss.backward()
    return loss.detach()


def run_child(variant: str, args: argparse.Namespace, out_path: str) -> Dict:
    """Runs in the subprocess: warm-up, one measured pass for peak memory and time, then the repeats."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    x, target, coeffs = make_inputs(args.n, args.h, args.v, args.m, dtype, device)
    step = make_step(variant, coeffs, target, args.temperature, args.ce_weight, args.chunk_size, args.divergence,
                     _divergence_params(args))
    if args.sparse_k and variant == "fused":  # the teacher as its cached top-k (made here, before the measurement)
        step = _sparse_step(x, args, target)
    _fwd_bwd(step, x)  # warm-up (and compilation)
    x["hs"].grad = x["ws"].grad = None
    first, loss, peak = measure_pass(lambda: _fwd_bwd(step, x), device)  # tgtfast's reused blocks freed first
    times: List[float] = [first]
    torch.save({"loss": loss.cpu().double(), "grad_hidden": x["hs"].grad[:_SLICE].cpu().double(),
                "grad_weight": x["ws"].grad[:_SLICE].cpu().double()}, out_path)
    for _ in range(args.repeats - 1):
        start = time.perf_counter()
        _fwd_bwd(step, x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"variant": variant, "times_s": times, "median_s": statistics.median(times), "peak_extra_bytes": peak}


def _run_variant(variant: str, argv: List[str], out_path: str) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", variant, "--child-out", out_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"variant": variant, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="rows (tokens)")
    parser.add_argument("--h", type=int, default=1024, help="hidden size (student and teacher)")
    parser.add_argument("--v", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--m", type=int, default=5, help="PTLoss orders (0: plain KL)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--divergence", choices=tgtfast.DIVERGENCES,
                        help="a divergence of tgtfast.distill_loss instead of PTLoss (--m is then ignored)")
    for name in _PARAM_NAMES:
        parser.add_argument(f"--{name}", type=float, help=f"the divergence's {name}")
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (the first also "
                                                                 "measures peak memory)")
    parser.add_argument("--sparse-k", type=int, default=0,
                        help="the fused variant distils from the teacher's top-k log-probabilities (a SparseTeacher "
                             "with a tail bucket) instead of its hidden states; the other variants keep the dense "
                             "teacher")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager", "compile", "fused"],
                        help="what to run, each in its own process (matmuls: the four products alone, the floor; "
                             "liger: Liger-Kernel's chunked fused linear JSD; chunked_eager: eager autograd per "
                             "chunk)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args, args.child_out)))
        return 0

    forwarded = list(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for variant in args.variants:
            path = os.path.join(tmp, f"{variant}.pt")
            row = _run_variant(variant, forwarded, path)
            if "error" not in row:
                results[variant] = torch.load(path)
            rows.append(row)
            print(json.dumps(row), flush=True)
        ref = results.get("eager")
        for row in rows:
            got = results.get(row["variant"])
            if ref is not None and got is not None:
                row["max_abs_diff_vs_eager"] = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    by = {r["variant"]: r for r in rows if "error" not in r}
    what = f"{args.divergence} {_divergence_params(args) or ''}" if args.divergence else f"PTLoss M={args.m}"
    if args.sparse_k:
        what += f" (fused: sparse teacher, top-{args.sparse_k})"
    lines = [f"fused linear {what} fwd+bwd  N={args.n} H={args.h} V={args.v} {args.dtype} on "
             f"{args.device} ({torch.get_num_threads()} threads), repeats={args.repeats}",
             f"{'variant':<14}{'median s':>10}{'min s':>9}{'peak MiB':>10}{'peak/eager':>11}{'time/compile':>13}"
             f"{'time/matmuls':>13}{'peak/liger':>11}  max |diff| vs eager (loss, grad hidden, grad weight)"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<14} failed: {r['error']}")
            continue
        peak_ratio = r["peak_extra_bytes"] / by["eager"]["peak_extra_bytes"] if "eager" in by else float("nan")
        t_ratio = r["median_s"] / by["compile"]["median_s"] if "compile" in by else float("nan")
        if "matmuls" in by:
            r["time_vs_matmuls"] = r["median_s"] / by["matmuls"]["median_s"]
        if "liger" in by:
            r["peak_vs_liger"] = r["peak_extra_bytes"] / max(by["liger"]["peak_extra_bytes"], 1)
        diff = r.get("max_abs_diff_vs_eager")
        diff_txt = "-" if diff is None else ", ".join(f"{diff[k]:.2e}" for k in ("loss", "grad_hidden",
                                                                                   "grad_weight"))
        lines.append(f"{r['variant']:<14}{r['median_s']:>10.2f}{min(r['times_s']):>9.2f}"
                     f"{r['peak_extra_bytes'] / 2**20:>10.0f}{peak_ratio:>11.3f}{t_ratio:>13.2f}"
                     f"{r.get('time_vs_matmuls', float('nan')):>13.2f}{r.get('peak_vs_liger', float('nan')):>11.3f}"
                     f"  {diff_txt}")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": {"N": args.n, "H": args.h, "V": args.v, "M": args.m}, "dtype": args.dtype,
                       "divergence": args.divergence, "params": _divergence_params(args),
                       "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
