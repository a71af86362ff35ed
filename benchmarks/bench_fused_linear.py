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
from tgtfast.bench import _peak_rss_bytes as _hwm, _rss_bytes as _rss, _sync  # the package's own measurement
from tgtfast import reference

VARIANTS = ("eager", "compile", "fused")
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


def make_step(variant: str, coeffs, target, temperature: float, ce_weight: float, chunk_size: Optional[int]):
    kw = dict(target=target, temperature=temperature, ce_weight=ce_weight)
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
    step = make_step(variant, coeffs, target, args.temperature, args.ce_weight, args.chunk_size)
    _fwd_bwd(step, x)  # warm-up (and compilation)
    x["hs"].grad = x["ws"].grad = None
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _rss()
    times: List[float] = []
    start = time.perf_counter()
    loss = _fwd_bwd(step, x)
    _sync(device)
    times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _hwm()) - base
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
    parser.add_argument("--ce-weight", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (the first also "
                                                                 "measures peak memory)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
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
    lines = [f"fused linear PTLoss fwd+bwd  N={args.n} H={args.h} V={args.v} M={args.m} {args.dtype} on "
             f"{args.device} ({torch.get_num_threads()} threads), repeats={args.repeats}",
             f"{'variant':<9}{'median s':>10}{'min s':>9}{'peak MiB':>10}{'peak/eager':>11}{'time/compile':>13}"
             f"  max |diff| vs eager (loss, grad hidden, grad weight)"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<9} failed: {r['error']}")
            continue
        peak_ratio = r["peak_extra_bytes"] / by["eager"]["peak_extra_bytes"] if "eager" in by else float("nan")
        t_ratio = r["median_s"] / by["compile"]["median_s"] if "compile" in by else float("nan")
        diff = r.get("max_abs_diff_vs_eager")
        diff_txt = "-" if diff is None else ", ".join(f"{diff[k]:.2e}" for k in ("loss", "grad_hidden",
                                                                                   "grad_weight"))
        lines.append(f"{r['variant']:<9}{r['median_s']:>10.2f}{min(r['times_s']):>9.2f}"
                     f"{r['peak_extra_bytes'] / 2**20:>10.0f}{peak_ratio:>11.3f}{t_ratio:>13.2f}  {diff_txt}")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": {"N": args.n, "H": args.h, "V": args.v, "M": args.m}, "dtype": args.dtype,
                       "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
